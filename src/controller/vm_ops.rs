//! Operations inside a VM: bootstrap steps, the runtime server, updates.
//! Every function here acts through the Sprites.dev exec and filesystem APIs
//! and therefore wakes the VM; callers decide when that is allowed.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use tracing::{info, warn};

use super::context::Context;
use super::error::Error;
use crate::api::sprite::{BootstrapStep, USER_LABEL};
use crate::api::{Sprite, SpriteStatus};
use crate::config::SecretReferences;
use crate::runtime::{self, FileKind, RuntimeBundle};
use crate::sprites::{self, ExecRequest};

const EXEC_PATH: &str = "/workspace/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub(super) fn base_exec(cmd: Vec<String>) -> ExecRequest {
    ExecRequest::new(cmd)
        .env("PATH", EXEC_PATH)
        .env("HOME", runtime::WORKSPACE)
        .env("SPRITE_WORKSPACE", runtime::WORKSPACE)
        .dir(runtime::WORKSPACE)
}

async fn run(ctx: &Context, vm: &str, step: &str, cmd: Vec<String>) -> Result<(), Error> {
    let out = ctx.sprites.exec_collect(vm, &base_exec(cmd)).await?;
    if out.exit_code != 0 {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr
            .chars()
            .rev()
            .take(400)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(Error::Command {
            step: step.to_string(),
            code: out.exit_code,
            stderr: tail,
        });
    }
    Ok(())
}

fn sh(script: String) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script]
}

fn pip_install(ctx: &Context) -> Vec<String> {
    let mut cmd: Vec<String> = vec![
        "/workspace/.venv/bin/pip".into(),
        "install".into(),
        "-q".into(),
        "--disable-pip-version-check".into(),
    ];
    cmd.extend(ctx.config.pip_args.iter().cloned());
    cmd.extend(["-r".into(), runtime::REQUIREMENTS_PATH.into()]);
    cmd
}

/// Writes files concurrently: the filesystem API takes one file per call,
/// so independent uploads are the fewest sequential round trips.
async fn write_files<'a>(
    ctx: &Context,
    vm: &str,
    files: impl Iterator<Item = &'a runtime::RuntimeFile>,
) -> Result<(), Error> {
    let writes = files.map(|f| {
        ctx.sprites
            .write_file(vm, &f.path, f.contents.clone(), 0o644, true)
    });
    for r in futures::future::join_all(writes).await {
        r?;
    }
    Ok(())
}

pub async fn bootstrap_step(
    ctx: &Context,
    vm: &str,
    step: BootstrapStep,
    bundle: &RuntimeBundle,
) -> Result<(), Error> {
    match step {
        BootstrapStep::Directories => {
            let mut cmd = vec!["mkdir".to_string(), "-p".to_string()];
            cmd.extend(runtime::DIRECTORIES.iter().map(|d| d.to_string()));
            run(ctx, vm, "directories", cmd).await
        }
        BootstrapStep::Venv => {
            // Ubuntu on Sprites.dev may lack python3-venv; install it only then.
            let script = "test -x /workspace/.venv/bin/python3 || python3 -m venv /workspace/.venv || \
                          { sudo apt-get install -y python3-venv && python3 -m venv /workspace/.venv; }";
            run(ctx, vm, "venv", sh(script.into())).await
        }
        BootstrapStep::Requirements => write_files(ctx, vm, bundle.of_kind(FileKind::Requirements)).await,
        BootstrapStep::PipInstall => run(ctx, vm, "pip install", pip_install(ctx)).await,
        BootstrapStep::RuntimeFiles => write_files(ctx, vm, bundle.of_kind(FileKind::Code)).await,
        BootstrapStep::Schema => {
            if !bundle.has_db_init() {
                return Ok(());
            }
            run(
                ctx,
                vm,
                "schema",
                vec![
                    runtime::VENV_PYTHON.into(),
                    "/workspace/src/db.py".into(),
                    "init".into(),
                ],
            )
            .await
        }
        BootstrapStep::MemoryTemplates => write_missing_templates(ctx, vm, bundle).await,
        BootstrapStep::Version => {
            ctx.sprites
                .write_file(
                    vm,
                    runtime::VERSION_PATH,
                    format!("{}\n", bundle.version).into_bytes(),
                    0o644,
                    true,
                )
                .await?;
            Ok(())
        }
    }
}

