//! A balie-transcoder worker in the test process, able to die abruptly.

use std::net::SocketAddr;
use std::path::Path;

use balie_offload::tls::TlsFiles;
use balie_sfu::offload::OffloadConfig;
use balie_transcoder::metrics::Metrics as WorkerMetrics;
use balie_transcoder::server::{CaptionsSetup, Worker, WorkerConfig};

/// A worker on its own runtime and thread, so that it can die abruptly:
/// shutting the runtime down stops its endpoint without a close frame, as
/// a crashed process or a lost node would.
pub struct TestWorker {
    pub addr: SocketAddr,
    pub metrics: WorkerMetrics,
    endpoint: quinn::Endpoint,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestWorker {
    pub fn start(dir: &Path) -> TestWorker {
        Self::start_with(dir, "127.0.0.1:0".parse().expect("addr"), None)
    }

    /// A worker on `listen`, making captions when `captions` is given.
    pub fn start_with(
        dir: &Path,
        listen: SocketAddr,
        captions: Option<CaptionsSetup>,
    ) -> TestWorker {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let metrics = WorkerMetrics::new();
        let worker = {
            let _in_runtime = runtime.enter();
            Worker::bind(
                &WorkerConfig {
                    listen,
                    tls: TlsFiles::dev_worker(dir),
                    max_sessions: 4,
                    placement: Default::default(),
                    captions,
                },
                metrics.clone(),
            )
            .expect("worker binds")
        };
        let addr = worker.local_addr().expect("addr");
        let endpoint = worker.endpoint();
        runtime.spawn(worker.run());
        TestWorker {
            addr,
            metrics,
            endpoint,
            runtime: Some(runtime),
        }
    }

    /// Serve the worker's `/metrics` as `balie-transcoder serve` does; the
    /// address. It dies with the worker.
    pub fn serve_metrics(&self) -> SocketAddr {
        let rt = self.runtime.as_ref().expect("worker running");
        let _in_runtime = rt.enter();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        rt.spawn(balie_transcoder::metrics::serve(
            listener,
            self.metrics.clone(),
        ));
        addr
    }

    pub fn sessions(&self) -> i64 {
        self.metrics.sessions.get()
    }

    /// Stop as `balie-transcoder serve` does on SIGTERM: a close frame on
    /// every connection.
    pub fn stop(&self) {
        balie_transcoder::server::stop(&self.endpoint);
    }

    pub fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `[offload]` for `workers`, with the development certificates in `dir`.
pub fn offload_config(dir: &Path, workers: &[&TestWorker]) -> OffloadConfig {
    OffloadConfig {
        workers: workers.iter().map(|w| w.addr.to_string()).collect(),
        server_name: Some("localhost".into()),
        ca: dir.join("ca.pem"),
        cert: dir.join("sfu.pem"),
        key: dir.join("sfu.key"),
        ..OffloadConfig::default()
    }
}
