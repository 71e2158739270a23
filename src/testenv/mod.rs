//! A real Kubernetes control plane on loopback, the way controller-runtime's
//! envtest starts one: etcd and kube-apiserver (optionally
//! kube-controller-manager) from prebuilt binaries, in a temp dir, with
//! certificates made here, RBAC on, and an admin kubeconfig.
//!
//! Used by the integration tests and by `sprite-operator demo`. The binaries
//! come from `KUBEBUILDER_ASSETS` (built by `hack/controlplane/build.sh`).

mod certs;
mod process;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};

use crate::crdgen;
use process::{ManagedProcess, Spawner};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KUBEBUILDER_ASSETS is not set: run `make controlplane` or point it at prebuilt binaries")]
    NoAssets,
    #[error("{0} not found in {1}")]
    MissingBinary(&'static str, PathBuf),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("certificates: {0}")]
    Certs(#[from] rcgen::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("{component} not ready after {waited:?}; log tail:\n{log}")]
    NotReady {
        component: &'static str,
        waited: Duration,
        log: String,
    },
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("CRD {0} not established: {1}")]
    Crd(String, String),
}

#[derive(Clone, Debug)]
pub struct Options {
    /// Folder holding `etcd`, `kube-apiserver` (and `kube-controller-manager`).
    pub assets: PathBuf,
    /// Also start kube-controller-manager (garbage collection, namespace
    /// deletion, Deployments).
    pub controller_manager: bool,
}

impl Options {
    /// Binaries from `KUBEBUILDER_ASSETS`.
    pub fn from_env() -> Result<Self, Error> {
        let assets = std::env::var_os("KUBEBUILDER_ASSETS").ok_or(Error::NoAssets)?;
        Ok(Self {
            assets: assets.into(),
            controller_manager: true,
        })
    }
}

/// A running control plane. Dropping it stops every component and removes
/// its directory; the components also die with this process (parent-death
/// signal). One kept in a static is cleaned up by `clean_up_at_exit`.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    kubeconfig_path: PathBuf,
    server: String,
    /// Time from start to a ready apiserver (and controller-manager).
    pub startup: Duration,
    // Field order is drop order: the apiserver must go before etcd.
    controller_manager: Option<ManagedProcess>,
    apiserver: ManagedProcess,
    etcd: ManagedProcess,
}

impl ControlPlane {
    /// For a plane kept in a static, which is never dropped: at process
    /// exit, kill its components and remove its directory (some 120 MB of
    /// etcd data, certificates and logs), as dropping it would have. The
    /// parent-death signal alone stops the processes but leaves the files.
    pub fn clean_up_at_exit(&'static self) {
        static PLANES: std::sync::Mutex<Vec<&'static ControlPlane>> = std::sync::Mutex::new(Vec::new());
        extern "C" fn at_exit() {
            let planes = PLANES.lock().map(|p| p.clone()).unwrap_or_default();
            for plane in planes {
                if let Some(cm) = &plane.controller_manager {
                    cm.kill();
                }
                // The apiserver before etcd, as in a drop.
                plane.apiserver.kill();
                plane.etcd.kill();
                let _ = std::fs::remove_dir_all(plane.dir.path());
            }
        }
        let Ok(mut planes) = PLANES.lock() else { return };
        if planes.is_empty() {
            // SAFETY: registers a plain function with no arguments; it
            // runs once, from `exit`, after the test harness has finished.
            unsafe { libc::atexit(at_exit) };
        }
        planes.push(self);
    }