/// Memory files belong to the user once written: templates only fill gaps.
async fn write_missing_templates(ctx: &Context, vm: &str, bundle: &RuntimeBundle) -> Result<(), Error> {
    let existing: Vec<String> = match ctx.sprites.list_dir(vm, "/workspace/memory").await {
        Ok(entries) => entries.into_iter().map(|e| e.path).collect(),
        Err(sprites::Error::NotFound { .. }) => vec![],
        Err(e) => return Err(e.into()),
    };
    let missing = bundle
        .of_kind(FileKind::MemoryTemplate)
        .filter(|f| !existing.iter().any(|p| p == &f.path));
    write_files(ctx, vm, missing).await
}

/// Starts the runtime server detached, surviving the socket's close
/// (`max_run_after_disconnect=0`). Its environment goes through a 0600 file,
/// never through the exec URL (decision 6).
pub(super) async fn start_server(sprite: &Sprite, ctx: &Context, vm: &str) -> Result<String, Error> {
    let ns = sprite.namespace().unwrap_or_default();
    let server = &sprite.spec.template.server;
    let mut lines = vec![format!("export SPRITE_PORT={}", server.port)];
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    for var in &server.env {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => {
                let r = &from.secret_key_ref;
                secret_value(&secrets, &r.name, &r.key, &ctx.config.secret_references).await?
            }
            (None, None) => String::new(),
        };
        lines.push(format!("export {}={}", var.name, shell_quote(&value)));
    }
    let body = lines.join("\n") + "\n";
    ctx.sprites
        .write_file(vm, runtime::SERVER_ENV_PATH, body.into_bytes(), 0o600, true)
        .await?;
    let mut cmd = sh(format!(". {} && exec \"$@\"", runtime::SERVER_ENV_PATH));
    cmd.push("sh".into());
    cmd.extend(server.command.iter().cloned());
    let req = base_exec(cmd).max_run_after_disconnect(Duration::ZERO);
    let id = ctx.sprites.exec_detached(vm, &req).await?;
    info!(sprite = %sprite.name_any(), session = %id, "runtime server started");
    Ok(id)
}

/// A referenced Secret, read on demand (the controller watches no Secret
/// data) and only when the platform's rule lets Sprites name it.
async fn secret_value(
    secrets: &Api<Secret>,
    name: &str,
    key: &str,
    rule: &SecretReferences,
) -> Result<String, Error> {
    let secret = secrets
        .get_opt(name)
        .await?
        .ok_or_else(|| Error::Secret(format!("{name} not found")))?;
    if let Err(why) = secret_allowed(&secret, rule) {
        return Err(Error::SecretRefused {
            name: name.to_string(),
            why,
        });
    }
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(v.0.clone())
            .map_err(|_| Error::Secret(format!("{name}/{key} is not UTF-8")));
    }
    if let Some(v) = secret.string_data.as_ref().and_then(|d| d.get(key)) {
        return Ok(v.clone());
    }
    Err(Error::Secret(format!("{name} has no key {key}")))
}

/// Whether a Sprite may have this Secret's values: never a User's gateway
/// Secret (that is another tenant's credential, whoever wrote the Sprite)
/// nor a service-account token; otherwise as the platform's rule says.
pub fn secret_allowed(secret: &Secret, rule: &SecretReferences) -> Result<(), String> {
    let labels = secret.metadata.labels.as_ref();
    let owned_by_user = secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "User" && o.api_version.starts_with(crate::api::GROUP));
    if owned_by_user || labels.is_some_and(|l| l.contains_key(USER_LABEL)) {
        return Err("it is a User's gateway Secret".into());
    }
    if secret.type_.as_deref() == Some("kubernetes.io/service-account-token") {
        return Err("it is a service-account token".into());
    }
    if let Some((key, value)) = rule.required() {
        let has = labels
            .and_then(|l| l.get(key))
            .is_some_and(|v| value.is_none_or(|want| v == want));
        if !has {
            return Err(format!(
                "it lacks the label {} that the operator requires (secretReferences.requiredLabel)",
                rule.required_label.trim()
            ));
        }
    }
    Ok(())
}

