//! The media plane: one shard per core.
//!
//! A shard owns one UDP socket (its own port, advertised as the ICE host
//! candidate, so the kernel delivers every packet of a session to the shard
//! that owns it), the `Rtc` of every session in the rooms pinned to it, and a
//! timer queue. [`core`] is the sans-IO state machine; [`driver`] is the thin
//! thread that does the I/O.

pub mod core;
pub mod driver;
pub mod layers;
pub mod room;
pub mod session;
pub mod timers;

pub use self::core::{
    Command, NewSession, ShardConfig, ShardCore, ShardEvent, ShardInput, ShardOutput, Trickle,
};
pub use self::driver::{spawn, ShardHandle};
pub use self::session::{LeaveReason, SessionKind};
