//! The monitoring files of `configs/monitoring` against the real thing:
//! promtool checks the alert rules and runs their unit tests, and a real
//! Prometheus (Debian's `prometheus`, installed by `./scripts/test`)
//! scrapes balie-sfu and a balie-transcoder worker on loopback through a
//! call whose viewer gets a worker's layer. Every query of the Grafana
//! dashboard must then return data, every alert rule must evaluate, and
//! killing the worker must raise `BalieOffloadWorkerLost`.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use balie_offload::tls::make_dev_certs;
use balie_offload::Codec;
use common::single_layer::{call, show_at};
use common::worker::{offload_config, TestWorker};
use common::{run_until, TestServer};
use serde_json::Value;
use str0m::media::MediaKind;

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/monitoring")
}

/// A tool of Debian's `prometheus` package, run in `configs/monitoring`.
fn tool(name: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(name);
    cmd.args(args).current_dir(monitoring());
    cmd
}

/// Run promtool; its output, once it has succeeded.
fn promtool(args: &[&str]) -> String {
    let out = tool("promtool", args).output().unwrap_or_else(|e| {
        panic!("promtool: {e} (Debian's prometheus package has it; ./scripts/test installs it)")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// The names of the alerts in `alerts.yml`.
fn alert_names() -> Vec<String> {
    let rules = std::fs::read_to_string(monitoring().join("alerts.yml")).expect("alerts.yml");
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|n| n.trim().to_owned())
        .collect()
}

#[test]
fn the_alert_rules_pass_promtool_and_each_is_tested_firing_and_quiet() {
    // The example config and the rules it loads.
    promtool(&["check", "config", "prometheus.yml"]);
    let out = promtool(&["test", "rules", "alerts.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    // Each alert has a case where it fires and one where it stays quiet.
    let tests =
        std::fs::read_to_string(monitoring().join("alerts.test.yml")).expect("alerts.test.yml");
    let cases: Vec<(&str, bool)> = tests
        .split("alertname: ")
        .skip(1)
        .map(|case| {
            let name = case.split_whitespace().next().unwrap_or_default();
            let end = case.find("- interval:").unwrap_or(case.len());
            (name, case[..end].contains("exp_labels:"))
        })
        .collect();
    let names = alert_names();
    assert!(names.len() >= 20, "{names:?}");
    for name in &names {
        let fires = cases.iter().any(|(n, f)| n == name && *f);
        let quiet = cases.iter().any(|(n, f)| n == name && !*f);
        assert!(
            fires && quiet,
            "{name}: a firing case {fires}, a quiet one {quiet}"
        );
    }
    for (n, _) in &cases {
        assert!(names.iter().any(|a| a == n), "a test of no alert: {n}");
    }
}

/// A Prometheus on loopback, stopped when dropped.
struct Prometheus {
    child: Child,
    url: String,
    http: reqwest::blocking::Client,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrape `sfu` and `worker` every second, with the alert rules of
    /// `configs/monitoring` evaluated every second.
    fn start(sfu: &str, worker: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n\
             \x20 - job_name: balie-sfu\n    static_configs:\n      - targets: [\"{sfu}\"]\n\
             \x20 - job_name: balie-transcoder\n    static_configs:\n      - targets: [\"{worker}\"]\n",
            rules = monitoring().join("alerts.yml").display(),
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).expect("config");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = tool(
            "prometheus",
            &[
                &format!("--config.file={}", config_file.display()),
                &format!("--storage.tsdb.path={}", dir.path().join("data").display()),
                &format!("--web.listen-address=127.0.0.1:{port}"),
                "--log.level=warn",
            ],
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("prometheus: {e} (Debian's prometheus package; ./scripts/test installs it)")
        });
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::blocking::Client::new(),
            _dir: dir,
        };
        let ready = wait(Duration::from_secs(30), || {
            p.http
                .get(format!("{}/-/ready", p.url))
                .send()
                .is_ok_and(|r| r.status().is_success())
        });
        assert!(ready, "prometheus ready");
        p
    }

    fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let body = self
            .http
            .get(format!("{}/api/v1/{path}", self.url))
            .query(query)
            .send()
            .and_then(|r| r.text())
            .expect("prometheus answers");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// An instant query: its series, or the error Prometheus gave.
    fn query(&self, q: &str) -> Result<Vec<Value>, String> {
        let v = self.api("query", &[("query", q)]);
        if v["status"] != "success" {
            return Err(v["error"].to_string());
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The state of an alert (`pending`, `firing`), if it is active.
    fn alert_state(&self, name: &str) -> Option<String> {
        let v = self.api("alerts", &[]);
        v["data"]["alerts"]
            .as_array()?
            .iter()
            .filter(|a| a["labels"]["alertname"] == name)
            .filter_map(|a| a["state"].as_str())
            .max_by_key(|s| *s == "firing")
            .map(str::to_owned)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Every query of the Grafana dashboard, with its panel's title, and its
/// variables as "all" over the last minute.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(monitoring().join("grafana-dashboard.json"))
        .expect("grafana-dashboard.json");
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    let mut out = Vec::new();
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("a target has an expr");
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$sfu", ".+")
                .replace("$worker", ".+");
            out.push((p["title"].as_str().unwrap_or("?").to_owned(), expr));
        }
    }
    out
}

#[test]
fn prometheus_sees_a_call_through_a_worker_on_every_dashboard_panel_and_alerts_on_its_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_dev_certs(dir.path(), &["localhost".into()]).expect("certs");
    let mut worker = TestWorker::start(dir.path());
    let worker_metrics = worker.serve_metrics();
    let cfg = offload_config(dir.path(), &[&worker]);
    let srv = TestServer::start(|c| c.offload = cfg);
    let sfu = srv.url.trim_start_matches("http://").to_owned();
    let prom = Prometheus::start(&sfu, &worker_metrics.to_string());

    // A join with a token that is not one (the dashboard shows refusals).
    let refused = srv
        .http
        .post(format!("{}/v1/rooms/counter-monitoring/sessions", srv.url))
        .bearer_auth("not-a-token")
        .header("content-type", "application/sdp")
        .body("v=0\r\n")
        .send()
        .expect("refused join");
    assert_eq!(refused.status().as_u16(), 401);
    // A call whose viewer shows the video small: a worker makes its layer.
    let (mut publisher, mut viewer) = call(&srv, "counter-monitoring", Codec::Vp8);
    show_at(&mut publisher, &mut viewer, 180);
    let on_layer = run_until(
        &mut [&mut publisher, &mut viewer],
        Duration::from_secs(20),
        |_| worker.metrics.frames_out.get() >= 30,
    );
    assert!(on_layer, "the worker makes layers");
    // Some seconds of it, scraped every second.
    common::run_for(&mut [&mut publisher, &mut viewer], Duration::from_secs(6));
    let video = viewer
        .received
        .values()
        .filter(|r| r.kind == Some(MediaKind::Video))
        .map(|r| r.video.len())
        .sum::<usize>();
    assert!(video >= 100, "the viewer got video: {video} frames");
    let both_up = wait(Duration::from_secs(10), || {
        prom.query("sum(up)")
            .is_ok_and(|r| r.first().and_then(|s| s["value"][1].as_str()) == Some("2"))
    });
    assert!(both_up, "prometheus scrapes both");

    // Every dashboard query runs and shows something.
    let queries = dashboard_queries();
    assert!(queries.len() >= 40, "{} queries", queries.len());
    let mut wrong = Vec::new();
    for (panel, q) in &queries {
        match prom.query(q) {
            Ok(series) if series.is_empty() => wrong.push(format!("{panel}: no data: {q}")),
            Ok(_) => {}
            Err(e) => wrong.push(format!("{panel}: {e}: {q}")),
        }
    }
    assert!(wrong.is_empty(), "dashboard queries:\n{}", wrong.join("\n"));
    // The worker's fill: one session of the 4 it takes (TestWorker).
    let fill = prom
        .query("sum(balie_transcoder_sessions) / sum(balie_transcoder_max_sessions)")
        .expect("fill");
    assert_eq!(fill[0]["value"][1], "0.25", "{fill:?}");
    eprintln!("{} dashboard queries, each with data", queries.len());

    // Every alert rule loaded and evaluates; none fires on a healthy call.
    let rules = prom.api("rules", &[]);
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules"))
        .collect();
    assert_eq!(loaded.len(), alert_names().len());
    for r in &loaded {
        assert_eq!(r["health"], "ok", "{r}");
        assert_ne!(r["state"], "firing", "{r}");
    }

    // The worker dies: its loss counts from 0 to 1, and the alert fires.
    let killed = Instant::now();
    worker.kill();
    let fired = wait(Duration::from_secs(20), || {
        prom.alert_state("BalieOffloadWorkerLost").as_deref() == Some("firing")
    });
    assert!(fired, "BalieOffloadWorkerLost fires");
    eprintln!(
        "BalieOffloadWorkerLost fired {:?} after the kill",
        killed.elapsed()
    );
    // The worker's own scrape fails: BalieTranscoderDown waits its minute.
    let down = wait(Duration::from_secs(10), || {
        prom.alert_state("BalieTranscoderDown").is_some()
    });
    assert!(down, "BalieTranscoderDown is pending");
}
