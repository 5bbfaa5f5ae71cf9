//! `application/trickle-ice-sdpfrag` (RFC 8840), as WHIP uses it for trickle
//! ICE and ICE restarts.

use str0m::{Candidate, IceCreds};

/// What a PATCH body says.
#[derive(Debug, Default)]
pub struct SdpFrag {
    /// `a=ice-ufrag` and `a=ice-pwd`, when both are present.
    pub creds: Option<IceCreds>,
    /// The `a=candidate` lines.
    pub candidates: Vec<Candidate>,
}

/// Most candidate lines taken from one fragment.
const MAX_CANDIDATES: usize = 64;

/// Parse a fragment; unknown lines are ignored, bad candidates are an error.
pub fn parse(text: &str) -> Result<SdpFrag, String> {
    let mut ufrag = None;
    let mut pwd = None;
    let mut candidates = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("a=ice-ufrag:") {
            ufrag = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("a=ice-pwd:") {
            pwd = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("a=") {
            if v.starts_with("candidate:") {
                if candidates.len() >= MAX_CANDIDATES {
                    return Err(format!("more than {MAX_CANDIDATES} candidates"));
                }
                let c = Candidate::from_sdp_string(v)
                    .map_err(|e| format!("bad candidate line: {e}"))?;
                candidates.push(c);
            }
        }
    }
    let creds = match (ufrag, pwd) {
        (Some(ufrag), Some(pass)) => Some(IceCreds { ufrag, pass }),
        (None, None) => None,
        _ => return Err("a=ice-ufrag and a=ice-pwd must come together".into()),
    };
    Ok(SdpFrag { creds, candidates })
}

/// Our new credentials after an ICE restart, as a fragment.
pub fn restart_answer(creds: &IceCreds) -> String {
    format!(
        "a=ice-ufrag:{}\r\na=ice-pwd:{}\r\n",
        creds.ufrag, creds.pass
    )
}

/// The `a=ice-ufrag` of an SDP text.
pub fn ice_ufrag(sdp: &str) -> Option<String> {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix("a=ice-ufrag:"))
        .map(|s| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_trickle_and_restart() {
        let f = parse(
            "a=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdefghijkl\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\n\
             a=mid:0\r\na=candidate:1 1 udp 2113929471 127.0.0.1 40000 typ host\r\na=end-of-candidates\r\n",
        )
        .expect("parses");
        assert_eq!(f.creds.expect("creds").ufrag, "abcd");
        assert_eq!(f.candidates.len(), 1);
        assert!(parse("a=candidate:garbage").is_err());
        assert!(parse("a=ice-ufrag:x").is_err());
        assert!(parse("").expect("empty is fine").creds.is_none());
    }
}
