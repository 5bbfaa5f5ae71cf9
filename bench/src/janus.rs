//! Janus 1.1 with its VideoRoom plugin, over the HTTP API: the server the
//! bench starts (a generated config folder, run in a network namespace) and
//! the API calls a participant makes.
//!
//! The sequence (checked against Janus 1.1.2, ../shared/facts.md): `create`
//! a session; `attach` the videoroom plugin; a room per call; a publisher
//! `joinandconfigure`s with its offer and gets the answer in an event; once
//! its `webrtcup` has come, the others `join` as subscribers on a second
//! handle, get Janus' offer and `start` with their answer. Janus answers
//! plugin requests with `ack` over HTTP and the result later on the
//! session's long poll (`GET /janus/{session}`); errors come with HTTP 200.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::{json, Value};

use crate::site::Site;

/// Where Debian's janus package keeps its plugins and transports.
const LIB: &str = "/usr/lib/x86_64-linux-gnu/janus";
const PORT: u16 = 8088;

/// Janus, started by the bench.
pub struct Janus {
    child: Child,
    dir: PathBuf,
    /// `http://ip:port/janus`.
    pub url: String,
    http: Client,
    /// A session and videoroom handle of the bench's own, for rooms.
    control: Option<(Session, u64)>,
}

impl Janus {
    /// Start `janus` in `site` (a namespace: Janus sends no media over
    /// loopback) with `threads` event loops, VideoRoom and HTTP only.
    pub fn start(site: &Site, threads: usize) -> Result<Janus, String> {
        let iface = site
            .server_if
            .as_deref()
            .ok_or("Janus needs a network namespace (it skips loopback for media)")?;
        let binary = which("janus")
            .ok_or("janus is not installed: `apt-get install -y janus` (./scripts/test does it)")?;
        let dir = std::env::temp_dir().join(format!("balie-bench-janus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["plugins", "transports", "events", "loggers"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        // Only the VideoRoom plugin and the HTTP transport are loaded.
        for (sub, lib) in [
            ("plugins", "libjanus_videoroom.so"),
            ("transports", "libjanus_http.so"),
        ] {
            let from = Path::new(LIB).join(sub).join(lib);
            if !from.exists() {
                return Err(format!("{} is missing (package janus)", from.display()));
            }
            std::os::unix::fs::symlink(&from, dir.join(sub).join(lib))
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let d = dir.display();
        let files = [
            (
                "janus.jcfg",
                format!(
                    "general: {{\n configs_folder = \"{d}\"\n plugins_folder = \"{d}/plugins\"\n \
                     transports_folder = \"{d}/transports\"\n events_folder = \"{d}/events\"\n \
                     loggers_folder = \"{d}/loggers\"\n debug_level = 4\n event_loops = {threads}\n \
                     session_timeout = 0\n}}\n\
                     media: {{\n ipv6 = false\n rtp_port_range = \"20000-60000\"\n}}\n\
                     nat: {{\n nice_debug = false\n ice_lite = true\n full_trickle = false\n \
                     ignore_mdns = true\n ice_enforce_list = \"{iface}\"\n}}\n\
                     plugins: {{\n}}\ntransports: {{\n}}\nloggers: {{\n}}\nevents: {{\n}}\n"
                ),
            ),
            ("janus.plugin.videoroom.jcfg", "general: {\n}\n".to_string()),
            (
                "janus.transport.http.jcfg",
                format!(
                    "general: {{\n json = \"compact\"\n base_path = \"/janus\"\n http = true\n \
                     port = {PORT}\n ip = \"{}\"\n https = false\n}}\n\
                     admin: {{\n admin_http = false\n admin_https = false\n}}\n",
                    site.server_ip
                ),
            ),
        ];
        for (name, text) in files {
            std::fs::write(dir.join(name), text).map_err(|e| format!("{d}/{name}: {e}"))?;
        }
        let log = dir.join("janus.log");
        let child = site
            .command(&binary)
            .arg("-F")
            .arg(&dir)
            .arg("-C")
            .arg(dir.join("janus.jcfg"))
            .args(["-o", "-N", "-L"])
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let http = Client::builder()
            .timeout(Duration::from_secs(40))
            .build()
            .map_err(|e| e.to_string())?;
        let mut janus = Janus {
            child,
            url: format!("http://{}:{PORT}/janus", site.server_ip),
            dir,
            http,
            control: None,
        };
        let t0 = Instant::now();
        loop {
            let up = janus
                .http
                .get(format!("{}/info", janus.url))
                .timeout(Duration::from_millis(500))
                .send()
                .is_ok_and(|r| r.status().is_success());
            if up {
                break;
            }
            if let Ok(Some(status)) = janus.child.try_wait() {
                return Err(format!("janus exited ({status}): {}", janus.log_tail()));
            }
            if t0.elapsed() > Duration::from_secs(20) {
                return Err(format!(
                    "janus did not answer within 20 s: {}",
                    janus.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut control = janus.session()?;
        let handle = control.attach()?;
        janus.control = Some((control, handle));
        Ok(janus)
    }

    /// The last lines of Janus' log, for errors.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("janus.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A new API session.
    pub fn session(&self) -> Result<Session, String> {
        Session::create(&self.http, &self.url)
    }

    /// A room for `publishers` participants, VP8 and Opus.
    pub fn create_room(&mut self, room: u64, publishers: usize) -> Result<(), String> {
        let (session, handle) = self.control.as_mut().ok_or("janus: no control session")?;
        session.request(
            *handle,
            json!({
                "request": "create", "room": room, "publishers": publishers.max(1),
                "bitrate": 4_000_000, "videocodec": "vp8", "audiocodec": "opus",
                "notify_joining": false, "permanent": false,
            }),
            None,
        )?;
        Ok(())
    }
}

impl Drop for Janus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `name` on the PATH (Debian puts janus in /usr/bin).
fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// One Janus API session: requests, and the events of its long poll.
pub struct Session {
    http: Client,
    /// `http://ip:port/janus/{id}`.
    url: String,
    next_tx: u64,
    /// Events the long poll brought that nobody has asked for yet.
    events: VecDeque<Value>,
}

/// Send a request (with a JSON body) and read the JSON reply.
fn fetch(req: reqwest::blocking::RequestBuilder, body: Option<&Value>) -> Result<Value, String> {
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(b.to_string()),
        None => req,
    };
    let text = req
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.text())
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("not JSON ({e}): {text:.200}"))
}

/// Janus' own error, or a plugin's (`error_code` in the plugin data).
fn check(v: &Value) -> Result<(), String> {
    if v["janus"] == "error" {
        return Err(format!(
            "janus error {}: {}",
            v["error"]["code"],
            v["error"]["reason"].as_str().unwrap_or("?")
        ));
    }
    let data = &v["plugindata"]["data"];
    if !data["error_code"].is_null() {
        return Err(format!(
            "videoroom error {}: {}",
            data["error_code"],
            data["error"].as_str().unwrap_or("?")
        ));
    }
    Ok(())
}

impl Session {
    fn create(http: &Client, base: &str) -> Result<Session, String> {
        let v = fetch(
            http.post(base),
            Some(&json!({"janus": "create", "transaction": "c"})),
        )
        .map_err(|e| format!("janus create: {e}"))?;
        check(&v)?;
        let id = v["data"]["id"]
            .as_u64()
            .ok_or_else(|| format!("janus create: no session id in {v}"))?;
        Ok(Session {
            http: http.clone(),
            url: format!("{base}/{id}"),
            next_tx: 0,
            events: VecDeque::new(),
        })
    }

    fn tx(&mut self) -> String {
        self.next_tx += 1;
        format!("t{}", self.next_tx)
    }

    fn post(&mut self, url: &str, mut body: Value) -> Result<(String, Value), String> {
        let tx = self.tx();
        body["transaction"] = json!(tx);
        let v = fetch(self.http.post(url), Some(&body))
            .map_err(|e| format!("janus {}: {e}", body["janus"]))?;
        check(&v)?;
        Ok((tx, v))
    }

    /// Attach the VideoRoom plugin: a handle.
    pub fn attach(&mut self) -> Result<u64, String> {
        let url = self.url.clone();
        let (_, v) = self.post(
            &url,
            json!({"janus": "attach", "plugin": "janus.plugin.videoroom"}),
        )?;
        v["data"]["id"]
            .as_u64()
            .ok_or_else(|| format!("janus attach: no handle id in {v}"))
    }

    /// A VideoRoom request on `handle`, with a JSEP when given: the
    /// plugin's data and Janus' JSEP, from the reply or (for requests Janus
    /// answers later) from the event with the same transaction.
    pub fn request(
        &mut self,
        handle: u64,
        body: Value,
        jsep: Option<Value>,
    ) -> Result<(Value, Option<Value>), String> {
        let mut msg = json!({"janus": "message", "body": body});
        if let Some(j) = jsep {
            msg["jsep"] = j;
        }
        let url = format!("{}/{handle}", self.url);
        let (tx, v) = self.post(&url, msg)?;
        let v = if v["janus"] == "ack" {
            self.wait(Duration::from_secs(10), |e| e["transaction"] == tx.as_str())?
        } else {
            v
        };
        check(&v)?;
        Ok((
            v["plugindata"]["data"].clone(),
            v.get("jsep").filter(|j| !j.is_null()).cloned(),
        ))
    }

    /// Wait up to `limit` for an event `want` accepts; others are kept.
    pub fn wait(
        &mut self,
        limit: Duration,
        want: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        let end = Instant::now() + limit;
        loop {
            if let Some(i) = self.events.iter().position(&want) {
                return Ok(self.events.remove(i).unwrap_or_default());
            }
            if Instant::now() >= end {
                return Err(format!(
                    "janus: the awaited event did not come within {} s",
                    limit.as_secs()
                ));
            }
            let v = fetch(self.http.get(format!("{}?maxev=10", self.url)), None)
                .map_err(|e| format!("janus long poll: {e}"))?;
            match v {
                Value::Array(list) => self.events.extend(list),
                v if v["janus"] == "keepalive" => {}
                v => {
                    check(&v)?;
                    self.events.push_back(v);
                }
            }
        }
    }
}

/// Janus' subscriber `streams` as balie's `tracks` (mid and publisher),
/// for the receiver's frame clocks.
pub fn tracks(streams: &Value) -> Value {
    Value::Array(
        streams
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                Some(json!({
                    "mid": s["mid"].as_str()?,
                    "participant": s["feed_id"].as_u64()?.to_string(),
                }))
            })
            .collect(),
    )
}
