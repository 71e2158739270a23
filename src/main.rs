use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;

use clap::{Parser, Subcommand};
use sprite_operator::config::OperatorConfig;
use sprite_operator::sprites::SpritesClient;
use sprite_operator::{controller, crdgen, telemetry};
use tokio_util::sync::CancellationToken;

/// Runs one persistent AI-agent microVM per user on Sprites.dev, managed the
/// Kubernetes way through the `User` and `Sprite` custom resources.
#[derive(Parser, Debug)]
#[command(name = "sprite-operator", version, propagate_version = true)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t, env = "LOG_FORMAT")]
    log_format: telemetry::LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the User and Sprite reconcilers (leader-elected), with /metrics,
    /// /healthz and /readyz.
    Controller(ControllerArgs),
    /// Run the WebSocket relay that connects browsers to their user's Sprite.
    Relay(Box<RelayArgs>),
    /// Run a Sprites.dev-compatible simulator that really runs commands.
    Sim(SimArgs),
    /// Print the CustomResourceDefinitions generated from the Rust types.
    Crds(CrdsArgs),
    /// Start a local control plane, the simulator, the controller and the
    /// relay, apply examples/, and serve a page to talk to a Sprite.
    Demo(DemoArgs),
}

#[derive(clap::Args, Debug)]
struct ControllerArgs {
    /// Base URL of the Sprites.dev API (or of `sprite-operator sim`).
    #[arg(long, env = "SPRITES_API_URL", default_value = "https://api.sprites.dev")]
    sprites_api_url: String,
    /// File holding the Sprites.dev API token (the token itself is never
    /// accepted on the command line, where `ps` would show it).
    #[arg(long, env = "SPRITES_TOKEN_FILE")]
    sprites_token_file: Option<PathBuf>,
    /// Operator configuration (tiers, rates, pip arguments) as YAML; built-in
    /// defaults apply when absent.
    #[arg(long, env = "SPRITE_OPERATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the /metrics, /healthz and /readyz server.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: String,
    /// Only watch these namespaces, comma-separated (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE", value_delimiter = ',')]
    namespace: Vec<String>,
    /// Namespace of the relay's session Leases (default: each Sprite's own).
    #[arg(long, env = "SESSION_LEASE_NAMESPACE")]
    session_lease_namespace: Option<String>,
    /// Take a coordination.k8s.io Lease before reconciling, so that only one
    /// replica acts at a time.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the leader-election Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
}

