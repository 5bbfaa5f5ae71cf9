//! Access tokens: JWTs issued by the municipality's portal after a DigiD login.
//!
//! The SFU only verifies them: HS256 with a shared secret (development) and
//! ES256, EdDSA or RS256 with public keys from a JWKS file (production). Keys
//! from the JWKS are only ever used with their own asymmetric algorithm, so a
//! token cannot switch a public key into an HMAC secret (algorithm confusion).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;
use crate::error::Error;
use crate::ids::RoomId;

/// A participant's role in a counter call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The member of the public at the counter.
    Citizen,
    /// The municipal official serving them.
    Official,
    /// An interpreter joining the call.
    Interpreter,
    /// A colleague who watches and listens (no publishing by default).
    Observer,
}

impl Role {
    /// The role's name as used in tokens and messages.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Citizen => "citizen",
            Role::Official => "official",
            Role::Interpreter => "interpreter",
            Role::Observer => "observer",
        }
    }

    /// Parse a role name.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "citizen" => Some(Role::Citizen),
            "official" => Some(Role::Official),
            "interpreter" => Some(Role::Interpreter),
            "observer" => Some(Role::Observer),
            _ => None,
        }
    }
}

/// DigiD assurance level (betrouwbaarheidsniveau), lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Loa {
    /// DigiD Basis (username and password).
    Basis,
    /// DigiD Midden (with SMS or app).
    Midden,
    /// DigiD Substantieel (app with identity document check).
    Substantieel,
    /// DigiD Hoog (identity document chip).
    Hoog,
}

impl Loa {
    /// The level as DigiD names it to people ("DigiD Substantieel").
    pub fn label(&self) -> &'static str {
        match self {
            Loa::Basis => "DigiD Basis",
            Loa::Midden => "DigiD Midden",
            Loa::Substantieel => "DigiD Substantieel",
            Loa::Hoog => "DigiD Hoog",
        }
    }

    /// Parse a level name.
    pub fn parse(s: &str) -> Option<Loa> {
        match s {
            "basis" => Some(Loa::Basis),
            "midden" => Some(Loa::Midden),
            "substantieel" => Some(Loa::Substantieel),
            "hoog" => Some(Loa::Hoog),
            _ => None,
        }
    }
}

/// The claims balie reads from a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The room this token admits to.
    pub room: String,
    /// A pseudonym for the person; never a citizen service number (BSN).
    pub sub: String,
    /// Display name shown to the other participants (never logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The participant's role.
    pub role: Role,
    /// May publish media. Default: every role but observer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_publish: Option<bool>,
    /// May receive media. Default: true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_subscribe: Option<bool>,
    /// DigiD assurance level verified at login, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loa: Option<Loa>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Officials only: the lowest DigiD level a citizen needs to join this
    /// room (the room policy from the municipality's portal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_loa: Option<Loa>,
}

impl Claims {
    /// Claims valid for an hour from now, with no display name, no DigiD
    /// level and the role's default rights.
    pub fn new(room: &str, sub: &str, role: Role) -> Claims {
        Claims {
            room: room.into(),
            sub: sub.into(),
            name: None,
            role,
            can_publish: None,
            can_subscribe: None,
            loa: None,
            exp: unix_now() + 3600,
            nbf: None,
            min_loa: None,
        }
    }

    /// Whether this participant may publish media.
    pub fn may_publish(&self) -> bool {
        self.can_publish.unwrap_or(self.role != Role::Observer)
    }

    /// Whether this participant may receive media.
    pub fn may_subscribe(&self) -> bool {
        self.can_subscribe.unwrap_or(true)
    }
}

/// Why a token was refused. Each maps to an HTTP status and an error code.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    /// No `Authorization: Bearer` header.
    Missing,
    /// Not a JWT, bad signature, unknown key, wrong algorithm, bad claims.
    Invalid(String),
    /// Past `exp`.
    Expired,
    /// Before `nbf`.
    NotYetValid,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Missing => f.write_str("no bearer token in the Authorization header"),
            TokenError::Invalid(why) => write!(f, "the token is not valid: {why}"),
            TokenError::Expired => f.write_str("the token has expired"),
            TokenError::NotYetValid => f.write_str("the token is not valid yet"),
        }
    }
}

