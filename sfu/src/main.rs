//! `balie-sfu`: run the SFU, or make a development token.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use balie_sfu::config::Config;
use balie_sfu::ids::RoomId;
use balie_sfu::token::{make_dev_token, DevTokenRequest, Loa, Role};
use balie_sfu::Server;
use clap::{Parser, Subcommand, ValueEnum};

/// balie's SFU: video calls for the digital counter (Digitale Balie).
///
/// Without a subcommand it serves: HTTP signalling (our API, WHIP, WHEP),
/// /healthz, /readyz, /metrics, and one media shard per core. Without
/// --config it uses the embedded development config (everything on 127.0.0.1).
#[derive(Parser, Debug)]
#[command(name = "balie-sfu", version, about, long_about)]
struct Cli {
    /// Config file (TOML); default: the embedded configs/dev.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// HTTP listen address, overriding the config's `http`.
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// Address to advertise in ICE candidates (repeatable), overriding
    /// `media.advertise_ips`; what clients reach behind NAT or in Kubernetes.
    #[arg(long, value_name = "IP")]
    advertise: Vec<IpAddr>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log filter in RUST_LOG syntax (default: $RUST_LOG, else "info").
    #[arg(long, value_name = "FILTER", global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print a token signed with the configured development secret (auth.hs256_secret).
    /// Refuses when none is set: production tokens come from the municipality's portal.
    Token {
        /// The room.
        #[arg(long)]
        room: String,
        /// A pseudonymous identity (the `sub` claim); never a citizen service number.
        #[arg(long)]
        identity: String,
        /// citizen, official, interpreter or observer.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Display name shown to the others in the call.
        #[arg(long)]
        name: Option<String>,
        /// DigiD assurance level: basis, midden, substantieel or hoog.
        #[arg(long, value_parser = parse_loa)]
        loa: Option<Loa>,
        /// Lifetime, e.g. 30m, 1h, 8h.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| "expected citizen, official, interpreter or observer".into())
}

fn parse_loa(s: &str) -> Result<Loa, String> {
    Loa::parse(s).ok_or_else(|| "expected basis, midden, substantieel or hoog".into())
}

fn init_logs(format: LogFormat, filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::new(f),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format, cli.log.as_deref());
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("balie-sfu: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Cmd::Token {
            room,
            identity,
            role,
            name,
            loa,
            ttl,
        }) => {
            let Some(room) = RoomId::parse(&room) else {
                eprintln!("balie-sfu: room names are 1-128 characters of A-Z a-z 0-9 . _ -");
                return ExitCode::from(2);
            };
            let req = DevTokenRequest {
                room,
                identity,
                role,
                name,
                loa,
                ttl,
            };
            match make_dev_token(&config.auth, &req) {
                Ok(t) => {
                    println!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("balie-sfu: {e}");
                    ExitCode::from(2)
                }
            }
        }
        None => {
            let config = match config.with_overrides(cli.http, &cli.advertise) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("balie-sfu: {e}");
                    return ExitCode::from(2);
                }
            };
            serve(config)
        }
    }
}

fn serve(config: Config) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("balie-http")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("balie-sfu: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        // Installed before anything is announced, so an early SIGTERM drains too.
        let shutdown = shutdown_signal();
        let drain_timeout = config.drain.timeout;
        let server = match Server::start(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("balie-sfu: {e}");
                return ExitCode::FAILURE;
            }
        };
        print_banner(&server);
        shutdown.await;
        tracing::info!("shutdown signal: draining");
        server.drain(drain_timeout).await;
        tracing::info!("drained; bye");
        ExitCode::SUCCESS
    })
}

/// Tell the operator where to go. Write errors are ignored: a closed stdout
/// must never stop a media server.
fn print_banner(server: &Server) {
    use std::io::Write;
    let url = format!("http://{}", server.http_addr);
    let shards: Vec<String> = server.shard_addrs.iter().map(|a| a.to_string()).collect();
    let text = format!(
        "balie-sfu is serving on {url}\n\
         \x20 the counter: open {url}/ in a browser{}\n\
         \x20 media shards on UDP {}\n\
         \x20 health: {url}/healthz  readiness: {url}/readyz  metrics: {url}/metrics\n\
         \x20 make a token: cargo run -p balie-sfu -- token --room demo --identity anna --role citizen --loa substantieel\n\
         \x20 join: POST an SDP offer to {url}/v1/rooms/demo/sessions with 'Authorization: Bearer TOKEN'\n",
        if server.dev() { " (development: it makes test links)" } else { "" },
        shards.join(", ")
    );
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed when this is
/// called, before the returned future is first polled.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    async move {
        match term {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
