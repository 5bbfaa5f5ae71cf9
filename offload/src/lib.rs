//! The offload protocol between balie-sfu (client) and balie-transcoder
//! (server): QUIC through quinn with mutual TLS, one bidirectional control
//! stream per connection, and media in groups, one GOP per unidirectional
//! stream, after the object model of Media over QUIC. `docs/offload.md`
//! describes the protocol; [`wire`] is its byte layout.
//!
//! This crate holds the wire format and the connection settings, nothing
//! else: no codec, no session logic, so both sides and the fuzzing tests
//! share exactly one definition.

pub mod io;
pub mod link;
pub mod tls;
pub mod wire;

pub use wire::{
    Capacity, Caption, Codec, Control, ErrorCode, Frame, GroupHeader, LayerSpec, Media, Size,
    WireError, ALPN, VERSION,
};
