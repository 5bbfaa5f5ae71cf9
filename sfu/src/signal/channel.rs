//! In-call signalling: JSON messages on the WebRTC data channel named `balie`.
//!
//! docs/signalling.md documents every message. Each message is one JSON
//! object with a `type` field; unknown or malformed messages get an `error`
//! message back and are counted, never acted on.

use serde::{Deserialize, Serialize};

use crate::token::{Loa, Role};

/// The data channel label balie uses.
pub const CHANNEL_LABEL: &str = "balie";

/// Longest message accepted from a client (bytes).
pub const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

/// A participant as others see it in the roster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterEntry {
    /// Participant id (the session id).
    pub id: String,
    /// Display name from the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Role from the token.
    pub role: Role,
    /// DigiD assurance level as verified from the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loa: Option<Loa>,
    /// Whether the participant may publish.
    pub publisher: bool,
    /// In the waiting room or in the call.
    pub state: ParticipantState,
}

/// Where a participant is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParticipantState {
    /// In the waiting room: no media flows to or from them.
    Waiting,
    /// In the call.
    Admitted,
}

/// What one of our send m-lines carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackInfo {
    /// The m-line (mid) in this peer connection.
    pub mid: String,
    /// The participant who publishes it.
    pub participant: String,
    /// `audio` or `video`.
    pub kind: String,
}

/// Messages from the server to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ServerMessage {
    /// First message after the channel opens: who you are and who is here.
    Welcome {
        /// Your participant id.
        you: RosterEntry,
        /// Everyone in the room, you included.
        participants: Vec<RosterEntry>,
    },
    /// Someone joined the room.
    ParticipantJoined {
        /// The newcomer.
        participant: RosterEntry,
    },
    /// A participant's state changed (admitted, held); also sent to that participant.
    ParticipantUpdated {
        /// The participant as they are now.
        participant: RosterEntry,
    },
    /// An official asks you to switch your microphone on (the client asks the
    /// person; nothing is switched remotely).
    UnmuteRequested {
        /// The official's participant id.
        by: String,
    },
    /// Someone left the room.
    ParticipantLeft {
        /// Their participant id.
        id: String,
        /// Why: `left`, `disconnected`, `removed`, `failed`, `drain`.
        reason: String,
    },
    /// A server-initiated renegotiation: answer with an `answer` message.
    Offer {
        /// The SDP offer.
        sdp: String,
        /// What each send m-line carries after this negotiation.
        tracks: Vec<TrackInfo>,
    },
    /// The answer to a client's `offer`.
    Answer {
        /// The SDP answer.
        sdp: String,
    },
    /// A track now flows on an m-line (also sent for m-lines the client offered).
    Tracks {
        /// What each send m-line carries now.
        tracks: Vec<TrackInfo>,
    },
    /// Stop (`send` false) or resume sending the video on your m-line `mid`:
    /// nobody in the room shows it (or somebody does again).
    SendVideo {
        /// Your m-line.
        mid: String,
        /// Whether to send.
        send: bool,
    },
    /// The server ends this session (drain, removal); the client should not retry
    /// unless `reason` is `drain`.
    Bye {
        /// Why.
        reason: String,
    },
    /// The room's captions: sent when the channel opens (on servers with
    /// captions set up) and whenever they are switched or become
    /// (un)available. `notice` says it in plain language.
    CaptionsState {
        /// Switched on.
        on: bool,
        /// Captions are being made (false while no worker can make them:
        /// the call goes on without).
        available: bool,
        /// The spoken language, forced (`nl`, `en`).
        language: String,
        /// Who switched them last (participant id), if someone did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        /// What to tell the participant, in `language`.
        notice: String,
    },
    /// A caption: what a participant said. A partial (`final` false) is
    /// replaced by the next caption of the same participant.
    Caption {
        /// Who spoke (participant id).
        participant: String,
        /// Their display name from the token.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// The text.
        text: String,
        /// It will not change.
        #[serde(rename = "final")]
        is_final: bool,
        /// The speech it covers, in milliseconds of the speaker's audio
        /// since captions started for them.
        start_ms: u32,
        /// End of that speech.
        end_ms: u32,
    },
    /// A message from the client was refused.
    Error {
        /// Machine-readable code.
        code: String,
        /// Human-readable reason.
        message: String,
    },
}

