//! The messages and their byte layout. Pure: no I/O, no clock.
//!
//! Every message on every stream is framed the same way:
//!
//! ```text
//! u32 length (big-endian; counts kind and body)   u8 kind   body
//! ```
//!
//! The length is checked against the stream's bound before anything is
//! allocated ([`MAX_CONTROL`] on the control stream, [`MAX_MEDIA`] on media
//! streams). Integers are big-endian; a string is a `u8` byte count and that
//! many bytes of UTF-8. A body must be consumed exactly: trailing bytes are an
//! error, so two implementations cannot silently disagree about a layout.
//!
//! Control stream (bidirectional, opened by the SFU): [`Control`] messages.
//! Both sides send [`Control::Hello`] first.
//!
//! Media streams (unidirectional, either way): one [`GroupHeader`] and then
//! [`Frame`]s, one group (a GOP, from a keyframe) per stream. The SFU sends
//! the source on track 0; the worker sends each layer it makes on track
//! 1, 2, ... (the index of the layer in [`Control::Open`], plus one).
//!
//! Caption sessions ([`Control::OpenCaptions`]) carry a participant's Opus
//! frames on track 0 (RTP time at 48 kHz), in short groups (the SFU starts
//! a new one every second; every Opus frame is decodable, so each group's
//! first frame is marked key). Nothing comes back on media streams: the
//! worker sends [`Control::Caption`] segments on the control stream.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The protocol version in [`Control::Hello`]. A peer with another version
/// is refused with [`ErrorCode::Version`].
pub const VERSION: u16 = 2;
/// The ALPN both sides require; it carries the major version, so a peer
/// speaking another one fails the TLS handshake instead of misreading us.
pub const ALPN: &[u8] = b"balie-offload/2";
/// Largest control message (kind and body).
pub const MAX_CONTROL: usize = 16 * 1024;
/// Largest media message (a frame with its header): a 1080p keyframe at a
/// high bitrate is a few hundred KiB.
pub const MAX_MEDIA: usize = 4 * 1024 * 1024;
/// Most layers one session may ask for.
pub const MAX_LAYERS: usize = 4;
/// Longest string (agent names, reasons) in bytes.
pub const MAX_TEXT: usize = 255;
/// Longest caption text in bytes (a 25 s utterance of fast speech is
/// about 500).
pub const MAX_CAPTION: usize = 2048;

/// Why a message could not be read. Every variant is a protocol error of the
/// peer; none is a reason to panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message truncated: {0} needs more bytes")]
    Truncated(&'static str),
    #[error("message of {len} bytes is over the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("empty message (no kind byte)")]
    Empty,
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    #[error("{0} has {1} bytes left over")]
    Trailing(&'static str, usize),
    #[error("invalid {field}: {why}")]
    Invalid {
        field: &'static str,
        why: &'static str,
    },
}

impl WireError {
    /// The error code a peer is told when it sent this.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::TooLong { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::Malformed,
        }
    }
}

/// Codes in [`Control::Error`], [`Control::Ended`] and QUIC close frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// Closed on purpose (shutdown, or the session is no longer needed).
    Closed = 0,
    /// A message could not be read.
    Malformed = 1,
    /// A message was over its bound.
    TooLarge = 2,
    /// The peer speaks another protocol version.
    Version = 3,
    /// A message came at the wrong time (a second hello, media before hello).
    Unexpected = 4,
    /// The worker holds as many sessions as it can.
    Capacity = 5,
    /// The worker cannot decode or encode this codec.
    Unsupported = 6,
    /// The source could not be decoded, or a layer not encoded.
    Media = 7,
    /// A message named a session that does not exist (or a session id reused).
    UnknownSession = 8,
    /// Anything else on the worker's side.
    Internal = 9,
}

