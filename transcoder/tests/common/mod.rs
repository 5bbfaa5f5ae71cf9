//! A worker on loopback and a link to it, for the worker's tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;

use balie_offload::link::{client_endpoint, Link, LinkEvent};
use balie_offload::tls::{client_config, make_dev_certs, TlsFiles};
use balie_transcoder::metrics::Metrics;
use balie_transcoder::pipeline::Placement;
use balie_transcoder::server::{CaptionsSetup, Worker, WorkerConfig};
use tokio::sync::mpsc::UnboundedReceiver;

/// Development certificates for `localhost` and 127.0.0.1 in `dir`.
pub fn certs(dir: &Path) {
    make_dev_certs(dir, &["localhost".into(), "127.0.0.1".into()]).expect("dev certificates");
}

/// Start a worker on an ephemeral loopback port (making captions when
/// `captions` is given); its address, metrics and endpoint.
pub fn start_worker(
    dir: &Path,
    max_sessions: u32,
    captions: Option<CaptionsSetup>,
) -> (SocketAddr, Metrics, quinn::Endpoint) {
    start_worker_placed(dir, max_sessions, captions, Placement::default())
}

/// [`start_worker`] with sessions placed by `placement`.
pub fn start_worker_placed(
    dir: &Path,
    max_sessions: u32,
    captions: Option<CaptionsSetup>,
    placement: Placement,
) -> (SocketAddr, Metrics, quinn::Endpoint) {
    let metrics = Metrics::new();
    let worker = Worker::bind(
        &WorkerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            tls: TlsFiles::dev_worker(dir),
            max_sessions,
            placement,
            captions,
        },
        metrics.clone(),
    )
    .expect("worker binds");
    let addr = worker.local_addr().expect("addr");
    let ep = worker.endpoint();
    tokio::spawn(worker.run());
    (addr, metrics, ep)
}

/// A link to the worker at `addr`, as an SFU makes it.
pub async fn connect(dir: &Path, addr: SocketAddr) -> (Link, UnboundedReceiver<LinkEvent>) {
    let cfg = client_config(&TlsFiles::dev_sfu(dir)).expect("client config");
    let ep = client_endpoint(cfg, addr).expect("endpoint");
    Link::connect(&ep, addr, "localhost", "test-sfu")
        .await
        .expect("link")
}

/// Run `balie-transcoder serve` on loopback with development certificates
/// in `dir`, `args` and `envs` added, expecting it to stop at start: its
/// standard error.
pub fn serve_refused(dir: &Path, args: &[&str], envs: &[(&str, &std::ffi::OsStr)]) -> String {
    certs(dir);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_balie-transcoder"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ])
        .args(args)
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .arg("--cert")
        .arg(dir.join("worker.pem"))
        .arg("--key")
        .arg(dir.join("worker.key"))
        .envs(envs.iter().copied())
        .output()
        .expect("runs");
    assert!(!out.status.success(), "serve started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}
