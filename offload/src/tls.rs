//! Mutual TLS for the offload link, and development certificates.
//!
//! Both sides present a certificate issued by the deployment's CA and check
//! the other's against it: a worker takes connections only from SFUs with a
//! client certificate of that CA, and an SFU connects only to workers whose
//! certificate names the host it dialled. Nothing unauthenticated gets a
//! stream: quinn finishes the handshake before `accept` returns a
//! connection. TLS 1.3 only (QUIC requires it), aws-lc-rs as the crypto
//! provider (str0m and the JWT verifier use it already).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::wire::ALPN;

/// The three files each side needs.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that issues every SFU's and worker's certificate (PEM).
    pub ca: PathBuf,
    /// This side's certificate chain (PEM).
    pub cert: PathBuf,
    /// This side's private key (PEM: PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("making certificates: {0}")]
    Generate(String),
}

fn file_err(path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        why: why.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| file_err(path, e))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| file_err(path, format!("holds no usable PEM private key: {e}")))
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs(path)? {
        store
            .add(c)
            .map_err(|e| file_err(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(store))
}

/// QUIC transport settings of both sides. A worker that stops answering is
/// declared lost after [`LOST_AFTER`] without a packet (keep-alives every
/// 250 ms), so the SFU moves its sessions within the 2 s it promises.
pub fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(250)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(LOST_AFTER).expect("a second is a valid idle timeout"),
    ));
    // One media stream per group (GOP) and track; a few dozen sessions per
    // connection, each with a source and up to four layers open at once.
    t.max_concurrent_uni_streams(1024u32.into());
    t.max_concurrent_bidi_streams(4u32.into());
    Arc::new(t)
}

/// How long a silent peer is given before its connection is closed: four
/// keep-alives lost in a row. Short, because a lost worker's sessions must
/// be moved within 2 s; a link that drops out for longer costs a move, not
/// a call.
pub const LOST_AFTER: Duration = Duration::from_millis(1000);

/// The worker's side: its certificate, and SFUs must show one of the CA's.
pub fn server_config(files: &TlsFiles) -> Result<quinn::ServerConfig, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider())
        .build()
        .map_err(|e| {
            TlsError::Config(format!("client verifier from {}: {e}", files.ca.display()))
        })?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&files.cert)?, key(&files.key)?)
        .map_err(|e| file_err(&files.key, format!("does not fit the certificate: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// The SFU's side: workers must show a certificate of the CA for the name
/// dialled, and the SFU shows its own.
pub fn client_config(files: &TlsFiles) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(certs(&files.cert)?, key(&files.key)?)
        .map_err(|e| file_err(&files.key, format!("does not fit the certificate: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// Write a development CA and two certificates it issues into `dir`:
/// `ca.pem` (+ `ca.key`), `worker.pem` + `worker.key` (for `names`, which
/// should include the host names and addresses SFUs dial), and `sfu.pem` +
/// `sfu.key`. Keys are written with mode 0600. Returns the files written.
/// For development and tests only: production uses the deployment's CA.
pub fn make_dev_certs(dir: &Path, names: &[String]) -> Result<Vec<PathBuf>, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, "balie offload development CA");
    let ca_key = KeyPair::generate().map_err(gen)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(gen)?;
    let mut written = vec![
        write(dir, "ca.pem", &ca_cert.pem(), false)?,
        write(dir, "ca.key", &ca_key.serialize_pem(), true)?,
    ];
    let issuer = Issuer::new(ca, ca_key);
    for (who, sans, usage) in [
        (
            "worker",
            names.to_vec(),
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        (
            "sfu",
            vec!["balie-sfu".to_owned()],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    ] {
        let mut p = CertificateParams::new(sans).map_err(gen)?;
        p.distinguished_name
            .push(DnType::CommonName, format!("balie {who} (development)"));
        p.extended_key_usages = vec![usage];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().map_err(gen)?;
        let cert = p.signed_by(&key, &issuer).map_err(gen)?;
        written.push(write(dir, &format!("{who}.pem"), &cert.pem(), false)?);
        written.push(write(
            dir,
            &format!("{who}.key"),
            &key.serialize_pem(),
            true,
        )?);
    }
    Ok(written)
}

fn write(dir: &Path, name: &str, pem: &str, secret: bool) -> Result<PathBuf, TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        opts.mode(0o600);
    }
    opts.open(&path)
        .and_then(|mut f| f.write_all(pem.as_bytes()))
        .map_err(|e| file_err(&path, e))?;
    Ok(path)
}

impl TlsFiles {
    /// The worker's files in a folder made by [`make_dev_certs`].
    pub fn dev_worker(dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("worker.pem"),
            key: dir.join("worker.key"),
        }
    }

    /// The SFU's files in a folder made by [`make_dev_certs`].
    pub fn dev_sfu(dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("sfu.pem"),
            key: dir.join("sfu.key"),
        }
    }
}
