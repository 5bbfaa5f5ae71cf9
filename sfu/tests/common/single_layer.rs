//! A single-layer call for offload tests: a str0m publisher sending one
//! 720p layer of real VP8 or H.264 from a generated clip, and a viewer.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use balie_offload::{Codec, Size};
use balie_sfu::sim::peer::Clip;
use balie_sfu::token::Role;
use balie_transcoder::clip;
use str0m::media::MediaKind;

use super::{run_until, token, Client, Join, TestServer};

pub const HD: Size = Size {
    width: 1280,
    height: 720,
};

/// A 3 s loop of 720p at 1.5 Mbit/s with one keyframe, and the same
/// pictures as keyframes (sent when a keyframe is asked for).
pub fn clip_of(codec: Codec) -> Clip {
    static VP8: OnceLock<Clip> = OnceLock::new();
    static H264: OnceLock<Clip> = OnceLock::new();
    let cell = match codec {
        Codec::Vp8 => &VP8,
        Codec::H264 => &H264,
    };
    cell.get_or_init(|| {
        let frames = |gop| {
            clip::make(codec, HD, 90, gop, 1500)
                .expect("clip")
                .into_iter()
                .map(|f| (f.key, f.data))
                .collect::<Vec<_>>()
        };
        Clip {
            frames: Arc::new(frames(90)),
            keys: Arc::new(frames(1)),
        }
    })
    .clone()
}

pub fn str0m_codec(codec: Codec) -> str0m::format::Codec {
    match codec {
        Codec::Vp8 => str0m::format::Codec::Vp8,
        Codec::H264 => str0m::format::Codec::H264,
    }
}

/// A publisher sending `codec` from the clip, and a viewer keeping what it
/// receives, both in `room`.
pub fn call(srv: &TestServer, room: &str, codec: Codec) -> (Client, Client) {
    let c = str0m_codec(codec);
    let mut publisher = Client::join_with(
        srv,
        room,
        "publisher",
        &token(room, "publisher", Role::Official),
        Join::Api,
        c,
    );
    publisher.clip = Some(clip_of(codec));
    let mut viewer = Client::join_with(
        srv,
        room,
        "viewer",
        &token(room, "viewer", Role::Official),
        Join::ApiViewer,
        c,
    );
    viewer.keep_video = true;
    (publisher, viewer)
}

/// Once the viewer receives the publisher's video, tell the SFU it is
/// shown `height` lines tall.
pub fn show_at(publisher: &mut Client, viewer: &mut Client, height: u32) {
    let tag = publisher.tag;
    assert!(
        run_until(&mut [publisher, viewer], Duration::from_secs(15), |c| {
            c[1].frames_from(tag, MediaKind::Video) >= 10
                || c[1]
                    .received
                    .values()
                    .any(|r| r.kind == Some(MediaKind::Video) && r.video.len() >= 10)
        }),
        "the viewer gets the source"
    );
    let mid = viewer
        .received
        .iter()
        .find(|(_, r)| r.kind == Some(MediaKind::Video))
        .map(|(mid, _)| mid.to_string())
        .expect("a video m-line");
    let msg = serde_json::json!({"type": "video-size", "track": mid, "width": height * 16 / 9, "height": height});
    viewer.send_json(&msg);
}
