//! The HTTP API's refusals, trickle ICE, and in-call message errors.

mod common;

use std::time::Duration;

use balie_sfu::token::{sign_hs256, unix_now, Loa, Role};
use common::{claims, run_until, token, Client, Join, TestServer};
use serde_json::Value;

fn post(
    srv: &TestServer,
    path: &str,
    auth: Option<&str>,
    ctype: &str,
    body: String,
) -> (u16, Value) {
    let mut req = srv
        .http
        .post(format!("{}{}", srv.url, path))
        .header("Content-Type", ctype)
        .body(body);
    if let Some(t) = auth {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let resp = req.send().expect("http");
    let status = resp.status().as_u16();
    let body: Value = resp.json().unwrap_or(Value::Null);
    (status, body)
}

fn offer() -> String {
    Client::prepare("x", Join::Api, str0m::format::Codec::Vp8)
        .1
        .to_sdp_string()
}

#[test]
fn every_refusal_has_its_status_code_and_is_counted() {
    let srv = TestServer::start(|c| {
        c.rooms.max_participants = 2;
        c.rooms.min_loa = Some(Loa::Midden);
    });
    let path = "/v1/rooms/r1/sessions";
    let sdp = "application/sdp";
    let good = token("r1", "anna", Role::Citizen);

    // (what, token, content type, body, status, code)
    type Case = (
        &'static str,
        Option<String>,
        &'static str,
        String,
        u16,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        ("missing token", None, sdp, offer(), 401, "token_missing"),
        (
            "forged token",
            Some(sign_hs256("wrong-secret", &claims("r1", "a", Role::Citizen)).expect("signs")),
            sdp,
            offer(),
            401,
            "token_invalid",
        ),
        (
            "garbage token",
            Some("not.a.jwt".into()),
            sdp,
            offer(),
            401,
            "token_invalid",
        ),
        (
            "expired token",
            Some({
                let mut c = claims("r1", "a", Role::Citizen);
                c.exp = unix_now() - 3600;
                sign_hs256(common::SECRET, &c).expect("signs")
            }),
            sdp,
            offer(),
            401,
            "token_expired",
        ),
        (
            "token for another room",
            Some(token("r2", "a", Role::Citizen)),
            sdp,
            offer(),
            403,
            "wrong_room",
        ),
        (
            "no rights at all",
            Some({
                let mut c = claims("r1", "a", Role::Observer);
                c.can_subscribe = Some(false);
                sign_hs256(common::SECRET, &c).expect("signs")
            }),
            sdp,
            offer(),
            403,
            "not_allowed",
        ),
        (
            "wrong content type",
            Some(good.clone()),
            "text/plain",
            offer(),
            415,
            "unsupported_media_type",
        ),
        (
            "malformed SDP",
            Some(good.clone()),
            sdp,
            "v=0\r\nthis is not sdp".into(),
            400,
            "bad_sdp",
        ),
        (
            "body over 64 KiB",
            Some(good.clone()),
            sdp,
            "a".repeat(65 * 1024),
            413,
            "body_too_large",
        ),
    ];
    for (what, auth, ctype, body, status, code) in cases {
        let (got, body) = post(&srv, path, auth.as_deref(), ctype, body);
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(body["code"], code, "{what}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}"
        );
        assert!(
            srv.metric("balie_http_errors_total", &[&format!("code=\"{code}\"")]) >= 1.0,
            "{what} counted"
        );
    }
    // The reason names both levels in words people know.
    let mut low = claims("r1", "a", Role::Citizen);
    low.loa = Some(Loa::Basis);
    let (_, body) = post(
        &srv,
        path,
        Some(&sign_hs256(common::SECRET, &low).expect("signs")),
        sdp,
        offer(),
    );
    assert_eq!(
        body["error"],
        "this counter needs DigiD Midden or higher; you logged in with DigiD Basis"
    );
    // The parser's reason reaches the client.
    let (_, body) = post(&srv, path, Some(&good), sdp, "v=0\r\nnonsense".into());
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("does not parse"),
        "{body}"
    );

    // An observer may not publish with WHIP.
    let (got, body) = post(
        &srv,
        "/whip/r1",
        Some(&token("r1", "o", Role::Observer)),
        sdp,
        offer(),
    );
    assert_eq!((got, body["code"].as_str()), (403, Some("not_allowed")));

    // Room full at max_participants = 2.
    let _a = Client::join(&srv, "r1", "a", Role::Citizen, Join::Api);
    let _b = Client::join(&srv, "r1", "b", Role::Official, Join::Api);
    let (got, body) = post(&srv, path, Some(&good), sdp, offer());
    assert_eq!(
        (got, body["code"].as_str()),
        (409, Some("room_full")),
        "{body}"
    );
    assert!(srv.metric("balie_joins_total", &["result=\"room_full\""]) >= 1.0);
    assert!(srv.metric("balie_joins_total", &["result=\"created\""]) >= 2.0);

    // Unknown sessions.
    let r = srv
        .http
        .delete(format!("{}/v1/sessions/{}", srv.url, "0".repeat(32)))
        .send()
        .expect("http");
    assert_eq!(r.status().as_u16(), 404);
    let r = srv
        .http
        .delete(format!("{}/v1/sessions/nope", srv.url))
        .send()
        .expect("http");
    assert_eq!(r.status().as_u16(), 404);
}

