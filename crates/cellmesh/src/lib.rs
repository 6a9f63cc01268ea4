//! The cellmesh runtime: what programs link against.
//!
//! This crate gives the protocol core ([`cellmesh_core`]) its world: the real clock, the
//! operating system's random source, and files. It is the library API of cellmesh; the
//! `cellmesh` command-line tool is a thin layer over it.
//!
//! - [`home`]: a device's home directory and its encrypted keystore.
//! - [`identity`]: the tokens a running node presents.
//! - [`node`]: a node on tokio: listen, join, peers, send and receive, shutdown.
//! - [`store`]: a relay's durable store: registered devices and queues for offline ones.
//! - [`tls`]: TLS around a relay's links (rustls on *ring*), for standard ports.
//! - [`ws`]: WebSocket around a relay's links, for networks that pass only web traffic.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod home;
pub mod identity;
pub mod mailbox;
pub mod node;
mod outbox;
pub mod relay;
pub mod store;
pub mod tls;
pub mod ws;

pub use bytes::Bytes;
pub use cellmesh_core as core;
/// The operating system's random source, as the core's functions take it.
pub use rand_core::OsRng;

use cellmesh_core::Timestamp;
use cellmesh_core::mnemonic::Mnemonic;

/// A new 12-word recovery phrase from the operating system's random source.
pub fn new_mnemonic() -> Mnemonic {
    Mnemonic::generate(&mut rand_core::OsRng)
}

/// The current wall-clock time as the core sees it. A clock before 1970 reads as 1970.
pub fn now() -> Timestamp {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Timestamp(secs)
}
