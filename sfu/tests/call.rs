//! Calls through balie-sfu over real loopback UDP with str0m clients.

mod common;

use std::time::Duration;

use balie_sfu::token::Role;
use common::{run_until, Client, Join, TestServer};
use str0m::media::MediaKind;

#[test]
fn one_to_one_call_both_sides_receive_audio_and_video_intact() {
    let srv = TestServer::start(|_| {});
    let mut a = Client::join(&srv, "counter-1", "anna", Role::Citizen, Join::Api);
    let mut b = Client::join(&srv, "counter-1", "bram", Role::Official, Join::Api);
    let (ta, tb) = (a.tag, b.tag);

    // The citizen waits: both channels open, nothing flows either way.
    assert!(run_until(
        &mut [&mut a, &mut b],
        Duration::from_secs(10),
        |c| { !c[0].messages_of("welcome").is_empty() && !c[1].messages_of("welcome").is_empty() }
    ));
    common::run_for(&mut [&mut a, &mut b], Duration::from_millis(1500));
    assert_eq!(a.messages_of("welcome")[0]["you"]["state"], "waiting");
    assert_eq!(
        a.frames_from(tb, MediaKind::Video) + a.frames_from(tb, MediaKind::Audio),
        0
    );
    assert_eq!(
        b.frames_from(ta, MediaKind::Video) + b.frames_from(ta, MediaKind::Audio),
        0
    );

    // The official admits the citizen.
    let id = a.id();
    b.send_json(&serde_json::json!({"type": "admit", "id": id}));
    let ok = run_until(&mut [&mut a, &mut b], Duration::from_secs(15), |c| {
        c[0].frames_from(tb, MediaKind::Video) >= 30
            && c[1].frames_from(ta, MediaKind::Video) >= 30
            && c[0].frames_from(tb, MediaKind::Audio) >= 50
            && c[1].frames_from(ta, MediaKind::Audio) >= 50
    });
    assert!(
        ok,
        "a got video {} audio {}, b got video {} audio {}",
        a.frames_from(tb, MediaKind::Video),
        a.frames_from(tb, MediaKind::Audio),
        b.frames_from(ta, MediaKind::Video),
        b.frames_from(ta, MediaKind::Audio)
    );
    assert_eq!(a.corrupt() + b.corrupt(), 0, "every frame arrives intact");
    // The citizen was told.
    let updated = a.messages_of("participant-updated");
    assert!(updated
        .iter()
        .any(|m| m["participant"]["id"] == id.as_str() && m["participant"]["state"] == "admitted"));
    // In-call signalling: both got a welcome, and a learnt of b (in its
    // welcome roster or by a participant-joined, whichever came first).
    assert_eq!(a.messages_of("welcome").len(), 1);
    assert_eq!(b.messages_of("welcome").len(), 1);
    let mut known: Vec<serde_json::Value> = a.messages_of("welcome")[0]["participants"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    known.extend(
        a.messages_of("participant-joined")
            .iter()
            .map(|m| m["participant"].clone()),
    );
    let official: Vec<_> = known.iter().filter(|p| p["role"] == "official").collect();
    assert_eq!(official.len(), 1, "a knows b once: {known:?}");
    assert_eq!(official[0]["loa"], "substantieel");
    // The roster shows the verified DigiD level but never the pseudonym.
    assert!(official[0].get("sub").is_none());
    assert!(srv.metric("balie_frames_forwarded_total", &[]) > 100.0);
}

#[test]
fn four_person_room_everyone_receives_everyone() {
    let srv = TestServer::start(|_| {});
    let roles = [
        Role::Citizen,
        Role::Official,
        Role::Interpreter,
        Role::Official,
    ];
    let mut cs: Vec<Client> = roles
        .iter()
        .enumerate()
        .map(|(i, r)| Client::join(&srv, "room-4", &format!("p{i}"), *r, Join::Api))
        .collect();
    let tags: Vec<u32> = cs.iter().map(|c| c.tag).collect();
    // The second official admits the citizen once its channel is open.
    let citizen = cs[0].id();
    let mut refs: Vec<&mut Client> = cs.iter_mut().collect();
    assert!(run_until(&mut refs, Duration::from_secs(10), |c| c[3]
        .channel
        .is_some()));
    refs[3].send_json(&serde_json::json!({"type": "admit", "id": citizen}));
    let ok = run_until(&mut refs, Duration::from_secs(20), |c| {
        c.iter().all(|me| {
            tags.iter().filter(|t| **t != me.tag).all(|t| {
                me.frames_from(*t, MediaKind::Video) >= 20
                    && me.frames_from(*t, MediaKind::Audio) >= 30
            })
        })
    });
    let report: Vec<String> = cs
        .iter()
        .map(|me| {
            let got: Vec<String> = tags
                .iter()
                .filter(|t| **t != me.tag)
                .map(|t| {
                    format!(
                        "{}v/{}a",
                        me.frames_from(*t, MediaKind::Video),
                        me.frames_from(*t, MediaKind::Audio)
                    )
                })
                .collect();
            format!("{}: {}", me.name, got.join(" "))
        })
        .collect();
    assert!(ok, "not everyone received everyone: {report:?}");
    assert_eq!(cs.iter().map(|c| c.corrupt()).sum::<u64>(), 0);
}

#[test]
fn h264_is_forwarded_intact() {
    let srv = TestServer::start(|_| {});
    let t1 = common::token("h264", "a", Role::Interpreter);
    let t2 = common::token("h264", "b", Role::Official);
    let mut a = Client::join_with(
        &srv,
        "h264",
        "a",
        &t1,
        Join::Api,
        str0m::format::Codec::H264,
    );
    let mut b = Client::join_with(
        &srv,
        "h264",
        "b",
        &t2,
        Join::Api,
        str0m::format::Codec::H264,
    );
    let (ta, tb) = (a.tag, b.tag);
    let ok = run_until(&mut [&mut a, &mut b], Duration::from_secs(15), |c| {
        c[0].frames_from(tb, MediaKind::Video) >= 30 && c[1].frames_from(ta, MediaKind::Video) >= 30
    });
    assert!(
        ok,
        "h264 frames: a got {}, b got {} (corrupt {} / {})",
        a.frames_from(tb, MediaKind::Video),
        b.frames_from(ta, MediaKind::Video),
        a.corrupt(),
        b.corrupt()
    );
    assert_eq!(a.corrupt() + b.corrupt(), 0);
}

#[test]
fn leave_and_rejoin() {
    let srv = TestServer::start(|_| {});
    let mut a = Client::join(&srv, "rejoin", "anna", Role::Interpreter, Join::Api);
    let mut b = Client::join(&srv, "rejoin", "bram", Role::Official, Join::Api);
    let tb = b.tag;
    assert!(run_until(
        &mut [&mut a, &mut b],
        Duration::from_secs(10),
        |c| {
            c[0].frames_from(tb, MediaKind::Video) >= 10
                && c[1].frames_from(c[0].tag, MediaKind::Video) >= 10
        }
    ));
    // b leaves through the data channel.
    let b_id = b.location.clone().expect("location");
    b.send_json(&serde_json::json!({"type": "leave"}));
    let ok = run_until(&mut [&mut a, &mut b], Duration::from_secs(10), |c| {
        !c[0].messages_of("participant-left").is_empty()
    });
    assert!(ok, "a was told that b left");
    assert_eq!(a.messages_of("participant-left")[0]["reason"], "left");
    assert!(b_id.starts_with("/v1/sessions/"));
    // The registry released b: its session URL is gone.
    let gone = srv
        .http
        .delete(format!("{}{}", srv.url, b_id))
        .send()
        .expect("http");
    assert_eq!(gone.status().as_u16(), 404);
    // a's m-lines from b are stopped by a server offer (a answered it).
    assert!(run_until(&mut [&mut a], Duration::from_secs(5), |c| c[0]
        .offers_answered
        >= 2));

    // b comes back as a new session; media flows again both ways.
    let mut b2 = Client::join(&srv, "rejoin", "bram", Role::Official, Join::Api);
    let (ta, tb2) = (a.tag, b2.tag);
    let ok = run_until(&mut [&mut a, &mut b2], Duration::from_secs(10), |c| {
        c[0].frames_from(tb2, MediaKind::Video) >= 10
            && c[1].frames_from(ta, MediaKind::Video) >= 10
    });
    assert!(ok, "media flows after the rejoin");

    // DELETE on the session URL ends a's session; b2 is told.
    let loc = a.location.clone().expect("location");
    let r = srv
        .http
        .delete(format!("{}{}", srv.url, loc))
        .send()
        .expect("http");
    assert_eq!(r.status().as_u16(), 200);
    assert!(run_until(
        &mut [&mut a, &mut b2],
        Duration::from_secs(5),
        |c| { !c[1].messages_of("participant-left").is_empty() }
    ));
    assert_eq!(a.corrupt() + b2.corrupt(), 0);
}

#[test]
fn whip_publisher_reaches_whep_viewer_and_api_participant() {
    let srv = TestServer::start(|_| {});
    let mut publisher = Client::join(&srv, "broadcast", "cam", Role::Official, Join::Whip);
    let mut viewer = Client::join(&srv, "broadcast", "viewer", Role::Observer, Join::Whep);
    let mut member = Client::join(&srv, "broadcast", "member", Role::Observer, Join::ApiViewer);
    let tp = publisher.tag;
    let ok = run_until(
        &mut [&mut publisher, &mut viewer, &mut member],
        Duration::from_secs(15),
        |c| {
            c[1].frames_from(tp, MediaKind::Video) >= 20
                && c[1].frames_from(tp, MediaKind::Audio) >= 30
                && c[2].frames_from(tp, MediaKind::Video) >= 20
        },
    );
    assert!(
        ok,
        "whep viewer got {}v/{}a, api member got {}v",
        viewer.frames_from(tp, MediaKind::Video),
        viewer.frames_from(tp, MediaKind::Audio),
        member.frames_from(tp, MediaKind::Video)
    );
    // The WHIP publisher receives nothing.
    assert_eq!(
        publisher.received.values().map(|r| r.frames).sum::<u64>(),
        0
    );
    assert_eq!(viewer.corrupt() + member.corrupt(), 0);
}

#[test]
fn ten_thousand_garbage_datagrams_leave_the_call_undisturbed() {
    use rand::Rng;
    let srv = TestServer::start(|c| c.media.shards = 1);
    let shard = srv.server().shard_addrs[0];
    let mut a = Client::join(&srv, "garbage", "anna", Role::Interpreter, Join::Api);
    let mut b = Client::join(&srv, "garbage", "bram", Role::Official, Join::Api);
    let (ta, tb) = (a.tag, b.tag);
    assert!(run_until(
        &mut [&mut a, &mut b],
        Duration::from_secs(10),
        |c| {
            c[0].frames_from(tb, MediaKind::Video) >= 10
                && c[1].frames_from(ta, MediaKind::Video) >= 10
        }
    ));
    let garbage_before = srv.metric("balie_garbage_datagrams_total", &[]);
    let stranger = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut rng = rand::rng();
    let (a_video, b_video) = (
        a.frames_from(tb, MediaKind::Video),
        b.frames_from(ta, MediaKind::Video),
    );
    // 8,000 from a stranger and 2,000 from a participant's own address (its
    // session's demux entry), interleaved with the call.
    for round in 0..100 {
        for i in 0..100 {
            let len = rng.random_range(1..1400);
            let mut buf = vec![0u8; len];
            rng.fill(&mut buf[..]);
            // Make some look like RTP, DTLS and STUN to reach deeper parsers.
            match i % 4 {
                0 => buf[0] = 0x80,
                1 => buf[0] = 22,
                2 => buf[0] = 0,
                _ => {}
            }
            if i % 5 == 0 {
                let _ = a.socket.send_to(&buf, shard);
            } else {
                let _ = stranger.send_to(&buf, shard);
            }
        }
        if round % 10 == 0 {
            a.step();
            b.step();
        }
    }
    let ok = run_until(&mut [&mut a, &mut b], Duration::from_secs(10), |c| {
        c[0].frames_from(tb, MediaKind::Video) >= a_video + 60
            && c[1].frames_from(ta, MediaKind::Video) >= b_video + 60
    });
    assert!(ok, "frames keep arriving after the garbage");
    assert_eq!(a.corrupt() + b.corrupt(), 0);
    let counted = srv.metric("balie_garbage_datagrams_total", &[]) - garbage_before;
    // Every stranger datagram is counted; a peer's garbage is dropped inside
    // str0m (and counted there only when it does not parse at all).
    assert!(counted >= 8000.0, "garbage counted: {counted}");
}
