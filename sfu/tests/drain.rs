//! SIGTERM drain of the real balie-sfu binary.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use balie_sfu::token::Role;
use common::{run_until, token, Client, Join};
use str0m::format::Codec;
use str0m::media::MediaKind;

struct Sfu {
    child: Child,
    /// Holds the config and the log; removed when the test ends.
    _dir: tempfile::TempDir,
    log: std::path::PathBuf,
    url: String,
    http: reqwest::blocking::Client,
}

impl Sfu {
    fn start(drain_timeout: &str) -> Sfu {
        let dir = tempfile::Builder::new()
            .prefix("balie-drain-")
            .tempdir()
            .expect("temp dir");
        let config = dir.path().join("sfu.toml");
        std::fs::write(
            &config,
            format!(
                "http = \"127.0.0.1:0\"\n[media]\nudp_bind = \"127.0.0.1\"\nshards = 1\n\
                 [auth]\nhs256_secret = \"{}\"\n[drain]\ntimeout = \"{drain_timeout}\"\n",
                common::SECRET
            ),
        )
        .expect("write config");
        let log = dir.path().join("sfu.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_balie-sfu"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("balie-sfu starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("first line");
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in {line:?}"))
            .to_string();
        Sfu {
            child,
            _dir: dir,
            log,
            url,
            http: reqwest::blocking::Client::new(),
        }
    }

    fn sigterm(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM sent");
    }

    fn join(&self, name: &str, role: Role) -> Client {
        Client::join_url(
            &self.http,
            &self.url,
            "drain",
            name,
            &token("drain", name, role),
            Join::Api,
            Codec::Vp8,
        )
    }

    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Sfu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sigterm_keeps_running_calls_refuses_new_ones_and_exits_when_they_end() {
    let mut sfu = Sfu::start("60s");
    let mut a = sfu.join("anna", Role::Interpreter);
    let mut b = sfu.join("bram", Role::Official);
    let tb = b.tag;
    assert!(run_until(
        &mut [&mut a, &mut b],
        Duration::from_secs(10),
        |c| { c[0].frames_from(tb, MediaKind::Video) >= 10 }
    ));
    sfu.sigterm();
    let ready = |s: &Sfu| {
        s.http
            .get(format!("{}/readyz", s.url))
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    let mut clients = [&mut a, &mut b];
    let end = Instant::now() + Duration::from_secs(5);
    while ready(&sfu) != 503 && Instant::now() < end {
        run_until(&mut clients, Duration::from_millis(50), |_| false);
    }
    assert_eq!(ready(&sfu), 503, "/readyz fails while draining");
    let (_, offer) = Client::prepare("late", Join::Api, Codec::Vp8);
    let r = sfu
        .http
        .post(format!("{}/v1/rooms/drain/sessions", sfu.url))
        .header("Content-Type", "application/sdp")
        .header(
            "Authorization",
            format!("Bearer {}", token("drain", "late", Role::Citizen)),
        )
        .body(offer.to_sdp_string())
        .send()
        .expect("http");
    assert_eq!(r.status().as_u16(), 503);
    // The running call goes on.
    let before = clients[0].frames_from(tb, MediaKind::Video);
    assert!(run_until(&mut clients, Duration::from_secs(10), |c| {
        c[0].frames_from(tb, MediaKind::Video) >= before + 30
    }));
    assert_eq!(
        sfu.wait_exit(Duration::from_millis(200)),
        None,
        "still serving the call"
    );
    // Both leave: the process exits 0.
    for c in clients.iter_mut() {
        c.send_json(&serde_json::json!({"type": "leave"}));
    }
    run_until(&mut clients, Duration::from_millis(500), |_| false);
    assert_eq!(sfu.wait_exit(Duration::from_secs(5)), Some(0));

    // Privacy: the info-level log has the calls' life cycle with pseudonyms,
    // but no display names, tokens or IP addresses.
    let log = std::fs::read_to_string(&sfu.log).expect("log");
    assert!(
        log.contains("session added") && log.contains("sub=anna"),
        "{log}"
    );
    assert!(log.contains("session closed"));
    let anna_token = token("drain", "anna", Role::Interpreter);
    let signature = anna_token.rsplit('.').next().expect("jwt");
    for secret in ["Name of anna", "Name of bram", signature, "127.0.0.1"] {
        assert!(
            !log.contains(secret),
            "the log must not contain {secret:?}:\n{log}"
        );
    }
}

#[test]
fn drain_timeout_ends_remaining_calls_with_a_bye_and_exits_zero() {
    let mut sfu = Sfu::start("1s");
    let mut a = sfu.join("anna", Role::Citizen);
    let mut b = sfu.join("bram", Role::Official);
    assert!(run_until(
        &mut [&mut a, &mut b],
        Duration::from_secs(10),
        |c| { !c[0].messages_of("welcome").is_empty() && !c[1].messages_of("welcome").is_empty() }
    ));
    let t0 = Instant::now();
    sfu.sigterm();
    let got_bye = run_until(&mut [&mut a, &mut b], Duration::from_secs(5), |c| {
        c.iter().all(|c| !c.messages_of("bye").is_empty())
    });
    assert!(got_bye, "clients are told why the call ends");
    assert_eq!(a.messages_of("bye")[0]["reason"], "drain");
    assert_eq!(sfu.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "waited for the drain timeout"
    );
}
