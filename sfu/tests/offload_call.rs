//! Offload end to end: balie-sfu and real balie-transcoder workers on
//! loopback, a str0m publisher sending one 720p layer of real VP8 or
//! H.264, and a subscriber that shows the video small. What the subscriber
//! receives is decoded to check its size.

mod common;

use std::time::{Duration, Instant};

use balie_offload::tls::make_dev_certs;
use balie_offload::Codec;
use balie_transcoder::pipeline::Decoder;
use common::single_layer::{call, show_at};
use common::worker::{offload_config, TestWorker};
use common::{run_until, Client, TestServer};
use str0m::media::MediaKind;

/// Every video frame the viewer received: arrival and decoded size
/// (`None`: the decoder gave no picture or an error).
fn decoded(viewer: &Client, codec: Codec) -> Vec<(Instant, Option<(u32, u32)>)> {
    let mut dec = Decoder::new(codec).expect("decoder");
    let frames = viewer
        .received
        .values()
        .find(|r| r.kind == Some(MediaKind::Video))
        .map(|r| r.video.clone())
        .unwrap_or_default();
    frames
        .iter()
        .enumerate()
        .map(|(i, (at, data))| {
            let size = match dec.decode(data, i as i64) {
                Ok(Some(p)) => Some((p.width(), p.height())),
                _ => None,
            };
            (*at, size)
        })
        .collect()
}

const LOW: [(u32, u32); 2] = [(320, 180), (640, 360)];

/// The viewer shows the video at 360 lines and gets a worker's layer;
/// with `then_hide`, it then hides it and the worker session is closed.
fn small_frames_decode(codec: Codec, then_hide: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    make_dev_certs(dir.path(), &["localhost".into()]).expect("certs");
    let worker = TestWorker::start(dir.path());
    let cfg = offload_config(dir.path(), &[&worker]);
    let srv = TestServer::start(|c| c.offload = cfg);
    let (mut publisher, mut viewer) = call(&srv, "counter-offload", codec);
    // Shown at an unknown size on a fast link: nobody needs less.
    common::run_for(&mut [&mut publisher, &mut viewer], Duration::from_secs(2));
    assert_eq!(
        worker.sessions(),
        0,
        "no worker session while none is needed"
    );
    show_at(&mut publisher, &mut viewer, 360);
    // The viewer gets a worker's layer.
    let ok = run_until(
        &mut [&mut publisher, &mut viewer],
        Duration::from_secs(20),
        |c| {
            c[1].received
                .values()
                .any(|r| r.kind == Some(MediaKind::Video) && r.video.len() >= 200)
        },
    );
    assert!(ok, "the viewer keeps receiving video");
    let sizes = decoded(&viewer, codec);
    let small = sizes
        .iter()
        .filter(|(_, s)| s.is_some_and(|s| LOW.contains(&s)))
        .count();
    let failed = sizes.iter().filter(|(_, s)| s.is_none()).count();
    let first = sizes.first().and_then(|(_, s)| *s);
    let last: Vec<_> = sizes.iter().rev().take(30).map(|(_, s)| *s).collect();
    eprintln!(
        "{codec:?}: {} frames, {small} at a worker's size, {failed} not decoded, first {first:?}, last {:?}",
        sizes.len(),
        last.first()
    );
    assert_eq!(first, Some((1280, 720)), "the source first");
    assert!(small >= 60, "frames at a worker's size: {small}");
    assert!(
        last.iter().all(|s| s.is_some_and(|s| LOW.contains(&s))),
        "the last frames: {last:?}"
    );
    assert_eq!(failed, 0, "every frame decodes");
    assert_eq!(worker.sessions(), 1);
    assert_eq!(srv.metric("balie_offload_tracks", &[]), 1.0);
    assert!(srv.metric("balie_offload_frames_total", &["from_worker"]) > 60.0);
    // /readyz says how the worker is.
    let ready = srv
        .http
        .get(format!("{}/readyz", srv.url))
        .send()
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 200);
    let body = ready.text().expect("body");
    assert!(body.contains("offload: 1 of 1 workers up"), "{body}");
    assert!(body.contains("up on 2 of 2 shards"), "{body}");
    if !then_hide {
        return;
    }
    // Hidden: the publisher is told to stop sending the video, and the
    // worker session is closed at once.
    show_at(&mut publisher, &mut viewer, 0);
    let start = Instant::now();
    let closed = run_until(
        &mut [&mut publisher, &mut viewer],
        Duration::from_secs(5),
        |_| worker.sessions() == 0,
    );
    eprintln!(
        "worker session closed {:?} after the video was hidden",
        start.elapsed()
    );
    assert!(closed, "the worker session is closed");
    assert!(publisher.video_paused);
    assert_eq!(srv.metric("balie_offload_tracks", &[]), 0.0);
}

