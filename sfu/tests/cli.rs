//! The balie-sfu command line: help, the token helper, config errors, JSON logs.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use balie_sfu::config::DEV_CONFIG;
use balie_sfu::token::{Loa, Role, Verifier};

fn sfu() -> Command {
    Command::new(env!("CARGO_BIN_EXE_balie-sfu"))
}

/// A file `name` holding `text` in a fresh directory, removed when the
/// returned guard drops.
fn temp_file(name: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("balie-cli-")
        .tempdir()
        .expect("temp dir");
    let p = dir.path().join(name);
    std::fs::write(&p, text).expect("write");
    (dir, p)
}

#[test]
fn help_documents_every_flag() {
    let out = sfu().arg("--help").output().expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--http",
        "--advertise",
        "--log-format",
        "--log",
        "token",
    ] {
        assert!(text.contains(flag), "--help mentions {flag}:\n{text}");
    }
    let out = sfu().args(["token", "--help"]).output().expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--room", "--identity", "--role", "--name", "--loa", "--ttl"] {
        assert!(text.contains(flag), "token --help mentions {flag}");
    }
}

#[test]
fn token_command_signs_with_the_dev_secret() {
    let out = sfu()
        .args([
            "token",
            "--room",
            "demo",
            "--identity",
            "anna",
            "--role",
            "citizen",
            "--loa",
            "substantieel",
            "--name",
            "Anna",
            "--ttl",
            "10m",
        ])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).expect("utf8");
    let dev = balie_sfu::Config::parse(DEV_CONFIG, "dev").expect("dev config");
    let claims = Verifier::new(&dev.auth)
        .expect("verifier")
        .verify(token.trim())
        .expect("the printed token verifies");
    assert_eq!(claims.room, "demo");
    assert_eq!(claims.role, Role::Citizen);
    assert_eq!(claims.loa, Some(Loa::Substantieel));
    assert!(claims.exp <= balie_sfu::token::unix_now() + 600);

    // Bad role: a clear error.
    let out = sfu()
        .args([
            "token",
            "--room",
            "demo",
            "--identity",
            "a",
            "--role",
            "king",
        ])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("citizen, official"));
}

#[test]
fn token_command_refuses_without_a_dev_secret() {
    let jwks = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys/jwks.json");
    let (_dir, cfg) = temp_file(
        "prod.toml",
        &format!(
            "[media]\nudp_bind = \"127.0.0.1\"\n[auth]\njwks_file = \"{}\"\n",
            jwks.display()
        ),
    );
    let out = sfu()
        .arg("--config")
        .arg(&cfg)
        .args([
            "token",
            "--room",
            "demo",
            "--identity",
            "a",
            "--role",
            "official",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no development secret"));
}

#[test]
fn a_bad_config_is_refused_with_its_reason() {
    let (_dir, cfg) = temp_file("bad.toml", "[rooms]\nmax_participants = \"many\"\n");
    let out = sfu().arg("--config").arg(&cfg).output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("max_participants"),
        "{err}"
    );
    let out = sfu()
        .args(["--config", "/nonexistent/balie.toml"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn json_logs_are_json() {
    let mut child = sfu()
        .args(["--http", "127.0.0.1:0", "--log-format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    // Wait for the banner: the signal handler is in place by then.
    let mut banner = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut banner)
        .expect("banner");
    assert!(banner.contains("serving on"), "{banner}");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
    let stderr = child.stderr.take().expect("stderr");
    let lines: Vec<String> = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .collect();
    let status = child.wait().expect("exits");
    assert!(status.success());
    assert!(!lines.is_empty());
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string());
    }
}