#[test]
fn health_and_metrics_endpoints() {
    let srv = TestServer::start(|_| {});
    let get = |p: &str| {
        srv.http
            .get(format!("{}{}", srv.url, p))
            .send()
            .expect("http")
    };
    assert_eq!(get("/healthz").status().as_u16(), 200);
    assert_eq!(get("/readyz").status().as_u16(), 200);
    let m = get("/metrics").text().expect("text");
    for family in [
        "balie_sessions",
        "balie_rooms",
        "balie_udp_packets_total",
        "balie_garbage_datagrams_total",
        "balie_join_latency_seconds",
    ] {
        assert!(m.contains(family), "{family} exported");
    }
    assert!(m.contains("shard=\"0\"") && m.contains("shard=\"1\""));
}

#[test]
fn trickle_ice_and_ice_restart_through_patch() {
    let srv = TestServer::start(|_| {});
    let mut a = Client::join(&srv, "trickle", "anna", Role::Citizen, Join::Api);
    assert!(run_until(&mut [&mut a], Duration::from_secs(5), |c| c[0].connected));
    let url = format!("{}{}", srv.url, a.location.clone().expect("location"));
    let patch = |body: &str, ctype: &str| {
        srv.http
            .patch(&url)
            .header("Content-Type", ctype)
            .body(body.to_string())
            .send()
            .expect("http")
    };
    let frag_ct = "application/trickle-ice-sdpfrag";
    // A plain trickled candidate: 204.
    let cand = format!(
        "a=candidate:2 1 udp 2113929471 127.0.0.1 {} typ host\r\n",
        a.addr.port()
    );
    assert_eq!(patch(&cand, frag_ct).status().as_u16(), 204);
    // Wrong type and a bad candidate line: 415 and 400.
    assert_eq!(patch(&cand, "text/plain").status().as_u16(), 415);
    let r = patch("a=candidate:garbage\r\n", frag_ct);
    assert_eq!(r.status().as_u16(), 400);
    // New ICE credentials: an ICE restart, answered with ours.
    let r = patch(
        "a=ice-ufrag:newufrag\r\na=ice-pwd:newpasswordnewpassword12\r\n",
        frag_ct,
    );
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().expect("text");
    assert!(
        text.contains("a=ice-ufrag:") && text.contains("a=ice-pwd:"),
        "{text}"
    );
    // Unknown session: 404.
    let r = srv
        .http
        .patch(format!("{}/v1/sessions/{}", srv.url, "f".repeat(32)))
        .header("Content-Type", frag_ct)
        .body(cand.clone())
        .send()
        .expect("http");
    assert_eq!(r.status().as_u16(), 404);
}

