//! The cellmesh protocol core.
//!
//! Everything that decides what goes on the wire lives here, and nothing here performs I/O:
//! no sockets, no files, no clock, no operating-system randomness. Callers pass the current
//! time ([`Timestamp`]) and a random source (any [`rand_core::CryptoRngCore`]) in, and get
//! bytes, typed values or typed errors back. That is what lets the same code run in the
//! daemon, in tests that never sleep, and in a deterministic simulator.
//!
//! How the pieces depend on each other:
//!
//! ```text
//!  mnemonic ──► keys ──► id (CellId, NodeId, Fingerprint)
//!                 │          │
//!                 ▼          ▼
//!               token (one signed format) ──► device (cell ⇄ node binding, revocation)
//!                                   keystore (sealing secrets at rest; pure functions)
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod codec;
pub mod connection;
pub mod device;
pub mod e2e;
pub mod handshake;
pub mod id;
pub mod keys;
pub mod keystore;
pub mod limits;
pub mod mailbox;
pub mod mesh;
pub mod mnemonic;
pub mod node;
pub mod peers;
pub mod relay;
pub mod revoked;
pub mod session;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod time;
pub mod token;
pub mod wire;
#[cfg(any(test, feature = "testing"))]
pub mod world;

pub use time::{Instant, Timestamp};