impl ErrorCode {
    /// Every code but [`ErrorCode::Closed`]: what a refusal or a protocol
    /// error can say (metrics start each at 0, so that the first one shows
    /// in `increase()` and alerts).
    pub const ERRORS: [ErrorCode; 9] = [
        ErrorCode::Malformed,
        ErrorCode::TooLarge,
        ErrorCode::Version,
        ErrorCode::Unexpected,
        ErrorCode::Capacity,
        ErrorCode::Unsupported,
        ErrorCode::Media,
        ErrorCode::UnknownSession,
        ErrorCode::Internal,
    ];

    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            0 => ErrorCode::Closed,
            1 => ErrorCode::Malformed,
            2 => ErrorCode::TooLarge,
            3 => ErrorCode::Version,
            4 => ErrorCode::Unexpected,
            5 => ErrorCode::Capacity,
            6 => ErrorCode::Unsupported,
            7 => ErrorCode::Media,
            8 => ErrorCode::UnknownSession,
            _ => ErrorCode::Internal,
        }
    }

    /// A short stable name (metrics labels, logs).
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Closed => "closed",
            ErrorCode::Malformed => "malformed",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Version => "version",
            ErrorCode::Unexpected => "unexpected",
            ErrorCode::Capacity => "capacity",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Media => "media",
            ErrorCode::UnknownSession => "unknown_session",
            ErrorCode::Internal => "internal",
        }
    }
}

/// The video codec of a session: the source's, and so the layers'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    Vp8,
    H264,
}

impl Codec {
    fn to_u8(self) -> u8 {
        match self {
            Codec::Vp8 => 1,
            Codec::H264 => 2,
        }
    }

    fn from_u8(v: u8) -> Result<Codec, WireError> {
        match v {
            1 => Ok(Codec::Vp8),
            2 => Ok(Codec::H264),
            _ => Err(WireError::Invalid {
                field: "codec",
                why: "not 1 (VP8) or 2 (H.264)",
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::Vp8 => "vp8",
            Codec::H264 => "h264",
        }
    }
}

/// One layer a session asks for: the source scaled down by `scale_down` in
/// each dimension (as a browser's `scaleResolutionDownBy`), encoded at
/// `bitrate_kbps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpec {
    /// 1 to 16.
    pub scale_down: u8,
    /// 10 to 50,000 kbit/s.
    pub bitrate_kbps: u32,
}

/// A picture size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub width: u16,
    pub height: u16,
}

/// A worker's load, sent after its hello and whenever it changes (at most
/// once a second unless a session opens or ends).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity {
    pub sessions: u32,
    pub max_sessions: u32,
    /// Frames waiting to be decoded, over all sessions.
    pub queue_depth: u32,
    /// How busy the worker's media threads were over the last second, in
    /// thousandths (1000 = every thread busy all the time).
    pub load_permille: u16,
    /// Caption sessions held, and the most it takes (0: no captions).
    pub captions: u32,
    pub max_captions: u32,
}

/// One caption segment of a caption session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caption {
    pub session: u64,
    /// At most [`MAX_CAPTION`] bytes.
    pub text: String,
    /// The speech it covers, in milliseconds of the session's audio (from
    /// its first frame).
    pub start_ms: u32,
    pub end_ms: u32,
    /// Final: it will not change. A partial is replaced by the next
    /// partial or final of the same session.
    pub is_final: bool,
    /// The language it was transcribed in.
    pub language: String,
}

/// Whether `lang` looks like a Whisper language code: 2 or 3 lowercase
/// ASCII letters (`nl`, `en`, `haw`).
pub fn valid_language(lang: &str) -> bool {
    (2..=3).contains(&lang.len()) && lang.bytes().all(|b| b.is_ascii_lowercase())
}

