//! The relay server's state machine under sequences of what devices and the world do, with
//! records the fuzzer chose. Three devices (two of one cell, one of another) join, leave and
//! send; the store's work is held back, committed, or lost to a restart; time passes. The
//! machine must never panic, must answer each FORWARD at most twice per time it was sent (`pushed`, then `queued`), and
//! must hold no more in memory for pushed envelopes than its bound.
//!
//! Input: a sequence of operations, each one byte `op` then its arguments:
//! `op % 8` = 0 join, 1 leave, 2 RECEIVE, 3 a FORWARD (`to`, an id byte, a length byte in
//! units of 512 bytes), 4 DELIVERED of the ids it was handed, 5 a payload of raw bytes (a
//! length byte, then that many bytes, decoded as records), 6 time (a byte of 100 ms), 7 the
//! store: hold, commit or restart; `op / 8 % 3` is the device.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use bytes::Bytes;
use cellmesh_core::relay::harness::RelayHarness;
use cellmesh_core::relay::{MsgId, Record, put_record};
use cellmesh_core::testing::{START, TestNode};
use libfuzzer_sys::fuzz_target;

fn devices() -> &'static [TestNode; 3] {
    static DEVICES: OnceLock<[TestNode; 3]> = OnceLock::new();
    DEVICES.get_or_init(|| {
        let t = START.timestamp();
        let a = TestNode::new(1, t);
        let a2 = a.sibling(3, t);
        [a, a2, TestNode::new(2, t)]
    })
}

fuzz_target!(|data: &[u8]| {
    let d = devices();
    let mut h = RelayHarness::new();
    let mut forwards: BTreeMap<MsgId, usize> = BTreeMap::new();
    let mut it = data.iter().copied();
    let mut next = || it.next();
    while let Some(op) = next() {
        let dev = &d[usize::from(op / 8 % 3)];
        match op % 8 {
            0 => h.join(dev),
            1 => h.leave(dev),
            2 => h.send(dev, &[Record::Receive]),
            3 => {
                let (Some(to), Some(id), Some(len)) = (next(), next(), next()) else {
                    break;
                };
                let mut e = vec![cellmesh_core::e2e::E2E_VERSION, 2 + 2 * (id & 1)];
                e.resize(2 + usize::from(len) * 512, id);
                let id = MsgId([id; 16]);
                *forwards.entry(id).or_default() += 1;
                let to = d[usize::from(to % 3)].node_id();
                h.send(
                    dev,
                    &[Record::Forward {
                        to,
                        id,
                        envelope: Bytes::from(e),
                    }],
                );
            }
            4 => {
                let ids: Vec<MsgId> = h
                    .sent
                    .get(&dev.node_id())
                    .into_iter()
                    .flatten()
                    .filter_map(|r| match r {
                        Record::Deliver { id, .. } => Some(*id),
                        _ => None,
                    })
                    .take(4096)
                    .collect();
                if !ids.is_empty() {
                    h.send(dev, &[Record::Delivered(ids)]);
                }
            }
            5 => {
                let Some(len) = next() else { break };
                let raw: Vec<u8> = (0..len).map_while(|_| next()).collect();
                let mut payload = Vec::new();
                // Half the time framed as one record, half the time as they come.
                if len % 2 == 0 {
                    payload.extend_from_slice(&raw);
                } else if let Ok(r) = Record::decode(Bytes::from(raw.clone())) {
                    put_record(&mut payload, &r);
                } else {
                    payload.extend_from_slice(&(raw.len() as u32).to_be_bytes());
                    payload.extend_from_slice(&raw);
                }
                h.server.records(
                    h.now,
                    [(dev.node_id(), dev.cell_id(), Bytes::from(payload))],
                    &h.links,
                );
                h.run();
            }
            6 => {
                let Some(t) = next() else { break };
                h.advance(u64::from(t) * 100);
            }
            _ => match op / 24 % 3 {
                0 => h.hold = true,
                1 => h.commit(),
                _ => h = std::mem::take(&mut h).restart(),
            },
        }
        let limits = h.server.config().memory;
        assert!(h.server.in_flight_bytes() <= limits.total);
    }
    h.commit();
    // At most two answers per time each id was forwarded (`pushed`, then `queued` when its
    // device left without acknowledging it); raw payloads may add their own.
    let mut answers: BTreeMap<MsgId, usize> = BTreeMap::new();
    for records in h.sent.values() {
        for r in records {
            if let Record::Accepted { id, .. } | Record::Refused { id, .. } = r {
                *answers.entry(*id).or_default() += 1;
            }
        }
    }
    if !data.iter().any(|op| op % 8 == 5) {
        for (id, n) in answers {
            let sent = forwards.get(&id).copied().unwrap_or(0);
            assert!(n <= 2 * sent, "{id:?} answered {n} times");
        }
    }
});
