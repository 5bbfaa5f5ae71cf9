//! balie-sfu: a sharded, sans-IO str0m media plane with token-checked HTTP
//! signalling, for government "digital counter" video calls.
//!
//! Where a packet goes (see ARCHITECTURE.md): [`signal::http`] admits a session
//! and hands a ready `Rtc` to a shard; [`shard::driver`] reads datagrams and
//! feeds [`shard::core`], which demultiplexes them to the session, lets str0m
//! decrypt them, and forwards each frame to the room's subscribers.

pub mod config;
pub mod error;
pub mod ids;
pub mod metrics;
pub mod offload;
pub mod registry;
pub mod server;
pub mod shard;
pub mod signal;
pub mod sim;
pub mod token;

pub use config::Config;
pub use error::Error;
pub use server::Server;
