//! `balie-transcoder`: the offload worker. `serve` runs it; `certs` makes
//! development certificates for it and for balie-sfu.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use balie_offload::tls::{make_dev_certs, TlsFiles};
use balie_transcoder::metrics::Metrics;
use balie_transcoder::server::{Worker, WorkerConfig};
use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info};

#[derive(Parser)]
#[command(name = "balie-transcoder", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// FFmpeg on the CPU (always built).
    Cpu,
    /// NVDEC decode and GPU scaling (needs the `cuda` feature and a GPU).
    Cuda,
}

#[derive(Subcommand)]
enum Command {
    /// Serve SFUs over QUIC with mutual TLS.
    Serve {
        /// UDP address to listen on.
        #[arg(
            long,
            env = "BALIE_TRANSCODER_LISTEN",
            default_value = "127.0.0.1:4470"
        )]
        listen: SocketAddr,
        /// The CA that issued the SFUs' client certificates (PEM).
        #[arg(long, env = "BALIE_TRANSCODER_CA")]
        ca: PathBuf,
        /// This worker's certificate chain (PEM).
        #[arg(long, env = "BALIE_TRANSCODER_CERT")]
        cert: PathBuf,
        /// This worker's private key (PEM).
        #[arg(long, env = "BALIE_TRANSCODER_KEY")]
        key: PathBuf,
        /// Sessions held at most (default: two per CPU core).
        #[arg(long, env = "BALIE_TRANSCODER_MAX_SESSIONS")]
        max_sessions: Option<u32>,
        /// Where to serve Prometheus metrics (`/metrics`).
        #[arg(
            long,
            env = "BALIE_TRANSCODER_METRICS",
            default_value = "127.0.0.1:9471"
        )]
        metrics: SocketAddr,
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
    },
    /// Write a development CA and certificates for a worker and an SFU
    /// (ca.pem, worker.pem/.key, sfu.pem/.key). Not for production.
    Certs {
        /// Folder to write to.
        #[arg(long)]
        out: PathBuf,
        /// Names the worker is dialled by (repeat); default localhost,
        /// 127.0.0.1 and ::1.
        #[arg(long = "name")]
        names: Vec<String>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("balie-transcoder: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Certs { out, mut names } => {
            if names.is_empty() {
                names = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
            }
            let files = make_dev_certs(&out, &names).map_err(|e| e.to_string())?;
            for f in files {
                println!("{}", f.display());
            }
            Ok(())
        }
        Command::Serve {
            listen,
            ca,
            cert,
            key,
            max_sessions,
            metrics,
            backend,
        } => {
            if backend == Backend::Cuda {
                return Err(
                    "--backend cuda: this binary was built without the `cuda` feature \
                            (cargo build --release -p balie-transcoder --features cuda)"
                        .into(),
                );
            }
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
            let config = WorkerConfig {
                listen,
                tls: TlsFiles { ca, cert, key },
                max_sessions: max_sessions.unwrap_or(2 * cores),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("starting tokio: {e}"))?;
            rt.block_on(serve(config, metrics))
        }
    }
}

async fn serve(config: WorkerConfig, metrics_addr: SocketAddr) -> Result<(), String> {
    let metrics = Metrics::new();
    let worker = Worker::bind(&config, metrics.clone()).map_err(|e| e.to_string())?;
    let addr = worker.local_addr().map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .map_err(|e| format!("binding the metrics listener {metrics_addr}: {e}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move { m.render() }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    info!(%addr, max_sessions = config.max_sessions, backend = "cpu", metrics = %metrics_addr, "balie-transcoder serving");
    let endpoint = worker.endpoint();
    tokio::select! {
        _ = worker.run() => {}
        _ = tokio::signal::ctrl_c() => {
            info!("shutting down");
            endpoint.close(0u32.into(), b"shutdown");
            endpoint.wait_idle().await;
        }
    }
    Ok(())
}