#[derive(clap::Args, Debug)]
struct RelayArgs {
    /// Address of the WebSocket endpoint (/ws) and of /healthz, /readyz, /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: String,
    /// Base URL of the Sprites.dev API (or of `sprite-operator sim`).
    #[arg(long, env = "SPRITES_API_URL", default_value = "https://api.sprites.dev")]
    sprites_api_url: String,
    /// File holding the Sprites.dev API token.
    #[arg(long, env = "SPRITES_TOKEN_FILE")]
    sprites_token_file: Option<PathBuf>,
    /// Only watch Users and Sprites in this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// File holding the shared secret for HS256 JWTs (at least 32 bytes).
    #[arg(long)]
    jwt_hs256_secret_file: Option<PathBuf>,
    /// JWKS file for RS256/ES256 JWTs.
    #[arg(long)]
    jwks_file: Option<PathBuf>,
    /// Require this `iss` in JWTs.
    #[arg(long)]
    jwt_issuer: Option<String>,
    /// Require this `aud` in JWTs.
    #[arg(long)]
    jwt_audience: Option<String>,
    /// Also accept the token in the `token` query parameter (browsers cannot
    /// set headers; prefer the subprotocol: URLs end up in logs).
    #[arg(long)]
    allow_query_token: bool,
    /// Stop keeping the VM awake after the browser sent nothing for this long.
    #[arg(long, default_value = "5m")]
    idle_timeout: humantime::Duration,
    /// Ping the runtime this often while the browser is active (below the
    /// VM's idle timeout).
    #[arg(long, default_value = "10s")]
    keepalive_interval: humantime::Duration,
    /// Largest WebSocket message either way; larger ones close the session (1009).
    #[arg(long, default_value_t = 1 << 20)]
    max_message_bytes: usize,
    /// Unacknowledged messages kept per session for resending (4413 beyond).
    #[arg(long, default_value_t = 256)]
    max_unacked_messages: usize,
    /// Unacknowledged bytes kept per session for resending (4413 beyond).
    #[arg(long, default_value_t = 4 << 20)]
    max_unacked_bytes: usize,
    /// Concurrent sessions per user (4429 beyond).
    #[arg(long, default_value_t = 8)]
    max_connections_per_user: usize,
    /// Give up reconnecting to a VM after this long (1013).
    #[arg(long, default_value = "60s")]
    upstream_retry_for: humantime::Duration,
    /// How long a session Lease says a session lasts (renewed at half of it).
    #[arg(long, default_value = "2m")]
    session_lease: humantime::Duration,
    /// Namespace of the session Leases (default: each Sprite's own); the
    /// relay needs write access to Leases there and nowhere else.
    #[arg(long, env = "SESSION_LEASE_NAMESPACE")]
    session_lease_namespace: Option<String>,
    /// Read buffer of each WebSocket (two per session), allocated up front:
    /// most of an idle session's memory. Larger favours throughput of big frames.
    #[arg(long, default_value_t = 4096)]
    ws_read_buffer_bytes: usize,
    /// How long sessions get to close on shutdown.
    #[arg(long, default_value = "10s")]
    drain_timeout: humantime::Duration,
    /// Longest a write to the browser or the runtime may wait for it to
    /// read before the session is ended (as nginx's send_timeout).
    #[arg(long, default_value = "60s")]
    write_timeout: humantime::Duration,
    /// Event loops relaying sessions, a thread each. 1 (the default): the
    /// lowest latency per message, as one nginx worker; more for more than
    /// one core's worth of traffic in one process.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Development and benchmarks only: send every session to this
    /// WebSocket URL instead of a VM.
    #[arg(long, hide = true)]
    dev_fixed_upstream: Option<url::Url>,
    /// Development and benchmarks only: read Users and Sprites from this
    /// YAML file instead of watching a cluster (no session lease is written).
    #[arg(long, hide = true)]
    dev_static: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// Where VMs, their files and checkpoints are kept (survives restarts).
    #[arg(long, default_value = "sim-data")]
    data_dir: PathBuf,
    /// The bearer token clients must present.
    #[arg(long, env = "SIM_TOKEN")]
    token: String,
    /// A VM goes to sleep after this long without activity.
    #[arg(long, default_value = "30s")]
    idle_timeout: humantime::Duration,
    /// Added delay when a sleeping VM is woken.
    #[arg(long, default_value = "300ms")]
    wake_delay: humantime::Duration,
    /// A suspended (warm) VM goes cold after this much longer.
    #[arg(long, default_value = "5m")]
    cold_after: humantime::Duration,
    /// Fault injection settings: inline JSON or the path of a JSON file (see docs/simulator.md).
    #[arg(long)]
    faults: Option<String>,
    /// Benchmark VMs: commands are emulated (the operator's bootstrap, server
    /// and heartbeat steps answered as they would be, their files written),
    /// no process or network namespace per VM. For fleet benchmarks only.
    #[arg(long)]
    bench_vms: bool,
}

#[derive(clap::Args, Debug)]
struct CrdsArgs {
    /// Write one file per CRD into this directory instead of printing.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    /// Use this cluster instead of starting a local control plane (which
    /// needs KUBEBUILDER_ASSETS; `make demo` sets it).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Address of the demo page.
    #[arg(long, default_value = "127.0.0.1:8088")]
    listen: String,
    /// Keep the simulator's VMs in this folder (default: a temp dir).
    #[arg(long)]
    sim_dir: Option<PathBuf>,
    /// Folder of the example manifests to apply.
    #[arg(long, default_value = "examples")]
    examples: PathBuf,
    /// A wheelhouse of the runtime's requirements, so VMs install without an
    /// index (`make demo` builds it).
    #[arg(long, env = "SPRITE_WHEELHOUSE")]
    wheelhouse: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Crds(args) => crds(args),
        Command::Controller(args) => block_on(controller(args)),
        Command::Sim(args) => block_on(sim(args)),
        Command::Demo(args) => block_on(demo(args)),
        Command::Relay(args) => block_on_runtime(sprite_operator::relay::front_runtime(), relay(*args)),
    }
}

fn block_on(fut: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    block_on_runtime(tokio::runtime::Runtime::new(), fut)
}

/// Runs `fut` on the runtime `rt` (or says why there is none).
fn block_on_runtime(
    rt: std::io::Result<tokio::runtime::Runtime>,
    fut: impl std::future::Future<Output = Result<(), String>>,
) -> ExitCode {
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "exiting");
            ExitCode::FAILURE
        }
    }
}