fn shell_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "'\\''"))
}

/// Moves a bootstrapped VM to the desired runtime: checkpoint, files, pip,
/// schema, server restart, VERSION last; on failure restore the checkpoint.
pub(super) async fn update(
    sprite: &Sprite,
    ctx: &Context,
    vm: &str,
    bundle: &RuntimeBundle,
    status: &mut SpriteStatus,
) -> Result<(), Error> {
    let policy = &sprite.spec.template.update_policy;
    let checkpoint = if policy.checkpoint_before_update {
        let comment = format!("sprite-operator: before update to {}", bundle.version);
        let id = ctx.sprites.create_checkpoint(vm, &comment).await?;
        status.last_checkpoint = Some(id.clone());
        Some(id)
    } else {
        None
    };
    // An update is the bootstrap from the requirements on: every step is
    // idempotent, memory templates fill only gaps, VERSION comes last.
    let result = async {
        for step in BootstrapStep::ALL
            .into_iter()
            .filter(|s| *s >= BootstrapStep::Requirements)
        {
            bootstrap_step(ctx, vm, step, bundle).await?;
        }
        Ok::<(), Error>(())
    }
    .await;
    match result {
        Ok(()) => {
            if let Some(id) = status.server_session_id.take() {
                let _ = ctx.sprites.kill_session(vm, &id, "SIGTERM").await;
            }
            status.server_session_id = Some(start_server(sprite, ctx, vm).await?);
            status.deployed_version = Some(bundle.version.clone());
            info!(sprite = %sprite.name_any(), version = %bundle.version, "runtime updated");
            Ok(())
        }
        Err(e) => {
            if let (Some(id), true) = (&checkpoint, policy.rollback_on_failure) {
                ctx.sprites.restore_checkpoint(vm, id).await?;
                // Restore ends exec sessions, the server's included.
                status.server_session_id = None;
                warn!(sprite = %sprite.name_any(), checkpoint = %id, error = %e, "update failed; checkpoint restored");
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(v: serde_json::Value) -> Secret {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn only_secrets_the_rule_allows_reach_a_vm() {
        let rule = SecretReferences::default();
        let labelled = secret(serde_json::json!({"metadata": {"name": "k",
            "labels": {"sprite-operator.dev/sprite-env": "true"}}}));
        assert!(secret_allowed(&labelled, &rule).is_ok());
        let plain = secret(serde_json::json!({"metadata": {"name": "k"}}));
        assert!(
            secret_allowed(&plain, &rule)
                .unwrap_err()
                .contains("lacks the label")
        );
        let wrong = secret(serde_json::json!({"metadata": {"name": "k",
            "labels": {"sprite-operator.dev/sprite-env": "false"}}}));
        assert!(secret_allowed(&wrong, &rule).is_err());

        let open = SecretReferences {
            required_label: String::new(),
        };
        assert!(secret_allowed(&plain, &open).is_ok());
        // Never, whatever the rule: a gateway Secret (by label or owner) or
        // a service-account token, even when it carries the label.
        let gateway = secret(serde_json::json!({"metadata": {"name": "bob-gateway",
            "labels": {"sprite-operator.dev/user": "bob", "sprite-operator.dev/sprite-env": "true"}}}));
        assert!(secret_allowed(&gateway, &open).is_err());
        let owned = secret(serde_json::json!({"metadata": {"name": "x", "ownerReferences": [{
            "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "User", "name": "bob", "uid": "1"}]}}));
        assert!(secret_allowed(&owned, &open).is_err());
        let sa = secret(serde_json::json!({"metadata": {"name": "t"},
            "type": "kubernetes.io/service-account-token"}));
        assert!(secret_allowed(&sa, &open).is_err());
    }

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote("a'b"), "'a'\\''b'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }
}
