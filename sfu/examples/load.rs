//! A simple load for docs/benchmarks.md (the full harness is balie-bench's job).
//!
//! Three measurements, each printed as one line of Markdown table:
//!
//! - `sim`: N 1:1 calls (audio + video) on one `ShardCore` in the virtual-time
//!   simulator; CPU spent inside the core per datagram it sends. No sockets,
//!   no HTTP: the pure cost of str0m + forwarding.
//! - `setup`: the cost of building a session (`answer_offer`: Rtc creation and
//!   answering an offer), the work the HTTP layer does per join.
//! - `udp URL PID`: N 1:1 calls through a running balie-sfu over loopback UDP;
//!   the server's CPU (from /proc/PID/stat) per datagram it sent and received,
//!   its RSS per session, and joins per second.
//!
//! ```text
//! cargo run --release --example load -- sim 50 20
//! cargo run --release --example load -- setup 200
//! cargo run --release --example load -- udp http://127.0.0.1:8080 $(pidof balie-sfu) 50 20
//! ```

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use balie_sfu::config::DEV_CONFIG;
use balie_sfu::shard::session::{answer_offer, SessionSetup};
use balie_sfu::shard::ShardConfig;
use balie_sfu::sim::{Join, Peer, Sim};
use balie_sfu::token::{make_dev_token, DevTokenRequest, Role};
use balie_sfu::Config;
use str0m::change::SdpAnswer;
use str0m::format::Codec;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: u64| -> u64 {
        args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default)
    };
    match args.first().map(String::as_str) {
        Some("sim") => {
            let flag = |f: &str| args.iter().any(|a| a == f);
            sim(
                num(1, 50) as usize,
                num(2, 20),
                flag("simulcast"),
                !flag("fixed"),
            )
        }
        Some("setup") => setup(num(1, 200) as usize),
        Some("udp") => {
            let url = args
                .get(1)
                .cloned()
                .unwrap_or_else(|| "http://127.0.0.1:8080".into());
            let pid: u32 = args
                .get(2)
                .and_then(|s| s.parse().ok())
                .expect("PID of balie-sfu");
            udp(&url, pid, num(3, 20) as usize, num(4, 20));
        }
        _ => eprintln!("usage: load sim CALLS SECONDS | setup N | udp URL PID CALLS SECONDS"),
    }
}

/// Thread CPU time of the calling thread.
fn thread_cpu() -> Duration {
    // /proc/thread-self/stat fields 14 and 15: utime, stime in clock ticks.
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    ticks(&stat)
}

fn ticks(stat: &str) -> Duration {
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // After the ")" field 3 is index 0, so utime (14) is index 11, stime (15) index 12.
    let t = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(t * 10) // USER_HZ = 100 on Linux
}

fn sim(calls: usize, seconds: u64, simulcast: bool, adaptive: bool) {
    let config = ShardConfig {
        adaptive_layers: adaptive,
        ..ShardConfig::default()
    };
    let mut s = Sim::new(1, config);
    let join = if simulcast {
        Join::ApiSimulcast
    } else {
        Join::Api
    };
    for c in 0..calls {
        let room = format!("r{c}");
        s.join(&room, Sim::claims(&room, "a", Role::Interpreter), join);
        s.join(&room, Sim::claims(&room, "b", Role::Official), join);
    }
    // Warm up: connect, negotiate, reach steady state.
    s.run_for(Duration::from_secs(3));
    let (cpu0, sent0) = (s.shard_busy, s.shard_sent);
    let wall = Instant::now();
    s.run_for(Duration::from_secs(seconds));
    let cpu = s.shard_busy - cpu0;
    let sent = s.shard_sent - sent0;
    let frames: u64 = s
        .peers
        .iter()
        .map(|p| p.received.values().map(|r| r.frames).sum::<u64>())
        .sum();
    let mode = match (simulcast, adaptive) {
        (false, _) => "",
        (true, true) => ", simulcast, adaptive",
        (true, false) => ", simulcast, fixed layer",
    };
    println!(
        "| sim | {calls} 1:1 calls{mode}, {seconds} s virtual | {sent} datagrams out | {:.2} µs core CPU per datagram out | {:.0} datagrams per core-second | {frames} frames received | {:.1} s wall |",
        cpu.as_secs_f64() * 1e6 / sent.max(1) as f64,
        sent as f64 / cpu.as_secs_f64().max(1e-9),
        wall.elapsed().as_secs_f64()
    );
}

fn setup(n: usize) {
    balie_sfu::server::install_crypto();
    let setup = SessionSetup::new(400, true).expect("certificate");
    let addr = "127.0.0.1:5000".parse().expect("addr");
    let offers: Vec<_> = (0..n)
        .map(|i| Peer::new("x", i as u32, Join::Api, Codec::Vp8, addr, Instant::now()).1)
        .collect();
    let cpu0 = thread_cpu();
    let t0 = Instant::now();
    for offer in offers {
        let _ = answer_offer(&setup, &[addr], offer, Instant::now()).expect("answers");
    }
    let wall = t0.elapsed();
    let cpu = thread_cpu() - cpu0;
    println!(
        "| setup | {n} sessions | {:.2} ms wall per session | {:.2} ms CPU per session | {:.0} sessions per core-second |",
        wall.as_secs_f64() * 1e3 / n as f64,
        cpu.as_secs_f64() * 1e3 / n as f64,
        n as f64 / cpu.as_secs_f64().max(1e-9)
    );
}

