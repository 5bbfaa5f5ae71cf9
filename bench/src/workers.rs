//! balie-transcoder workers the bench starts beside the balie-sfu it starts
//! (`target.offload_workers`): development certificates, one
//! `balie-transcoder serve` per worker in the target's place (loopback or
//! its namespace), the SFU's `[offload]` naming them, and what they did.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::site::Site;

/// Running workers; stopped when dropped.
pub struct Workers {
    children: Vec<Child>,
    metrics: Vec<String>,
    http: reqwest::blocking::Client,
    dir: PathBuf,
    /// The SFU's `[offload]` section for them.
    pub config: String,
}

/// What the workers did so far, summed over them (their own metrics).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WorkerCounts {
    /// Transcode sessions opened.
    pub sessions_opened: f64,
    /// Source frames received.
    pub frames_in: f64,
    /// Layer frames sent back.
    pub frames_out: f64,
    /// Source frames not transcoded (past their deadline, queue full,
    /// waiting for a keyframe).
    pub frames_dropped: f64,
}

/// The workers over a run, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct WorkersReport {
    /// How many the bench started.
    pub count: usize,
    /// Their CPU over the hold (the window of the server's), seconds.
    pub cpu_seconds: f64,
    /// The same over the hold's length: cores busy.
    pub cpu_cores: f64,
    /// Their resident memory at the end, bytes.
    pub rss_bytes: u64,
    /// Over the whole run.
    #[serde(flatten)]
    pub counts: WorkerCounts,
}

/// A port nothing on `ip` (or, where `ip` is not this namespace's, on
/// loopback) uses now.
fn free_port(ip: IpAddr, udp: bool) -> Result<u16, String> {
    let probe = |ip: IpAddr| -> std::io::Result<u16> {
        let at = SocketAddr::new(ip, 0);
        if udp {
            std::net::UdpSocket::bind(at)?
                .local_addr()
                .map(|a| a.port())
        } else {
            std::net::TcpListener::bind(at)?
                .local_addr()
                .map(|a| a.port())
        }
    };
    probe(ip)
        .or_else(|_| probe(IpAddr::from([127, 0, 0, 1])))
        .map_err(|e| format!("a free port: {e}"))
}

/// The end of a worker's log, for an error.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

impl Workers {
    /// Start `n` workers of `binary` in `site`; each answers its metrics
    /// endpoint before this returns.
    pub fn start(binary: &Path, n: usize, site: &Site) -> Result<Workers, String> {
        let dir = std::env::temp_dir().join(format!(
            "balie-bench-workers-{}-{}",
            std::process::id(),
            site.netns.as_deref().unwrap_or("lo")
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut workers = Workers {
            children: Vec::new(),
            metrics: Vec::new(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .map_err(|e| e.to_string())?,
            dir,
            config: String::new(),
        };
        let ip = site.server_ip;
        let certs = workers.dir.join("certs");
        let made = Command::new(binary)
            .arg("certs")
            .arg("--out")
            .arg(&certs)
            .arg("--name")
            .arg(ip.to_string())
            .output()
            .map_err(|e| format!("running {}: {e}", binary.display()))?;
        if !made.status.success() {
            return Err(format!(
                "{} certs: {}",
                binary.display(),
                String::from_utf8_lossy(&made.stderr).trim()
            ));
        }
        let mut quic = Vec::new();
        for i in 0..n {
            let listen = SocketAddr::new(ip, free_port(ip, true)?);
            let metrics = SocketAddr::new(ip, free_port(ip, false)?);
            let log = workers.log(i);
            let log_file =
                std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
            let child = site
                .command(binary)
                .arg("serve")
                .arg("--listen")
                .arg(listen.to_string())
                .arg("--metrics")
                .arg(metrics.to_string())
                .arg("--ca")
                .arg(certs.join("ca.pem"))
                .arg("--cert")
                .arg(certs.join("worker.pem"))
                .arg("--key")
                .arg(certs.join("worker.key"))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .map_err(|e| format!("starting {}: {e}", binary.display()))?;
            workers.children.push(child);
            workers.metrics.push(format!("http://{metrics}/metrics"));
            quic.push(format!("\"{listen}\""));
        }
        for (i, url) in workers.metrics.iter().enumerate() {
            let start = Instant::now();
            loop {
                if workers
                    .http
                    .get(url)
                    .send()
                    .is_ok_and(|r| r.status().is_success())
                {
                    break;
                }
                if let Ok(Some(status)) = workers.children[i].try_wait() {
                    return Err(format!(
                        "balie-transcoder worker {i} exited ({status}):\n{}",
                        log_tail(&workers.log(i))
                    ));
                }
                if start.elapsed() > Duration::from_secs(20) {
                    return Err(format!(
                        "balie-transcoder worker {i} did not serve its metrics within 20 s:\n{}",
                        log_tail(&workers.log(i))
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        workers.config = format!(
            "[offload]\nworkers = [{}]\nserver_name = \"{ip}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            quic.join(", "),
            certs.join("ca.pem").display(),
            certs.join("sfu.pem").display(),
            certs.join("sfu.key").display(),
        );
        Ok(workers)
    }

    /// Where worker `i` writes its standard error.
    fn log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("worker-{i}.log"))
    }

    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// The workers' processes, for CPU and memory.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// What they did so far (a worker that does not answer counts 0).
    pub fn counts(&self) -> WorkerCounts {
        let mut c = WorkerCounts::default();
        for url in &self.metrics {
            let text = self
                .http
                .get(url)
                .send()
                .and_then(|r| r.text())
                .unwrap_or_default();
            let sum = |prefix: &str| crate::run::sum_metric(&text, prefix);
            c.sessions_opened += sum("balie_transcoder_session_opens_total{outcome=\"opened\"");
            c.frames_in += sum("balie_transcoder_frames_in_total");
            c.frames_out += sum("balie_transcoder_frames_out_total");
            c.frames_dropped += sum("balie_transcoder_frames_dropped_total");
        }
        c
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
