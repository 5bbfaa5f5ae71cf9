//! The thin I/O driver around a [`ShardCore`]: one OS thread per shard with a
//! single-threaded tokio runtime, its own UDP socket, and batching on both
//! sides through quinn-udp (recvmmsg with GRO in, GSO out: consecutive
//! datagrams to one destination, such as the packets of one video frame to one
//! subscriber, leave in one syscall).

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use quinn_udp::{RecvMeta, UdpSocketState};
use str0m::net::Transmit;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::core::{Command, ShardConfig, ShardCore, ShardEvent, ShardInput, ShardOutput};
use crate::error::Error;
use crate::ids::ShardId;
use crate::metrics::ShardMetrics;
use crate::offload::{OffloadSetup, Pool, PoolEvent};

/// What the rest of the process holds of a running shard.
pub struct ShardHandle {
    /// The shard's id.
    pub id: ShardId,
    /// The address its UDP socket is bound to.
    pub local_addr: SocketAddr,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ShardHandle {
    /// Send a command; false if the shard has stopped.
    pub fn send(&self, cmd: Command) -> bool {
        self.commands.send(cmd).is_ok()
    }

    /// A sender for the shard's command queue.
    pub fn commands(&self) -> mpsc::UnboundedSender<Command> {
        self.commands.clone()
    }

    /// Stop the shard's thread and wait for it (after its sessions are closed).
    pub fn stop(mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bind the shard's socket and start its thread. Events (session closed,
/// room closed, ...) are sent to `events`. With `offload`, the shard runs
/// its own transcoder pool (one QUIC connection per worker) on its thread.
pub fn spawn(
    id: ShardId,
    bind: SocketAddr,
    config: ShardConfig,
    metrics: ShardMetrics,
    events: mpsc::UnboundedSender<(ShardId, ShardEvent)>,
    offload: Option<OffloadSetup>,
) -> Result<ShardHandle, Error> {
    let socket = bind_socket(bind)?;
    let local_addr = socket
        .local_addr()
        .map_err(|e| Error::io("reading the shard socket address", e))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let thread = thread::Builder::new()
        .name(format!("balie-shard-{id}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(shard = %id, "cannot start the shard runtime: {e}");
                    return;
                }
            };
            let core = ShardCore::new(id, config, metrics.clone());
            if let Err(e) = rt.block_on(run(core, socket, rx, events, metrics, offload)) {
                tracing::error!(shard = %id, "shard stopped: {e}");
            }
        })
        .map_err(|e| Error::io("starting a shard thread", e))?;
    Ok(ShardHandle {
        id,
        local_addr,
        commands: tx,
        thread: Some(thread),
    })
}

/// The socket buffers a shard asks for, each way. At 2,000 audio calls on
/// two cores shared with the load generator a shard is now and then kept
/// from reading longer than 4 MiB lasts (about 150 ms there): the kernel
/// dropped up to 77,000 datagrams a run, and a join that lost a handshake
/// datagram waited for DTLS's 1 s retransmission. With 8 MiB, five runs
/// dropped nothing (docs/benchmarks.md, 2026-11-30 e).
const SOCKET_BUFFER: usize = 8 << 20;

/// What to tell the operator when the kernel granted less than
/// [`SOCKET_BUFFER`], from the sizes `SO_RCVBUF` and `SO_SNDBUF` read back
/// (Linux reports twice what it grants, for its own bookkeeping, and caps
/// the request at `net.core.rmem_max` and `wmem_max`: 212,992 bytes on a
/// default Debian).
fn buffer_advice(recv: usize, send: usize) -> Option<String> {
    let granted = |reported: usize| {
        if cfg!(target_os = "linux") {
            reported / 2
        } else {
            reported
        }
    };
    let (recv, send) = (granted(recv), granted(send));
    (recv < SOCKET_BUFFER || send < SOCKET_BUFFER).then(|| {
        format!(
            "the kernel gave the shard's UDP socket {} KiB to receive and {} KiB to send of the \
             {} KiB asked: it drops what arrives while the shard is busy sooner \
             (balie_errors_total{{kind=\"receive_dropped\"}}); raise net.core.rmem_max and \
             net.core.wmem_max to {} (docs/operations.md)",
            recv / 1024,
            send / 1024,
            SOCKET_BUFFER / 1024,
            SOCKET_BUFFER
        )
    })
}

fn bind_socket(bind: SocketAddr) -> Result<std::net::UdpSocket, Error> {
    let domain = socket2::Domain::for_address(bind);
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .map_err(|e| Error::io("creating a UDP socket", e))?;
    if bind.is_ipv6() {
        let _ = sock.set_only_v6(false);
    }
    // Larger kernel buffers absorb bursts (keyframes); the kernel caps them.
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    let granted = (sock.recv_buffer_size(), sock.send_buffer_size());
    if let (Ok(recv), Ok(send)) = granted {
        if let Some(advice) = buffer_advice(recv, send) {
            tracing::warn!("{advice}");
        }
    }
    sock.bind(&bind.into())
        .map_err(|e| Error::io(format!("binding UDP {bind}"), e))?;
    sock.set_nonblocking(true)
        .map_err(|e| Error::io("setting the UDP socket non-blocking", e))?;
    Ok(sock.into())
}

async fn run(
    mut core: ShardCore,
    socket: std::net::UdpSocket,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<(ShardId, ShardEvent)>,
    metrics: ShardMetrics,
    offload: Option<OffloadSetup>,
) -> io::Result<()> {
    let state = UdpSocketState::new((&socket).into())?;
    let socket = UdpSocket::from_std(socket)?;
    let local = socket.local_addr()?;
    let id = core.id();
    // The pool's tasks run on this thread's runtime; without offload the
    // event channel stays open and empty.
    let (pool, mut pool_events, _keep) = match offload.map(|o| Pool::start(&o, id.to_string())) {
        Some(Ok((pool, events))) => (Some(pool), events, None),
        Some(Err(e)) => {
            tracing::error!(shard = %id, "offload disabled: {e}");
            let (tx, rx) = mpsc::unbounded_channel::<PoolEvent>();
            (None, rx, Some(tx))
        }
        None => {
            let (tx, rx) = mpsc::unbounded_channel::<PoolEvent>();
            (None, rx, Some(tx))
        }
    };

    // One buffer per datagram of a batch, large enough for GRO-coalesced runs.
    let buf_len = (state.gro_segments() * 1500).max(2048);
    let mut bufs: Vec<Vec<u8>> = (0..quinn_udp::BATCH_SIZE)
        .map(|_| vec![0u8; buf_len])
        .collect();
    let mut metas = vec![RecvMeta::default(); quinn_udp::BATCH_SIZE];
    let mut out: Vec<Transmit> = Vec::new();
    let mut gso = Vec::with_capacity(64 * 1024);
    // The kernel's count of datagrams it dropped at this socket, read once a
    // second into `balie_errors_total{kind="receive_dropped"}` on a thread
    // of its own.
    watch_drops(
        socket_inode(&socket),
        metrics.err_receive_dropped.clone(),
        id,
    );

    let mut stopping = false;
    loop {
        // Drain the core's output.
        let deadline = loop {
            match core.poll_output() {
                ShardOutput::Transmit(t) => out.push(t),
                ShardOutput::Event(e) => {
                    let _ = events.send((id, e));
                }
                ShardOutput::Offload(cmd) => {
                    if let Some(p) = &pool {
                        p.send(cmd);
                    }
                }
                ShardOutput::Timeout(t) => break t,
            }
        };
        send_batch(&socket, &state, &mut out, &mut gso, &metrics).await;
        let now = Instant::now();
        if deadline <= now {
            core.handle_input(ShardInput::Timeout(now));
            continue;
        }

        tokio::select! {
            biased;
            cmd = commands.recv() => match cmd {
                Some(Command::Stop) | None => break,
                Some(cmd) => core.handle_input(ShardInput::Command(Instant::now(), cmd)),
            },
            Some(ev) = pool_events.recv() => {
                core.handle_input(ShardInput::Offload(Instant::now(), ev));
            }
            ready = socket.readable() => {
                ready?;
                // Read until the socket is empty, a batch at a time.
                loop {
                    let mut slices: Vec<IoSliceMut> =
                        bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                    let n = match socket.try_io(Interest::READABLE, || {
                        state.recv((&socket).into(), &mut slices, &mut metas)
                    }) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            // ICMP errors and the like: not fatal for a UDP server.
                            tracing::debug!(shard = %id, "recv error: {e}");
                            break;
                        }
                    };
                    let now = Instant::now();
                    for (meta, buf) in metas.iter().zip(bufs.iter()).take(n) {
                        let stride = meta.stride.max(1);
                        for data in buf[..meta.len].chunks(stride) {
                            core.handle_input(ShardInput::Datagram {
                                now,
                                source: meta.addr,
                                destination: local,
                                data,
                            });
                        }
                    }
                    // Take in new sessions (and other commands) between
                    // batches too: a client whose answer left with its
                    // session's hand-over checks at once, and its check is
                    // held until the session is here (see `Early` in the
                    // core), not for the rest of the read.
                    while let Ok(cmd) = commands.try_recv() {
                        if matches!(cmd, Command::Stop) {
                            stopping = true;
                            break;
                        }
                        core.handle_input(ShardInput::Command(Instant::now(), cmd));
                    }
                    // Answer connecting peers now, not after the rest of
                    // the queue (see ShardCore::poll_urgent).
                    while let Some(t) = core.poll_urgent() {
                        out.push(t);
                    }
                    if !out.is_empty() {
                        send_batch(&socket, &state, &mut out, &mut gso, &metrics).await;
                    }
                    if n < quinn_udp::BATCH_SIZE || stopping {
                        break;
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                core.handle_input(ShardInput::Timeout(Instant::now()));
            }
        }
        if stopping {
            break;
        }
    }
    Ok(())
}

/// How often the kernel's drop count of a shard's socket is read.
const DROPS_EVERY: Duration = Duration::from_secs(1);

/// Datagrams the kernel dropped at a socket because its receive buffer was
/// full: read from the socket's line in `/proc/self/net/udp` (or `udp6`),
/// found by its inode (the `drops` column), and added to the shard's
/// `balie_errors_total{kind="receive_dropped"}` once [`DROPS_EVERY`]. Not a
/// syscall on the socket: the workspace forbids `unsafe`, which
/// `getsockopt(SO_MEMINFO)` needs. The table has a line per UDP socket of
/// the network namespace: a few on a server node, but 17 ms a read where a
/// load generator's 4,000 sockets share it. So one thread of the process
/// reads it for every shard (it was one per shard: 1.9% of the server's CPU
/// at 1,000 audio calls beside the generator), never a shard's own thread.
/// A socket that is gone from the table is no longer watched.
fn watch_drops(inode: Option<String>, counter: prometheus::IntCounter, id: ShardId) {
    let Some(inode) = inode else {
        return;
    };
    let seen = socket_drops(&inode).unwrap_or(0);
    if let Ok(mut watched) = WATCHED.lock() {
        watched.push(Watched {
            inode,
            counter,
            seen,
        });
    }
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let spawned = thread::Builder::new()
            .name("balie-drops".into())
            .spawn(|| loop {
                thread::sleep(DROPS_EVERY);
                read_drops();
            });
        if let Err(e) = spawned {
            tracing::warn!(shard = %id, "not counting receive drops: {e}");
        }
    });
}

