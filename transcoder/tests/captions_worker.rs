//! Caption sessions over QUIC on loopback, as an SFU sees them: Opus
//! packets of espeak-ng speech go in short groups, caption segments come
//! back on the control stream. Needs the default model (the test command
//! provisions it) and espeak-ng.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use balie_offload::link::{GroupSender, Link, LinkEvent};
use balie_offload::{Caption, Control, ErrorCode, Frame, GroupHeader};
use balie_transcoder::captions::audio::{encode_opus, OPUS_FRAME};
use balie_transcoder::captions::mel::SAMPLE_RATE;
use balie_transcoder::captions::speech::{speak, words};
use balie_transcoder::captions::{models, whisper::Whisper};
use balie_transcoder::metrics::Metrics;
use balie_transcoder::server::CaptionsSetup;
use tokio::sync::mpsc::UnboundedReceiver;

fn model() -> Arc<Whisper> {
    let dir = models::default_dir();
    assert!(
        models::is_provisioned(&dir),
        "run `cargo run -p balie-transcoder -- models fetch` (the test command does)"
    );
    Arc::new(Whisper::load(&dir).expect("model loads"))
}

/// A worker taking two caption sessions' worth of video and `captions`.
fn start_worker(dir: &Path, captions: Option<CaptionsSetup>) -> (SocketAddr, Metrics) {
    common::certs(dir);
    let (addr, metrics, _) = common::start_worker(dir, 2, captions);
    (addr, metrics)
}

/// Send Opus packets as the SFU does: paced in real time, a group per
/// second, RTP time at 48 kHz.
async fn send_audio(link: &Link, session: u64, packets: &[Vec<u8>]) {
    let start = Instant::now();
    let mut group: Option<GroupSender> = None;
    for (i, p) in packets.iter().enumerate() {
        tokio::time::sleep_until((start + Duration::from_millis(20 * i as u64)).into()).await;
        if i % 50 == 0 {
            if let Some(g) = group.take() {
                g.finish();
            }
            let header = GroupHeader {
                session,
                track: 0,
                group: (i / 50) as u32 + 1,
            };
            group = Some(link.open_group(header).await.expect("group"));
        }
        let g = group.as_mut().expect("a group is open");
        g.frame(Frame {
            rtp_time: (i * 960) as u32,
            deadline_ms: 0,
            key: i % 50 == 0,
            data: p.clone().into(),
        })
        .await
        .expect("sent");
    }
    if let Some(g) = group {
        g.finish();
    }
}

/// Caption segments (and other control messages) until `until` passes.
async fn captions(
    events: &mut UnboundedReceiver<LinkEvent>,
    until: Duration,
) -> (Vec<Caption>, Vec<Control>) {
    let (mut caps, mut other) = (Vec::new(), Vec::new());
    let end = tokio::time::Instant::now() + until;
    while let Ok(Some(ev)) = tokio::time::timeout_at(end, events.recv()).await {
        match ev {
            LinkEvent::Control(Control::Caption(c)) => caps.push(c),
            LinkEvent::Control(Control::Capacity(_)) => {}
            LinkEvent::Control(c) => other.push(c),
            e => panic!("unexpected {e:?}"),
        }
    }
    (caps, other)
}