/// Messages from a client to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ClientMessage {
    /// The answer to the server's `offer`.
    Answer {
        /// The SDP answer.
        sdp: String,
    },
    /// A client-initiated renegotiation (e.g. adding a camera later).
    Offer {
        /// The SDP offer.
        sdp: String,
    },
    /// Leave the call now.
    Leave,
    /// Officials only: let a waiting participant into the call.
    Admit {
        /// The participant id.
        id: String,
    },
    /// Officials only: send a participant back to the waiting room.
    Hold {
        /// The participant id.
        id: String,
    },
    /// Officials only: end a participant's session.
    Remove {
        /// The participant id.
        id: String,
    },
    /// Officials only: ask a participant to switch their microphone on.
    RequestUnmute {
        /// The participant id.
        id: String,
    },
    /// Officials only: switch the room's captions on or off.
    Captions {
        /// On.
        on: bool,
    },
    /// How large the client shows a video it receives: `track` is the mid of
    /// its m-line; 0 by 0 means hidden (nothing is sent for it then).
    VideoSize {
        /// The mid.
        track: String,
        /// Shown width in pixels.
        width: u32,
        /// Shown height in pixels.
        height: u32,
    },
}

impl ClientMessage {
    /// Parse a message, with a reason fit for an `error` reply.
    pub fn parse(data: &[u8]) -> Result<ClientMessage, String> {
        if data.len() > MAX_CLIENT_MESSAGE {
            return Err(format!("message over {MAX_CLIENT_MESSAGE} bytes"));
        }
        serde_json::from_slice(data).map_err(|e| e.to_string())
    }
}

/// The plain-language notice for a captions state (language level B1:
/// the counter's citizens include people with low literacy).
pub fn captions_notice(language: &str, on: bool, available: bool) -> String {
    let dutch = language != "en";
    match (on, available, dutch) {
        (true, true, true) => {
            "De ondertiteling staat aan. Wat er gezegd wordt, verschijnt als tekst \
             op het scherm. Er wordt niets opgenomen en niets bewaard."
                .into()
        }
        (true, true, false) => "Captions are on. What is said appears as text on the screen. \
             Nothing is recorded and nothing is kept."
            .into(),
        (true, false, true) => {
            "De ondertiteling werkt nu even niet. Het gesprek gaat gewoon door.".into()
        }
        (true, false, false) => "Captions are not working right now. The call goes on.".into(),
        (false, _, true) => "De ondertiteling staat uit.".into(),
        (false, _, false) => "Captions are off.".into(),
    }
}

impl ServerMessage {
    /// Serialise for the wire.
    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_parse_and_refuse() {
        assert_eq!(
            ClientMessage::parse(br#"{"type":"leave"}"#),
            Ok(ClientMessage::Leave)
        );
        assert!(ClientMessage::parse(br#"{"type":"answer","sdp":"v=0"}"#).is_ok());
        assert!(ClientMessage::parse(br#"{"type":"dance"}"#).is_err());
        assert!(ClientMessage::parse(b"\xff\x00").is_err());
        assert!(ClientMessage::parse(&vec![b' '; MAX_CLIENT_MESSAGE + 1]).is_err());
    }

    #[test]
    fn captions_messages_have_their_documented_shape() {
        assert_eq!(
            ClientMessage::parse(br#"{"type":"captions","on":true}"#),
            Ok(ClientMessage::Captions { on: true })
        );
        let m = ServerMessage::Caption {
            participant: "a".into(),
            name: Some("Anna".into()),
            text: "Goedemorgen".into(),
            is_final: true,
            start_ms: 100,
            end_ms: 900,
        };
        assert_eq!(
            m.to_json(),
            r#"{"type":"caption","participant":"a","name":"Anna","text":"Goedemorgen","final":true,"start_ms":100,"end_ms":900}"#
        );
        assert!(captions_notice("nl", true, true).contains("niets opgenomen"));
        assert!(captions_notice("en", true, false).contains("call goes on"));
    }

    #[test]
    fn server_messages_are_tagged() {
        let m = ServerMessage::ParticipantLeft {
            id: "a".into(),
            reason: "left".into(),
        };
        assert_eq!(
            m.to_json(),
            r#"{"type":"participant-left","id":"a","reason":"left"}"#
        );
    }
}
