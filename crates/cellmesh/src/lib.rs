//! The cellmesh runtime: what programs link against.
//!
//! This crate gives the protocol core ([`cellmesh_core`]) its world: the real clock, the
//! operating system's random source, and files. It is the library API of cellmesh; the
//! `cellmesh` command-line tool is a thin layer over it.
//!
//! - [`clock`]: the one clock every time handed to the core comes from.
//! - [`home`]: a device's home directory and its encrypted keystore.
//! - [`identity`]: the tokens a running node presents.
//! - [`node`]: a node on tokio: listen, join, peers, send and receive, shutdown.
//! - [`state`]: a device's durable state in its home: sessions, duplicate memory, sends.
//! - [`store`]: a relay's durable store: registered devices and queues for offline ones.
//! - [`tls`]: TLS around a relay's links (rustls on *ring*), for standard ports.
//! - [`ws`]: WebSocket around a relay's links, for networks that pass only web traffic.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![doc(test(attr(deny(warnings))))]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod clock;
pub mod home;
pub mod identity;
pub mod mailbox;
pub mod node;
mod outbox;
pub mod relay;
pub mod state;
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

/// The current time in whole seconds, as tokens count it ([`clock::timestamp`]).
pub fn now() -> Timestamp {
    clock::timestamp()
}

/// The README's examples, compiled as this crate's doctests so that they stay true to the API.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