/// Verifies tokens with the configured keys.
pub struct Verifier {
    hs256: Option<DecodingKey>,
    /// JWKS keys by `kid`, each with the one algorithm it may be used with.
    jwks: HashMap<String, (Algorithm, DecodingKey)>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("hs256", &self.hs256.is_some())
            .field("jwks_keys", &self.jwks.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Clock leeway for `exp` and `nbf`.
const LEEWAY_S: u64 = 30;

impl Verifier {
    /// Build a verifier from the auth config, reading the JWKS file if one is set.
    pub fn new(config: &AuthConfig) -> Result<Verifier, Error> {
        let hs256 = (!config.hs256_secret.is_empty())
            .then(|| DecodingKey::from_secret(config.hs256_secret.as_bytes()));
        let mut jwks = HashMap::new();
        if !config.jwks_file.as_os_str().is_empty() {
            jwks = load_jwks(&config.jwks_file)?;
        }
        Ok(Verifier { hs256, jwks })
    }

    /// Verify a token's signature and time claims and return its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| TokenError::Invalid(format!("malformed header: {e}")))?;
        let (alg, key) = if header.alg == Algorithm::HS256 {
            let key = self
                .hs256
                .as_ref()
                .ok_or_else(|| TokenError::Invalid("HS256 tokens are not accepted".into()))?;
            (Algorithm::HS256, key)
        } else {
            let kid = header
                .kid
                .as_deref()
                .ok_or_else(|| TokenError::Invalid("no key id (kid) in the header".into()))?;
            let (alg, key) = self
                .jwks
                .get(kid)
                .ok_or_else(|| TokenError::Invalid("unknown key id".into()))?;
            if *alg != header.alg {
                return Err(TokenError::Invalid(format!(
                    "algorithm {:?} does not match the key's {:?}",
                    header.alg, alg
                )));
            }
            (*alg, key)
        };
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_S;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        match jsonwebtoken::decode::<Claims>(token, key, &validation) {
            Ok(data) => Ok(data.claims),
            Err(e) => Err(match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidSignature => TokenError::Invalid("bad signature".into()),
                ErrorKind::Json(e) => TokenError::Invalid(format!("claims: {e}")),
                other => TokenError::Invalid(format!("{other:?}")),
            }),
        }
    }
}

fn load_jwks(path: &Path) -> Result<HashMap<String, (Algorithm, DecodingKey)>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Token(format!("reading JWKS {}: {e}", path.display())))?;
    let set: JwkSet = serde_json::from_str(&text)
        .map_err(|e| Error::Token(format!("parsing JWKS {}: {e}", path.display())))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let kid = jwk
            .common
            .key_id
            .clone()
            .ok_or_else(|| Error::Token(format!("a key in {} has no kid", path.display())))?;
        let alg = match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                Algorithm::EdDSA
            }
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            _ => {
                return Err(Error::Token(format!(
                    "key {kid} in {}: only P-256 (ES256), Ed25519 (EdDSA) and RSA (RS256) keys are accepted",
                    path.display()
                )))
            }
        };
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| Error::Token(format!("key {kid} in {}: {e}", path.display())))?;
        keys.insert(kid, (alg, key));
    }
    Ok(keys)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a development token says; see [`make_dev_token`].
#[derive(Debug, Clone)]
pub struct DevTokenRequest {
    /// Room.
    pub room: RoomId,
    /// Pseudonymous identity (`sub`).
    pub identity: String,
    /// Role.
    pub role: Role,
    /// Display name.
    pub name: Option<String>,
    /// DigiD level.
    pub loa: Option<Loa>,
    /// Lifetime.
    pub ttl: Duration,
}

/// Sign a token with the configured HS256 development secret.
pub fn make_dev_token(config: &AuthConfig, req: &DevTokenRequest) -> Result<String, Error> {
    if config.hs256_secret.is_empty() {
        return Err(Error::Token(
            "no development secret (auth.hs256_secret) is configured: production tokens come \
             from the municipality's portal"
                .into(),
        ));
    }
    let claims = Claims {
        name: req.name.clone(),
        loa: req.loa,
        exp: unix_now() + req.ttl.as_secs(),
        ..Claims::new(req.room.as_str(), &req.identity, req.role)
    };
    sign_hs256(&config.hs256_secret, &claims)
}

