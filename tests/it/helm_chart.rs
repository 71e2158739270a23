//! The Helm chart (charts/sprite-operator): its CRDs are byte copies of
//! crds/, it lints and renders with the default and the "every option"
//! values, the real kube-apiserver accepts what it renders (server-side dry
//! run), it installs, and the controller's and relay's ServiceAccounts get
//! exactly the access the code needs: the allowed calls succeed and calls
//! outside the rules are forbidden.
//!
//! The controller also runs in-process with its ServiceAccount's token (no
//! kubelet here, so no pod runs) and reconciles the examples to Ready, which
//! proves the rules are sufficient as well as narrow. `helm test` needs
//! running pods and belongs to the kind e2e.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};
use sprite_operator::api::{Sprite, User, session};
use sprite_operator::config::OperatorConfig;

use crate::common::{TestNs, say, unavailable_reason};

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/sprite-operator")
}

fn full_values() -> PathBuf {
    chart_dir().join("ci/values-full.yaml")
}

/// `*.yaml` files of a folder, by name.
fn yaml_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn chart_crds_are_byte_copies_of_the_generated_crds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let generated = yaml_files(&root.join("crds"));
    let copies = yaml_files(&chart_dir().join("crds"));
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert!(!generated.is_empty(), "crds/ is empty");
    assert_eq!(
        names(&generated),
        names(&copies),
        "charts/sprite-operator/crds/ must hold exactly the files of crds/ (cp crds/*.yaml charts/sprite-operator/crds/)"
    );
    for ((name, a), (_, b)) in generated.iter().zip(&copies) {
        assert!(
            a == b,
            "charts/sprite-operator/crds/{name} differs from crds/{name}: copy it again (cp crds/*.yaml charts/sprite-operator/crds/)"
        );
    }
}

/// A binary built with the control plane (helm, kubectl), or None when the
/// control plane is not available here (the reason was printed; in CI this
/// panics instead).
fn tool(name: &str) -> Option<PathBuf> {
    if let Some(why) = unavailable_reason() {
        say(&format!("skipped: {why}"));
        return None;
    }
    let path = PathBuf::from(std::env::var_os("KUBEBUILDER_ASSETS").unwrap()).join(name);
    assert!(
        path.is_file(),
        "{} is missing: `make controlplane` builds it",
        path.display()
    );
    Some(path)
}

/// Runs helm with its state in a temp dir (never the user's ~/.config/helm).
fn helm(helm: &Path, home: &Path, args: &[&str]) -> Output {
    Command::new(helm)
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .args(args)
        .output()
        .expect("run helm")
}

fn ok(what: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn docs(rendered: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(rendered)
        .expect("rendered manifests parse")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name_suffix: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .ends_with(name_suffix)
        })
        .unwrap_or_else(|| panic!("no {kind} named *{name_suffix} among the rendered objects"))
}

/// The operator config the chart renders must load in the controller.
fn rendered_config(docs: &[Value]) -> OperatorConfig {
    let cm = find(docs, "ConfigMap", "-config");
    let text = cm["data"]["config.yaml"].as_str().expect("config.yaml key");
    OperatorConfig::from_yaml(text)
        .unwrap_or_else(|e| panic!("the rendered config does not load: {e}\n{text}"))
}

/// The restricted securityContext every container but the simulator's has.
fn assert_restricted(deploy: &Value) {
    let pod = &deploy["spec"]["template"]["spec"];
    let name = deploy["metadata"]["name"].as_str().unwrap();
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
    for c in pod["containers"].as_array().unwrap() {
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        assert!(sc.get("privileged").is_none_or(|p| p == false), "{name}");
    }
}

