use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sprite_operator::{crdgen, telemetry};

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
    Relay(RelayArgs),
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
    /// Only watch this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
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
    /// Address of the WebSocket endpoint (/ws) and health endpoints.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: String,
    /// Base URL of the Sprites.dev API (or of `sprite-operator sim`).
    #[arg(long, env = "SPRITES_API_URL", default_value = "https://api.sprites.dev")]
    sprites_api_url: String,
    /// File holding the Sprites.dev API token.
    #[arg(long, env = "SPRITES_TOKEN_FILE")]
    sprites_token_file: Option<PathBuf>,
    /// File holding the shared secret for HS256 JWTs.
    #[arg(long)]
    jwt_hs256_secret_file: Option<PathBuf>,
    /// JWKS file for RS256/ES256 JWTs.
    #[arg(long)]
    jwks_file: Option<PathBuf>,
    /// Also accept the token in the `token` query parameter (browsers cannot
    /// set headers; prefer the subprotocol).
    #[arg(long)]
    allow_query_token: bool,
    /// Stop keeping the VM awake after the browser sent nothing for this long.
    #[arg(long, default_value = "5m")]
    idle_timeout: humantime::Duration,
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
}

#[derive(clap::Args, Debug)]
struct CrdsArgs {
    /// Write one file per CRD into this directory instead of printing.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    /// Use this cluster instead of starting a local control plane.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Address of the demo page and the relay.
    #[arg(long, default_value = "127.0.0.1:8088")]
    listen: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Crds(args) => crds(args),
        Command::Sim(args) => sim(args),
        other => {
            eprintln!("{other:?}: not built yet");
            ExitCode::FAILURE
        }
    }
}

fn sim(args: SimArgs) -> ExitCode {
    let faults = match args.faults.as_deref().map(sprite_operator::sim::Faults::from_arg) {
        None => Default::default(),
        Some(Ok(f)) => f,
        Some(Err(e)) => {
            eprintln!("--faults: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = sprite_operator::sim::SimConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        token: args.token,
        idle_timeout: args.idle_timeout.into(),
        cold_after: args.cold_after.into(),
        wake_delay: args.wake_delay.into(),
        faults,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sprite_operator::sim::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sim: {e}");
            ExitCode::FAILURE
        }
    }
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