/// Sign arbitrary claims with an HS256 secret (development and tests).
pub fn sign_hs256(secret: &str, claims: &Claims) -> Result<String, Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| Error::Token(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn keys_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
    }

    fn claims(exp_in: i64) -> Claims {
        Claims {
            name: Some("Anna".into()),
            loa: Some(Loa::Substantieel),
            exp: (unix_now() as i64 + exp_in) as u64,
            ..Claims::new("r1", "pseudo-1", Role::Citizen)
        }
    }

    fn config() -> AuthConfig {
        AuthConfig {
            hs256_secret: "s3cret".into(),
            jwks_file: keys_dir().join("jwks.json"),
        }
    }

    fn sign_with(alg: Algorithm, kid: &str, pem: &str, c: &Claims) -> String {
        let pem = std::fs::read(keys_dir().join(pem)).expect("test key exists");
        let key = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .expect("test key parses");
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, c, &key).expect("signs")
    }

    #[test]
    fn hs256_round_trip_and_defaults() {
        let v = Verifier::new(&config()).expect("verifier");
        let t = sign_hs256("s3cret", &claims(60)).expect("signs");
        let c = v.verify(&t).expect("valid");
        assert_eq!(c.loa, Some(Loa::Substantieel));
        assert!(c.may_publish() && c.may_subscribe());
    }

    #[test]
    fn every_asymmetric_algorithm_verifies() {
        let v = Verifier::new(&config()).expect("verifier");
        for (alg, kid, pem) in [
            (Algorithm::ES256, "test-es256", "es256.pem"),
            (Algorithm::EdDSA, "test-eddsa", "ed25519.pem"),
            (Algorithm::RS256, "test-rs256", "rs256.pem"),
        ] {
            let t = sign_with(alg, kid, pem, &claims(60));
            assert_eq!(v.verify(&t).expect("valid").sub, "pseudo-1", "{alg:?}");
        }
    }

    #[test]
    fn refusals() {
        let v = Verifier::new(&config()).expect("verifier");
        let forged = sign_hs256("other", &claims(60)).expect("signs");
        assert!(matches!(v.verify(&forged), Err(TokenError::Invalid(_))));
        let expired = sign_hs256("s3cret", &claims(-3600)).expect("signs");
        assert_eq!(v.verify(&expired), Err(TokenError::Expired));
        let mut early = claims(3600);
        early.nbf = Some(unix_now() + 600);
        let early = sign_hs256("s3cret", &early).expect("signs");
        assert_eq!(v.verify(&early), Err(TokenError::NotYetValid));
        assert!(matches!(v.verify("garbage"), Err(TokenError::Invalid(_))));
        // A key used with another algorithm than its own.
        let t = sign_with(Algorithm::ES256, "test-rs256", "es256.pem", &claims(60));
        assert!(matches!(v.verify(&t), Err(TokenError::Invalid(_))));
        // Unknown key id.
        let t = sign_with(Algorithm::ES256, "nope", "es256.pem", &claims(60));
        assert!(matches!(v.verify(&t), Err(TokenError::Invalid(_))));
        // HS256 refused when no secret is configured.
        let v = Verifier::new(&AuthConfig {
            hs256_secret: String::new(),
            jwks_file: keys_dir().join("jwks.json"),
        })
        .expect("verifier");
        let t = sign_hs256("s3cret", &claims(60)).expect("signs");
        assert!(matches!(v.verify(&t), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn dev_token_needs_a_secret() {
        let req = DevTokenRequest {
            room: RoomId::parse("r").expect("valid"),
            identity: "i".into(),
            role: Role::Official,
            name: None,
            loa: None,
            ttl: Duration::from_secs(60),
        };
        assert!(make_dev_token(&AuthConfig::default(), &req).is_err());
        let t = make_dev_token(&config(), &req).expect("signs");
        let c = Verifier::new(&config())
            .expect("v")
            .verify(&t)
            .expect("valid");
        assert_eq!(c.role, Role::Official);
    }
}
