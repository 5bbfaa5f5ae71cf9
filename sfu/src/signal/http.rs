//! The HTTP API: sessions (our own API, WHIP, WHEP), health and metrics.
//!
//! Building an `Rtc` and accepting the offer costs milliseconds of CPU, so it
//! happens here, on tokio's blocking pool, never on a shard thread; the shard
//! receives a ready session.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use str0m::change::SdpOffer;
use tokio::sync::{mpsc, oneshot};

use super::{sdpfrag, ApiError};
use crate::config::Config;
use crate::ids::{RoomId, SessionId};
use crate::metrics::Metrics;
use crate::registry::{AdmitError, Registry};
use crate::shard::session::{answer_offer, SessionSetup, SetupError};
use crate::shard::{Command, LeaveReason, NewSession, SessionKind, Trickle};
use crate::token::{Claims, TokenError, Verifier};

/// Largest request body accepted (an SDP offer is a few KiB).
pub const MAX_BODY: usize = 64 * 1024;

/// How the HTTP layer reaches one shard.
#[derive(Clone)]
pub struct ShardLink {
    /// The shard's command queue.
    pub commands: mpsc::UnboundedSender<Command>,
    /// The host candidates advertised for its socket.
    pub candidates: Vec<SocketAddr>,
}

/// Shared state of the HTTP handlers.
pub struct AppState {
    /// The configuration.
    pub config: Arc<Config>,
    /// Token verification.
    pub verifier: Verifier,
    /// Room pinning and admission.
    pub registry: Arc<Registry>,
    /// The shards, by id.
    pub shards: Vec<ShardLink>,
    /// Metrics.
    pub metrics: Metrics,
    /// Set on SIGTERM.
    pub draining: Arc<AtomicBool>,
    /// What sessions are built with (the shared DTLS certificate and buffers).
    pub setup: SessionSetup,
    /// Each shard's transcoder pool (empty without offload).
    pub offload: Vec<crate::offload::PoolStatus>,
}

/// The HTTP router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/rooms/{room}/sessions", new_session(SessionKind::Api))
        .route("/whip/{room}", new_session(SessionKind::Whip))
        .route("/whep/{room}", new_session(SessionKind::Whep))
        .route(
            "/v1/sessions/{id}",
            axum::routing::delete(delete_session).patch(patch_session),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(super::web::routes())
        .with_state(state)
}

/// `POST` creating a session of one kind.
fn new_session(kind: SessionKind) -> MethodRouter<Arc<AppState>> {
    post(
        move |State(st): State<Arc<AppState>>,
              Path(room): Path<String>,
              headers: HeaderMap,
              body: Body| async move { create(&st, &room, kind, &headers, body).await },
    )
}

/// 503 while draining, else 200. The body's further lines give the
/// transcoder workers' health: a node without workers still serves calls
/// (single-layer video is forwarded as sent), so they do not fail it.
async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    let mut body = if st.draining.load(Ordering::Relaxed) {
        String::from("draining\n")
    } else {
        String::from("ready\n")
    };
    body.push_str(&crate::offload::readiness(&st.offload));
    let status = if st.draining.load(Ordering::Relaxed) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, body).into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        st.metrics.render(),
    )
        .into_response()
}

/// Count and answer an error.
fn refuse(st: &AppState, e: ApiError) -> Response {
    st.metrics.http_error(e.code);
    st.metrics.join_result(e.code);
    e.into_response()
}

async fn create(
    st: &AppState,
    room: &str,
    kind: SessionKind,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let offer_received = Instant::now();
    match admit(st, room, kind, headers, body, offer_received).await {
        Ok(resp) => {
            st.metrics.join_result("created");
            resp
        }
        Err(e) => refuse(st, e),
    }
}

