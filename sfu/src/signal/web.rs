//! The counter web client (`web/`), embedded in the binary so that the README's
//! run command needs nothing else: `/` and `/join?token=...` serve the page,
//! `/assets/...` its files. `/dev/token` makes development tokens, and only
//! exists when the config says `dev = true`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::http::AppState;
use super::ApiError;
use crate::ids::RoomId;
use crate::token::{make_dev_token, DevTokenRequest, Loa, Role};

/// Embedded files: (path under /assets/, content type, contents).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../web/app.js"),
    ),
    (
        "i18n.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../web/i18n.js"),
    ),
    (
        "theme.css",
        "text/css; charset=utf-8",
        include_str!("../../../web/theme.css"),
    ),
    (
        "vendor/nl-design-system/button.css",
        "text/css; charset=utf-8",
        include_str!("../../../web/vendor/nl-design-system/button.css"),
    ),
    (
        "vendor/nl-design-system/heading.css",
        "text/css; charset=utf-8",
        include_str!("../../../web/vendor/nl-design-system/heading.css"),
    ),
    (
        "vendor/nl-design-system/paragraph.css",
        "text/css; charset=utf-8",
        include_str!("../../../web/vendor/nl-design-system/paragraph.css"),
    ),
];

const INDEX: &str = include_str!("../../../web/index.html");

/// Security headers on every page and asset. The page URL carries the
/// token, so no referrer ever leaves it and the page is never cached.
fn secure(mut resp: Response, cache: bool) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; media-src 'self' blob: mediastream:; img-src 'self' data:; \
             object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if cache {
            "public, max-age=300"
        } else {
            "no-store"
        }),
    );
    h.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(self), microphone=(self)"),
    );
    resp
}

/// Routes of the web client.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(index))
        .route("/join", get(index))
        .route("/assets/{*path}", get(asset))
        .route("/v1/info", get(info))
        .route("/dev/token", post(dev_token))
}

async fn index() -> Response {
    secure(
        ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX).into_response(),
        false,
    )
}

async fn asset(Path(path): Path<String>) -> Response {
    match ASSETS.iter().find(|(p, _, _)| *p == path) {
        Some((_, ctype, body)) => secure(
            ([(header::CONTENT_TYPE, *ctype)], *body).into_response(),
            true,
        ),
        None => ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such file").into_response(),
    }
}

async fn info(State(st): State<Arc<AppState>>) -> Response {
    Json(serde_json::json!({
        "dev": st.config.dev,
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct DevTokenBody {
    room: String,
    name: String,
    role: String,
    loa: Option<String>,
}

async fn dev_token(State(st): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    if !st.config.dev {
        st.metrics.http_error("not_found");
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "development tokens are off",
        )
        .into_response();
    }
    let bad = |why: &str| {
        st.metrics.http_error("bad_request");
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", why).into_response()
    };
    let Ok(req) = serde_json::from_slice::<DevTokenBody>(&body) else {
        return bad("expected JSON {room, name, role, loa}");
    };
    let Some(room) = RoomId::parse(&req.room) else {
        return bad("room names are 1-128 characters of A-Z a-z 0-9 . _ -");
    };
    let Some(role) = Role::parse(&req.role) else {
        return bad("role is citizen, official, interpreter or observer");
    };
    let loa = match req.loa.as_deref() {
        None | Some("") => None,
        Some(l) => match Loa::parse(l) {
            Some(l) => Some(l),
            None => return bad("loa is basis, midden, substantieel or hoog"),
        },
    };
    let name = req.name.trim().chars().take(64).collect::<String>();
    let request = DevTokenRequest {
        room,
        // A pseudonym, as the portal would issue.
        identity: format!("dev-{:08x}", rand::random::<u32>()),
        role,
        name: (!name.is_empty()).then_some(name),
        loa,
        ttl: Duration::from_secs(4 * 3600),
    };
    match make_dev_token(&st.config.auth, &request) {
        Ok(token) => Json(serde_json::json!({ "token": token })).into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            .into_response(),
    }
}