/// A socket whose drops are counted.
struct Watched {
    inode: String,
    counter: prometheus::IntCounter,
    seen: u64,
}

static WATCHED: std::sync::Mutex<Vec<Watched>> = std::sync::Mutex::new(Vec::new());

/// Read the tables once and bring every watched counter up to date.
fn read_drops() {
    let Ok(mut watched) = WATCHED.lock() else {
        return;
    };
    if watched.is_empty() {
        return;
    }
    let mut tables: Vec<String> = Vec::new();
    watched.retain_mut(|w| {
        let mut total = tables.iter().find_map(|t| drops_of(t, &w.inode));
        // The IPv6 table only when a socket is not in the IPv4 one.
        while total.is_none() && tables.len() < UDP_TABLES.len() {
            tables.push(std::fs::read_to_string(UDP_TABLES[tables.len()]).unwrap_or_default());
            total = tables.last().and_then(|t| drops_of(t, &w.inode));
        }
        let Some(total) = total else {
            return false;
        };
        w.counter.inc_by(total.saturating_sub(w.seen));
        w.seen = w.seen.max(total);
        true
    });
}

const UDP_TABLES: [&str; 2] = ["/proc/self/net/udp", "/proc/self/net/udp6"];

/// The inode of a socket (`socket:[N]` behind `/proc/self/fd`), Linux only.
#[cfg(unix)]
fn socket_inode(socket: &impl std::os::fd::AsRawFd) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", socket.as_raw_fd())).ok()?;
    let inode = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?;
    Some(inode.to_owned())
}

