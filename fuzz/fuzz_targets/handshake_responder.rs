//! A real initiator (TestNode 1) against a responder (TestNode 2), with one handshake message
//! replaced by, or mutated with, fuzz data on its way to the responder. The responder must
//! never panic, and must report `Joined` only if the message it got was the genuine one.
//! As a check on the harness itself, the genuine message must lead to a join.
//!
//! Input: byte 0 picks the message (bit 0: hello or finish) and the mutation (bits 1-2:
//! replace the body with the fuzz bytes; XOR them into it, keeping its length; XOR them into
//! it, taking their length, so it is cut short or extended with the fuzz bytes). The rest are
//! the fuzz bytes. Only the message body changes: it is re-framed with a correct header, so
//! the responder sees exactly one frame in its place (framing is `frame_decoder`'s job).
#![no_main]

use std::sync::{Arc, OnceLock};

use cellmesh_core::connection::{Connection, ConnectionConfig, Event};
use cellmesh_core::testing::{START, TestNode};
use cellmesh_core::wire::{self, FrameType};
use libfuzzer_sys::fuzz_target;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng as _;

fn configs() -> &'static (Arc<ConnectionConfig>, Arc<ConnectionConfig>) {
    static CONFIGS: OnceLock<(Arc<ConnectionConfig>, Arc<ConnectionConfig>)> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let t = START.timestamp();
        (
            Arc::new(TestNode::new(1, t).config()),
            Arc::new(TestNode::new(2, t).config()),
        )
    })
}

/// The whole frames `conn` has queued, as (type, body).
fn frames(conn: &mut Connection) -> Vec<(FrameType, Vec<u8>)> {
    let bytes = conn.poll_transmit().unwrap_or_default();
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while let Ok(Some((kind, body))) = wire::split_frame(rest) {
        out.push((kind, rest[body.clone()].to_vec()));
        rest = &rest[body.end..];
    }
    assert!(rest.is_empty(), "a connection queued a partial frame");
    out
}

fn mutate(genuine: &[u8], mode: u8, fuzz: &[u8]) -> Vec<u8> {
    match mode {
        0 => fuzz.to_vec(),
        1 => genuine
            .iter()
            .zip(fuzz.iter().chain(std::iter::repeat(&0)))
            .map(|(g, f)| g ^ f)
            .collect(),
        _ => fuzz
            .iter()
            .enumerate()
            .map(|(i, f)| genuine.get(i).copied().unwrap_or(0) ^ f)
            .collect(),
    }
}

fn send(to: &mut Connection, frames: &[(FrameType, Vec<u8>)], rng: &mut ChaCha20Rng) {
    let mut bytes = Vec::new();
    for (kind, body) in frames {
        wire::put_frame(&mut bytes, *kind, body);
    }
    if !bytes.is_empty() {
        to.handle_input(&bytes, START, rng);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, fuzz)) = data.split_first() else {
        return;
    };
    let target = if selector & 1 == 0 {
        FrameType::Hello
    } else {
        FrameType::Finish
    };
    let mode = (selector >> 1) & 3;

    let (ca, cb) = configs();
    let mut rng = ChaCha20Rng::seed_from_u64(u64::from(selector));
    let mut a = Connection::connect(Arc::clone(ca), START, &mut rng);
    let mut b = Connection::accept(Arc::clone(cb), START);
    let mut b_events = Vec::new();
    let mut tampered = None;

    for _ in 0..16 {
        let mut from_a = frames(&mut a);
        let from_b = frames(&mut b);
        if from_a.is_empty() && from_b.is_empty() {
            break;
        }
        if tampered.is_none()
            && let Some((kind, body)) = from_a.first_mut()
            && *kind == target
        {
            let delivered = mutate(body, mode, fuzz);
            tampered = Some(delivered != *body);
            *body = delivered;
        }
        send(&mut b, &from_a, &mut rng);
        b_events.extend(std::iter::from_fn(|| b.poll_event()));
        send(&mut a, &from_b, &mut rng);
        while a.poll_event().is_some() {}
    }

    let joined = b_events.iter().any(|e| matches!(e, Event::Joined(_)));
    match tampered {
        Some(true) => assert!(
            !joined,
            "the responder joined on a {target:?} that was not the genuine one: {b_events:?}"
        ),
        Some(false) => assert!(
            joined,
            "the genuine handshake did not lead to a join: {b_events:?}"
        ),
        // The targeted message was never sent: the initiator must have given up first.
        None => assert!(!joined, "joined without a {target:?}: {b_events:?}"),
    }
});
