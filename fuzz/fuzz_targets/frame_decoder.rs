//! Arbitrary bytes from the network into a fresh responder, whole or in chunks: framing,
//! the hello parser and whatever a frame can reach before a session exists must never panic.
//! `split_frame` must only ever return a body range that lies within its input.
//!
//! Input: byte 0 picks the chunk size (0: everything at once, n: n bytes at a time); the rest
//! is what arrives on the socket.
#![no_main]

use std::sync::{Arc, OnceLock};

use cellmesh_core::connection::{Connection, ConnectionConfig};
use cellmesh_core::testing::{START, TestNode};
use cellmesh_core::wire::{LEN_PREFIX, split_frame};
use libfuzzer_sys::fuzz_target;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng as _;

fn responder_config() -> Arc<ConnectionConfig> {
    static CONFIG: OnceLock<Arc<ConnectionConfig>> = OnceLock::new();
    Arc::clone(CONFIG.get_or_init(|| Arc::new(TestNode::new(2, START.timestamp()).config())))
}

/// Walks `buf` frame by frame as a reader would, checking every range `split_frame` returns.
fn check_split(mut buf: &[u8]) {
    while let Ok(Some((_, body))) = split_frame(buf) {
        assert_eq!(
            body.start,
            LEN_PREFIX + 1,
            "body does not follow the header"
        );
        assert!(
            body.end <= buf.len(),
            "body {body:?} runs past the {} bytes given",
            buf.len()
        );
        buf = &buf[body.end..];
    }
}

fuzz_target!(|data: &[u8]| {
    check_split(data);
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    check_split(input);

    let chunk = match chunk {
        0 => input.len().max(1),
        n => usize::from(n),
    };
    let mut rng = ChaCha20Rng::seed_from_u64(0);
    let mut conn = Connection::accept(responder_config(), START);
    for (i, piece) in input.chunks(chunk).enumerate() {
        let now = START.plus_millis(i as u64);
        conn.handle_input(piece, now, &mut rng);
        while conn.poll_transmit().is_some() {}
        while conn.poll_event().is_some() {}
    }
});
