//! The SFU's configuration: a TOML file with documented defaults.
//!
//! `configs/dev.toml` is embedded in the binary and used when no `--config` is
//! given; `configs/production.toml` is a commented example. Unknown keys are
//! refused so that a typo never silently falls back to a default.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::Error;
use crate::token::Loa;

/// The embedded development config (`configs/dev.toml`).
pub const DEV_CONFIG: &str = include_str!("../../configs/dev.toml");

/// The whole configuration of one `balie-sfu` process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Development conveniences (token helper page). Default `false`.
    pub dev: bool,
    /// HTTP listen address for signalling, metrics and health. Default `127.0.0.1:8080`.
    pub http: SocketAddr,
    /// The media plane.
    pub media: MediaConfig,
    /// Room policy.
    pub rooms: RoomsConfig,
    /// Token verification.
    pub auth: AuthConfig,
    /// Graceful shutdown.
    pub drain: DrainConfig,
    /// Transcoder workers for single-layer publishers (off by default).
    pub offload: crate::offload::OffloadConfig,
    /// Live captions, made on the `[offload]` workers (off by default).
    pub captions: CaptionsConfig,
}

/// Live captions.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CaptionsConfig {
    /// Whether officials may switch captions on. Needs `[offload]` workers
    /// started with `--captions`. Default false.
    pub enabled: bool,
    /// The spoken language, forced (Whisper's code: `nl`, `en`). Default `nl`.
    pub language: String,
    /// Captions are on in every room from the start (an official can still
    /// switch them off). Default false.
    pub on_at_start: bool,
}

impl Default for CaptionsConfig {
    fn default() -> Self {
        CaptionsConfig {
            enabled: false,
            language: "nl".into(),
            on_at_start: false,
        }
    }
}

/// The media plane: shards and their UDP sockets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Address the shard sockets bind to. Default `0.0.0.0` (all interfaces).
    pub udp_bind: IpAddr,
    /// 0: ephemeral ports; otherwise shard `i` binds `udp_port_base + i`. Default 0.
    pub udp_port_base: u16,
    /// Addresses advertised in ICE host candidates. Default: the bind address.
    pub advertise_ips: Vec<IpAddr>,
    /// Number of shards; 0 means one per available core. Default 0.
    pub shards: usize,
    /// Outgoing video packets kept per stream for retransmission (NACK) and
    /// to hold a whole keyframe. Default 400 (about 2 s at 1.5 Mbit/s);
    /// str0m's own default of 1000 costs about 1.2 MB per video stream.
    pub send_buffer_video: usize,
}

/// Room policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    /// Most participants in one room; the next join gets 409. Default 8.
    pub max_participants: usize,
    /// An empty room is kept this long before it is closed. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub empty_grace: Duration,
    /// The simulcast layer (rid) forwarded from simulcast publishers when
    /// `adaptive_layers` is off. Default `h`.
    pub simulcast_layer: String,
    /// Choose each subscriber's simulcast layer from its bandwidth estimate.
    /// Default true.
    pub adaptive_layers: bool,
    /// A session whose ICE connection was lost is kept this long for an ICE
    /// restart before it is closed. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub reconnect_grace: Duration,
    /// Least time between two keyframe requests to one publisher track. Default 500 ms.
    #[serde(with = "humantime_serde")]
    pub keyframe_request_interval: Duration,
    /// The lowest DigiD level (`basis`, `midden`, `substantieel`, `hoog`) a
    /// citizen needs to join; an official's token (`min_loa` claim) may set
    /// it per room. Default: none.
    pub min_loa: Option<Loa>,
}

/// How tokens are verified.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret (development). Empty: HS256 tokens are refused.
    pub hs256_secret: String,
    /// JWKS file with ES256, EdDSA or RS256 public keys. Empty: none.
    pub jwks_file: PathBuf,
}

/// Graceful shutdown after SIGTERM.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// How long running calls may go on after SIGTERM. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            dev: false,
            http: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            media: MediaConfig::default(),
            rooms: RoomsConfig::default(),
            auth: AuthConfig::default(),
            drain: DrainConfig::default(),
            offload: crate::offload::OffloadConfig::default(),
            captions: CaptionsConfig::default(),
        }
    }
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            udp_bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            udp_port_base: 0,
            advertise_ips: Vec::new(),
            shards: 0,
            send_buffer_video: 400,
        }
    }
}

impl Default for RoomsConfig {
    fn default() -> Self {
        RoomsConfig {
            max_participants: 8,
            empty_grace: Duration::from_secs(5),
            simulcast_layer: "h".into(),
            adaptive_layers: true,
            reconnect_grace: Duration::from_secs(30),
            keyframe_request_interval: Duration::from_millis(500),
            min_loa: None,
        }
    }
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            timeout: Duration::from_secs(60),
        }
    }
}

