//! Wiring: start the shards, the room registry and the HTTP server; drain on
//! SIGTERM.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::error::Error;
use crate::ids::ShardId;
use crate::metrics::Metrics;
use crate::offload::{OffloadMetrics, OffloadSetup, PoolStatus};
use crate::registry::Registry;
use crate::shard::session::SessionSetup;
use crate::shard::{self, Command, LeaveReason, ShardConfig, ShardEvent, ShardHandle};
use crate::signal::http::ShardLink;
use crate::signal::{router, AppState};
use crate::token::Verifier;

/// A running balie-sfu.
pub struct Server {
    /// The HTTP address actually bound.
    pub http_addr: SocketAddr,
    /// Each shard's UDP address.
    pub shard_addrs: Vec<SocketAddr>,
    state: Arc<AppState>,
    shards: Vec<ShardHandle>,
    http: JoinHandle<()>,
    http_stop: Option<tokio::sync::oneshot::Sender<()>>,
    events: JoinHandle<()>,
}

/// Install str0m's crypto provider once per process.
pub fn install_crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| str0m::crypto::from_feature_flags().install_process_default());
}

impl Server {
    /// Start everything. Must be called inside a tokio runtime.
    pub async fn start(config: Config) -> Result<Server, Error> {
        install_crypto();
        let config = Arc::new(config);
        let metrics = Metrics::new();
        let verifier = Verifier::new(&config.auth)?;
        let setup = SessionSetup::new(config.media.send_buffer_video, config.rooms.adaptive_layers)
            .map_err(|_| Error::Rtc("cannot generate the DTLS certificate".into()))?;

        let count = config.shard_count();
        let mut shard_config = ShardConfig {
            simulcast_layer: config.rooms.simulcast_layer.clone(),
            reconnect_grace: config.rooms.reconnect_grace,
            keyframe_request_interval: config.rooms.keyframe_request_interval,
            empty_grace: config.rooms.empty_grace,
            adaptive_layers: config.rooms.adaptive_layers,
            offload_layers: 0,
            captions: None,
        };
        let offload = Self::offload_setup(&config, &metrics, &mut shard_config)?;
        let (events_tx, mut events_rx) = mpsc::unbounded_channel();
        let mut shards = Vec::with_capacity(count);
        let mut links = Vec::with_capacity(count);
        let mut pool_status = Vec::new();
        for i in 0..count {
            let port = match config.media.udp_port_base {
                0 => 0,
                base => base + i as u16,
            };
            let bind = SocketAddr::new(config.media.udp_bind, port);
            let id = ShardId(i);
            let handle = shard::spawn(
                id,
                bind,
                shard_config.clone(),
                metrics.shard(id),
                events_tx.clone(),
                offload.as_ref().map(|o| {
                    let status = PoolStatus::default();
                    pool_status.push(status.clone());
                    OffloadSetup {
                        status,
                        ..o.clone()
                    }
                }),
            )?;
            let candidates = config
                .advertise_ips()
                .into_iter()
                .map(|ip| SocketAddr::new(ip, handle.local_addr.port()))
                .collect();
            links.push(ShardLink {
                commands: handle.commands(),
                candidates,
            });
            shards.push(handle);
        }
        let registry = Arc::new(Registry::new(
            count,
            config.rooms.max_participants,
            config.rooms.min_loa,
        ));
        let state = Arc::new(AppState {
            config: config.clone(),
            verifier,
            registry: registry.clone(),
            shards: links,
            metrics,
            draining: Arc::new(AtomicBool::new(false)),
            setup,
            offload: pool_status,
        });

        // Shards report closed sessions and rooms back to the registry.
        let events = tokio::spawn(async move {
            while let Some((_shard, event)) = events_rx.recv().await {
                match event {
                    ShardEvent::SessionClosed { session, .. } => registry.release(session),
                    ShardEvent::RoomClosed { room } => registry.room_closed(&room),
                    ShardEvent::SessionConnected { .. } => {}
                }
            }
        });

        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .map_err(|e| Error::io(format!("binding HTTP {}", config.http), e))?;
        let http_addr = listener
            .local_addr()
            .map_err(|e| Error::io("reading the HTTP address", e))?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app = router(state.clone());
        let http = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stop_rx.await;
            });
            if let Err(e) = serve.await {
                tracing::error!("http server: {e}");
            }
        });
        let shard_addrs = shards.iter().map(|s| s.local_addr).collect();
        Ok(Server {
            http_addr,
            shard_addrs,
            state,
            shards,
            http,
            http_stop: Some(stop_tx),
            events,
        })
    }

    /// The offload setup, when `[offload]` lists workers: the TLS files
    /// are loaded once here, so a bad path fails the start with its name.
    /// Offload needs adaptive layers (the worker's layers are chosen like
    /// simulcast layers); without them it is switched off with a warning.
    fn offload_setup(
        config: &Config,
        metrics: &Metrics,
        shard_config: &mut ShardConfig,
    ) -> Result<Option<OffloadSetup>, Error> {
        if !config.offload.enabled() {
            return Ok(None);
        }
        let layers = config.rooms.adaptive_layers;
        if !layers {
            tracing::warn!(
                "offload needs rooms.adaptive_layers = true: no layers are made for single-layer video"
            );
            if !config.captions.enabled {
                return Ok(None);
            }
        }
        let setup = OffloadSetup {
            config: config.offload.clone(),
            agent: format!("balie-sfu/{}", env!("CARGO_PKG_VERSION")),
            metrics: OffloadMetrics::new(metrics.registry()),
            status: PoolStatus::default(),
            resolver: Default::default(),
        };
        setup.check_tls().map_err(|reason| Error::Config {
            origin: "[offload]".into(),
            reason,
        })?;
        if layers {
            shard_config.offload_layers = config.offload.layers.len() as u8;
        }
        if config.captions.enabled {
            shard_config.captions = Some(config.captions.clone());
        }
        Ok(Some(setup))
    }

    /// Whether development conveniences are on (`dev = true`).
    pub fn dev(&self) -> bool {
        self.state.config.dev
    }

    /// Sessions on the node.
    pub fn session_count(&self) -> usize {
        self.state.registry.session_count()
    }

    /// The metrics of this server.
    pub fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }

    /// Graceful drain: `/readyz` fails and new sessions get 503 at once;
    /// running calls go on until they end or `timeout` passes; then every
    /// session is closed and the server stops.
    pub async fn drain(mut self, timeout: Duration) {
        self.state.draining.store(true, Ordering::Relaxed);
        self.state.metrics.set_draining();
        let start = Instant::now();
        tracing::info!(
            sessions = self.session_count(),
            timeout_s = timeout.as_secs(),
            "draining"
        );
        while self.session_count() > 0 && start.elapsed() < timeout {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = self.session_count();
        if left > 0 {
            tracing::info!(
                sessions = left,
                "drain timeout: closing the remaining sessions"
            );
        }
        self.shutdown().await;
    }

    /// Stop now: close every session, stop the shards and the HTTP server.
    pub async fn shutdown(&mut self) {
        for s in &self.shards {
            s.send(Command::CloseAll(LeaveReason::Drain));
        }
        // Give the goodbyes (data channel bye, RTCP BYE, DTLS close) a moment.
        tokio::time::sleep(Duration::from_millis(100)).await;
        for s in self.shards.drain(..) {
            tokio::task::spawn_blocking(move || s.stop()).await.ok();
        }
        if let Some(stop) = self.http_stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.http).await;
        self.events.abort();
    }
}