/// Speech with a second of silence before and after, as Opus packets.
fn spoken(voice: &str, text: &str) -> Vec<Vec<u8>> {
    let mut pcm = vec![0f32; SAMPLE_RATE];
    pcm.extend(speak(voice, text).expect("speech"));
    pcm.extend(vec![0f32; SAMPLE_RATE]);
    encode_opus(&pcm).expect("opus")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opus_speech_in_gives_partials_then_final_captions_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, metrics) = start_worker(
        dir.path(),
        Some(CaptionsSetup {
            whisper: model(),
            max_sessions: 1,
        }),
    );
    let (link, mut events) = common::connect(dir.path(), addr).await;
    assert_eq!(link.max_captions, 1);
    let packets = spoken(
        "en",
        "Please bring your passport to the counter on Monday morning.",
    );
    assert!(packets.len() > 150, "{} packets", packets.len());
    link.send(Control::OpenCaptions {
        session: 7,
        language: "en".into(),
    });
    let sent = Instant::now();
    send_audio(&link, 7, &packets).await;
    let audio = packets.len() as f64 * OPUS_FRAME as f64 / SAMPLE_RATE as f64;
    eprintln!(
        "{:.1} s of audio sent in {:.1} s",
        audio,
        sent.elapsed().as_secs_f64()
    );
    let (caps, other) = captions(&mut events, Duration::from_secs(3)).await;
    for c in &caps {
        eprintln!(
            "{:5}-{:5} {} {}",
            c.start_ms,
            c.end_ms,
            if c.is_final { "final  " } else { "partial" },
            c.text
        );
    }
    assert!(other.is_empty(), "{other:?}");
    assert!(caps.iter().all(|c| c.session == 7 && c.language == "en"));
    assert!(caps.iter().any(|c| !c.is_final), "partials come first");
    let finals: Vec<String> = caps
        .iter()
        .filter(|c| c.is_final)
        .flat_map(|c| words(&c.text))
        .collect();
    for w in ["passport", "counter", "monday"] {
        assert!(finals.iter().any(|f| f == w), "{w} in {finals:?}");
    }
    // The speech starts after a second of silence and ends before the
    // silence after it.
    let first = caps.iter().map(|c| c.start_ms).min().unwrap_or(0);
    assert!((600..=1_300).contains(&first), "starts at {first} ms");
    assert!(caps.iter().all(|c| f64::from(c.end_ms) <= audio * 1000.0));
    let m = metrics.render();
    eprintln!(
        "{}",
        m.lines()
            .filter(|l| l.contains("caption") && !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(m.contains("balie_transcoder_caption_sessions 1"));
    assert!(
        m.contains("balie_transcoder_caption_whisper_on_gpu 0"),
        "{m}"
    );
    assert!(m.contains("balie_transcoder_caption_latency_seconds_count"));
    assert!(!m.contains("balie_transcoder_caption_latency_seconds_count 0"));

    // The one caption slot is taken: a second session is refused.
    link.send(Control::OpenCaptions {
        session: 8,
        language: "en".into(),
    });
    let (_, other) = captions(&mut events, Duration::from_millis(500)).await;
    assert!(
        matches!(
            &other[..],
            [Control::Ended {
                session: 8,
                code: ErrorCode::Capacity,
                ..
            }]
        ),
        "{other:?}"
    );
    // Closed: the slot is free again.
    link.send(Control::Close { session: 7 });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(metrics
        .render()
        .contains("balie_transcoder_caption_sessions 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captions_are_refused_by_a_worker_without_a_model_or_for_an_unknown_language() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, _) = start_worker(dir.path(), None);
    let (link, mut events) = common::connect(dir.path(), addr).await;
    assert_eq!(link.max_captions, 0);
    link.send(Control::OpenCaptions {
        session: 1,
        language: "nl".into(),
    });
    let (_, other) = captions(&mut events, Duration::from_millis(500)).await;
    assert!(
        matches!(&other[..], [Control::Ended { session: 1, code: ErrorCode::Unsupported, reason }] if reason.contains("--captions")),
        "{other:?}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, metrics) = start_worker(
        dir.path(),
        Some(CaptionsSetup {
            whisper: model(),
            max_sessions: 4,
        }),
    );
    let (link, mut events) = common::connect(dir.path(), addr).await;
    link.send(Control::OpenCaptions {
        session: 2,
        language: "zz".into(),
    });
    let (_, other) = captions(&mut events, Duration::from_millis(500)).await;
    assert!(
        matches!(
            &other[..],
            [Control::Ended {
                session: 2,
                code: ErrorCode::Unsupported,
                ..
            }]
        ),
        "{other:?}"
    );
    // Opus garbage in a session is counted, and the session goes on.
    link.send(Control::OpenCaptions {
        session: 3,
        language: "nl".into(),
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut g = link
        .open_group(GroupHeader {
            session: 3,
            track: 0,
            group: 1,
        })
        .await
        .expect("group");
    for i in 0..20u32 {
        g.frame(Frame {
            rtp_time: i * 960,
            deadline_ms: 0,
            key: i == 0,
            data: vec![0xff; 40].into(),
        })
        .await
        .expect("sent");
    }
    g.finish();
    let (caps, other) = captions(&mut events, Duration::from_millis(700)).await;
    assert!(caps.is_empty() && other.is_empty(), "{caps:?} {other:?}");
    let m = metrics.render();
    assert!(
        m.contains("balie_transcoder_caption_audio_packets_total{outcome=\"undecodable\"} 20"),
        "{m}"
    );
    assert!(m.contains("balie_transcoder_caption_sessions 1"), "{m}");
}

#[test]
fn serve_with_captions_and_no_model_stops_with_how_to_get_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let no_model = dir.path().join("no-model");
    let err = common::serve_refused(
        dir.path(),
        &[],
        &[
            ("BALIE_TRANSCODER_CAPTIONS", "true".as_ref()),
            ("BALIE_TRANSCODER_CAPTIONS_MODEL", no_model.as_os_str()),
        ],
    );
    assert!(
        err.contains("no-model/config.json") && err.contains("models fetch"),
        "{err}"
    );
}