#[test]
fn bad_channel_messages_get_an_error_and_are_counted() {
    let srv = TestServer::start(|_| {});
    let mut a = Client::join(&srv, "chan", "anna", Role::Interpreter, Join::Api);
    let mut b = Client::join(&srv, "chan", "bram", Role::Official, Join::Api);
    // Wait until a has answered the server's offer for b's tracks: the
    // channel is ordered, so that answer lands before the messages below.
    assert!(run_until(
        &mut [&mut a, &mut b],
        Duration::from_secs(10),
        |c| { c[0].offers_answered >= 1 && !c[0].messages_of("welcome").is_empty() }
    ));
    a.send_raw(b"{not json");
    a.send_json(&serde_json::json!({"type": "dance"}));
    a.send_json(&serde_json::json!({"type": "answer", "sdp": "v=0"}));
    let ok = run_until(&mut [&mut a, &mut b], Duration::from_secs(5), |c| {
        c[0].messages_of("error").len() >= 3
    });
    assert!(ok, "errors: {:?}", a.messages_of("error"));
    let codes: Vec<&str> = a
        .messages_of("error")
        .iter()
        .filter_map(|m| m["code"].as_str())
        .collect();
    assert_eq!(codes, vec!["bad_message", "bad_message", "no_offer"]);
    assert!(srv.metric("balie_channel_messages_total", &["result=\"refused\""]) >= 3.0);
    // The call is undisturbed.
    let tb = b.tag;
    let before = a.frames_from(tb, str0m::media::MediaKind::Video);
    assert!(run_until(
        &mut [&mut a, &mut b],
        Duration::from_secs(5),
        |c| { c[0].frames_from(tb, str0m::media::MediaKind::Video) > before + 20 }
    ));
}

#[test]
fn the_web_client_is_served_with_safe_headers_and_dev_tokens_only_in_dev() {
    let srv = TestServer::start(|c| c.dev = false);
    let get = |p: &str| {
        srv.http
            .get(format!("{}{}", srv.url, p))
            .send()
            .expect("http")
    };
    let page = get("/join?token=abc");
    assert_eq!(page.status().as_u16(), 200);
    assert_eq!(
        page.headers()["referrer-policy"],
        "no-referrer",
        "the token never leaks"
    );
    assert_eq!(page.headers()["cache-control"], "no-store");
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .expect("ascii")
        .contains("default-src 'self'"));
    assert!(page.text().expect("html").contains("/assets/app.js"));
    for asset in [
        "app.js",
        "i18n.js",
        "theme.css",
        "vendor/nl-design-system/button.css",
    ] {
        let r = get(&format!("/assets/{asset}"));
        assert_eq!(r.status().as_u16(), 200, "{asset}");
        assert!(r.text().expect("text").len() > 100);
    }
    assert_eq!(get("/assets/../Cargo.toml").status().as_u16(), 404);
    assert_eq!(get("/assets/nope.js").status().as_u16(), 404);
    let info: Value = get("/v1/info").json().expect("json");
    assert_eq!(info["dev"], false);
    let r = srv
        .http
        .post(format!("{}/dev/token", srv.url))
        .body(r#"{"room":"r","name":"n","role":"citizen","loa":null}"#)
        .send()
        .expect("http");
    assert_eq!(
        r.status().as_u16(),
        404,
        "no development tokens outside dev"
    );

    // With dev = true the same request makes a token that joins.
    let dev = TestServer::start(|c| c.dev = true);
    let r = dev
        .http
        .post(format!("{}/dev/token", dev.url))
        .body(r#"{"room":"r","name":"Anna","role":"citizen","loa":"midden"}"#)
        .send()
        .expect("http");
    assert_eq!(r.status().as_u16(), 200);
    let t: Value = r.json().expect("json");
    let claims = balie_sfu::token::Verifier::new(&balie_sfu::config::AuthConfig {
        hs256_secret: common::SECRET.into(),
        jwks_file: Default::default(),
    })
    .expect("verifier")
    .verify(t["token"].as_str().expect("token"))
    .expect("valid");
    assert_eq!(
        (claims.role, claims.loa),
        (Role::Citizen, Some(Loa::Midden))
    );
    assert!(claims.sub.starts_with("dev-"), "a pseudonym, not the name");
    for bad in [
        r#"{"room":"a/b","name":"n","role":"citizen"}"#,
        r#"{"room":"r","name":"n","role":"king"}"#,
        r#"{"room":"r","name":"n","role":"citizen","loa":"super"}"#,
        "not json",
    ] {
        let r = dev
            .http
            .post(format!("{}/dev/token", dev.url))
            .body(bad)
            .send()
            .expect("http");
        assert_eq!(r.status().as_u16(), 400, "{bad}");
    }
}
