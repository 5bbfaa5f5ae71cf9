//! The worker over QUIC on loopback, as an SFU sees it: layers that decode
//! to the sizes asked for, keyframes where asked, capacity, and refusal of
//! bad peers and bad messages.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use balie_offload::io::{read_control, write_control};
use balie_offload::link::{client_endpoint, Link, LinkEvent};
use balie_offload::tls::{client_config, TlsFiles};
use balie_offload::{Codec, Control, ErrorCode, Frame, GroupHeader, LayerSpec, Size, VERSION};
use balie_transcoder::bench::LAYERS as TWO_LAYERS;
use balie_transcoder::clip::{self, ClipFrame};
use balie_transcoder::picture::{self, LayerFrame};
use balie_transcoder::pipeline::{Backend, Decoder, Placement};
use common::{certs, connect, start_worker, start_worker_placed};
use tokio::sync::mpsc::UnboundedReceiver;

const HD: Size = Size {
    width: 1280,
    height: 720,
};

/// The least mean luma PSNR a layer of the generated clip must have
/// against the reference scaling of its source picture.
const MIN_Y_DB: f64 = 18.0;

/// Send the clip as the SFU would: a group per GOP, paced at 30 fps.
async fn publish(link: &Link, session: u64, clip: &[ClipFrame]) {
    let mut group = None;
    let mut number = 0;
    let start = Instant::now();
    for (i, f) in clip.iter().enumerate() {
        tokio::time::sleep_until((start + Duration::from_millis(33 * i as u64)).into()).await;
        if f.key {
            if let Some(g) = group.take() {
                balie_offload::link::GroupSender::finish(g);
            }
            number += 1;
            let header = GroupHeader {
                session,
                track: 0,
                group: number,
            };
            group = Some(link.open_group(header).await.expect("group"));
        }
        let g = group.as_mut().expect("clip starts with a keyframe");
        g.frame(Frame {
            rtp_time: f.rtp_time,
            deadline_ms: 500,
            key: f.key,
            data: f.data.clone().into(),
        })
        .await
        .expect("frame sent");
    }
    if let Some(g) = group {
        g.finish();
    }
}

#[derive(Default)]
struct Received {
    frames: HashMap<u8, Vec<(GroupHeader, Frame)>>,
    layouts: Vec<Control>,
    control: Vec<Control>,
}

async fn collect(events: &mut UnboundedReceiver<LinkEvent>, until: Duration) -> Received {
    let mut r = Received::default();
    let end = tokio::time::Instant::now() + until;
    while let Ok(Some(ev)) = tokio::time::timeout_at(end, events.recv()).await {
        match ev {
            LinkEvent::Frame { header, frame } => r
                .frames
                .entry(header.track)
                .or_default()
                .push((header, frame)),
            LinkEvent::Control(c @ Control::Layout { .. }) => r.layouts.push(c),
            LinkEvent::Control(c) => r.control.push(c),
            other => panic!("unexpected event {other:?}"),
        }
    }
    r
}

/// Decode a track's frames; the sizes of the pictures that came out.
fn decoded_sizes(codec: Codec, frames: &[(GroupHeader, Frame)]) -> Vec<(u32, u32)> {
    let mut dec = Decoder::new(codec).expect("decoder");
    let mut sizes = Vec::new();
    for (_, f) in frames {
        if let Ok(Some(p)) = dec.decode(&f.data, i64::from(f.rtp_time)) {
            sizes.push((p.width(), p.height()));
        }
    }
    sizes
}

