//! Round trips per second through the client and the in-process simulator on loopback: a small
//! exec (`true`) and a 1 MiB file write. Fixed counts, bounded in time.
//! Run: `cargo bench --bench sim_client` (counts: SIM_BENCH_EXECS, SIM_BENCH_WRITES). Under
//! `cargo test --all-targets` (no `--bench` argument) it runs a 3-round smoke pass instead.

use std::time::{Duration, Instant};

use sprite_operator::sim::{self, SimConfig};
use sprite_operator::sprites::{CreateSprite, ExecRequest, SpritesClient};

const TIME_LIMIT: Duration = Duration::from_secs(30);

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `op` up to `n` times or until the time limit; returns (done, elapsed).
async fn measure<F, Fut>(n: usize, mut op: F) -> (usize, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let start = Instant::now();
    let mut done = 0;
    while done < n && start.elapsed() < TIME_LIMIT {
        op().await;
        done += 1;
    }
    (done, start.elapsed())
}

fn report(what: &str, (done, elapsed): (usize, Duration), bytes_each: usize) {
    let per_sec = done as f64 / elapsed.as_secs_f64();
    let mib_s = per_sec * bytes_each as f64 / (1024.0 * 1024.0);
    let extra = if bytes_each > 0 {
        format!(", {mib_s:.1} MiB/s")
    } else {
        String::new()
    };
    println!(
        "{what}: {done} round trips in {:.2}s = {per_sec:.1}/s, {:.2} ms each{extra}",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0 / done.max(1) as f64
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = SimConfig::new(dir.path(), "bench-token");
        config.wake_delay = Duration::ZERO;
        config.idle_timeout = Duration::from_secs(600);
        let handle = sim::start(config).await.expect("sim starts");
        let client = SpritesClient::new(&handle.url(), "bench-token").expect("client");
        client
            .create_sprite(&CreateSprite {
                name: "bench".into(),
                ..Default::default()
            })
            .await
            .expect("create");
        let exec = ExecRequest::new(["true"]);
        client.exec_collect("bench", &exec).await.expect("warm-up exec");

        let execs = measure(count("SIM_BENCH_EXECS", 300), || async {
            let out = client.exec_collect("bench", &exec).await.expect("exec");
            assert_eq!(out.exit_code, 0);
        })
        .await;
        report("exec `true`", execs, 0);

        let payload = bytes::Bytes::from(vec![0x5a; 1024 * 1024]);
        let writes = measure(count("SIM_BENCH_WRITES", 200), || async {
            client
                .write_file("bench", "/workspace/bench.bin", payload.clone(), 0o644, true)
                .await
                .expect("write");
        })
        .await;
        report("fs write 1 MiB", writes, payload.len());
        handle.shutdown().await.expect("shutdown");
    });
}