/// Messages on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// First message of both sides.
    Hello {
        version: u16,
        /// Who is speaking (`balie-sfu 0.1.0 shard 3`); for logs only.
        agent: String,
        /// The worker's session limit; 0 from the SFU.
        max_sessions: u32,
        /// The worker's caption session limit (0: it makes no captions);
        /// 0 from the SFU.
        max_captions: u32,
    },
    /// Worker -> SFU.
    Capacity(Capacity),
    /// SFU -> worker: transcode the source that will come on track 0 of
    /// groups for `session`. Session ids are chosen by the SFU, unique per
    /// connection.
    Open {
        session: u64,
        codec: Codec,
        layers: Vec<LayerSpec>,
    },
    /// SFU -> worker: make captions of the Opus audio that will come on
    /// track 0 of groups for `session`, in `language` (a Whisper code, see
    /// [`valid_language`]). Session ids share one space with [`Control::Open`]'s.
    OpenCaptions { session: u64, language: String },
    /// Worker -> SFU: a caption segment.
    Caption(Caption),
    /// SFU -> worker: nobody needs this session any more.
    Close { session: u64 },
    /// SFU -> worker: send a keyframe on `track` (a layer) soon.
    /// Worker -> SFU: track 0: the decoder needs a keyframe of the source.
    Keyframe { session: u64, track: u8 },
    /// Worker -> SFU: the sizes of the source and of each layer, once the
    /// first keyframe is decoded and again when the source size changes.
    Layout {
        session: u64,
        source: Size,
        layers: Vec<Size>,
    },
    /// Worker -> SFU: a session was refused or has ended.
    Ended {
        session: u64,
        code: ErrorCode,
        reason: String,
    },
    /// Either way: a protocol error; the sender closes the connection next.
    Error { code: ErrorCode, reason: String },
}

const K_HELLO: u8 = 0x01;
const K_CAPACITY: u8 = 0x02;
const K_OPEN: u8 = 0x03;
const K_CLOSE: u8 = 0x04;
const K_KEYFRAME: u8 = 0x05;
const K_LAYOUT: u8 = 0x06;
const K_ENDED: u8 = 0x07;
const K_ERROR: u8 = 0x08;
const K_OPEN_CAPTIONS: u8 = 0x09;
const K_CAPTION: u8 = 0x0a;
const K_GROUP: u8 = 0x20;
const K_FRAME: u8 = 0x21;

/// The first message of a media stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupHeader {
    pub session: u64,
    /// 0: the source (SFU -> worker); 1..: a layer (worker -> SFU).
    pub track: u8,
    /// Counts up per session and track; lets a receiver drop a group that
    /// arrives after a newer one started.
    pub group: u32,
}

/// One encoded frame (VP8 frame, or H.264 access unit in Annex B).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The source frame's RTP timestamp (90 kHz), kept on every layer made
    /// from it, so layers line up as simulcast layers do.
    pub rtp_time: u32,
    /// How long after it arrives the frame is still worth working on, in
    /// milliseconds; a worker drops work on a frame past it rather than
    /// queue it.
    pub deadline_ms: u16,
    /// Decodable on its own.
    pub key: bool,
    pub data: Bytes,
}

/// Messages on a media stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Media {
    Group(GroupHeader),
    Frame(Frame),
}

/// Append `msg` framed (length, kind, body) to `out`.
pub fn encode_control(msg: &Control, out: &mut BytesMut) {
    framed(out, |b| match msg {
        Control::Hello {
            version,
            agent,
            max_sessions,
            max_captions,
        } => {
            b.put_u8(K_HELLO);
            b.put_u16(*version);
            put_str(b, agent);
            b.put_u32(*max_sessions);
            b.put_u32(*max_captions);
        }
        Control::Capacity(c) => {
            b.put_u8(K_CAPACITY);
            b.put_u32(c.sessions);
            b.put_u32(c.max_sessions);
            b.put_u32(c.queue_depth);
            b.put_u16(c.load_permille);
            b.put_u32(c.captions);
            b.put_u32(c.max_captions);
        }
        Control::OpenCaptions { session, language } => {
            b.put_u8(K_OPEN_CAPTIONS);
            b.put_u64(*session);
            put_str(b, language);
        }
        Control::Caption(c) => {
            b.put_u8(K_CAPTION);
            b.put_u64(c.session);
            b.put_u32(c.start_ms);
            b.put_u32(c.end_ms);
            b.put_u8(u8::from(c.is_final));
            put_str(b, &c.language);
            put_long_str(b, &c.text, MAX_CAPTION);
        }
        Control::Open {
            session,
            codec,
            layers,
        } => {
            b.put_u8(K_OPEN);
            b.put_u64(*session);
            b.put_u8(codec.to_u8());
            b.put_u8(layers.len().min(255) as u8);
            for l in layers.iter().take(255) {
                b.put_u8(l.scale_down);
                b.put_u32(l.bitrate_kbps);
            }
        }
        Control::Close { session } => {
            b.put_u8(K_CLOSE);
            b.put_u64(*session);
        }
        Control::Keyframe { session, track } => {
            b.put_u8(K_KEYFRAME);
            b.put_u64(*session);
            b.put_u8(*track);
        }
        Control::Layout {
            session,
            source,
            layers,
        } => {
            b.put_u8(K_LAYOUT);
            b.put_u64(*session);
            put_size(b, *source);
            b.put_u8(layers.len().min(255) as u8);
            for s in layers.iter().take(255) {
                put_size(b, *s);
            }
        }
        Control::Ended {
            session,
            code,
            reason,
        } => {
            b.put_u8(K_ENDED);
            b.put_u64(*session);
            b.put_u16(*code as u16);
            put_str(b, reason);
        }
        Control::Error { code, reason } => {
            b.put_u8(K_ERROR);
            b.put_u16(*code as u16);
            put_str(b, reason);
        }
    });
}

