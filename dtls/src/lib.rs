//! The crypto provider balie's peer connections are built with: str0m's
//! own (aws-lc-rs, DTLS by dimpl), except that the DTLS configuration is
//! built once per process and shared.
//!
//! str0m's aws-lc-rs provider builds a `dimpl::Config` for every
//! connection, and building one checks the crypto provider: a key exchange
//! in every group (P-384 among them) and a signature verified. That was 96%
//! of building an `Rtc` (0.63-0.69 ms of it, measured with a shared
//! certificate), on the server for every join and in the load generator for
//! every participant. A `dimpl::Config` holds settings only (each
//! connection seeds its own random generator), so one per MTU serves all.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use str0m::crypto::dtls::{
    DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, ProtocolVersion,
};
use str0m::crypto::{CryptoError, CryptoProvider};

/// str0m's aws-lc-rs provider with [`SharedConfigDtls`] for DTLS.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            static DTLS: SharedConfigDtls = SharedConfigDtls::new();
            Arc::new(CryptoProvider {
                dtls_provider: &DTLS,
                ..str0m::crypto::from_feature_flags()
            })
        })
        .clone()
}

/// DTLS as str0m's aws-lc-rs provider makes it (no server cookie: ICE has
/// checked the path), its `dimpl::Config` built once per MTU.
#[derive(Debug)]
pub struct SharedConfigDtls {
    /// One per MTU asked for (in practice one).
    configs: Mutex<Vec<(Option<usize>, Arc<dimpl::Config>)>>,
}

impl SharedConfigDtls {
    pub const fn new() -> SharedConfigDtls {
        SharedConfigDtls {
            configs: Mutex::new(Vec::new()),
        }
    }

    fn config(&self, mtu: Option<usize>) -> Result<Arc<dimpl::Config>, CryptoError> {
        let mut configs = self
            .configs
            .lock()
            .map_err(|_| CryptoError::Other("the DTLS configurations' lock is poisoned".into()))?;
        if let Some((_, c)) = configs.iter().find(|(m, _)| *m == mtu) {
            return Ok(c.clone());
        }
        let mut builder = dimpl::Config::builder().use_server_cookie(false);
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        let config = Arc::new(
            builder
                .build()
                .map_err(|e| CryptoError::Other(format!("dimpl config creation failed: {e}")))?,
        );
        configs.push((mtu, config.clone()));
        Ok(config)
    }
}

impl Default for SharedConfigDtls {
    fn default() -> SharedConfigDtls {
        SharedConfigDtls::new()
    }
}

impl DtlsProvider for SharedConfigDtls {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        str0m::crypto::from_feature_flags()
            .dtls_provider
            .generate_certificate()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        dtls_version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let config = self.config(mtu)?;
        let cert = cert.clone();
        let dtls = match dtls_version {
            DtlsVersion::Dtls12 => dimpl::Dtls::new_12(config, cert, now),
            DtlsVersion::Dtls13 => dimpl::Dtls::new_13(config, cert, now),
            DtlsVersion::Auto => dimpl::Dtls::new_auto(config, cert, now),
            other => {
                return Err(CryptoError::Other(format!(
                    "unsupported DTLS version: {other}"
                )))
            }
        };
        Ok(Box::new(Instance(dtls)))
    }
}

/// One connection's DTLS: dimpl's, as str0m's provider wraps it.
struct Instance(dimpl::Dtls);

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance").finish()
    }
}

impl DtlsInstance for Instance {
    fn set_active(&mut self, active: bool) {
        self.0.set_active(active);
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.0.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        self.0.poll_output(buf)
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.0.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.0.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.0.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.0.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.0.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.0.close()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use str0m::change::SdpOffer;
    use str0m::net::{Protocol, Receive};
    use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

    use super::*;

    fn peer(addr: SocketAddr, now: Instant) -> Rtc {
        let mut rtc = RtcConfig::new().set_crypto_provider(provider()).build(now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").expect("candidate"));
        rtc
    }

    /// Two peers built with the shared configuration connect (ICE, DTLS,
    /// SCTP) and open a data channel; a third and fourth do too, reusing
    /// the configuration the first two built.
    #[test]
    fn peers_built_with_the_shared_configuration_connect() {
        for round in 0..2 {
            let mut now = Instant::now();
            let (a_addr, b_addr): (SocketAddr, SocketAddr) = (
                format!("127.0.0.1:{}", 1000 + round).parse().expect("a"),
                format!("127.0.0.1:{}", 2000 + round).parse().expect("b"),
            );
            let mut a = peer(a_addr, now);
            let mut b = peer(b_addr, now);
            let mut api = a.sdp_api();
            let channel = api.add_channel("t".into());
            let (offer, pending) = api.apply().expect("an offer");
            let offer = SdpOffer::from_sdp_string(&offer.to_sdp_string()).expect("offer");
            let answer = b.sdp_api().accept_offer(offer).expect("an answer");
            a.sdp_api()
                .accept_answer(pending, answer)
                .expect("the answer");
            let mut open = false;
            for _ in 0..10_000 {
                let mut next = now + Duration::from_millis(100);
                for (from, from_addr) in [(0, a_addr), (1, b_addr)] {
                    let (src, dst) = if from == 0 {
                        (&mut a, &mut b)
                    } else {
                        (&mut b, &mut a)
                    };
                    loop {
                        match src.poll_output().expect("output") {
                            Output::Timeout(t) => {
                                next = next.min(t);
                                break;
                            }
                            Output::Transmit(t) => {
                                let input = Input::Receive(
                                    now,
                                    Receive {
                                        proto: Protocol::Udp,
                                        source: from_addr,
                                        destination: t.destination,
                                        contents: (&*t.contents).try_into().expect("datagram"),
                                    },
                                );
                                dst.handle_input(input).expect("input");
                            }
                            Output::Event(Event::ChannelOpen(id, _)) if from == 0 => {
                                open |= id == channel;
                            }
                            Output::Event(_) => {}
                        }
                    }
                }
                if open && a.is_connected() && b.is_connected() {
                    break;
                }
                now = next.max(now + Duration::from_millis(1));
                a.handle_input(Input::Timeout(now)).expect("timeout");
                b.handle_input(Input::Timeout(now)).expect("timeout");
            }
            assert!(
                a.is_connected() && b.is_connected() && open,
                "round {round}"
            );
        }
        let dtls = SharedConfigDtls::new();
        let first = dtls.config(Some(1200)).expect("a configuration");
        let again = dtls.config(Some(1200)).expect("the same");
        assert!(Arc::ptr_eq(&first, &again));
        assert!(!Arc::ptr_eq(&first, &dtls.config(None).expect("another")));
    }
}