impl Config {
    /// Parse and check a config from TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, Error> {
        let config: Config = toml::from_str(text).map_err(|e| Error::Config {
            origin: origin.to_string(),
            reason: e.to_string(),
        })?;
        config.check().map_err(|reason| Error::Config {
            origin: origin.to_string(),
            reason,
        })?;
        Ok(config)
    }

    /// Load a config file, or the embedded development config when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, Error> {
        match path {
            None => Config::parse(DEV_CONFIG, "embedded configs/dev.toml"),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::Config {
                    origin: p.display().to_string(),
                    reason: e.to_string(),
                })?;
                Config::parse(&text, &p.display().to_string())
            }
        }
    }

    fn check(&self) -> Result<(), String> {
        self.offload.check()?;
        if self.captions.enabled && !self.offload.enabled() {
            return Err(
                "captions.enabled needs [offload] workers: captions are made on a transcoder worker"
                    .into(),
            );
        }
        if !balie_offload::wire::valid_language(&self.captions.language) {
            return Err(format!(
                "captions.language {:?} is not a Whisper language code (nl, en, ...)",
                self.captions.language
            ));
        }
        if self.rooms.max_participants < 2 {
            return Err("rooms.max_participants must be at least 2".into());
        }
        if self.media.send_buffer_video < 64 {
            return Err("media.send_buffer_video must be at least 64 packets (a keyframe)".into());
        }
        if self.rooms.simulcast_layer.is_empty() {
            return Err("rooms.simulcast_layer must name a rid (q, h or f)".into());
        }
        if self.media.udp_port_base != 0
            && usize::from(self.media.udp_port_base) + self.shard_count() > 65536
        {
            return Err("media.udp_port_base + shards exceeds the port range".into());
        }
        if self.auth.hs256_secret.is_empty() && self.auth.jwks_file.as_os_str().is_empty() {
            return Err(
                "no token verification configured: set auth.hs256_secret or auth.jwks_file".into(),
            );
        }
        if self.media.udp_bind.is_unspecified() && self.media.advertise_ips.is_empty() {
            return Err(
                "media.udp_bind is a wildcard address: set media.advertise_ips (or --advertise) \
                 to the address clients reach"
                    .into(),
            );
        }
        if self
            .media
            .advertise_ips
            .iter()
            .any(|ip| ip.is_unspecified())
        {
            return Err("media.advertise_ips may not hold a wildcard address".into());
        }
        Ok(())
    }

    /// The number of shards to start: `media.shards`, or the available cores.
    pub fn shard_count(&self) -> usize {
        if self.media.shards > 0 {
            self.media.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }

    /// The addresses to advertise in ICE candidates.
    pub fn advertise_ips(&self) -> Vec<IpAddr> {
        if self.media.advertise_ips.is_empty() {
            vec![self.media.udp_bind]
        } else {
            self.media.advertise_ips.clone()
        }
    }

    /// Apply command-line overrides, then check again.
    pub fn with_overrides(
        mut self,
        http: Option<SocketAddr>,
        advertise: &[IpAddr],
    ) -> Result<Config, Error> {
        if let Some(http) = http {
            self.http = http;
        }
        if !advertise.is_empty() {
            self.media.advertise_ips = advertise.to_vec();
        }
        self.check().map_err(|reason| Error::Config {
            origin: "command line".into(),
            reason,
        })?;
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_in_configs_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("configs/ exists") {
            let path = entry.expect("readable entry").path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            Config::load(Some(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
        assert!(
            seen >= 2,
            "expected dev.toml and production.toml, saw {seen}"
        );
    }

    #[test]
    fn embedded_config_is_dev_on_loopback() {
        let c = Config::load(None).expect("embedded config parses");
        assert!(c.dev);
        assert!(c.http.ip().is_loopback());
        assert_eq!(c.advertise_ips(), vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let e = Config::parse("htp = \"1.2.3.4:1\"", "t").expect_err("must be refused");
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = Config::parse(
            "[auth]\nhs256_secret = \"x\"\n[rooms]\nmax_participants = 1",
            "t",
        )
        .expect_err("must be refused");
        assert!(e.to_string().contains("max_participants"), "{e}");
        let e = Config::parse("[auth]\nhs256_secret = \"x\"", "t").expect_err("must be refused");
        assert!(e.to_string().contains("advertise_ips"), "{e}");
        let e =
            Config::parse("[media]\nudp_bind = \"127.0.0.1\"", "t").expect_err("must be refused");
        assert!(e.to_string().contains("token verification"), "{e}");
    }
}