#[test]
fn a_small_display_gets_a_workers_vp8_layer_that_decodes() {
    small_frames_decode(Codec::Vp8, true);
}

#[test]
fn a_small_display_gets_a_workers_h264_layer_that_decodes() {
    small_frames_decode(Codec::H264, false);
}

#[test]
fn a_killed_worker_leaves_the_source_and_another_brings_the_layer_back_within_2_s() {
    let codec = Codec::Vp8;
    let dir = tempfile::tempdir().expect("tempdir");
    make_dev_certs(dir.path(), &["localhost".into()]).expect("certs");
    let mut workers = [TestWorker::start(dir.path()), TestWorker::start(dir.path())];
    let cfg = offload_config(dir.path(), &[&workers[0], &workers[1]]);
    let srv = TestServer::start(|c| {
        c.offload = cfg;
        // One shard: one connection per worker, so the session's worker
        // is the one to kill.
        c.media.shards = 1;
    });
    let (mut publisher, mut viewer) = call(&srv, "counter-move", codec);
    show_at(&mut publisher, &mut viewer, 180);
    let on_layer = run_until(
        &mut [&mut publisher, &mut viewer],
        Duration::from_secs(20),
        |_| workers.iter().any(|w| w.sessions() == 1),
    );
    assert!(on_layer, "a worker got the session");
    // Well into the worker's layer.
    common::run_for(&mut [&mut publisher, &mut viewer], Duration::from_secs(3));
    let busy = workers
        .iter()
        .position(|w| w.sessions() == 1)
        .expect("a worker has it");
    workers[busy].kill();
    let killed = Instant::now();
    common::run_for(&mut [&mut publisher, &mut viewer], Duration::from_secs(5));
    let sizes = decoded(&viewer, codec);
    let before: Vec<_> = sizes.iter().filter(|(t, _)| *t < killed).collect();
    let after: Vec<_> = sizes.iter().filter(|(t, _)| *t >= killed).collect();
    assert!(
        before
            .iter()
            .rev()
            .take(30)
            .all(|(_, s)| *s == Some((320, 180))),
        "on the 180p layer before the kill"
    );
    // Meanwhile the source, then a layer again from the other worker.
    let source_at = after
        .iter()
        .find(|(_, s)| *s == Some((1280, 720)))
        .map(|(t, _)| t.duration_since(killed));
    let back_at = after
        .iter()
        .skip_while(|(_, s)| *s != Some((1280, 720)))
        .find(|(_, s)| *s == Some((320, 180)))
        .map(|(t, _)| t.duration_since(killed));
    let failed = after.iter().filter(|(_, s)| s.is_none()).count();
    eprintln!(
        "worker killed: source after {source_at:?}, low layer back after {back_at:?}, {} frames after, {failed} not decoded",
        after.len()
    );
    assert!(source_at.is_some(), "the source meanwhile");
    // The picture never stopped for long.
    let mut gap = Duration::ZERO;
    for w in sizes
        .iter()
        .filter(|(t, _)| *t + Duration::from_secs(1) >= killed)
        .collect::<Vec<_>>()
        .windows(2)
    {
        gap = gap.max(w[1].0.duration_since(w[0].0));
    }
    eprintln!("longest gap between frames around the kill: {gap:?}");
    assert!(gap < Duration::from_millis(800), "a gap of {gap:?}");
    let back = back_at.expect("the low layer came back");
    assert!(
        back <= Duration::from_secs(2),
        "low layer back after {back:?}"
    );
    assert_eq!(workers[1 - busy].sessions(), 1, "moved to the other worker");
    assert_eq!(failed, 0, "every frame decodes");
    // And keeps coming.
    assert!(after
        .iter()
        .rev()
        .take(30)
        .all(|(_, s)| *s == Some((320, 180))));
    assert!(srv.metric("balie_offload_moves_total", &["moved"]) >= 1.0);
    let body = srv
        .http
        .get(format!("{}/readyz", srv.url))
        .send()
        .expect("readyz")
        .text()
        .expect("body");
    assert!(body.contains("offload: 1 of 2 workers up"), "{body}");
}
