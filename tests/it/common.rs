//! Shared fixtures: one control plane per test binary, one namespace per test.

use std::sync::OnceLock;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, PostParams};
use sprite_operator::testenv::{self, ControlPlane, Options};

/// Writes to the real stderr: the test harness captures `eprintln!`, and
/// these lines (skip reasons, measured start-up) must show in every run.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Why a cluster test cannot run here, or None when it can. In CI a missing
/// control plane is a failure, never a skip.
pub fn unavailable_reason() -> Option<String> {
    if std::env::var_os("KUBEBUILDER_ASSETS").is_some() {
        return None;
    }
    let why = "KUBEBUILDER_ASSETS is not set (run `make test`, which builds the control plane)".to_string();
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why}; CI must run every integration test");
    }
    Some(why)
}

/// The shared control plane, started on first use. It is started on its own
/// thread and runtime because each test has a runtime of its own, and lives
/// until the test binary exits, which stops it and removes its files.
pub fn plane() -> Option<&'static ControlPlane> {
    static PLANE: OnceLock<ControlPlane> = OnceLock::new();
    if let Some(why) = unavailable_reason() {
        say(&format!("skipped: {why}"));
        return None;
    }
    let plane = PLANE.get_or_init(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async {
                let opts = Options::from_env().expect("KUBEBUILDER_ASSETS");
                let plane = ControlPlane::start(opts)
                    .await
                    .unwrap_or_else(|e| panic!("control plane: {e}"));
                say(&format!(
                    "control plane (etcd + kube-apiserver + kube-controller-manager) ready in {:.2}s",
                    plane.startup.as_secs_f64()
                ));
                let client = plane.client().await.expect("client");
                testenv::install_crds(&client)
                    .await
                    .unwrap_or_else(|e| panic!("CRDs: {e}"));
                plane
            })
        })
        .join()
        .expect("control plane start-up panicked")
    });
    static CLEAN_UP: std::sync::Once = std::sync::Once::new();
    CLEAN_UP.call_once(|| plane.clean_up_at_exit());
    Some(plane)
}

/// A test's own namespace, deleted when the test ends.
pub struct TestNs {
    pub client: kube::Client,
    pub name: String,
    pub plane: &'static ControlPlane,
}

impl TestNs {
    /// None when no control plane can run here (the reason was printed).
    pub async fn new(prefix: &str) -> Option<TestNs> {
        Self::named(&format!(
            "{prefix}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ))
        .await
    }

    /// A namespace of exactly this name (tests that need two names that
    /// relate, such as `x` and `x-corp`).
    pub async fn named(name: &str) -> Option<TestNs> {
        let plane = plane()?;
        let client = plane.client().await.expect("client");
        let name = name.to_string();
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        Some(TestNs { client, name, plane })
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Runs the kubectl built with the control plane against it.
    pub fn kubectl(&self, args: &[&str]) -> std::process::Output {
        let assets = std::env::var_os("KUBEBUILDER_ASSETS").expect("assets");
        std::process::Command::new(std::path::Path::new(&assets).join("kubectl"))
            .arg("--kubeconfig")
            .arg(self.plane.kubeconfig_path())
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("run kubectl")
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        // Best effort and detached: the namespace controller finishes it.
        let client = self.client.clone();
        let name = self.name.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = Api::<Namespace>::all(client)
                    .delete(&name, &DeleteParams::background())
                    .await;
            });
        }
    }
}

/// Polls `check` until it returns Some or `secs` pass; on timeout panics with
/// `what` and the last observation.
pub async fn eventually<T, F, Fut>(what: &str, secs: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        match check().await {
            Ok(v) => return v,
            Err(e) => last = e,
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("timed out after {secs}s waiting for {what}; last: {last}");
}

/// Every document of an example file, for applying.
pub fn example_docs(file: &str) -> Vec<serde_json::Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_multiple::<serde_json::Value>(&text).expect("example parses")
}