async fn admit(
    st: &AppState,
    room: &str,
    kind: SessionKind,
    headers: &HeaderMap,
    body: Body,
    offer_received: Instant,
) -> Result<Response, ApiError> {
    if st.draining.load(Ordering::Relaxed) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this node is shutting down; try again (another node will take the call)",
        ));
    }
    let room = RoomId::parse(room).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_room",
            "room names are 1-128 characters of A-Z, a-z, 0-9, '.', '_' and '-'",
        )
    })?;
    let claims = authorize(st, headers, &room, kind)?;
    require_content_type(headers, "application/sdp")?;
    let body = read_body(body).await?;
    let sdp = std::str::from_utf8(&body)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "bad_sdp", "the SDP is not UTF-8"))?
        .to_string();
    let offer = SdpOffer::from_sdp_string(&sdp).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_sdp",
            format!("the SDP offer does not parse: {e}"),
        )
    })?;
    let remote_ufrag = sdpfrag::ice_ufrag(&sdp);

    let session = SessionId::random();
    let shard = st
        .registry
        .admit(&room, session, &claims)
        .map_err(|e| match e {
            AdmitError::RoomFull => ApiError::new(
                StatusCode::CONFLICT,
                "room_full",
                format!(
                    "the room already has {} participants",
                    st.config.rooms.max_participants
                ),
            ),
            AdmitError::LoaTooLow { required, has } => ApiError::new(
                StatusCode::FORBIDDEN,
                "loa_too_low",
                format!(
                    "this counter needs {} or higher; you logged in with {}",
                    required.label(),
                    has.map(|l| l.label()).unwrap_or("no DigiD level")
                ),
            ),
        })?;
    let link = &st.shards[shard.0];

    // Off the async workers: building an Rtc and accepting the offer is CPU work.
    let setup = st.setup.clone();
    let candidates = link.candidates.clone();
    let built = tokio::task::spawn_blocking(move || {
        answer_offer(&setup, &candidates, offer, Instant::now())
    })
    .await;
    let (rtc, answer, ufrag) = match built {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            st.registry.release(session);
            return Err(match e {
                SetupError::Offer(why) => ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_sdp",
                    format!("the SDP offer cannot be answered: {why}"),
                ),
                SetupError::Candidate(why) => ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("bad host candidate: {why}"),
                ),
                SetupError::Certificate => ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "no DTLS certificate",
                ),
            });
        }
        Err(_) => {
            st.registry.release(session);
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "session setup failed",
            ));
        }
    };
    let new = NewSession {
        id: session,
        room,
        kind,
        claims,
        rtc,
        ufrag,
        remote_ufrag,
        offer_received,
    };
    if link.commands.send(Command::Add(Box::new(new))).is_err() {
        st.registry.release(session);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shard_unavailable",
            "the media plane is not running",
        ));
    }
    let location = format!("/v1/sessions/{session}");
    Ok((
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/sdp".to_string()),
            (header::LOCATION, location),
        ],
        answer.to_sdp_string(),
    )
        .into_response())
}

fn authorize(
    st: &AppState,
    headers: &HeaderMap,
    room: &RoomId,
    kind: SessionKind,
) -> Result<Claims, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Err(token_error(TokenError::Missing));
    };
    let claims = st.verifier.verify(token).map_err(token_error)?;
    if claims.room != room.as_str() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "wrong_room",
            "the token is for another room",
        ));
    }
    let allowed = match kind {
        SessionKind::Whip => claims.may_publish(),
        SessionKind::Whep => claims.may_subscribe(),
        SessionKind::Api => claims.may_publish() || claims.may_subscribe(),
    };
    if !allowed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_allowed",
            format!(
                "the token does not allow {}",
                match kind {
                    SessionKind::Whip => "publishing",
                    SessionKind::Whep => "receiving",
                    SessionKind::Api => "publishing or receiving",
                }
            ),
        ));
    }
    Ok(claims)
}

fn token_error(e: TokenError) -> ApiError {
    let code = match e {
        TokenError::Missing => "token_missing",
        TokenError::Expired => "token_expired",
        _ => "token_invalid",
    };
    ApiError::new(StatusCode::UNAUTHORIZED, code, e.to_string())
}

fn require_content_type(headers: &HeaderMap, want: &str) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let base = ct.split(';').next().unwrap_or("").trim();
    if base.eq_ignore_ascii_case(want) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("expected Content-Type {want}"),
        ))
    }
}

async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is over {} KiB", MAX_BODY / 1024),
        )
    })
}

async fn delete_session(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let found = SessionId::parse(&id).and_then(|s| st.registry.session(s).map(|(_, sh)| (s, sh)));
    let Some((session, shard)) = found else {
        return refuse_plain(&st, not_found());
    };
    let _ = st.shards[shard.0].commands.send(Command::Remove {
        session,
        reason: LeaveReason::Left,
    });
    StatusCode::OK.into_response()
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such session")
}

fn refuse_plain(st: &AppState, e: ApiError) -> Response {
    st.metrics.http_error(e.code);
    e.into_response()
}

async fn patch_session(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match trickle(&st, &id, &headers, body).await {
        Ok(r) => r,
        Err(e) => refuse_plain(&st, e),
    }
}

async fn trickle(
    st: &AppState,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let session = SessionId::parse(id).ok_or_else(not_found)?;
    let (_, shard) = st.registry.session(session).ok_or_else(not_found)?;
    require_content_type(headers, "application/trickle-ice-sdpfrag")?;
    let body = read_body(body).await?;
    let text = std::str::from_utf8(&body).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_sdpfrag",
            "the body is not UTF-8",
        )
    })?;
    let frag = sdpfrag::parse(text)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_sdpfrag", e))?;
    let (reply, answer) = oneshot::channel();
    let cmd = Command::Trickle(Trickle {
        session,
        candidates: frag.candidates,
        remote: frag.creds,
        reply,
    });
    if st.shards[shard.0].commands.send(cmd).is_err() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shard_unavailable",
            "the media plane is not running",
        ));
    }
    match answer.await {
        Ok(Ok(Some(creds))) => Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/trickle-ice-sdpfrag")],
            sdpfrag::restart_answer(&creds),
        )
            .into_response()),
        Ok(Ok(None)) => Ok(StatusCode::NO_CONTENT.into_response()),
        Ok(Err(_)) | Err(_) => Err(not_found()),
    }
}