#[cfg(not(unix))]
fn socket_inode<T>(_: &T) -> Option<String> {
    None
}

/// The `drops` of the UDP socket with this inode.
fn socket_drops(inode: &str) -> Option<u64> {
    UDP_TABLES
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .find_map(|text| drops_of(&text, inode))
}

/// In a `/proc/net/udp` table: the last column (`drops`) of the line whose
/// tenth column (`inode`) is `inode`.
fn drops_of(table: &str, inode: &str) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let mut cols = line.split_whitespace();
        (cols.nth(9) == Some(inode)).then(|| cols.last()?.parse().ok())?
    })
}

/// Send every queued transmit, coalescing runs to one destination with GSO.
async fn send_batch(
    socket: &UdpSocket,
    state: &UdpSocketState,
    out: &mut Vec<Transmit>,
    gso: &mut Vec<u8>,
    metrics: &ShardMetrics,
) {
    let max_segments = state.max_gso_segments().max(1);
    let mut i = 0;
    while i < out.len() {
        let dest = out[i].destination;
        let size = out[i].contents.len();
        let mut j = i + 1;
        // GSO: every segment but the last has the same size; the last may be shorter.
        while j < out.len()
            && j - i < max_segments
            && out[j].destination == dest
            && out[j - 1].contents.len() == size
            && out[j].contents.len() <= size
        {
            j += 1;
        }
        let (contents, segment_size): (&[u8], Option<usize>) = if j - i == 1 {
            (&out[i].contents, None)
        } else {
            gso.clear();
            for t in &out[i..j] {
                gso.extend_from_slice(&t.contents);
            }
            (gso.as_slice(), Some(size))
        };
        let transmit = quinn_udp::Transmit {
            destination: dest,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        let sent = loop {
            match socket.try_io(Interest::WRITABLE, || {
                state.try_send(socket.into(), &transmit)
            }) {
                Ok(()) => break true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if socket.writable().await.is_err() {
                        break false;
                    }
                }
                Err(e) => {
                    tracing::debug!("send error: {e}");
                    break false;
                }
            }
        };
        if sent {
            metrics.packets_out.inc_by((j - i) as u64);
            metrics.bytes_out.inc_by(contents.len() as u64);
        } else {
            metrics.err_send.inc();
        }
        i = j;
    }
    out.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_socket_buffers_are_reported_with_the_sysctls_to_raise() {
        // Debian's default caps, as Linux reports them (doubled). Linux only:
        // elsewhere the sizes read back are what was granted.
        let advice = buffer_advice(425_984, 425_984).expect("advice");
        assert!(advice.contains("208 KiB") && advice.contains("net.core.rmem_max"));
        assert!(buffer_advice(SOCKET_BUFFER * 2, 425_984).is_some());
        assert_eq!(buffer_advice(SOCKET_BUFFER * 2, SOCKET_BUFFER * 2), None);
    }

    #[test]
    fn the_drops_column_is_read_from_the_line_of_the_inode() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  1: 0100007F:9E73 00000000:0000 07 00000000:001DD2C0 00:00000000 00000000     0        0 4242 2 0000000000000000 77985\n\
  2: 0100007F:9B74 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4243 2 0000000000000000 0\n";
        assert_eq!(drops_of(table, "4242"), Some(77985));
        assert_eq!(drops_of(table, "4243"), Some(0));
        assert_eq!(drops_of(table, "424"), None);
    }

    /// A socket whose small receive buffer overflows: the kernel's count
    /// of what it dropped there goes up, and is read back.
    #[test]
    fn a_full_receive_buffer_shows_as_drops() {
        let sock = bind_socket("127.0.0.1:0".parse().expect("address")).expect("socket");
        let to = sock.local_addr().expect("address");
        let inode = socket_inode(&sock).expect("a socket's inode");
        assert_eq!(socket_drops(&inode), Some(0));
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("sender");
        // Far more than the buffer (at most 8 MiB, each datagram costing
        // more than its kilobyte there): nothing reads `sock`.
        for _ in 0..20_000 {
            let _ = sender.send_to(&[0u8; 1000], to);
        }
        assert!(socket_drops(&inode).is_some_and(|d| d > 0));
    }

    /// The watcher adds what the kernel drops after it starts to each
    /// shard's counter, from one thread of its own.
    #[test]
    fn drops_reach_the_metric() {
        let socks: Vec<_> = (0..2)
            .map(|_| bind_socket("127.0.0.1:0".parse().expect("address")).expect("socket"))
            .collect();
        let counters: Vec<_> = (0..2)
            .map(|_| prometheus::IntCounter::new("t", "t").expect("counter"))
            .collect();
        for (i, (sock, counter)) in socks.iter().zip(&counters).enumerate() {
            watch_drops(socket_inode(sock), counter.clone(), ShardId(i));
        }
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("sender");
        for sock in &socks {
            let to = sock.local_addr().expect("address");
            for _ in 0..20_000 {
                let _ = sender.send_to(&[0u8; 1000], to);
            }
        }
        let deadline = Instant::now() + DROPS_EVERY * 3;
        while counters.iter().any(|c| c.get() == 0) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        assert!(counters.iter().all(|c| c.get() > 0));
    }
}