fn args(deploy: &Value) -> Vec<String> {
    deploy["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn chart_lints_and_renders() {
    let Some(helm_bin) = tool("helm") else { return };
    let home = tempfile::tempdir().unwrap();
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    let full = full_values();
    let full = full.to_str().unwrap();

    ok(
        "helm lint (defaults)",
        helm(
            &helm_bin,
            home.path(),
            &["lint", "--strict", chart, "--set", "sprites.token=x"],
        ),
    );
    ok(
        "helm lint (values-full)",
        helm(&helm_bin, home.path(), &["lint", "--strict", chart, "-f", full]),
    );

    // Defaults: cluster-wide RBAC, restricted pods, the real API, no sim.
    // `helm template rel <chart> --namespace ops --set sprites.token=x`, then `extra`.
    let in_ops = |what: &str, extra: &[&str]| {
        let mut argv = vec![
            "template",
            "rel",
            chart,
            "--namespace",
            "ops",
            "--set",
            "sprites.token=x",
        ];
        argv.extend_from_slice(extra);
        docs(&ok(what, helm(&helm_bin, home.path(), &argv)))
    };
    let d = in_ops("helm template (defaults)", &[]);
    let controller = find(&d, "Deployment", "-controller");
    assert_restricted(controller);
    assert_restricted(find(&d, "Deployment", "-relay"));
    let a = args(controller);
    assert!(
        a.contains(&"--sprites-api-url=https://api.sprites.dev".to_string()),
        "{a:?}"
    );
    assert!(a.contains(&"--leader-election=true".to_string()), "{a:?}");
    assert!(
        !d.iter()
            .any(|x| x["kind"] == "Deployment" && x["metadata"]["name"] == "rel-sprite-operator-sim")
    );
    assert!(!d.iter().any(|x| x["kind"] == "ServiceMonitor"));
    for kind in [
        "ClusterRole",
        "ClusterRoleBinding",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ] {
        assert!(d.iter().any(|x| x["kind"] == kind), "no {kind} rendered");
    }
    let lease_role = find(&d, "Role", "-leader-election");
    assert_eq!(lease_role["metadata"]["namespace"], "ops");
    // Session Leases: both components are told the release namespace, where
    // the relay may write Leases; it writes nothing of sprite-operator.dev
    // (a Sprite's spec decides what runs in a tenant's VM).
    for component in ["-controller", "-relay"] {
        let a = args(find(&d, "Deployment", component));
        assert!(
            a.contains(&"--session-lease-namespace=ops".to_string()),
            "{component}: {a:?}"
        );
    }
    assert_eq!(
        find(&d, "Role", "-relay-session-leases")["metadata"]["namespace"],
        "ops"
    );
    for rule in find(&d, "ClusterRole", "-relay")["rules"].as_array().unwrap() {
        assert_eq!(
            rule["verbs"],
            json!(["get", "list", "watch"]),
            "relay rule {rule}"
        );
    }
    assert_eq!(rendered_config(&d), OperatorConfig::default());
    let secret = find(&d, "Secret", "-sprites-token");
    assert_eq!(secret["data"]["token"], "eA==");

    // No token and no simulator: the render fails and says what to set.
    let out = helm(&helm_bin, home.path(), &["template", "rel", chart]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "rendered without a token");
    assert!(
        stderr.contains("sprites.existingSecret") && stderr.contains("sprites.token"),
        "{stderr}"
    );

    // A misspelt value is an error (strict schema).
    // `helm template rel <chart> --set sprites.token=x --set <set>`.
    let with_token = |set: &str| {
        helm(
            &helm_bin,
            home.path(),
            &["template", "rel", chart, "--set", "sprites.token=x", "--set", set],
        )
    };
    let out = with_token("relay.idelTimeout=1m");
    assert!(!out.status.success(), "the schema accepted an unknown key");

    // JWT verification without an issuer and an audience would accept a token
    // the identity provider minted for any of its applications: the render
    // fails and names what is missing...
    for (set, missing) in [
        (
            "relay.jwt.hs256SecretName=jwt",
            "relay.jwt.issuer, relay.jwt.audience",
        ),
        (
            "relay.jwt.jwksConfigMap=jwks,relay.jwt.issuer=idp",
            "relay.jwt.audience",
        ),
    ] {
        let out = with_token(set);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "rendered with {set}");
        assert!(
            stderr.contains(&format!("these are empty: {missing}."))
                && stderr.contains("relay.jwt.allowMissingIssuerAndAudience=true"),
            "{stderr}"
        );
    }
    // ...unless the escape hatch is set (NOTES then warn:
    // rendered_manifests_pass_server_side_dry_run).
    ok(
        "helm template (JWT without iss/aud, allowed)",
        with_token("relay.jwt.hs256SecretName=jwt,relay.jwt.allowMissingIssuerAndAudience=true"),
    );

    // Without leader election the controller still reads the session Leases
    // (its own Role), and an empty requiredLabel reaches the config as "".
    let d = in_ops(
        "helm template (no leader election, any Secret)",
        &[
            "--set",
            "controller.leaderElection=false",
            "--set-string",
            "secretReferences.requiredLabel=",
        ],
    );
    assert!(!d.iter().any(|x| {
        x["kind"] == "Role"
            && x["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with("-leader-election"))
    }));
    let reader = find(&d, "Role", "-controller-session-leases");
    assert_eq!(reader["metadata"]["namespace"], "ops");
    assert_eq!(reader["rules"][0]["verbs"], json!(["get", "list", "watch"]));
    assert_eq!(rendered_config(&d).secret_references.required_label, "");

    // The simulator alone: the API URL and the token default to it, and only
    // its container is privileged.
    let d = docs(&ok(
        "helm template (sim)",
        helm(
            &helm_bin,
            home.path(),
            &[
                "template",
                "rel",
                chart,
                "--namespace",
                "ops",
                "--set",
                "sim.enabled=true",
            ],
        ),
    ));
    let a = args(find(&d, "Deployment", "-controller"));
    assert!(
        a.contains(&"--sprites-api-url=http://rel-sprite-operator-sim.ops.svc:7070".to_string()),
        "{a:?}"
    );
    let vol = &find(&d, "Deployment", "-controller")["spec"]["template"]["spec"]["volumes"];
    assert!(
        vol.to_string()
            .contains("\"secretName\":\"rel-sprite-operator-sim\""),
        "{vol}"
    );
    let sim = find(&d, "Deployment", "-sim");
    assert_eq!(
        sim["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"],
        true
    );
    assert_eq!(
        sim["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );
    assert_eq!(
        rendered_config(&d).pip_args,
        ["--no-index", "--find-links", "/opt/wheelhouse"],
        "with the sim, pip uses the sim image's wheelhouse"
    );

    // Every option: namespaced RBAC, the existing Secret wins, capabilities
    // instead of privileged, ServiceMonitors, the config carries the tiers.
    let d = docs(&ok(
        "helm template (values-full)",
        helm(
            &helm_bin,
            home.path(),
            &["template", "rel", chart, "--namespace", "ops", "-f", full],
        ),
    ));
    assert!(
        !d.iter()
            .any(|x| x["kind"] == "ClusterRole" || x["kind"] == "ClusterRoleBinding")
    );
    assert_eq!(
        find(&d, "Role", "-controller")["metadata"]["namespace"],
        "tenants"
    );
    let controller = find(&d, "Deployment", "-controller");
    assert_restricted(controller);
    assert!(args(controller).contains(&"--namespace=tenants".to_string()));
    assert!(controller.to_string().contains("\"secretName\":\"sprites-api\""));
    let sim_sc =
        &find(&d, "Deployment", "-sim")["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(sim_sc["privileged"], false);
    assert_eq!(sim_sc["capabilities"]["add"], json!(["SYS_ADMIN", "NET_ADMIN"]));
    assert_eq!(d.iter().filter(|x| x["kind"] == "ServiceMonitor").count(), 2);
    let cfg = rendered_config(&d);
    assert_eq!(cfg.tier(sprite_operator::api::Tier::Starter).max_sprites, 3);
    assert_eq!(cfg.idle_tail, std::time::Duration::from_secs(20));
    assert_eq!(cfg.pip_args, ["--no-index", "--find-links", "/wheels"]);
    assert_eq!(
        cfg.secret_references.required_label,
        "platform.example.com/vm-env=allowed"
    );
}

/// `kubectl apply --dry-run=server` of rendered manifests: the apiserver
/// validates every object against its real schemas (and admission).
fn server_dry_run(ns: &TestNs, kubectl: &Path, docs: Vec<Value>) -> String {
    // The ServiceMonitor CRD (Prometheus Operator) is not installed here;
    // its shape is checked in chart_lints_and_renders.
    let items: Vec<Value> = docs
        .into_iter()
        .filter(|d| d["kind"] != "ServiceMonitor")
        .collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    let mut child = Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(ns.plane.kubeconfig_path())
        .args(["apply", "--dry-run=server", "-o", "name", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(list.to_string().as_bytes())
        .unwrap();
    ok(
        "kubectl apply --dry-run=server",
        child.wait_with_output().unwrap(),
    )
}

#[tokio::test]
async fn rendered_manifests_pass_server_side_dry_run() {
    let Some(ns) = TestNs::new("helm-dry").await else {
        return;
    };
    let (helm_bin, kubectl) = (tool("helm").unwrap(), tool("kubectl").unwrap());
    let home = tempfile::tempdir().unwrap();
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    let full = full_values();
    let release = format!("dry{}", &ns.name[ns.name.len() - 8..]);

    let defaults = docs(&ok(
        "helm template (defaults)",
        helm(
            &helm_bin,
            home.path(),
            &[
                "template",
                &release,
                chart,
                "--namespace",
                &ns.name,
                "--set",
                "sprites.token=x",
            ],
        ),
    ));
    let n = defaults.len();
    let applied = server_dry_run(&ns, &kubectl, defaults);
    assert_eq!(applied.lines().count(), n, "{applied}");

    let watch = format!("watchNamespace={}", ns.name);
    let full_docs = docs(&ok(
        "helm template (values-full)",
        helm(
            &helm_bin,
            home.path(),
            &[
                "template",
                &release,
                chart,
                "--namespace",
                &ns.name,
                "-f",
                full.to_str().unwrap(),
                "--set",
                &watch,
            ],
        ),
    ));
    let applied = server_dry_run(&ns, &kubectl, full_docs);
    for kind in [
        "deployment.apps/",
        "role.rbac.authorization.k8s.io/",
        "poddisruptionbudget.policy/",
        "pod/",
    ] {
        assert!(applied.contains(kind), "no {kind} in the dry run:\n{applied}");
    }

    // NOTES: `helm template` leaves them out, and a client dry run of
    // `helm install` still asks the apiserver for its capabilities, so they
    // are checked here. JWT verification without iss/aud accepts tokens the
    // identity provider minted for any of its applications: NOTES say so...
    let kubeconfig = ns.plane.kubeconfig_path().to_str().unwrap().to_string();
    let notes = |extra: &[&str]| {
        let mut argv = vec![
            "install",
            release.as_str(),
            chart,
            "--dry-run=client",
            "--kubeconfig",
            kubeconfig.as_str(),
            "--namespace",
            ns.name.as_str(),
        ];
        argv.extend_from_slice(extra);
        ok(
            "helm install --dry-run=client",
            helm(&helm_bin, home.path(), &argv),
        )
    };
    let out = notes(&[
        "--set",
        "sprites.token=x",
        "--set",
        "relay.jwt.hs256SecretName=jwt,relay.jwt.allowMissingIssuerAndAudience=true",
    ]);
    assert!(
        out.contains(
            "WARNING: the relay verifies JWTs WITHOUT checking the issuer (iss) or the audience (aud)"
        ),
        "{out}"
    );
    // ...and only then: values-full sets the escape hatch, but an issuer and
    // an audience too. (helm maps every object to an API resource here, and
    // the ServiceMonitor CRD is not installed.)
    let out = notes(&[
        "-f",
        full.to_str().unwrap(),
        "--set",
        watch.as_str(),
        "--set",
        "metrics.serviceMonitor.enabled=false",
    ]);
    assert!(out.contains("NOTES:"), "{out}");
    assert!(!out.contains("WARNING: the relay verifies JWTs"), "{out}");
}

/// A client that authenticates as `sa` in `ns` with a fresh bound token,
/// against the test plane's apiserver (its CA from the admin kubeconfig).
async fn client_as(ns: &TestNs, sa: &str) -> kube::Client {
    let request: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}})).unwrap();
    let token = Api::<ServiceAccount>::namespaced(ns.client.clone(), &ns.name)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("token for {sa}: {e}"))
        .status
        .expect("token status")
        .token
        .expect("a token");
    let mut kc = Kubeconfig::read_from(ns.plane.kubeconfig_path()).expect("kubeconfig");
    for named in &mut kc.auth_infos {
        named.auth_info = Some(AuthInfo {
            token: Some(token.clone().into()),
            ..Default::default()
        });
    }
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    assert_eq!(
        config.cluster_url.to_string().trim_end_matches('/'),
        ns.plane.server()
    );
    kube::Client::try_from(config).expect("client")
}

fn is_forbidden<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> bool {
    matches!(r, Err(kube::Error::Api(ref e)) if e.code == 403)
}

/// SelfSubjectAccessReview: may the client's user do `verb` on `resource`?
async fn can(client: &kube::Client, verb: &str, group: &str, resource: &str, ns: Option<&str>) -> bool {
    let (resource, sub) = resource
        .split_once('/')
        .map_or((resource, None), |(r, s)| (r, Some(s)));
    let review: SelfSubjectAccessReview = serde_json::from_value(json!({
        "spec": {"resourceAttributes": {
            "verb": verb, "group": group, "resource": resource, "subresource": sub, "namespace": ns,
        }}
    }))
    .unwrap();
    Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SelfSubjectAccessReview")
        .status
        .expect("review status")
        .allowed
}

#[tokio::test]
async fn helm_install_and_least_privilege_rbac() {
    let Some(ns) = TestNs::new("helm-install").await else {
        return;
    };
    let helm_bin = tool("helm").unwrap();
    let home = tempfile::tempdir().unwrap();
    let chart = chart_dir();
    // A release name of its own, so that parallel tests' cluster-scoped
    // objects (ClusterRoles, bindings) never clash.
    let release = format!("it{}", &ns.name[ns.name.len() - 8..]);
    let kubeconfig = ns.plane.kubeconfig_path().to_str().unwrap().to_string();
    let installed = helm(
        &helm_bin,
        home.path(),
        &[
            "install",
            &release,
            chart.to_str().unwrap(),
            "--kubeconfig",
            &kubeconfig,
            "--namespace",
            &ns.name,
            "--set",
            "sprites.token=test-token",
            "--set",
            "relay.replicas=1",
        ],
    );
    ok("helm install", installed);

    let fullname = format!("{release}-sprite-operator");
    let sa_controller = format!("{fullname}-controller");
    let sa_relay = format!("{fullname}-relay");
    let sas = Api::<ServiceAccount>::namespaced(ns.client.clone(), &ns.name);
    for sa in [&sa_controller, &sa_relay] {
        sas.get(sa)
            .await
            .unwrap_or_else(|e| panic!("ServiceAccount {sa}: {e}"));
    }

    // Fixtures made by the admin: a Sprite, a ConfigMap, a Secret.
    let sprite: Sprite = serde_json::from_value(json!({
        "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "Sprite",
        "metadata": {"name": "rbac-probe"}, "spec": {"userRef": {"name": "rbac-probe"}},
    }))
    .unwrap();
    ns.api::<Sprite>()
        .create(&PostParams::default(), &sprite)
        .await
        .expect("create Sprite");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "runtime"}, "data": {"VERSION": "1"}})).unwrap();
    ns.api::<ConfigMap>()
        .create(&PostParams::default(), &cm)
        .await
        .expect("create ConfigMap");

    // The controller, with its own token: everything the code does works...
    let c = client_as(&ns, &sa_controller).await;
    Api::<Sprite>::all(c.clone())
        .list(&ListParams::default())
        .await
        .expect("controller lists Sprites");
    Api::<User>::all(c.clone())
        .list(&ListParams::default())
        .await
        .expect("controller lists Users");
    let sprites = Api::<Sprite>::namespaced(c.clone(), &ns.name);
    sprites
        .patch_status(
            "rbac-probe",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"wakes": 0}})),
        )
        .await
        .expect("controller patches sprites/status");
    Api::<ConfigMap>::namespaced(c.clone(), &ns.name)
        .get("runtime")
        .await
        .expect("controller gets ConfigMaps");
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "gateway-probe"}, "stringData": {"token": "t"}}))
            .unwrap();
    let secrets = Api::<Secret>::namespaced(c.clone(), &ns.name);
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("controller creates Secrets");
    let lease: Lease =
        serde_json::from_value(json!({"metadata": {"name": "sprite-operator-controller"}, "spec": {}}))
            .unwrap();
    Api::<Lease>::namespaced(c.clone(), &ns.name)
        .create(&PostParams::default(), &lease)
        .await
        .expect("controller creates its Lease in the release namespace");
    // The relay's session Leases, listed the way the controller watches them.
    Api::<Lease>::namespaced(c.clone(), &ns.name)
        .list(&ListParams::default().labels(&format!("{}=true", session::SESSION_LABEL)))
        .await
        .expect("controller lists session Leases in the release namespace");

    // ...and nothing else.
    assert!(
        is_forbidden(secrets.delete("gateway-probe", &DeleteParams::default()).await),
        "the controller may delete Secrets"
    );
    assert!(
        is_forbidden(
            Api::<Pod>::namespaced(c.clone(), &ns.name)
                .list(&ListParams::default())
                .await
        ),
        "the controller may list Pods"
    );
    assert!(
        is_forbidden(sprites.delete("rbac-probe", &DeleteParams::default()).await),
        "the controller may delete Sprites"
    );
    assert!(
        is_forbidden(
            Api::<Lease>::namespaced(c.clone(), "default")
                .create(&PostParams::default(), &lease)
                .await
        ),
        "the controller may write Leases outside the release namespace"
    );
    assert!(
        !can(&c, "list", "coordination.k8s.io", "leases", Some("default")).await,
        "the controller may read Leases outside the release namespace"
    );
    let n = Some(ns.name.as_str());
    let matrix: &[(&str, &str, &str, bool)] = &[
        ("watch", "sprite-operator.dev", "sprites", true),
        ("create", "sprite-operator.dev", "sprites", true),
        ("update", "sprite-operator.dev", "users", true),
        ("create", "sprite-operator.dev", "users", false),
        ("delete", "sprite-operator.dev", "users", false),
        ("update", "sprite-operator.dev", "users/status", true),
        ("watch", "", "secrets", true),
        ("update", "", "secrets", false),
        ("patch", "", "secrets", false),
        ("create", "", "configmaps", false),
        ("create", "events.k8s.io", "events", true),
        ("patch", "events.k8s.io", "events", true),
        ("create", "", "events", false),
        ("watch", "coordination.k8s.io", "leases", true),
        ("delete", "coordination.k8s.io", "leases", false),
        ("list", "", "namespaces", false),
    ];
    for (verb, group, resource, want) in matrix {
        assert_eq!(
            can(&c, verb, group, resource, n).await,
            *want,
            "controller: {verb} {group}/{resource} should be {}",
            if *want { "allowed" } else { "forbidden" }
        );
    }

    // The relay: reads Users and Sprites, never Secrets, and writes nothing
    // of sprite-operator.dev. A Sprite's spec decides what runs in a tenant's
    // VM (server.command, env from Secrets), so a relay that could patch
    // Sprites would be a way into every tenant's VM; its one write is the
    // session Lease, in the release namespace only.
    let r = client_as(&ns, &sa_relay).await;
    Api::<User>::all(r.clone())
        .list(&ListParams::default())
        .await
        .expect("relay lists Users");
    Api::<Sprite>::all(r.clone())
        .list(&ListParams::default())
        .await
        .expect("relay lists Sprites");
    let relay_sprites = Api::<Sprite>::namespaced(r.clone(), &ns.name);
    relay_sprites
        .get("rbac-probe")
        .await
        .expect("relay gets a Sprite");
    for (what, body) in [
        (
            "annotate",
            json!({"metadata": {"annotations": {"sprite-operator.dev/probe": "1"}}}),
        ),
        (
            "change the server command of",
            json!({"spec": {"server": {"command": ["sh", "-c", "id"]}}}),
        ),
    ] {
        assert!(
            is_forbidden(
                relay_sprites
                    .patch("rbac-probe", &PatchParams::default(), &Patch::Merge(body))
                    .await
            ),
            "the relay may {what} a Sprite"
        );
    }
    assert!(
        is_forbidden(
            Api::<Secret>::namespaced(r.clone(), &ns.name)
                .get("gateway-probe")
                .await
        ),
        "the relay may read Secrets"
    );

    // Session Leases in the release namespace: the Lease exactly as the relay
    // writes it, by server-side apply (the first apply creates, the next
    // renews)...
    let leases = Api::<Lease>::namespaced(r.clone(), &ns.name);
    let apply = PatchParams::apply("sprite-operator-relay").force();
    let session_lease = |lease_ns: &str| {
        session::lease(
            lease_ns,
            &ns.name,
            "rbac-probe",
            "relay-0",
            jiff::Timestamp::now(),
            jiff::Timestamp::now(),
            std::time::Duration::from_secs(120),
        )
    };
    let body = session_lease(ns.name.as_str());
    let name = body.metadata.name.clone().unwrap();
    for what in ["creates", "renews"] {
        leases
            .patch(&name, &apply, &Patch::Apply(&body))
            .await
            .unwrap_or_else(|e| panic!("relay {what} a session Lease by apply: {e}"));
    }
    // ...and by plain create and update.
    let probe: Lease = serde_json::from_value(json!({
        "metadata": {"name": "relay-probe"},
        "spec": {"holderIdentity": "relay-0", "leaseDurationSeconds": 120},
    }))
    .unwrap();
    let mut renewed = leases
        .create(&PostParams::default(), &probe)
        .await
        .expect("relay creates a Lease in the release namespace");
    renewed.spec.as_mut().unwrap().lease_duration_seconds = Some(60);
    leases
        .replace("relay-probe", &PostParams::default(), &renewed)
        .await
        .expect("relay updates a Lease in the release namespace");
    leases
        .list(&ListParams::default().labels(&format!("{}=true", session::SESSION_LABEL)))
        .await
        .expect("relay lists session Leases");
    // Anywhere else a Lease could pass for another component's (leader
    // election of other controllers, node heartbeats): forbidden.
    let elsewhere = Api::<Lease>::namespaced(r.clone(), "default");
    assert!(
        is_forbidden(elsewhere.create(&PostParams::default(), &probe).await),
        "the relay may create Leases outside the release namespace"
    );
    let body = session_lease("default");
    assert!(
        is_forbidden(elsewhere.patch(&name, &apply, &Patch::Apply(&body)).await),
        "the relay may apply Leases outside the release namespace"
    );
    for (verb, group, resource, want) in [
        ("watch", "sprite-operator.dev", "users", true),
        ("watch", "sprite-operator.dev", "sprites", true),
        ("patch", "sprite-operator.dev", "users", false),
        ("patch", "sprite-operator.dev", "sprites", false),
        ("update", "sprite-operator.dev", "sprites", false),
        ("create", "sprite-operator.dev", "sprites", false),
        ("patch", "sprite-operator.dev", "sprites/status", false),
        ("list", "", "secrets", false),
        ("watch", "coordination.k8s.io", "leases", true),
        ("delete", "coordination.k8s.io", "leases", false),
    ] {
        assert_eq!(
            can(&r, verb, group, resource, n).await,
            want,
            "relay: {verb} {group}/{resource}"
        );
    }

    // Cluster-scoped objects do not go with the namespace.
    ok(
        "helm uninstall",
        helm(
            &helm_bin,
            home.path(),
            &[
                "uninstall",
                &release,
                "--kubeconfig",
                &kubeconfig,
                "--namespace",
                &ns.name,
            ],
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_reconciles_the_examples_as_its_service_account() {
    let Some(mut env) = crate::sprite_controller::Env::new("helm-sa").await else {
        return;
    };
    env.kill_controller().await;
    let helm_bin = tool("helm").unwrap();
    let home = tempfile::tempdir().unwrap();
    let release = format!("sa{}", &env.ns.name[env.ns.name.len() - 8..]);
    let kubeconfig = env.ns.plane.kubeconfig_path().to_str().unwrap().to_string();
    let installed = helm(
        &helm_bin,
        home.path(),
        &[
            "install",
            &release,
            chart_dir().to_str().unwrap(),
            "--kubeconfig",
            &kubeconfig,
            "--namespace",
            &env.ns.name,
            "--set",
            "sprites.token=test-token",
        ],
    );
    ok("helm install", installed);
    let sa_client = client_as(&env.ns, &format!("{release}-sprite-operator-controller")).await;
    // Leader election on, as deployed: the Lease rules are exercised too.
    env.start_controller_as(sa_client, true);
    for file in ["user.yaml", "secret-api-keys.yaml", "sprite.yaml"] {
        env.apply_example(file).await;
    }
    env.wait_ready("alice-primary", 240).await;
    env.wait_ready("research", 240).await;
    crate::common::eventually("the User to be Active", 60, || async {
        let u = env
            .ns
            .api::<User>()
            .get("alice")
            .await
            .map_err(|e| e.to_string())?;
        let st = u.status.unwrap_or_default();
        if st.phase == Some(sprite_operator::api::user::UserPhase::Active)
            && st.gateway_token_sha256.is_some()
        {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
    // The gateway Secret was created with the ServiceAccount's rights.
    env.ns
        .api::<Secret>()
        .get("alice-gateway")
        .await
        .expect("gateway Secret");
}
