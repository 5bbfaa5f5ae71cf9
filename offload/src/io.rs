//! Framed messages over quinn streams.

use bytes::{Bytes, BytesMut};

use crate::wire::{
    check_len, decode_control, decode_media, encode_control, encode_media, Control, Media,
    WireError, MAX_CONTROL, MAX_MEDIA,
};

/// Why a message could not be read from a stream.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer sent bytes that are not a valid message: a protocol error.
    #[error("protocol error: {0}")]
    Wire(#[from] WireError),
    /// The stream ended in the middle of a message.
    #[error("stream ended inside a message")]
    Truncated,
    /// The stream or connection failed (reset, closed, lost).
    #[error("stream: {0}")]
    Stream(#[from] quinn::ReadError),
}

/// Read one framed message (kind and body) of at most `max` bytes. `None`
/// when the stream ended cleanly between messages.
pub async fn read_message(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<Bytes>, ReadError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(ReadError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    check_len(len, max)?;
    let mut body = BytesMut::zeroed(len);
    match recv.read_exact(&mut body).await {
        Ok(()) => Ok(Some(body.freeze())),
        Err(quinn::ReadExactError::FinishedEarly(_)) => Err(ReadError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => Err(e.into()),
    }
}

/// Read the next control message; `None` at a clean end of the stream.
pub async fn read_control(recv: &mut quinn::RecvStream) -> Result<Option<Control>, ReadError> {
    match read_message(recv, MAX_CONTROL).await? {
        Some(m) => Ok(Some(decode_control(&m)?)),
        None => Ok(None),
    }
}

/// Read the next media message; `None` at a clean end of the stream.
pub async fn read_media(recv: &mut quinn::RecvStream) -> Result<Option<Media>, ReadError> {
    match read_message(recv, MAX_MEDIA).await? {
        Some(m) => Ok(Some(decode_media(m)?)),
        None => Ok(None),
    }
}

/// Write one control message.
pub async fn write_control(
    send: &mut quinn::SendStream,
    msg: &Control,
) -> Result<(), quinn::WriteError> {
    let mut buf = BytesMut::with_capacity(64);
    encode_control(msg, &mut buf);
    send.write_all(&buf).await
}

/// Write one media message.
pub async fn write_media(
    send: &mut quinn::SendStream,
    msg: &Media,
) -> Result<(), quinn::WriteError> {
    let mut buf = BytesMut::with_capacity(match msg {
        Media::Frame(f) => f.data.len() + 16,
        Media::Group(_) => 24,
    });
    encode_media(msg, &mut buf);
    send.write_all(&buf).await
}
