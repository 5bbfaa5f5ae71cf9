//! Signalling: the HTTP API (our own, WHIP and WHEP), health, metrics, and the
//! in-call messages on the data channel ([`channel`]).

pub mod channel;
pub mod http;
pub mod sdpfrag;
pub mod web;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

pub use http::{router, AppState};

/// An error answered to an HTTP client as `{"error": "...", "code": "..."}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code (also the metric label).
    pub code: &'static str,
    /// Human-readable reason.
    pub message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    code: &'a str,
}

impl ApiError {
    /// An error with a status, code and reason.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: &self.message,
            code: self.code,
        };
        (self.status, axum::Json(body)).into_response()
    }
}
