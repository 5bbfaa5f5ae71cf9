//! The crate's error type.

/// Everything that can go wrong in `balie-sfu` outside a single request.
/// Request errors that reach a client are [`crate::signal::ApiError`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A config file (or the command line) is invalid.
    #[error("config {origin}: {reason}")]
    Config {
        /// Where the config came from.
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A socket could not be opened.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Token keys could not be loaded or a token could not be made.
    #[error("tokens: {0}")]
    Token(String),
    /// The WebRTC stack refused something at start-up.
    #[error("webrtc: {0}")]
    Rtc(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}
