//! The relay protocol's batch decoder (`records`, what a device or a relay does with every
//! link DATA payload) and `Record::decode` on arbitrary bytes. They must never panic; `records`
//! must stop at its first error; and whatever decodes must be the one canonical encoding of the
//! record, with `encoded_len` agreeing.
//!
//! Input: byte 0 picks the mode. Even: the rest of the input is the payload verbatim. Odd: a
//! genuine batch holding one record of every kind (real tokens in its DIRECTORY), with the
//! rest of the input after two more bytes (a big-endian offset, modulo the batch's length + 1)
//! XORed into it from that offset on, extending it where the rest runs past its end. Without
//! the base the fuzzer could not get past the signed tokens in a DIRECTORY; the offset lets
//! short inputs reach every record.
//!
//! Every REVOKE that decodes is also offered to a relay's [`RelayRevocations`] (cell A has a
//! device registered), which must never panic and must keep only what verifies.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use cellmesh_core::limits::{RegistrationLimits, Registrations};
use cellmesh_core::relay::{
    Accepted, DirectoryEntry, MsgId, Record, RefuseCode, put_record, records,
};
use cellmesh_core::revoked::{CellRevocation, Offered, RelayRevocations, RevocationLimits};
use cellmesh_core::testing::{START, TestNode};
use rand_core::SeedableRng as _;
use libfuzzer_sys::fuzz_target;

fn base() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let (a, b) = (
            TestNode::new(1, START.timestamp()),
            TestNode::new(2, START.timestamp()),
        );
        let id = MsgId([7; 16]);
        let mut rng = rand_chacha::ChaCha20Rng::from_seed([5; 32]);
        let revocation =
            cellmesh_core::device::revocation(&a.cell, b.node_id(), START.timestamp(), &mut rng)
                .expect("a revocation");
        let mut out = Vec::new();
        for record in [
            Record::Lookup {
                request: 9,
                cell: a.cell_id(),
            },
            Record::Forward {
                to: b.node_id(),
                id,
                envelope: Bytes::from_static(b"sealed"),
            },
            Record::Delivered(vec![id, MsgId([8; 16])]),
            Record::Directory {
                request: 9,
                cell: a.cell_id(),
                devices: vec![
                    DirectoryEntry {
                        node_token: a.node_token.clone(),
                        identity: a.identity.clone(),
                    },
                    DirectoryEntry {
                        node_token: b.node_token.clone(),
                        identity: b.identity.clone(),
                    },
                ],
                revocations: vec![revocation.clone()],
            },
            Record::Revoke {
                request: 10,
                revocation: Box::new(revocation),
            },
            Record::Revoked {
                request: 10,
                result: Err(RefuseCode::TooMany),
            },
            Record::Accepted {
                to: b.node_id(),
                id,
                status: Accepted::Queued,
            },
            Record::Refused {
                to: b.node_id(),
                id,
                code: RefuseCode::QueueFull,
            },
            Record::Deliver {
                from: a.node_id(),
                id,
                envelope: Bytes::new(),
            },
        ] {
            put_record(&mut out, &record);
        }
        out
    })
}

fn input(data: &[u8]) -> Vec<u8> {
    match data {
        [selector, hi, lo, xor @ ..] if selector % 2 == 1 => {
            let base = base();
            let at = usize::from(u16::from_be_bytes([*hi, *lo])) % (base.len() + 1);
            let mut out = base.to_vec();
            for (i, f) in xor.iter().enumerate() {
                match out.get_mut(at + i) {
                    Some(b) => *b ^= f,
                    None => out.push(*f),
                }
            }
            out
        }
        [_, rest @ ..] => rest.to_vec(),
        [] => Vec::new(),
    }
}

fn encode(record: &Record) -> Vec<u8> {
    let mut out = Vec::new();
    record.encode(&mut out);
    assert_eq!(out.len(), record.encoded_len(), "encoded_len disagrees");
    out
}

fn offer(token: &cellmesh_core::token::Token) {
    let a = TestNode::new(1, START.timestamp());
    let mut registrations = Registrations::new(RegistrationLimits {
        per_cell: 64,
        total: 64,
        ttl_secs: 3600,
    });
    let _ = registrations.join(a.cell_id(), a.node_id(), START.timestamp());
    let mut kept = RelayRevocations::new(RevocationLimits::default(), 0);
    match kept.offer(a.cell_id(), token, &registrations, START) {
        Ok(Offered::New(r)) => {
            assert!(CellRevocation::verify(token).is_ok());
            assert!(kept.is_revoked(r.cell(), r.node()));
            assert_eq!(kept.of_cell(r.cell()), vec![token.clone()]);
        }
        Ok(Offered::Known) => panic!("nothing was kept before"),
        Err(_) => assert!(kept.is_empty()),
    }
}

fuzz_target!(|data: &[u8]| {
    let payload = input(data);

    let mut reencoded = Vec::new();
    let mut failed = false;
    for result in records(Bytes::copy_from_slice(&payload)) {
        assert!(!failed, "records() went on after an error");
        match result {
            Ok(record) => {
                if let Record::Revoke { revocation, .. } = &record {
                    offer(revocation);
                }
                let before = reencoded.len();
                put_record(&mut reencoded, &record);
                assert_eq!(
                    reencoded.len() - before,
                    4 + record.encoded_len(),
                    "encoded_len disagrees with {record:?}"
                );
            }
            Err(_) => failed = true,
        }
    }
    assert!(reencoded.len() <= payload.len());
    assert_eq!(
        reencoded[..],
        payload[..reencoded.len()],
        "a decoded record is not its input's encoding"
    );
    if !failed {
        assert_eq!(
            reencoded.len(),
            payload.len(),
            "records() left input over without an error"
        );
    }

    // The payload as one whole record, without the batch framing.
    if let Ok(record) = Record::decode(Bytes::copy_from_slice(&payload)) {
        assert_eq!(
            encode(&record),
            payload,
            "decode accepted a non-canonical record"
        );
    }
});
