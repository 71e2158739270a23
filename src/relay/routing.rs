//! Which Sprite a session goes to: a watch cache of Users and Sprites
//! (stripped to the fields routing reads, to keep the relay small however
//! many objects the cluster holds) and the pure decision from (user, the
//! requested name, the namespace's Sprites) to a VM and a port.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};

use super::error::Error;
use crate::api::sprite::{ServerSpec, SpriteTemplateSpec};
use crate::api::{Sprite, User};

/// Where a session goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub namespace: String,
    pub user: String,
    /// The Sprite object's name.
    pub sprite: String,
    /// The VM's name on Sprites.dev.
    pub vm: String,
    /// The runtime's port inside the VM.
    pub port: u16,
}

/// Picks the Sprite for `user`. `requested` is the client's `sprite` query
/// parameter; without it the user's primary (`<user>-primary`) or, failing
/// that, their only Sprite. A Sprite that exists but belongs to someone else
/// gets the same answer as one that does not exist, so that names cannot be
/// probed; the caller logs which it was. So does a Sprite whose VM the
/// controller has not confirmed as its own (`status.ownedVm`, written only
/// after it saw the Sprite's UID label on the VM): a name alone never leads
/// a session anywhere (decision 17).
pub fn choose(user: &User, requested: Option<&str>, sprites: &[Arc<Sprite>]) -> Result<Target, Error> {
    const NO_SUCH: Error = Error::Forbidden("no such sprite for this user");
    const NONE: Error = Error::NotFound("this user has no sprite");
    let ns = user.namespace().unwrap_or_default();
    let uname = user.name_any();
    let owned = |s: &Sprite| s.namespace().as_deref() == Some(ns.as_str()) && s.spec.user_ref.name == uname;
    let (sprite, missing) = match requested {
        Some(name) => (
            sprites
                .iter()
                .find(|s| s.name_any() == name && owned(s))
                .ok_or(NO_SUCH)?,
            NO_SUCH,
        ),
        None => {
            let primary = format!("{uname}-primary");
            let mine: Vec<&Arc<Sprite>> = sprites.iter().filter(|s| owned(s)).collect();
            let chosen = match mine.iter().find(|s| s.name_any() == primary) {
                Some(s) => *s,
                None => match mine.as_slice() {
                    [only] => *only,
                    [] => return Err(NONE),
                    _ => return Err(Error::NotFound("several sprites: name one with ?sprite=")),
                },
            };
            (chosen, NONE)
        }
    };
    let Some(vm) = sprite.status.as_ref().and_then(|s| s.owned_vm.as_ref()) else {
        return Err(missing);
    };
    if sprite.spec.suspend {
        return Err(Error::Forbidden("sprite suspended"));
    }
    if sprite.meta().deletion_timestamp.is_some() {
        return Err(Error::Forbidden("sprite is being deleted"));
    }
    // The port the running server was started on: a port changed in spec
    // is followed once the server has moved there.
    let port = sprite.status.as_ref().and_then(|s| s.server_port);
    let port = u16::try_from(port.unwrap_or(sprite.spec.template.server.port))
        .ok()
        .filter(|p| *p != 0)
        .ok_or(Error::Forbidden("sprite has an invalid server port"))?;
    Ok(Target {
        namespace: ns,
        user: uname,
        sprite: sprite.name_any(),
        vm: vm.name.clone(),
        port,
    })
}

/// Whether `name` belongs to another User (for the log line of a refusal).
pub fn owned_by_other(user: &User, name: &str, sprites: &[Arc<Sprite>]) -> bool {
    let uname = user.name_any();
    sprites
        .iter()
        .any(|s| s.name_any() == name && s.spec.user_ref.name != uname)
}

/// Drops what routing never reads: managed fields, annotations, labels,
/// owner references, the template, usage.
pub fn strip_user(u: &mut User) {
    strip_meta(u.meta_mut());
    u.spec.sprite = None;
    u.spec.email.clear();
    if let Some(s) = u.status.as_mut() {
        s.usage = None;
        s.ledger = None;
        s.gateway_secret_ref = None;
        s.conditions.retain(|c| c.type_ == super::auth::DUPLICATE_SUBJECT);
        for c in &mut s.conditions {
            c.message.clear();
        }
    }
}