/// Cancelled on SIGINT or SIGTERM, for graceful shutdown.
fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

/// The Sprites.dev token from its file (or `SPRITES_TOKEN`), never from argv.
fn read_token(file: Option<&PathBuf>) -> Result<String, String> {
    if let Some(f) = file {
        return std::fs::read_to_string(f)
            .map(|t| t.trim().to_string())
            .map_err(|e| format!("cannot read {}: {e}", f.display()));
    }
    std::env::var("SPRITES_TOKEN").map_err(|_| "set --sprites-token-file or SPRITES_TOKEN".to_string())
}

async fn controller(args: ControllerArgs) -> Result<(), String> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("kubernetes client: {e}"))?;
    let token = read_token(args.sprites_token_file.as_ref())?;
    let sprites = SpritesClient::new(&args.sprites_api_url, token).map_err(|e| e.to_string())?;
    let config = match &args.config {
        Some(path) => OperatorConfig::load(path).map_err(|e| e.to_string())?,
        None => OperatorConfig::default(),
    };
    let ctx = Arc::new(
        controller::Context::new(client.clone(), sprites, config, Arc::new(controller::SystemClock))
            .with_session_lease_namespace(args.session_lease_namespace.clone()),
    );
    let shutdown = shutdown_token();
    let addr: std::net::SocketAddr = args
        .metrics_addr
        .parse()
        .map_err(|e| format!("--metrics-addr: {e}"))?;
    let metrics = tokio::spawn(controller::serve_metrics(addr, ctx.clone(), shutdown.clone()));
    let namespace = controller::Scope::from(args.namespace.clone());
    if args.leader_election {
        let settings = controller::leader::LeaseSettings {
            namespace: args
                .lease_namespace
                .clone()
                .or_else(|| args.namespace.first().cloned())
                .unwrap_or_else(|| "default".into()),
            name: "sprite-operator-controller".into(),
            identity: std::env::var("POD_NAME")
                .unwrap_or_else(|_| format!("sprite-operator-{}", uuid::Uuid::new_v4().simple())),
            duration_secs: 15,
            grace_secs: 5,
        };
        let work_ctx = ctx.clone();
        controller::leader::run_as_leader(client, settings, shutdown.clone(), move |token| {
            controller::run(work_ctx, namespace, token)
        })
        .await
        .map_err(|e| e.to_string())?;
    } else {
        controller::run(ctx, namespace, shutdown.clone()).await;
    }
    shutdown.cancel();
    let _ = metrics.await;
    Ok(())
}