/// Append `msg` framed to `out`.
pub fn encode_media(msg: &Media, out: &mut BytesMut) {
    framed(out, |b| match msg {
        Media::Group(g) => {
            b.put_u8(K_GROUP);
            b.put_u64(g.session);
            b.put_u8(g.track);
            b.put_u32(g.group);
        }
        Media::Frame(f) => {
            b.put_u8(K_FRAME);
            b.put_u32(f.rtp_time);
            b.put_u16(f.deadline_ms);
            b.put_u8(u8::from(f.key));
            b.put_slice(&f.data);
        }
    });
}

fn framed(out: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    let at = out.len();
    out.put_u32(0);
    body(out);
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// `s` cut at a character boundary within `max` bytes.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_str(b: &mut BytesMut, s: &str) {
    let s = cut(s, MAX_TEXT);
    b.put_u8(s.len() as u8);
    b.put_slice(s.as_bytes());
}

/// A string with a `u16` byte count, cut within `max` bytes.
fn put_long_str(b: &mut BytesMut, s: &str, max: usize) {
    let s = cut(s, max.min(usize::from(u16::MAX)));
    b.put_u16(s.len() as u16);
    b.put_slice(s.as_bytes());
}

fn put_size(b: &mut BytesMut, s: Size) {
    b.put_u16(s.width);
    b.put_u16(s.height);
}