fn proc_cpu(pid: u32) -> Duration {
    ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

fn proc_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn metric(http: &reqwest::blocking::Client, url: &str, name: &str) -> f64 {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct UdpPeer {
    peer: Peer,
    socket: UdpSocket,
}

fn udp(url: &str, pid: u32, calls: usize, seconds: u64) {
    balie_sfu::server::install_crypto();
    let config = Config::parse(DEV_CONFIG, "dev").expect("dev config");
    let http = reqwest::blocking::Client::new();
    let rss0 = proc_rss(pid);
    let mut peers: Vec<UdpPeer> = Vec::new();
    let t0 = Instant::now();
    for c in 0..calls {
        for (who, role) in [("a", Role::Interpreter), ("b", Role::Official)] {
            let room = format!("load{c}");
            let token = make_dev_token(
                &config.auth,
                &DevTokenRequest {
                    room: balie_sfu::ids::RoomId::parse(&room).expect("room"),
                    identity: who.into(),
                    role,
                    name: None,
                    loa: None,
                    ttl: Duration::from_secs(3600),
                },
            )
            .expect("token");
            let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
            socket.set_nonblocking(true).expect("nonblocking");
            let addr = socket.local_addr().expect("addr");
            let tag = peers.len() as u32 + 1;
            let (mut peer, offer) =
                Peer::new(who, tag, Join::Api, Codec::Vp8, addr, Instant::now());
            let resp = http
                .post(format!("{url}{}", Join::Api.path(&room)))
                .header("Content-Type", "application/sdp")
                .header("Authorization", format!("Bearer {token}"))
                .body(offer.to_sdp_string())
                .send()
                .expect("http");
            assert_eq!(resp.status().as_u16(), 201);
            let answer = SdpAnswer::from_sdp_string(&resp.text().expect("body")).expect("answer");
            peer.accept_answer(answer).expect("accept");
            peers.push(UdpPeer { peer, socket });
        }
    }
    let join_wall = t0.elapsed();
    let mut buf = vec![0u8; 2048];
    let mut out = Vec::new();
    let mut drive = |peers: &mut Vec<UdpPeer>, d: Duration| {
        let end = Instant::now() + d;
        while Instant::now() < end {
            let now = Instant::now();
            for p in peers.iter_mut() {
                while let Ok((n, src)) = p.socket.recv_from(&mut buf) {
                    p.peer.handle_datagram(now, src, &buf[..n]);
                }
                p.peer.tick(now);
                p.peer.poll(&mut out);
                for t in out.drain(..) {
                    let _ = p.socket.send_to(&t.contents, t.destination);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    drive(&mut peers, Duration::from_secs(3));
    let connected = peers.iter().filter(|p| p.peer.connected).count();
    let (cpu0, out0, in0) = (
        proc_cpu(pid),
        metric(&http, url, "balie_udp_packets_total{direction=\"out\""),
        metric(&http, url, "balie_udp_packets_total{direction=\"in\""),
    );
    let load0 = thread_cpu();
    drive(&mut peers, Duration::from_secs(seconds));
    let load_cpu = thread_cpu() - load0;
    // Steady state: the retransmission buffers have filled by now.
    let rss = proc_rss(pid);
    let cpu = proc_cpu(pid) - cpu0;
    let pkts_out = metric(&http, url, "balie_udp_packets_total{direction=\"out\"") - out0;
    let pkts_in = metric(&http, url, "balie_udp_packets_total{direction=\"in\"") - in0;
    let frames: u64 = peers
        .iter()
        .map(|p| p.peer.received.values().map(|r| r.frames).sum::<u64>())
        .sum();
    println!(
        "| udp | {calls} 1:1 calls ({connected} of {} peers connected), {seconds} s | {pkts_in:.0} in / {pkts_out:.0} out | {:.2} µs server CPU per datagram out ({:.2} per datagram in+out) | {:.0} datagrams out per server CPU-second | {:.0} KiB RSS per session | {:.1} joins/s (sequential HTTP) | load generator CPU {:.0}% | {frames} frames received |",
        peers.len(),
        cpu.as_secs_f64() * 1e6 / pkts_out.max(1.0),
        cpu.as_secs_f64() * 1e6 / (pkts_in + pkts_out).max(1.0),
        pkts_out / cpu.as_secs_f64().max(1e-9),
        (rss.saturating_sub(rss0)) as f64 / 1024.0 / peers.len() as f64,
        peers.len() as f64 / join_wall.as_secs_f64(),
        load_cpu.as_secs_f64() * 100.0 / seconds as f64,
    );
    for p in peers.iter_mut() {
        p.peer.send_json(&serde_json::json!({"type": "leave"}));
    }
    drive(&mut peers, Duration::from_millis(500));
}