async fn relay(args: RelayArgs) -> Result<(), String> {
    use sprite_operator::relay::{self, Connector, Directory, JwtVerifier, RelayConfig, outbox};
    let config = RelayConfig {
        listen: args.listen,
        allow_query_token: args.allow_query_token,
        idle_timeout: args.idle_timeout.into(),
        keepalive_interval: args.keepalive_interval.into(),
        max_message_bytes: args.max_message_bytes,
        outbox: outbox::Limits {
            max_messages: args.max_unacked_messages,
            max_bytes: args.max_unacked_bytes,
        },
        max_connections_per_user: args.max_connections_per_user,
        upstream_retry_for: args.upstream_retry_for.into(),
        lease: args.session_lease.into(),
        lease_refresh: std::time::Duration::from(args.session_lease) / 2,
        drain_timeout: args.drain_timeout.into(),
        read_buffer_bytes: args.ws_read_buffer_bytes,
        write_timeout: args.write_timeout.into(),
        threads: args.threads,
        session_lease_namespace: args.session_lease_namespace,
        ..RelayConfig::default()
    };
    let jwt_configured = args.jwt_hs256_secret_file.is_some() || args.jwks_file.is_some();
    if jwt_configured && (args.jwt_issuer.is_none() || args.jwt_audience.is_none()) {
        tracing::warn!(
            issuer_checked = args.jwt_issuer.is_some(),
            audience_checked = args.jwt_audience.is_some(),
            "JWTs are verified without both --jwt-issuer and --jwt-audience: a token the identity \
             provider minted for any of its applications is accepted here"
        );
    }
    let jwt = JwtVerifier::from_files(args.jwt_hs256_secret_file.as_deref(), args.jwks_file.as_deref())
        .map_err(|e| e.to_string())?
        .with_issuer(args.jwt_issuer)
        .with_audience(args.jwt_audience);
    // The kube client and the cache watch run on the relay's background
    // runtime, with the sessions' timers: the front runtime (HTTP) and the
    // event loops that relay frames have no time driver.
    let background = relay::background::Background::start().map_err(|e| format!("relay: {e}"))?;
    let (directory, kube) = match &args.dev_static {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            tracing::warn!("--dev-static: Users and Sprites come from a file, not the cluster");
            (
                Directory::fixed_from_yaml(&text).map_err(|e| e.to_string())?,
                None,
            )
        }
        None => {
            let client = background
                .spawn(kube::Client::try_default())
                .await
                .map_err(|e| format!("kubernetes client: {e}"))?
                .map_err(|e| format!("kubernetes client: {e}"))?;
            let (directory, watch) = Directory::watch(client.clone(), args.namespace.as_deref());
            background.spawn(watch);
            (directory, Some(client))
        }
    };
    let connector = match args.dev_fixed_upstream {
        Some(url) => {
            tracing::warn!("--dev-fixed-upstream: every session goes to one URL, not to its VM");
            Connector::Fixed(url)
        }
        None => {
            let token = read_token(args.sprites_token_file.as_ref())?;
            Connector::Sprites(SpritesClient::new(&args.sprites_api_url, token).map_err(|e| e.to_string())?)
        }
    };
    let shutdown = shutdown_token();
    let handle = relay::start(relay::Parts {
        config,
        directory,
        jwt,
        connector,
        kube,
        background: Some(background),
    })
    .await
    .map_err(|e| format!("relay: {e}"))?;
    // Print the address for whoever started us with port 0 (the bench).
    println!("listening on {}", handle.addr());
    shutdown.cancelled().await;
    handle.shutdown().await;
    Ok(())
}

async fn sim(args: SimArgs) -> Result<(), String> {
    let faults = match args.faults.as_deref().map(sprite_operator::sim::Faults::from_arg) {
        None => Default::default(),
        Some(f) => f.map_err(|e| format!("--faults: {e}"))?,
    };
    let config = sprite_operator::sim::SimConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        token: args.token,
        idle_timeout: args.idle_timeout.into(),
        cold_after: args.cold_after.into(),
        wake_delay: args.wake_delay.into(),
        faults,
        bench_vms: args.bench_vms,
    };
    sprite_operator::sim::run(config)
        .await
        .map_err(|e| format!("sim: {e}"))
}

async fn demo(args: DemoArgs) -> Result<(), String> {
    use sprite_operator::demo::{self, DemoOptions};
    let pip_args = match &args.wheelhouse {
        Some(w) => OperatorConfig::default().with_wheelhouse(w).pip_args,
        None => vec![],
    };
    let shutdown = shutdown_token();
    let started = demo::start(DemoOptions {
        kubeconfig: args.kubeconfig,
        listen: args.listen,
        sim_dir: args.sim_dir,
        examples: args.examples,
        pip_args,
    });
    let running = tokio::select! {
        r = started => r.map_err(|e| e.to_string())?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    if let Some(kc) = &running.kubeconfig {
        let assets = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from);
        let kubectl = assets.map(|a| a.join("kubectl")).filter(|p| p.is_file());
        if let Some(kubectl) = &kubectl {
            let out = std::process::Command::new(kubectl)
                .arg("--kubeconfig")
                .arg(kc)
                .args(["-n", demo::NAMESPACE, "get", "users,sprites"])
                .output();
            if let Ok(out) = out {
                println!("\n$ kubectl -n {} get users,sprites", demo::NAMESPACE);
                print!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
        println!("\nTo look around:  export KUBECONFIG={}", kc.display());
    }
    println!(
        "\nOpen {} to talk to Sprite {} through the relay. Ctrl-C stops everything.\n",
        running.page_url, running.page.sprite
    );
    shutdown.cancelled().await;
    running.shutdown().await;
    println!("[demo] stopped");
    Ok(())
}

fn crds(args: CrdsArgs) -> ExitCode {
    match args.out_dir {
        None => {
            print!("{}", crdgen::all_yaml());
            ExitCode::SUCCESS
        }
        Some(dir) => {
            for (file, crd) in crdgen::crds() {
                let path = dir.join(file);
                if let Err(e) = std::fs::write(&path, crdgen::to_yaml(&crd)) {
                    eprintln!("cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
    }
}