/// Take one framed message (kind and body) from the front of `buf`, if it
/// is complete. A length over `max` is an error before anything is read.
pub fn split_message(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    check_len(len, max)?;
    if buf.len() < 4 + len {
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Check a length prefix against a bound.
pub fn check_len(len: usize, max: usize) -> Result<(), WireError> {
    if len == 0 {
        return Err(WireError::Empty);
    }
    if len > max {
        return Err(WireError::TooLong { len, max });
    }
    Ok(())
}

/// Read a control message (kind and body, without the length prefix).
pub fn decode_control(msg: &[u8]) -> Result<Control, WireError> {
    check_len(msg.len(), MAX_CONTROL)?;
    let mut r = Reader(msg);
    let kind = r.u8("kind")?;
    let out = match kind {
        K_HELLO => Control::Hello {
            version: r.u16("hello version")?,
            agent: r.string("hello agent")?,
            max_sessions: r.u32("hello max_sessions")?,
            max_captions: r.u32("hello max_captions")?,
        },
        K_CAPACITY => Control::Capacity(Capacity {
            sessions: r.u32("capacity sessions")?,
            max_sessions: r.u32("capacity max_sessions")?,
            queue_depth: r.u32("capacity queue_depth")?,
            load_permille: r.u16("capacity load")?,
            captions: r.u32("capacity captions")?,
            max_captions: r.u32("capacity max_captions")?,
        }),
        K_OPEN_CAPTIONS => {
            let session = r.u64("open captions session")?;
            let language = r.string("open captions language")?;
            if !valid_language(&language) {
                return Err(WireError::Invalid {
                    field: "open captions language",
                    why: "not 2 or 3 lowercase letters",
                });
            }
            Control::OpenCaptions { session, language }
        }
        K_CAPTION => {
            let session = r.u64("caption session")?;
            let start_ms = r.u32("caption start")?;
            let end_ms = r.u32("caption end")?;
            let flags = r.u8("caption flags")?;
            if flags > 1 {
                return Err(WireError::Invalid {
                    field: "caption flags",
                    why: "unknown bits set",
                });
            }
            let language = r.string("caption language")?;
            let text = r.long_string("caption text", MAX_CAPTION)?;
            if end_ms < start_ms {
                return Err(WireError::Invalid {
                    field: "caption end",
                    why: "before its start",
                });
            }
            Control::Caption(Caption {
                session,
                text,
                start_ms,
                end_ms,
                is_final: flags == 1,
                language,
            })
        }
        K_OPEN => {
            let session = r.u64("open session")?;
            let codec = Codec::from_u8(r.u8("open codec")?)?;
            let n = r.u8("open layer count")? as usize;
            if n == 0 || n > MAX_LAYERS {
                return Err(WireError::Invalid {
                    field: "open layer count",
                    why: "must be 1 to 4",
                });
            }
            let mut layers = Vec::with_capacity(n);
            for _ in 0..n {
                let scale_down = r.u8("layer scale_down")?;
                let bitrate_kbps = r.u32("layer bitrate")?;
                if !(1..=16).contains(&scale_down) {
                    return Err(WireError::Invalid {
                        field: "layer scale_down",
                        why: "must be 1 to 16",
                    });
                }
                if !(10..=50_000).contains(&bitrate_kbps) {
                    return Err(WireError::Invalid {
                        field: "layer bitrate",
                        why: "must be 10 to 50000 kbit/s",
                    });
                }
                layers.push(LayerSpec {
                    scale_down,
                    bitrate_kbps,
                });
            }
            Control::Open {
                session,
                codec,
                layers,
            }
        }
        K_CLOSE => Control::Close {
            session: r.u64("close session")?,
        },
        K_KEYFRAME => Control::Keyframe {
            session: r.u64("keyframe session")?,
            track: r.u8("keyframe track")?,
        },
        K_LAYOUT => {
            let session = r.u64("layout session")?;
            let source = r.size("layout source")?;
            let n = r.u8("layout layer count")? as usize;
            if n > MAX_LAYERS {
                return Err(WireError::Invalid {
                    field: "layout layer count",
                    why: "over 4",
                });
            }
            let mut layers = Vec::with_capacity(n);
            for _ in 0..n {
                layers.push(r.size("layout layer")?);
            }
            Control::Layout {
                session,
                source,
                layers,
            }
        }
        K_ENDED => Control::Ended {
            session: r.u64("ended session")?,
            code: ErrorCode::from_u16(r.u16("ended code")?),
            reason: r.string("ended reason")?,
        },
        K_ERROR => Control::Error {
            code: ErrorCode::from_u16(r.u16("error code")?),
            reason: r.string("error reason")?,
        },
        other => return Err(WireError::UnknownKind(other)),
    };
    r.done("control message")?;
    Ok(out)
}

/// Read a media message (kind and body, without the length prefix). The
/// frame's data shares `msg`'s buffer.
pub fn decode_media(msg: Bytes) -> Result<Media, WireError> {
    check_len(msg.len(), MAX_MEDIA)?;
    let mut r = Reader(&msg);
    match r.u8("kind")? {
        K_GROUP => {
            let g = GroupHeader {
                session: r.u64("group session")?,
                track: r.u8("group track")?,
                group: r.u32("group number")?,
            };
            r.done("group header")?;
            Ok(Media::Group(g))
        }
        K_FRAME => {
            let rtp_time = r.u32("frame rtp time")?;
            let deadline_ms = r.u16("frame deadline")?;
            let flags = r.u8("frame flags")?;
            if flags > 1 {
                return Err(WireError::Invalid {
                    field: "frame flags",
                    why: "unknown bits set",
                });
            }
            let at = msg.len() - r.0.len();
            if at == msg.len() {
                return Err(WireError::Invalid {
                    field: "frame data",
                    why: "empty",
                });
            }
            Ok(Media::Frame(Frame {
                rtp_time,
                deadline_ms,
                key: flags & 1 == 1,
                data: msg.slice(at..),
            }))
        }
        other => Err(WireError::UnknownKind(other)),
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        let b = self.take(8, what)?;
        let mut a = [0; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn size(&mut self, what: &'static str) -> Result<Size, WireError> {
        Ok(Size {
            width: self.u16(what)?,
            height: self.u16(what)?,
        })
    }

    fn string(&mut self, what: &'static str) -> Result<String, WireError> {
        let n = self.u8(what)? as usize;
        self.utf8(n, what)
    }

    fn long_string(&mut self, what: &'static str, max: usize) -> Result<String, WireError> {
        let n = self.u16(what)? as usize;
        if n > max {
            return Err(WireError::Invalid {
                field: what,
                why: "longer than allowed",
            });
        }
        self.utf8(n, what)
    }

    fn utf8(&mut self, n: usize, what: &'static str) -> Result<String, WireError> {
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::Invalid {
            field: what,
            why: "not UTF-8",
        })
    }

    fn done(&self, what: &'static str) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(what, self.0.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip_control(msg: &Control) -> Control {
        let mut buf = BytesMut::new();
        encode_control(msg, &mut buf);
        let body = split_message(&mut buf, MAX_CONTROL)
            .expect("length within bounds")
            .expect("complete");
        assert!(buf.is_empty());
        decode_control(&body).expect("decodes")
    }

    #[test]
    fn the_error_codes_are_every_code_but_closed_each_with_its_own_name() {
        let mut names = std::collections::HashSet::new();
        for v in 1..=9u16 {
            let code = ErrorCode::from_u16(v);
            assert_eq!(code as u16, v);
            assert!(ErrorCode::ERRORS.contains(&code), "{code:?}");
            assert!(names.insert(code.name()));
        }
        assert!(!ErrorCode::ERRORS.contains(&ErrorCode::Closed));
        assert_eq!(names.len(), ErrorCode::ERRORS.len());
    }

    #[test]
    fn every_control_message_reads_back_as_written() {
        let all = [
            Control::Hello {
                version: VERSION,
                agent: "balie-sfu 0.1.0 shard 1".into(),
                max_sessions: 0,
                max_captions: 0,
            },
            Control::Capacity(Capacity {
                sessions: 3,
                max_sessions: 40,
                queue_depth: 7,
                load_permille: 512,
                captions: 2,
                max_captions: 16,
            }),
            Control::OpenCaptions {
                session: 12,
                language: "nl".into(),
            },
            Control::Caption(Caption {
                session: 12,
                text: "Ik wil graag een nieuw paspoort aanvragen.".into(),
                start_ms: 1_200,
                end_ms: 3_950,
                is_final: true,
                language: "nl".into(),
            }),
            Control::Open {
                session: u64::MAX,
                codec: Codec::H264,
                layers: vec![
                    LayerSpec {
                        scale_down: 2,
                        bitrate_kbps: 500,
                    },
                    LayerSpec {
                        scale_down: 4,
                        bitrate_kbps: 150,
                    },
                ],
            },
            Control::Close { session: 9 },
            Control::Keyframe {
                session: 9,
                track: 2,
            },
            Control::Layout {
                session: 9,
                source: Size {
                    width: 1280,
                    height: 720,
                },
                layers: vec![Size {
                    width: 640,
                    height: 360,
                }],
            },
            Control::Ended {
                session: 9,
                code: ErrorCode::Capacity,
                reason: "full".into(),
            },
            Control::Error {
                code: ErrorCode::Version,
                reason: "version 2 not spoken here".into(),
            },
        ];
        for msg in &all {
            assert_eq!(&roundtrip_control(msg), msg);
        }
    }

    #[test]
    fn media_messages_read_back_and_frames_share_the_buffer() {
        let mut buf = BytesMut::new();
        let g = GroupHeader {
            session: 5,
            track: 0,
            group: 77,
        };
        let f = Frame {
            rtp_time: 0xdead_beef,
            deadline_ms: 120,
            key: true,
            data: Bytes::from_static(b"\x10\x02\x00\x9d\x01\x2a"),
        };
        encode_media(&Media::Group(g), &mut buf);
        encode_media(&Media::Frame(f.clone()), &mut buf);
        let m1 = split_message(&mut buf, MAX_MEDIA)
            .expect("ok")
            .expect("one");
        let m2 = split_message(&mut buf, MAX_MEDIA)
            .expect("ok")
            .expect("two");
        assert_eq!(decode_media(m1), Ok(Media::Group(g)));
        assert_eq!(decode_media(m2), Ok(Media::Frame(f)));
    }

    #[test]
    fn a_length_over_the_bound_is_refused_before_the_body_arrives() {
        let mut buf = BytesMut::new();
        buf.put_u32(MAX_CONTROL as u32 + 1);
        assert_eq!(
            split_message(&mut buf, MAX_CONTROL),
            Err(WireError::TooLong {
                len: MAX_CONTROL + 1,
                max: MAX_CONTROL
            })
        );
        assert_eq!(
            split_message(&mut BytesMut::from(&[0u8, 0, 0, 0][..]), MAX_CONTROL),
            Err(WireError::Empty)
        );
    }

    #[test]
    fn bad_fields_name_what_is_wrong() {
        // An open with no layers, a scale of 0, codec 9, trailing bytes.
        let cases: [(&[u8], &str); 4] = [
            (&[K_OPEN, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0], "layer count"),
            (
                &[K_OPEN, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 100],
                "scale_down",
            ),
            (&[K_OPEN, 0, 0, 0, 0, 0, 0, 0, 1, 9, 1], "codec"),
            (&[K_CLOSE, 0, 0, 0, 0, 0, 0, 0, 1, 0xff], "left over"),
        ];
        for (bytes, words) in cases {
            let err = decode_control(bytes).expect_err("invalid");
            assert!(err.to_string().contains(words), "{err} lacks {words}");
        }
        assert_eq!(decode_control(&[0x7f]), Err(WireError::UnknownKind(0x7f)));
        assert_eq!(
            decode_media(Bytes::from_static(&[K_FRAME, 0, 0, 0, 0, 0, 0, 0])),
            Err(WireError::Invalid {
                field: "frame data",
                why: "empty"
            })
        );
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary() {
        let agent = "é".repeat(200); // 400 bytes
        let Control::Hello { agent: back, .. } = roundtrip_control(&Control::Hello {
            version: 1,
            agent,
            max_sessions: 1,
            max_captions: 0,
        }) else {
            panic!("not a hello");
        };
        assert_eq!(back.len(), 254);
        assert!(back.chars().all(|c| c == 'é'));
        let long = Control::Caption(Caption {
            session: 1,
            text: "ë".repeat(MAX_CAPTION),
            start_ms: 0,
            end_ms: 1,
            is_final: false,
            language: "nl".into(),
        });
        let Control::Caption(c) = roundtrip_control(&long) else {
            panic!("not a caption");
        };
        assert_eq!(c.text.len(), MAX_CAPTION);
    }

    #[test]
    fn caption_fields_are_checked() {
        let mut bad_lang = BytesMut::new();
        encode_control(
            &Control::OpenCaptions {
                session: 1,
                language: "NL!".into(),
            },
            &mut bad_lang,
        );
        let err = decode_control(&bad_lang[4..]).expect_err("bad language");
        assert!(err.to_string().contains("language"), "{err}");
        // A caption whose end is before its start, and one whose text
        // claims more than MAX_CAPTION bytes.
        let mut backwards = vec![K_CAPTION];
        backwards.extend_from_slice(&1u64.to_be_bytes());
        backwards.extend_from_slice(&500u32.to_be_bytes());
        backwards.extend_from_slice(&100u32.to_be_bytes());
        backwards.extend_from_slice(&[1, 2, b'n', b'l', 0, 1, b'a']);
        let err = decode_control(&backwards).expect_err("backwards");
        assert!(err.to_string().contains("before its start"), "{err}");
        let mut huge = vec![K_CAPTION];
        huge.extend_from_slice(&1u64.to_be_bytes());
        huge.extend_from_slice(&[0; 8]);
        huge.extend_from_slice(&[0, 2, b'n', b'l', 0xff, 0xff]);
        let err = decode_control(&huge).expect_err("too long");
        assert!(err.to_string().contains("longer than allowed"), "{err}");
    }

    fn arb_control() -> impl Strategy<Value = Control> {
        let layer = (1u8..=16, 10u32..=50_000).prop_map(|(scale_down, bitrate_kbps)| LayerSpec {
            scale_down,
            bitrate_kbps,
        });
        let size = (any::<u16>(), any::<u16>()).prop_map(|(width, height)| Size { width, height });
        let code = (0u16..10).prop_map(ErrorCode::from_u16);
        prop_oneof![
            (any::<u16>(), "[a-z0-9 .]{0,60}", any::<u32>(), any::<u32>()).prop_map(
                |(version, agent, max, captions)| Control::Hello {
                    version,
                    agent,
                    max_sessions: max,
                    max_captions: captions,
                }
            ),
            (
                (any::<u32>(), any::<u32>(), any::<u32>()),
                any::<u16>(),
                (any::<u32>(), any::<u32>())
            )
                .prop_map(|((a, b, c), d, (e, f))| {
                    Control::Capacity(Capacity {
                        sessions: a,
                        max_sessions: b,
                        queue_depth: c,
                        load_permille: d,
                        captions: e,
                        max_captions: f,
                    })
                }),
            (any::<u64>(), "[a-z]{2,3}")
                .prop_map(|(session, language)| { Control::OpenCaptions { session, language } }),
            (
                any::<u64>(),
                ".{0,200}",
                (any::<u32>(), any::<u32>()),
                any::<bool>(),
                "[a-z]{2,3}"
            )
                .prop_map(|(session, text, (a, b), is_final, language)| {
                    Control::Caption(Caption {
                        session,
                        text,
                        start_ms: a.min(b),
                        end_ms: a.max(b),
                        is_final,
                        language,
                    })
                }),
            (
                any::<u64>(),
                prop_oneof![Just(Codec::Vp8), Just(Codec::H264)],
                proptest::collection::vec(layer, 1..=MAX_LAYERS)
            )
                .prop_map(|(session, codec, layers)| Control::Open {
                    session,
                    codec,
                    layers
                }),
            any::<u64>().prop_map(|session| Control::Close { session }),
            (any::<u64>(), any::<u8>())
                .prop_map(|(session, track)| Control::Keyframe { session, track }),
            (
                any::<u64>(),
                size.clone(),
                proptest::collection::vec(size, 0..=MAX_LAYERS)
            )
                .prop_map(|(session, source, layers)| Control::Layout {
                    session,
                    source,
                    layers
                }),
            (any::<u64>(), code.clone(), ".{0,40}").prop_map(|(session, code, reason)| {
                Control::Ended {
                    session,
                    code,
                    reason,
                }
            }),
            (code, ".{0,40}").prop_map(|(code, reason)| Control::Error { code, reason }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn any_control_message_reads_back(msg in arb_control()) {
            prop_assert_eq!(roundtrip_control(&msg), msg);
        }

        /// The decoders' property test (run in CI, bounded by the case
        /// count): arbitrary bytes, and valid messages with bytes changed,
        /// cut or appended, give a message or an error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let _ = decode_control(&bytes);
            let _ = decode_media(Bytes::from(bytes.clone()));
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(m)) = split_message(&mut buf, MAX_CONTROL) {
                let _ = decode_control(&m);
            }
        }

        #[test]
        fn mutated_messages_never_panic_the_decoders(
            msg in arb_control(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in any::<usize>(),
            tail in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let mut buf = BytesMut::new();
            encode_control(&msg, &mut buf);
            let mut bytes = buf[4..].to_vec();
            for (at, v) in flips {
                let n = bytes.len();
                bytes[at % n] = v;
            }
            let _ = decode_control(&bytes);
            bytes.truncate(cut % (bytes.len() + 1));
            bytes.extend_from_slice(&tail);
            let _ = decode_control(&bytes);
            let _ = decode_media(Bytes::from(bytes));
        }
    }
}