/// Keeps a Sprite's name, owner, suspension, confirmed VM and port.
pub fn strip_sprite(s: &mut Sprite) {
    strip_meta(s.meta_mut());
    let port = s.spec.template.server.port;
    s.spec.template = SpriteTemplateSpec {
        server: ServerSpec {
            port,
            command: vec![],
            env: vec![],
        },
        ..Default::default()
    };
    if let Some(st) = s.status.take() {
        s.status = Some(crate::api::SpriteStatus {
            owned_vm: st.owned_vm,
            server_port: st.server_port,
            ..Default::default()
        });
    }
}

fn strip_meta(m: &mut kube::api::ObjectMeta) {
    m.managed_fields = None;
    m.annotations = None;
    m.labels = None;
    m.owner_references = None;
    m.finalizers = None;
}

/// The relay's view of Users and Sprites.
#[derive(Clone)]
pub struct Directory {
    users: Store<User>,
    sprites: Store<Sprite>,
    ready: Arc<AtomicBool>,
}

impl Directory {
    /// Watches Users and Sprites (in `namespace`, or everywhere) into
    /// stores. The returned future runs the watches; it ends only when the
    /// process does (the watcher retries with backoff).
    pub fn watch(
        client: kube::Client,
        namespace: Option<&str>,
    ) -> (Directory, impl std::future::Future<Output = ()> + Send + 'static) {
        let (users_api, sprites_api): (Api<User>, Api<Sprite>) = match namespace {
            Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client, ns)),
            None => (Api::all(client.clone()), Api::all(client)),
        };
        let (users, uw) = reflector::store();
        let (sprites, sw) = reflector::store();
        let dir = Directory {
            users: users.clone(),
            sprites: sprites.clone(),
            ready: Arc::new(AtomicBool::new(false)),
        };
        let ready = dir.ready.clone();
        let run = async move {
            let cfg = watcher::Config::default();
            let u = watcher(users_api, cfg.clone())
                .default_backoff()
                .modify(strip_user)
                .reflect(uw)
                .for_each(|e| async move {
                    if let Err(e) = e {
                        tracing::warn!(error = %e, "watching Users");
                    }
                });
            let s = watcher(sprites_api, cfg)
                .default_backoff()
                .modify(strip_sprite)
                .reflect(sw)
                .for_each(|e| async move {
                    if let Err(e) = e {
                        tracing::warn!(error = %e, "watching Sprites");
                    }
                });
            let mark_ready = async move {
                if users.wait_until_ready().await.is_ok() && sprites.wait_until_ready().await.is_ok() {
                    ready.store(true, Ordering::Release);
                    tracing::info!("relay caches synced");
                }
            };
            futures::join!(u, s, mark_ready);
        };
        (dir, run)
    }

    /// A fixed directory, for benchmarks and `--dev-static`: no cluster.
    pub fn fixed(users: Vec<User>, sprites: Vec<Sprite>) -> Directory {
        let (ur, mut uw) = reflector::store();
        let (sr, mut sw) = reflector::store();
        uw.apply_watcher_event(&watcher::Event::Init);
        for mut u in users {
            strip_user(&mut u);
            uw.apply_watcher_event(&watcher::Event::InitApply(u));
        }
        uw.apply_watcher_event(&watcher::Event::InitDone);
        sw.apply_watcher_event(&watcher::Event::Init);
        for mut s in sprites {
            strip_sprite(&mut s);
            sw.apply_watcher_event(&watcher::Event::InitApply(s));
        }
        sw.apply_watcher_event(&watcher::Event::InitDone);
        // The writers may go: the stores keep their last state.
        Directory {
            users: ur,
            sprites: sr,
            ready: Arc::new(AtomicBool::new(true)),
        }
    }

    /// A fixed directory from YAML documents of Users and Sprites (with
    /// their status), for `--dev-static`: development and benchmarks only.
    pub fn fixed_from_yaml(text: &str) -> Result<Directory, Error> {
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(text).map_err(|e| Error::Config(format!("static directory: {e}")))?;
        let (mut users, mut sprites) = (vec![], vec![]);
        for doc in docs {
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            let bad = |e: serde_json::Error| Error::Config(format!("static directory {kind}: {e}"));
            match kind.as_str() {
                "User" => users.push(serde_json::from_value(doc).map_err(bad)?),
                "Sprite" => sprites.push(serde_json::from_value(doc).map_err(bad)?),
                other => {
                    return Err(Error::Config(format!(
                        "static directory: unexpected kind {other:?}"
                    )));
                }
            }
        }
        Ok(Self::fixed(users, sprites))
    }

    /// True once both caches hold a full list.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn users(&self) -> Vec<Arc<User>> {
        self.users.state()
    }

    pub fn sprites_in(&self, namespace: &str) -> Vec<Arc<Sprite>> {
        self.sprites
            .state_filter(|s| s.metadata.namespace.as_deref() == Some(namespace))
    }

    pub fn user(&self, namespace: &str, name: &str) -> Option<Arc<User>> {
        self.users.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn sprite(&self, namespace: &str, name: &str) -> Option<Arc<Sprite>> {
        self.sprites.get(&ObjectRef::new(name).within(namespace))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user(name: &str) -> User {
        serde_json::from_value(json!({
            "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "User",
            "metadata": {"name": name, "namespace": "ns",
                "managedFields": [{"manager": "x", "operation": "Apply"}],
                "annotations": {"a": "b"}},
            "spec": {"email": "a@b.cd", "subject": format!("sub-{name}"), "tier": "free",
                "sprite": {"server": {"port": 9000}}},
            "status": {"gatewayTokenSha256": "00", "sprites": 1,
                "conditions": [{"type": "Ready", "status": "True", "reason": "R", "message": "long text",
                    "lastTransitionTime": "2025-01-01T00:00:00Z"}]}
        }))
        .unwrap()
    }

    /// A Sprite whose VM the controller confirmed (`status.ownedVm`).
    fn sprite(ns: &str, name: &str, owner: Option<&str>, extra: serde_json::Value) -> Arc<Sprite> {
        let mut s = unconfirmed(ns, name, owner, extra);
        s.status = Some(crate::api::SpriteStatus {
            owned_vm: Some(crate::api::sprite::OwnedVm {
                name: s.vm_name(),
                id: format!("id-{name}"),
            }),
            ..Default::default()
        });
        Arc::new(s)
    }

    fn unconfirmed(ns: &str, name: &str, owner: Option<&str>, extra: serde_json::Value) -> Sprite {
        let mut spec = json!({"userRef": {"name": owner.unwrap_or("somebody-else")}});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        serde_json::from_value(json!({
            "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "Sprite",
            "metadata": {"name": name, "namespace": ns}, "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn primary_then_only_sprite_then_named() {
        let alice = user("alice");
        let sprites = vec![
            sprite("ns", "alice-primary", Some("alice"), json!({})),
            sprite(
                "ns",
                "alice-lab",
                Some("alice"),
                json!({"server": {"port": 9000}}),
            ),
            sprite("ns", "bob-primary", Some("bob"), json!({})),
        ];
        let t = choose(&alice, None, &sprites).unwrap();
        assert_eq!(
            (t.sprite.as_str(), t.vm.as_str(), t.port),
            (
                "alice-primary",
                crate::api::sprite::default_vm_name("ns", "alice-primary").as_str(),
                8765
            )
        );
        let t = choose(&alice, Some("alice-lab"), &sprites).unwrap();
        assert_eq!((t.sprite.as_str(), t.port), ("alice-lab", 9000));

        let only = vec![sprite(
            "ns",
            "research",
            Some("alice"),
            json!({"spriteName": "alice-research"}),
        )];
        let t = choose(&alice, None, &only).unwrap();
        assert_eq!(t.vm, "alice-research");

        let two = vec![
            sprite("ns", "a", Some("alice"), json!({})),
            sprite("ns", "b", Some("alice"), json!({})),
        ];
        assert!(matches!(choose(&alice, None, &two), Err(Error::NotFound(_))));
        assert!(matches!(choose(&alice, None, &[]), Err(Error::NotFound(_))));
    }

    #[test]
    fn another_users_sprite_is_refused_like_a_missing_one() {
        let alice = user("alice");
        let sprites = vec![
            sprite("ns", "bob-primary", Some("bob"), json!({})),
            sprite("ns", "orphan", None, json!({})),
            // Same User name in another namespace is another User.
            sprite("other", "alice-primary", Some("alice"), json!({})),
        ];
        for name in ["bob-primary", "orphan", "alice-primary", "nope"] {
            assert!(
                matches!(choose(&alice, Some(name), &sprites), Err(Error::Forbidden(_))),
                "{name}"
            );
        }
        assert!(owned_by_other(&alice, "bob-primary", &sprites));
        assert!(!owned_by_other(&alice, "nope", &sprites));
        assert!(matches!(choose(&alice, None, &sprites), Err(Error::NotFound(_))));
    }

    #[test]
    fn only_a_vm_the_controller_confirmed_is_reached() {
        let alice = user("alice");
        // Named in spec and in status, but not confirmed: refused exactly as
        // a missing Sprite is, on both paths.
        let mut s = unconfirmed(
            "ns",
            "alice-primary",
            Some("alice"),
            json!({"spriteName": "victim-vm"}),
        );
        s.status = Some(crate::api::SpriteStatus {
            sprite_name: Some("victim-vm".into()),
            ..Default::default()
        });
        let s = vec![Arc::new(s)];
        assert_eq!(
            choose(&alice, None, &s).unwrap_err().to_string(),
            choose(&alice, None, &[]).unwrap_err().to_string()
        );
        assert_eq!(
            choose(&alice, Some("alice-primary"), &s).unwrap_err().to_string(),
            choose(&alice, Some("nope"), &s).unwrap_err().to_string()
        );
        // Confirmed: the session goes to the VM status confirmed, whatever
        // the spec names.
        let mut c = (*s[0]).clone();
        c.status = Some(crate::api::SpriteStatus {
            owned_vm: Some(crate::api::sprite::OwnedVm {
                name: "confirmed-vm".into(),
                id: "1".into(),
            }),
            ..Default::default()
        });
        assert_eq!(choose(&alice, None, &[Arc::new(c)]).unwrap().vm, "confirmed-vm");
    }

    #[test]
    fn suspended_sprite_is_refused() {
        let alice = user("alice");
        let s = vec![sprite(
            "ns",
            "alice-primary",
            Some("alice"),
            json!({"suspend": true}),
        )];
        assert!(matches!(choose(&alice, None, &s), Err(Error::Forbidden(_))));
    }

    #[test]
    fn stripping_keeps_what_routing_reads() {
        let mut u = user("alice");
        strip_user(&mut u);
        assert!(u.metadata.managed_fields.is_none() && u.metadata.annotations.is_none());
        assert!(u.spec.sprite.is_none());
        assert_eq!(u.spec.subject, "sub-alice");
        let st = u.status.unwrap();
        assert_eq!(st.gateway_token_sha256.as_deref(), Some("00"));
        assert!(st.conditions.is_empty(), "only DuplicateSubject is kept");

        let mut s = (*sprite(
            "ns",
            "x",
            Some("alice"),
            json!({"server": {"port": 9000, "command": ["a"]}}),
        ))
        .clone();
        s.status = Some(crate::api::SpriteStatus {
            owned_vm: Some(crate::api::sprite::OwnedVm {
                name: "vm".into(),
                id: "1".into(),
            }),
            deployed_version: Some("1".into()),
            ..Default::default()
        });
        strip_sprite(&mut s);
        assert_eq!(s.spec.template.server.port, 9000);
        assert!(s.spec.template.server.command.is_empty());
        assert_eq!(s.spec.user_ref.name, "alice");
        let st = s.status.unwrap();
        assert_eq!(st.owned_vm.map(|v| v.name).as_deref(), Some("vm"));
        assert!(st.deployed_version.is_none());
    }

    #[test]
    fn fixed_directory_serves_lookups() {
        let d = Directory::fixed(
            vec![user("alice")],
            vec![(*sprite("ns", "alice-primary", Some("alice"), json!({}))).clone()],
        );
        assert!(d.is_ready());
        assert_eq!(d.users().len(), 1);
        assert_eq!(d.sprites_in("ns").len(), 1);
        assert!(d.sprites_in("other").is_empty());
        assert!(d.sprite("ns", "alice-primary").is_some());

        let yaml = r#"
apiVersion: sprite-operator.dev/v1alpha1
kind: User
metadata: {name: bench, namespace: bench}
spec: {email: b@e.nch, subject: bench, tier: free}
status: {gatewayTokenSha256: "00"}
---
apiVersion: sprite-operator.dev/v1alpha1
kind: Sprite
metadata: {name: bench-primary, namespace: bench}
spec: {userRef: {name: bench}}
"#;
        let d = Directory::fixed_from_yaml(yaml).unwrap();
        assert_eq!(
            d.users()[0]
                .status
                .as_ref()
                .unwrap()
                .gateway_token_sha256
                .as_deref(),
            Some("00")
        );
        assert!(d.sprite("bench", "bench-primary").is_some());
        assert!(Directory::fixed_from_yaml("kind: Secret").is_err());
    }
}