async fn layers_decode_to_the_sizes_asked_for(codec: Codec) {
    let dir = tempfile::tempdir().expect("tempdir");
    certs(dir.path());
    let (addr, metrics, _ep) = start_worker(dir.path(), 4, None);
    let (link, mut events) = connect(dir.path(), addr).await;
    assert!(link.agent.starts_with("balie-transcoder"), "{}", link.agent);
    let clip = clip::make(codec, HD, 75, 30, 1500).expect("clip");
    assert_eq!(clip.len(), 75);
    assert!(link.send(Control::Open {
        session: 7,
        codec,
        layers: TWO_LAYERS.to_vec(),
    }));
    publish(&link, 7, &clip).await;
    let got = collect(&mut events, Duration::from_millis(1500)).await;
    assert_eq!(
        got.layouts,
        vec![Control::Layout {
            session: 7,
            source: HD,
            layers: vec![
                Size {
                    width: 640,
                    height: 360
                },
                Size {
                    width: 320,
                    height: 180
                }
            ],
        }]
    );
    let source_keys: Vec<u32> = clip.iter().filter(|f| f.key).map(|f| f.rtp_time).collect();
    assert_eq!(source_keys.len(), 3);
    for (track, size) in [(1u8, (640, 360)), (2, (320, 180))] {
        let frames = got.frames.get(&track).expect("frames of the layer");
        assert!(
            frames.len() >= 70,
            "{codec:?} track {track}: {} of 75 frames",
            frames.len()
        );
        let sizes = decoded_sizes(codec, frames);
        assert!(sizes.len() >= 70, "{} decoded", sizes.len());
        assert!(sizes.iter().all(|s| *s == size), "{codec:?}: {sizes:?}");
        // Keyframes where the source has them, one group per GOP.
        let keys: Vec<u32> = frames
            .iter()
            .filter(|(_, f)| f.key)
            .map(|(_, f)| f.rtp_time)
            .collect();
        assert_eq!(keys, source_keys, "{codec:?} track {track}");
        let groups: std::collections::BTreeSet<u32> = frames.iter().map(|(h, _)| h.group).collect();
        assert_eq!(groups.len(), 3);
        // Every layer frame carries a source frame's RTP time.
        assert!(frames
            .iter()
            .all(|(_, f)| clip.iter().any(|c| c.rtp_time == f.rtp_time)));
    }
    // The layers show the source: each picture against the source picture
    // of its RTP time, scaled down by the reference box filter. Against
    // the picture two frames before (the bands moved 6 pixels, near half
    // their period, the square 85) they are far worse, so a layer made from
    // the wrong picture fails.
    let layers: Vec<LayerFrame<'_>> = got
        .frames
        .iter()
        .flat_map(|(t, fs)| fs.iter().map(move |(_, f)| (*t, f.rtp_time, &f.data[..])))
        .collect();
    let seen = picture::fidelity(codec, &clip, &layers).expect("fidelity");
    let shifted = picture::fidelity(codec, &later(&clip, 6000), &layers).expect("fidelity");
    for (layer, off) in seen.iter().zip(&shifted) {
        eprintln!("{codec:?} layer {layer}; two frames off: {off}");
        assert!(layer.frames >= 70 && layer.bad == 0, "{codec:?}: {layer}");
        assert!(
            layer.mean.y >= MIN_Y_DB && layer.mean.all >= MIN_Y_DB,
            "{codec:?}: {layer}"
        );
        assert!(layer.worst_y >= MIN_Y_DB - 6.0, "{codec:?}: {layer}");
        assert!(
            layer.mean.y - off.mean.y >= 6.0,
            "{codec:?}: {layer} / {off}"
        );
    }
    let text = metrics.render();
    assert!(
        text.contains("balie_transcoder_frames_in_total 75"),
        "{text}"
    );
    assert!(text.contains("balie_transcoder_sessions 1"));
    // Closing the session frees its slot.
    assert!(link.send(Control::Close { session: 7 }));
    let got = collect(&mut events, Duration::from_millis(300)).await;
    assert!(got
        .control
        .iter()
        .any(|c| matches!(c, Control::Capacity(c) if c.sessions == 0)));
    assert!(metrics.render().contains("balie_transcoder_sessions 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_720p_vp8_source_gives_360p_and_180p_layers_that_decode() {
    layers_decode_to_the_sizes_asked_for(Codec::Vp8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_720p_h264_source_gives_360p_and_180p_layers_that_decode() {
    layers_decode_to_the_sizes_asked_for(Codec::H264).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyframe_request_gives_a_keyframe_on_that_layer_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs(dir.path());
    let (addr, _m, _ep) = start_worker(dir.path(), 4, None);
    let (link, mut events) = connect(dir.path(), addr).await;
    // One GOP of 60 frames: the only source keyframe is the first.
    let clip = clip::make(Codec::Vp8, HD, 60, 600, 1500).expect("clip");
    let layers = TWO_LAYERS.to_vec();
    assert!(link.send(Control::Open {
        session: 1,
        codec: Codec::Vp8,
        layers
    }));
    let (first, rest) = clip.split_at(30);
    publish(&link, 1, first).await;
    assert!(link.send(Control::Keyframe {
        session: 1,
        track: 2
    }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The rest of the GOP continues the same group on the SFU's side.
    let mut g = link
        .open_group(GroupHeader {
            session: 1,
            track: 0,
            group: 1,
        })
        .await
        .expect("group");
    for f in rest {
        g.frame(Frame {
            rtp_time: f.rtp_time,
            deadline_ms: 500,
            key: false,
            data: f.data.clone().into(),
        })
        .await
        .expect("frame");
        tokio::time::sleep(Duration::from_millis(33)).await;
    }
    g.finish();
    let got = collect(&mut events, Duration::from_millis(1000)).await;
    let keys = |t: u8| got.frames[&t].iter().filter(|(_, f)| f.key).count();
    assert_eq!(keys(1), 1, "track 1: only the source's keyframe");
    assert_eq!(keys(2), 2, "track 2: the source's and the requested one");
    assert_eq!(
        decoded_sizes(Codec::Vp8, &got.frames[&2]).len(),
        got.frames[&2].len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_worker_refuses_a_session_with_capacity() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs(dir.path());
    let (addr, metrics, _ep) = start_worker(dir.path(), 1, None);
    let (link, mut events) = connect(dir.path(), addr).await;
    assert_eq!(link.max_sessions, 1);
    let layers = vec![LayerSpec {
        scale_down: 2,
        bitrate_kbps: 300,
    }];
    for session in [1, 2] {
        link.send(Control::Open {
            session,
            codec: Codec::H264,
            layers: layers.clone(),
        });
    }
    let got = collect(&mut events, Duration::from_millis(500)).await;
    assert!(
        got.control.iter().any(|c| matches!(
            c,
            Control::Ended {
                session: 2,
                code: ErrorCode::Capacity,
                ..
            }
        )),
        "{:?}",
        got.control
    );
    assert!(!got
        .control
        .iter()
        .any(|c| matches!(c, Control::Ended { session: 1, .. })));
    assert!(metrics
        .render()
        .contains("balie_transcoder_session_opens_total{outcome=\"capacity\"} 1"));
}

/// The gauge of sessions on the GPU, from the metrics' text.
/// The line of one metric without labels, as `/metrics` shows it.
fn metric_line(metrics: &balie_transcoder::metrics::Metrics, name: &str) -> String {
    let text = metrics.render();
    text.lines()
        .find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ')))
        .unwrap_or("not there")
        .to_string()
}

fn on_gpu(metrics: &balie_transcoder::metrics::Metrics) -> String {
    metric_line(metrics, "balie_transcoder_gpu_video_sessions")
}

/// Sessions past the GPU's places run on the CPU, and a closed session
/// gives its place back. The GPU's backend is not built here: the CPU's
/// stands in for it, so this checks the places and their gauge, which the
/// worker keeps whatever the backend behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_past_the_gpu_places_run_on_the_cpu_and_places_come_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs(dir.path());
    let placement = Placement::new(Backend::Cpu, 1);
    let (addr, metrics, _ep) = start_worker_placed(dir.path(), 4, None, placement);
    assert_eq!(on_gpu(&metrics), "balie_transcoder_gpu_video_sessions 0");
    let (link, mut events) = connect(dir.path(), addr).await;
    assert!(
        link.agent.ends_with("cpu for 1 sessions, then cpu"),
        "{}",
        link.agent
    );
    let clip = clip::make(Codec::Vp8, HD, 15, 30, 1500).expect("clip");
    let open = |session| {
        assert!(link.send(Control::Open {
            session,
            codec: Codec::Vp8,
            layers: TWO_LAYERS.to_vec(),
        }));
    };
    open(1);
    open(2);
    publish(&link, 1, &clip).await;
    publish(&link, 2, &clip).await;
    let got = collect(&mut events, Duration::from_millis(800)).await;
    // Both made layers: the one on a place and the one past it.
    assert_eq!(got.layouts.len(), 2, "{:?}", got.control);
    assert_eq!(on_gpu(&metrics), "balie_transcoder_gpu_video_sessions 1");
    assert!(metrics.render().contains("balie_transcoder_sessions 2"));
    // Both closed: the place comes back when the first one's pipeline ends.
    assert!(link.send(Control::Close { session: 1 }));
    assert!(link.send(Control::Close { session: 2 }));
    let deadline = Instant::now() + Duration::from_secs(5);
    while on_gpu(&metrics) != "balie_transcoder_gpu_video_sessions 0" {
        assert!(Instant::now() < deadline, "{}", on_gpu(&metrics));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the next session takes it.
    open(3);
    publish(&link, 3, &clip).await;
    let got = collect(&mut events, Duration::from_millis(500)).await;
    assert_eq!(got.layouts.len(), 1, "{:?}", got.control);
    assert_eq!(on_gpu(&metrics), "balie_transcoder_gpu_video_sessions 1");
}

/// A clip's frames moved on in RTP time (a publisher's stream goes on).
fn later(clip: &[ClipFrame], by: u32) -> Vec<ClipFrame> {
    clip.iter()
        .map(|f| ClipFrame {
            rtp_time: f.rtp_time.wrapping_add(by),
            ..f.clone()
        })
        .collect()
}

fn fallbacks(metrics: &balie_transcoder::metrics::Metrics) -> String {
    metric_line(metrics, "balie_transcoder_gpu_fallbacks_total")
}

/// A session whose pipeline fails on its GPU place goes on on the CPU,
/// gives the place back and is counted; a failure on the CPU ends it. The
/// failure here is a picture too small to scale (8x8), which both backends
/// refuse: the CPU's backend stands in for the GPU's, not built here, so
/// this checks the worker's way of going on, not a GPU error itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_gpu_pipeline_fails_goes_on_on_the_cpu() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs(dir.path());
    let placement = Placement::new(Backend::Cpu, 1);
    let (addr, metrics, _ep) = start_worker_placed(dir.path(), 4, None, placement);
    let (link, mut events) = connect(dir.path(), addr).await;
    let hd = clip::make(Codec::Vp8, HD, 10, 30, 1500).expect("clip");
    let tiny = clip::make(
        Codec::Vp8,
        Size {
            width: 8,
            height: 8,
        },
        1,
        30,
        50,
    )
    .expect("tiny clip");
    assert!(link.send(Control::Open {
        session: 1,
        codec: Codec::Vp8,
        layers: TWO_LAYERS.to_vec(),
    }));
    publish(&link, 1, &hd).await;
    let got = collect(&mut events, Duration::from_millis(800)).await;
    assert_eq!(got.layouts.len(), 1, "{:?}", got.control);
    assert_eq!(on_gpu(&metrics), "balie_transcoder_gpu_video_sessions 1");
    assert_eq!(
        fallbacks(&metrics),
        "balie_transcoder_gpu_fallbacks_total 0"
    );
    // The pipeline on the GPU place fails: the session goes on on the CPU.
    publish(&link, 1, &later(&tiny, 90_000)).await;
    publish(&link, 1, &later(&hd, 180_000)).await;
    let got = collect(&mut events, Duration::from_millis(800)).await;
    assert!(
        !got.control
            .iter()
            .any(|c| matches!(c, Control::Ended { .. })),
        "{:?}",
        got.control
    );
    assert_eq!(got.layouts.len(), 1, "layers again: {:?}", got.control);
    assert!(
        got.frames.get(&1).is_some_and(|f| f.len() >= 5),
        "{:?}",
        got.frames.keys()
    );
    assert_eq!(
        fallbacks(&metrics),
        "balie_transcoder_gpu_fallbacks_total 1"
    );
    assert_eq!(on_gpu(&metrics), "balie_transcoder_gpu_video_sessions 0");
    // On the CPU it fails for good: the session ends with a media error.
    publish(&link, 1, &later(&tiny, 360_000)).await;
    let got = collect(&mut events, Duration::from_millis(800)).await;
    assert!(
        got.control.iter().any(|c| matches!(
            c,
            Control::Ended {
                session: 1,
                code: ErrorCode::Media,
                ..
            }
        )),
        "{:?}",
        got.control
    );
    assert_eq!(
        fallbacks(&metrics),
        "balie_transcoder_gpu_fallbacks_total 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_a_valid_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs(dir.path());
    let other = tempfile::tempdir().expect("tempdir");
    certs(other.path());
    let (addr, metrics, _ep) = start_worker(dir.path(), 4, None);

    // A certificate from another CA.
    let cfg = client_config(&TlsFiles::dev_sfu(other.path())).expect("config");
    let ep = client_endpoint(cfg, addr).expect("endpoint");
    let refused = Link::connect(&ep, addr, "localhost", "intruder").await;
    assert!(refused.is_err(), "a foreign certificate was let in");

    // No client certificate at all.
    let ca = std::fs::read(dir.path().join("ca.pem")).expect("ca");
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.expect("pem")).expect("root");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![balie_offload::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic");
    let ep = client_endpoint(quinn::ClientConfig::new(std::sync::Arc::new(quic)), addr)
        .expect("endpoint");
    let refused = Link::connect(&ep, addr, "localhost", "anonymous").await;
    assert!(refused.is_err(), "a peer without a certificate was let in");

    // The worker also refuses to be someone it is not: its certificate does
    // not name other hosts.
    let cfg = client_config(&TlsFiles::dev_sfu(dir.path())).expect("config");
    let ep = client_endpoint(cfg, addr).expect("endpoint");
    assert!(Link::connect(&ep, addr, "worker.example", "sfu")
        .await
        .is_err());

    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = metrics.render();
    let failures: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("balie_transcoder_handshake_failures_total "))
        .and_then(|v| v.parse().ok())
        .expect("metric");
    assert!(failures >= 2, "{text}");
    // And a valid SFU still gets in.
    let (link, _ev) = connect(dir.path(), addr).await;
    assert_eq!(link.max_sessions, 4);
}

/// A raw connection with a valid certificate, for sending bad bytes.
async fn raw(dir: &Path, addr: SocketAddr) -> quinn::Connection {
    let cfg = client_config(&TlsFiles::dev_sfu(dir)).expect("config");
    let ep = client_endpoint(cfg, addr).expect("endpoint");
    ep.connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("connection")
}

async fn hello(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, version: u16) {
    write_control(
        send,
        &Control::Hello {
            version,
            agent: "raw".into(),
            max_sessions: 0,
            max_captions: 0,
        },
    )
    .await
    .expect("hello");
    if version == VERSION {
        let back = read_control(recv).await.expect("read").expect("hello");
        assert!(matches!(back, Control::Hello { .. }));
    }
}

/// Read control messages until an error message (skipping capacity).
async fn error_reply(recv: &mut quinn::RecvStream) -> (ErrorCode, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(2), read_control(recv))
            .await
            .expect("a reply in time")
        {
            Ok(Some(Control::Error { code, reason })) => return (code, reason),
            Ok(Some(_)) => continue,
            other => panic!("no error message: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_get_a_protocol_error_and_the_worker_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs(dir.path());
    let (addr, metrics, _ep) = start_worker(dir.path(), 4, None);

    // A control message that is not one.
    let conn = raw(dir.path(), addr).await;
    let (mut send, mut recv) = conn.open_bi().await.expect("bi");
    hello(&mut send, &mut recv, VERSION).await;
    send.write_all(&[0, 0, 0, 3, 0x7f, 1, 2])
        .await
        .expect("write");
    let (code, reason) = error_reply(&mut recv).await;
    assert_eq!(code, ErrorCode::Malformed);
    assert!(reason.contains("unknown message kind 0x7f"), "{reason}");
    let closed = conn.closed().await;
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == 1u32.into()),
        "{closed:?}"
    );

    // A control message over the bound: refused from its length alone.
    let conn = raw(dir.path(), addr).await;
    let (mut send, mut recv) = conn.open_bi().await.expect("bi");
    hello(&mut send, &mut recv, VERSION).await;
    send.write_all(&(1u32 << 30).to_be_bytes())
        .await
        .expect("write");
    let (code, _) = error_reply(&mut recv).await;
    assert_eq!(code, ErrorCode::TooLarge);

    // Another version.
    let conn = raw(dir.path(), addr).await;
    let (mut send, mut recv) = conn.open_bi().await.expect("bi");
    hello(&mut send, &mut recv, VERSION + 1).await;
    let (code, reason) = error_reply(&mut recv).await;
    assert_eq!(code, ErrorCode::Version);
    assert!(
        reason.contains(&format!("version {}", VERSION + 1)),
        "{reason}"
    );

    // Media streams: an unknown session, bytes that are no header, and an
    // oversized frame are each stopped with their code; the connection and
    // its session go on.
    let (link, mut events) = connect(dir.path(), addr).await;
    link.send(Control::Open {
        session: 3,
        codec: Codec::Vp8,
        layers: vec![LayerSpec {
            scale_down: 2,
            bitrate_kbps: 300,
        }],
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut unknown = link
        .open_group(GroupHeader {
            session: 99,
            track: 0,
            group: 1,
        })
        .await
        .expect("stream");
    assert_eq!(
        stopped(unknown.stream()).await,
        ErrorCode::UnknownSession as u32
    );
    let mut s = link.conn.open_uni().await.expect("uni");
    s.write_all(&[0, 0, 0, 2, 0x20, 1]).await.expect("write");
    assert_eq!(stopped(&mut s).await, ErrorCode::Malformed as u32);
    let mut s = link.conn.open_uni().await.expect("uni");
    balie_offload::io::write_media(
        &mut s,
        &balie_offload::Media::Group(GroupHeader {
            session: 3,
            track: 0,
            group: 1,
        }),
    )
    .await
    .expect("header");
    s.write_all(&(64u32 << 20).to_be_bytes())
        .await
        .expect("write");
    assert_eq!(stopped(&mut s).await, ErrorCode::TooLarge as u32);
    // The session still transcodes.
    let clip = clip::make(Codec::Vp8, HD, 10, 30, 1500).expect("clip");
    publish(&link, 3, &clip).await;
    let got = collect(&mut events, Duration::from_millis(800)).await;
    assert!(got.frames.get(&1).is_some_and(|f| f.len() >= 8));
    let text = metrics.render();
    for code in ["malformed", "too_large", "version", "unknown_session"] {
        assert!(
            text.contains(&format!(
                "balie_transcoder_protocol_errors_total{{code=\"{code}\"}}"
            )),
            "{code} not counted: {text}"
        );
    }
}

async fn stopped(s: &mut quinn::SendStream) -> u32 {
    let code = tokio::time::timeout(Duration::from_secs(2), s.stopped())
        .await
        .expect("stopped in time")
        .expect("stopped")
        .expect("with a code");
    u32::try_from(code.into_inner()).expect("small code")
}

#[test]
fn video_on_the_gpu_without_the_gpu_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = common::serve_refused(dir.path(), &["--video-backend", "cuda"], &[]);
    assert!(
        err.contains("--video-backend cuda needs the GPU: add --backend cuda"),
        "{err}"
    );
    // A way of running NVDEC that does not exist: the ones that do, named.
    let err = common::serve_refused(dir.path(), &["--nvdec", "sideways"], &[]);
    assert!(
        err.contains("own-context") && err.contains("shared") && err.contains("resident"),
        "{err}"
    );
}

/// `docker stop` and Kubernetes stop a worker with SIGTERM: it closes its
/// connections with a close frame, so an SFU sees the link end at once
/// (and moves its sessions), not after a second of silence as with a
/// worker that died; and it exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_the_sfus_links_at_once_and_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs(dir.path());
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_balie-transcoder"))
        .args(["serve", "--metrics", "127.0.0.1:0", "--listen"])
        .arg(addr.to_string())
        .arg("--ca")
        .arg(dir.path().join("ca.pem"))
        .arg("--cert")
        .arg(dir.path().join("worker.pem"))
        .arg("--key")
        .arg(dir.path().join("worker.key"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("serve starts");
    let pid = child.id().to_string();
    // Whatever happens below, the process does not outlive the test.
    let exited = tokio::task::spawn_blocking(move || child.wait_with_output());
    let ep = client_endpoint(
        client_config(&TlsFiles::dev_sfu(dir.path())).expect("client config"),
        addr,
    )
    .expect("endpoint");
    let started = Instant::now();
    let (_link, mut events) = loop {
        match Link::connect(&ep, addr, "localhost", "test-sfu").await {
            Ok(l) => break l,
            Err(_) if started.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid])
                    .status();
                panic!("the worker never came up: {e}");
            }
        }
    };
    let sent = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(kill.success());
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(ev) = events.recv().await {
            if let LinkEvent::Closed(why) = ev {
                return why;
            }
        }
        "events ended".to_string()
    })
    .await
    .expect("the link ends");
    let after = sent.elapsed();
    eprintln!("link ended {after:?} after SIGTERM: {closed}");
    assert!(
        after < Duration::from_millis(500),
        "link ended {after:?} after SIGTERM ({closed}): a close frame, not silence"
    );
    let out = tokio::time::timeout(Duration::from_secs(5), exited)
        .await
        .expect("exits")
        .expect("joined")
        .expect("output");
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}: {log}", out.status);
    assert!(log.contains("SIGTERM"), "{log}");
}
