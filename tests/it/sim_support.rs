//! Starting an in-process simulator on 127.0.0.1:0 with a temporary data dir.

use std::path::Path;
use std::time::Duration;

use sprite_operator::sim::{self, SimConfig, SimHandle};
use sprite_operator::sprites::{RetryPolicy, SpritesClient};

pub const TOKEN: &str = "sim-test-token-6f1d2c";

pub struct TestSim {
    pub handle: SimHandle,
    pub dir: tempfile::TempDir,
    pub client: SpritesClient,
}

/// Fast retries so that fault tests finish quickly.
pub fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 8,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
        max_retry_after: Duration::from_secs(2),
    }
}

pub fn config(dir: &Path) -> SimConfig {
    let mut c = SimConfig::new(dir, TOKEN);
    c.wake_delay = Duration::from_millis(20);
    c
}

pub async fn start_with(dir: tempfile::TempDir, change: impl FnOnce(&mut SimConfig)) -> TestSim {
    let mut cfg = config(dir.path());
    change(&mut cfg);
    let handle = sim::start(cfg).await.expect("sim starts");
    let client = SpritesClient::new(&handle.url(), TOKEN)
        .expect("client")
        .with_retry_policy(fast_retries());
    TestSim { handle, dir, client }
}

pub async fn start() -> TestSim {
    start_with(tempfile::tempdir().expect("tempdir"), |_| {}).await
}

impl TestSim {
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> reqwest::Response {
        let mut req = reqwest::Client::new()
            .request(method, format!("{}{path}", self.handle.url()))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.expect("admin call")
    }

    pub async fn stats(&self) -> serde_json::Value {
        self.admin(reqwest::Method::GET, "/sim/stats", None)
            .await
            .json()
            .await
            .expect("stats JSON")
    }

    pub async fn vm_stats(&self, name: &str) -> serde_json::Value {
        self.stats().await["vms"][name].clone()
    }

    pub async fn force_sleep(&self, name: &str) {
        let r = self
            .admin(reqwest::Method::POST, &format!("/sim/sprites/{name}/sleep"), None)
            .await;
        assert_eq!(r.status(), 204);
    }

    pub async fn set_faults(&self, faults: serde_json::Value) {
        let r = self
            .admin(reqwest::Method::PUT, "/sim/faults", Some(faults))
            .await;
        assert_eq!(r.status(), 200, "faults accepted");
    }

    pub async fn create(&self, name: &str) {
        let req = sprite_operator::sprites::CreateSprite {
            name: name.into(),
            ..Default::default()
        };
        self.client.create_sprite(&req).await.expect("create");
    }
}