    pub async fn start(opts: Options) -> Result<Self, Error> {
        let t0 = Instant::now();
        let bin = |name: &'static str| -> Result<PathBuf, Error> {
            let p = opts.assets.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::MissingBinary(name, opts.assets.clone()))
            }
        };
        let dir = tempfile::Builder::new().prefix("sprite-operator-cp-").tempdir()?;
        let root_buf = dir.path().to_path_buf();
        let root = root_buf.as_path();
        let pki = certs::write_pki(&root.join("pki"))?;

        let spawner = Spawner::global();
        let (etcd_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = spawner.spawn(
            "etcd",
            &bin("etcd")?,
            &[
                "--name=t".into(),
                format!("--data-dir={}", root.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=t={peer_url}"),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
            root,
        )?;

        let server = format!("https://127.0.0.1:{api_port}");
        let p = |f: &str| pki.dir.join(f).display().to_string();
        let apiserver = spawner.spawn(
            "kube-apiserver",
            &bin("kube-apiserver")?,
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={api_port}"),
                format!("--cert-dir={}", pki.dir.display()),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--allow-privileged=true".into(),
                "--authorization-mode=RBAC".into(),
                "--disable-admission-plugins=ServiceAccount".into(),
                format!("--service-account-issuer={server}/"),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                format!("--client-ca-file={}", p("client-ca.crt")),
            ],
            root,
        )?;

        let kubeconfig_path = root.join("admin.kubeconfig");
        std::fs::write(&kubeconfig_path, pki.kubeconfig(&server))?;

        let mut plane = ControlPlane {
            kubeconfig_path,
            server,
            startup: Duration::ZERO,
            controller_manager: None,
            apiserver,
            etcd,
            dir,
        };
        plane.wait_apiserver_ready().await?;

        if opts.controller_manager {
            let kcm_port = free_port()?;
            plane.controller_manager = Some(spawner.spawn(
                "kube-controller-manager",
                &bin("kube-controller-manager")?,
                &[
                    format!("--kubeconfig={}", plane.kubeconfig_path.display()),
                    "--leader-elect=false".into(),
                    "--bind-address=127.0.0.1".into(),
                    format!("--secure-port={kcm_port}"),
                    format!("--root-ca-file={}", p("ca.crt")),
                    format!("--service-account-private-key-file={}", p("sa.key")),
                    "--use-service-account-credentials=false".into(),
                    "--controllers=*".into(),
                ],
                root,
            )?);
            plane.wait_controller_manager_ready().await?;
        }
        plane.startup = t0.elapsed();
        tracing::info!(startup_ms = plane.startup.as_millis() as u64, server = %plane.server, "control plane ready");
        Ok(plane)
    }

    /// A fresh client for the admin user. Make one per tokio runtime: a
    /// client's worker task lives on the runtime that created it.
    pub async fn client(&self) -> Result<kube::Client, Error> {
        let kc =
            Kubeconfig::read_from(&self.kubeconfig_path).map_err(|e| Error::Kubeconfig(e.to_string()))?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| Error::Kubeconfig(e.to_string()))?;
        Ok(kube::Client::try_from(config)?)
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    pub fn work_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of every component's log, for failure reports.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for p in [
            Some(&self.etcd),
            Some(&self.apiserver),
            self.controller_manager.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            out.push_str(&format!("==> {} <==\n{}\n", p.name, p.log_tail(lines)));
        }
        out
    }

    async fn wait_apiserver_ready(&self) -> Result<(), Error> {
        let deadline = Duration::from_secs(90);
        let t0 = Instant::now();
        let mut last_err = String::new();
        while t0.elapsed() < deadline {
            if let Some(status) = self.etcd.exit_status() {
                last_err = format!("etcd exited: {status}");
                break;
            }
            if let Some(status) = self.apiserver.exit_status() {
                last_err = format!("kube-apiserver exited: {status}");
                break;
            }
            match self.client().await {
                Ok(client) => {
                    let req = http::Request::get("/readyz")
                        .body(Vec::new())
                        .expect("static request");
                    match client.request_text(req).await {
                        Ok(body) if body.trim() == "ok" => return Ok(()),
                        Ok(body) => last_err = body,
                        Err(e) => last_err = e.to_string(),
                    }
                }
                Err(e) => last_err = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(Error::NotReady {
            component: "kube-apiserver",
            waited: t0.elapsed(),
            log: format!("{last_err}\n{}", self.log_tails(30)),
        })
    }

    /// kube-controller-manager is working once its service-account
    /// controller has created the `default` ServiceAccount.
    async fn wait_controller_manager_ready(&self) -> Result<(), Error> {
        use k8s_openapi::api::core::v1::ServiceAccount;
        let client = self.client().await?;
        let sas: Api<ServiceAccount> = Api::namespaced(client, "default");
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(90) {
            if let Some(kcm) = &self.controller_manager
                && let Some(status) = kcm.exit_status()
            {
                return Err(Error::NotReady {
                    component: "kube-controller-manager",
                    waited: t0.elapsed(),
                    log: format!("exited: {status}\n{}", kcm.log_tail(30)),
                });
            }
            if sas.get_opt("default").await?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(Error::NotReady {
            component: "kube-controller-manager",
            waited: t0.elapsed(),
            log: self.log_tails(30),
        })
    }
}

/// Applies the generated CRDs (server-side apply) and waits until the
/// apiserver serves them.
/// Server-side applies one manifest (a parsed YAML document of any kind)
/// into `namespace`, as `manager`, taking ownership of conflicting fields.
/// The demo applies the examples with it, and so do the tests.
pub async fn apply_doc(
    client: &kube::Client,
    namespace: &str,
    doc: &serde_json::Value,
    manager: &str,
) -> Result<kube::api::DynamicObject, kube::Error> {
    use kube::core::{ApiResource, GroupVersionKind};
    let obj: kube::api::DynamicObject =
        serde_json::from_value(doc.clone()).map_err(kube::Error::SerdeError)?;
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, doc["kind"].as_str().unwrap_or_default());
    let api: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk(&gvk));
    let name = obj.metadata.name.clone().unwrap_or_default();
    api.patch(&name, &PatchParams::apply(manager).force(), &Patch::Apply(&obj))
        .await
}

pub async fn install_crds(client: &kube::Client) -> Result<(), Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply("sprite-operator-testenv").force();
    for (_, crd) in crdgen::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &pp, &Patch::Apply(&crd)).await?;
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        match tokio::time::timeout(Duration::from_secs(30), established).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Error::Crd(name, e.to_string())),
            Err(_) => return Err(Error::Crd(name, "timed out after 30s".into())),
        }
    }
    Ok(())
}

/// A port the kernel says is free now. Another process may take it before we
/// bind it again; on loopback in a test run that race is rare enough.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
