//! Where the target runs: on loopback, or in a network namespace of the
//! bench's own joined to the bench by a veth pair.
//!
//! Janus never uses loopback for media (it skips loopback interfaces when it
//! gathers candidates), so it runs in a namespace; `compare` puts balie-sfu
//! in the same kind of namespace so that both see the same network path.
//! Creating a namespace needs root (CI runs as root).

use std::net::IpAddr;
use std::process::Command;

/// The target's side of the network.
pub struct Site {
    /// The namespace the target runs in (None: the bench's own, loopback).
    pub netns: Option<String>,
    /// The address the target binds (HTTP and media).
    pub server_ip: IpAddr,
    /// The address the participants bind.
    pub client_ip: IpAddr,
    /// The veth interface inside the namespace (for Janus' ICE list).
    pub server_if: Option<String>,
    host_if: Option<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running `ip` (package iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Site {
    /// Loopback: server and participants on 127.0.0.1.
    pub fn loopback() -> Site {
        let lo = IpAddr::from([127, 0, 0, 1]);
        Site {
            netns: None,
            server_ip: lo,
            client_ip: lo,
            server_if: None,
            host_if: None,
        }
    }

    /// An external server at `url` (`http://host:port`): participants
    /// bind to the local address the route to it leaves from.
    pub fn towards(url: &str) -> Result<Site, String> {
        let authority = url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .ok_or_else(|| format!("target.url: no host in {url:?}"))?;
        let with_port = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let server = std::net::ToSocketAddrs::to_socket_addrs(&with_port)
            .map_err(|e| format!("target.url: {authority}: {e}"))?
            .next()
            .ok_or_else(|| format!("target.url: {authority} resolves to nothing"))?;
        let any: std::net::SocketAddr = if server.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .map_err(|e| format!("{e}"))?;
        // Connecting a UDP socket sends nothing; it asks the kernel's route.
        let probe = std::net::UdpSocket::bind(any).map_err(|e| e.to_string())?;
        probe
            .connect(server)
            .map_err(|e| format!("target.url: no route to {server}: {e}"))?;
        let local = probe.local_addr().map_err(|e| e.to_string())?;
        Ok(Site {
            netns: None,
            server_ip: server.ip(),
            client_ip: local.ip(),
            server_if: None,
            host_if: None,
        })
    }

    /// A namespace of this process's own (named after its pid and `tag`),
    /// joined by a veth pair: 10.213.N.1 here, 10.213.N.2 inside.
    pub fn netns(tag: u8) -> Result<Site, String> {
        // `ip netns add` fails without root; say what to do instead.
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(String::from))
            })
            .unwrap_or_default();
        if uid != "0" {
            return Err(
                "this target runs in a network namespace of the bench's own (Janus does not send media over loopback): run balie-bench as root"
                    .into(),
            );
        }
        clean_up_after_the_dead();
        let pid = std::process::id();
        let name = format!("bbench-{pid}-{tag}");
        // Interface names are at most 15 bytes.
        let host_if = format!("bb{}h{tag}", pid % 1_000_000);
        let server_if = format!("bb{}s{tag}", pid % 1_000_000);
        let net = 20 + (pid as usize * 7 + usize::from(tag)) % 200;
        let host = format!("10.213.{net}.1");
        let server = format!("10.213.{net}.2");
        let site = Site {
            netns: Some(name.clone()),
            server_ip: server.parse().map_err(|e| format!("{e}"))?,
            client_ip: host.parse().map_err(|e| format!("{e}"))?,
            server_if: Some(server_if.clone()),
            host_if: Some(host_if.clone()),
        };
        // From here on, Drop removes what was made.
        ip(&["netns", "add", &name])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &server_if,
        ])?;
        ip(&["link", "set", &server_if, "netns", &name])?;
        ip(&["addr", "add", &format!("{host}/24"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["link", "set", "lo", "up"])?;
        inside(&["addr", "add", &format!("{server}/24"), "dev", &server_if])?;
        inside(&["link", "set", &server_if, "up"])?;
        Ok(site)
    }

    /// `program` to run inside the site.
    pub fn command(&self, program: &std::path::Path) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }
}

/// Namespaces of earlier runs that were killed before they could remove
/// them (`bbench-PID-N` whose PID is gone): their processes (a Janus) are
/// stopped and the namespace deleted, which takes its veth pair along.
fn clean_up_after_the_dead() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(owner) = name
            .strip_prefix("bbench-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{owner}")).exists() {
            continue; // its run is still going
        }
        if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = ip(&["netns", "del", name]);
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(h) = &self.host_if {
            let _ = ip(&["link", "del", h]);
        }
        if let Some(ns) = &self.netns {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
