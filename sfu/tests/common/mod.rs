//! Test harness: an in-process balie-sfu and synthetic peers
//! ([`balie_sfu::sim::Peer`]) over real loopback UDP.
#![allow(dead_code)]

pub mod single_layer;
pub mod worker;

use std::net::UdpSocket;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use balie_sfu::config::Config;
use balie_sfu::server::install_crypto;
pub use balie_sfu::sim::Join;
use balie_sfu::sim::Peer;
use balie_sfu::token::{sign_hs256, Claims, Loa, Role};
use balie_sfu::Server;
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::format::Codec;

pub const SECRET: &str = "balie-test-secret";

/// balie-sfu running on its own tokio runtime.
pub struct TestServer {
    pub rt: tokio::runtime::Runtime,
    pub server: Option<Server>,
    pub url: String,
    pub http: reqwest::blocking::Client,
}

impl TestServer {
    pub fn start(tweak: impl FnOnce(&mut Config)) -> TestServer {
        install_crypto();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let mut config = Config::load(None).expect("embedded config");
        config.http = "127.0.0.1:0".parse().expect("addr");
        config.auth.hs256_secret = SECRET.into();
        config.media.shards = 2;
        config.rooms.empty_grace = Duration::from_millis(200);
        tweak(&mut config);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let server = rt.block_on(Server::start(config)).expect("server starts");
        let url = format!("http://{}", server.http_addr);
        TestServer {
            rt,
            server: Some(server),
            url,
            http: reqwest::blocking::Client::new(),
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("server running")
    }

    pub fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .expect("metrics")
            .text()
            .expect("text")
    }

    /// Sum of a metric family's samples whose labels contain every `label`.
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        balie_sfu::metrics::family_sum(&self.metrics(), name, labels)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}

pub fn claims(room: &str, identity: &str, role: Role) -> Claims {
    Claims {
        name: Some(format!("Name of {identity}")),
        loa: Some(Loa::Substantieel),
        ..Claims::new(room, identity, role)
    }
}

pub fn token(room: &str, identity: &str, role: Role) -> String {
    sign_hs256(SECRET, &claims(room, identity, role)).expect("signs")
}

/// A peer with a real UDP socket on loopback.
pub struct Client {
    pub peer: Peer,
    pub socket: UdpSocket,
    pub location: Option<String>,
    buf: Vec<u8>,
    out: Vec<str0m::net::Transmit>,
}

impl Deref for Client {
    type Target = Peer;
    fn deref(&self) -> &Peer {
        &self.peer
    }
}

impl DerefMut for Client {
    fn deref_mut(&mut self) -> &mut Peer {
        &mut self.peer
    }
}

static NEXT_TAG: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

impl Client {
    /// Build the client's offer without sending it.
    pub fn prepare(name: &str, join: Join, video: Codec) -> (Client, SdpOffer) {
        install_crypto();
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket.set_nonblocking(true).expect("nonblocking");
        let local = socket.local_addr().expect("addr");
        let tag = NEXT_TAG.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (peer, offer) = Peer::new(name, tag, join, video, local, Instant::now());
        let client = Client {
            peer,
            socket,
            location: None,
            buf: vec![0; 2048],
            out: Vec::new(),
        };
        (client, offer)
    }

    /// Join through the HTTP API; panics unless it gets 201.
    pub fn join(srv: &TestServer, room: &str, name: &str, role: Role, join: Join) -> Client {
        Self::join_with(srv, room, name, &token(room, name, role), join, Codec::Vp8)
    }

    pub fn join_with(
        srv: &TestServer,
        room: &str,
        name: &str,
        token: &str,
        join: Join,
        video: Codec,
    ) -> Client {
        Self::join_url(&srv.http, &srv.url, room, name, token, join, video)
    }

    pub fn join_url(
        http: &reqwest::blocking::Client,
        url: &str,
        room: &str,
        name: &str,
        token: &str,
        join: Join,
        video: Codec,
    ) -> Client {
        let (mut c, offer) = Client::prepare(name, join, video);
        let resp = http
            .post(format!("{url}{}", join.path(room)))
            .header("Content-Type", "application/sdp")
            .header("Authorization", format!("Bearer {token}"))
            .body(offer.to_sdp_string())
            .send()
            .expect("http");
        let status = resp.status();
        let location = resp
            .headers()
            .get("location")
            .map(|v| v.to_str().expect("ascii").to_string());
        let body = resp.text().expect("body");
        assert_eq!(status.as_u16(), 201, "join {name}: {body}");
        c.location = location;
        let answer = SdpAnswer::from_sdp_string(&body).expect("answer parses");
        c.peer.accept_answer(answer).expect("answer accepted");
        c
    }

    /// The participant id (the session id at the end of the Location URL).
    pub fn id(&self) -> String {
        let loc = self.location.as_deref().unwrap_or("");
        loc.rsplit('/').next().unwrap_or("").to_string()
    }

    /// One step: read the socket, drive timers and media, send output.
    pub fn step(&mut self) {
        if self.peer.closed {
            return;
        }
        let now = Instant::now();
        while let Ok((n, source)) = self.socket.recv_from(&mut self.buf) {
            self.peer.handle_datagram(now, source, &self.buf[..n]);
        }
        self.peer.tick(now);
        self.peer.poll(&mut self.out);
        for t in self.out.drain(..) {
            let _ = self.socket.send_to(&t.contents, t.destination);
        }
    }
}

/// Drive clients until `done` holds or `timeout` passes; true if it held.
pub fn run_until(
    clients: &mut [&mut Client],
    timeout: Duration,
    mut done: impl FnMut(&[&mut Client]) -> bool,
) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        for c in clients.iter_mut() {
            c.step();
        }
        if done(clients) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// Drive clients for a fixed time.
pub fn run_for(clients: &mut [&mut Client], d: Duration) {
    run_until(clients, d, |_| false);
}
