//! The relay server as a state machine, driven by random sequences of what devices and the
//! world do: joins, departures, RECEIVE, FORWARDs of messages and answers of every size,
//! DELIVERED, LOOKUPs, time, store operations held back and committed, and restarts (a crash
//! loses what was held). After every sequence, every device comes online, receives and
//! acknowledges until nothing more arrives, and then:
//!
//! - every FORWARD got one answer (or `pushed` and then `queued`, when what its device did
//!   not acknowledge before leaving was kept, or `pushed` and then a transient REFUSED, when
//!   the store could not keep it), unless a restart came while its store operation was held
//!   (its sender never heard, and sends it again);
//! - every FORWARD answered `queued` reached its recipient device, which acknowledged it
//!   while connected (what a device was handed and not acknowledged when its connection
//!   ended is lost with it, and must be handed again);
//! - every FORWARD answered `pushed` did too, when no restart came after it (pushed copies live in
//!   memory until acknowledged: a crash loses them, and their senders, who were promised
//!   nothing durable, send them again when no acknowledgement comes);
//! - with a store that fails for a while (a full disk), all of the above, except that a
//!   FORWARD answered `pushed` whose sender went offline after it may be lost (the store
//!   could not keep it, and its sender was not there to hear REFUSED: its mailbox sends what
//!   was pushed again when its link comes back);
//! - nothing was delivered to a device that was not forwarded to it, by its sender.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use cellmesh_core::id::NodeId;
use cellmesh_core::relay::harness::RelayHarness;
use cellmesh_core::relay::server::RETRY_MS;
use cellmesh_core::relay::{Accepted, MAX_IDS, MsgId, Record, RefuseCode};
use cellmesh_core::testing::{START, TestNode};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Join(usize),
    Leave(usize),
    Receive(usize),
    Forward {
        from: usize,
        to: usize,
        answer: bool,
        len: usize,
    },
    /// The device acknowledges everything it was handed so far.
    Ack(usize),
    Lookup(usize, usize),
    Advance(u64),
    Hold,
    Commit,
    Restart,
    /// The store fails every operation from now on (a full disk), until `Heal`.
    Fail,
    Heal,
}

fn op() -> impl Strategy<Value = Op> {
    let d = 0..3usize;
    prop_oneof![
        3 => d.clone().prop_map(Op::Join),
        2 => d.clone().prop_map(Op::Leave),
        2 => d.clone().prop_map(Op::Receive),
        8 => (d.clone(), d.clone(), prop::bool::weighted(0.2), prop_oneof![
                9 => 1..2048usize,
                1 => 300_000..700_000usize,
            ])
            .prop_map(|(from, to, answer, len)| Op::Forward { from, to, answer, len }),
        3 => d.clone().prop_map(Op::Ack),
        1 => (d.clone(), d).prop_map(|(a, b)| Op::Lookup(a, b)),
        2 => prop_oneof![0..50u64, 1000..5000u64].prop_map(Op::Advance),
        1 => Just(Op::Hold),
        2 => Just(Op::Commit),
        1 => Just(Op::Restart),
        1 => Just(Op::Fail),
        2 => Just(Op::Heal),
    ]
}

/// The devices: two of one cell, one of another.
fn devices() -> Vec<TestNode> {
    let t = START.timestamp();
    let a = TestNode::new(1, t);
    let a2 = a.sibling(3, t);
    vec![a, a2, TestNode::new(2, t)]
}

fn envelope(answer: bool, len: usize, n: u16) -> Bytes {
    let mut e = vec![0u8; len.max(4)];
    e[0] = cellmesh_core::e2e::E2E_VERSION;
    e[1] = if answer { 0x04 } else { 0x02 };
    e[2..4].copy_from_slice(&n.to_be_bytes());
    Bytes::from(e)
}

struct Model {
    h: RelayHarness,
    devices: Vec<TestNode>,
    online: BTreeSet<usize>,
    /// Forward number → (sender, recipient).
    forwards: BTreeMap<MsgId, (usize, usize)>,
    /// Forwards whose answer may never come (a restart while their store work was held).
    exempt: BTreeSet<MsgId>,
    /// How many of each device's records were looked at by `Ack`.
    acked_upto: Vec<usize>,
    /// What each device acknowledged: it has it.
    acked: Vec<BTreeSet<MsgId>>,
    /// Forwards made before a restart (what was pushed of them is lost with the machine).
    restarted: BTreeSet<MsgId>,
    /// Whether the store failed at some point: a pushed copy that it could not keep when
    /// its device left is lost, and its sender hears so if it is online.
    failed: bool,
    /// Forwards whose sender went offline after sending them.
    sender_left: BTreeSet<MsgId>,
    next: u16,
}

impl Model {
    fn new() -> Self {
        Self {
            h: RelayHarness::new(),
            devices: devices(),
            online: BTreeSet::new(),
            forwards: BTreeMap::new(),
            exempt: BTreeSet::new(),
            acked_upto: vec![0; 3],
            acked: vec![BTreeSet::new(); 3],
            restarted: BTreeSet::new(),
            failed: false,
            sender_left: BTreeSet::new(),
            next: 0,
        }
    }

    fn node(&self, d: usize) -> NodeId {
        self.devices[d].node_id()
    }

    fn records_of(&self, d: usize) -> &[Record] {
        self.h
            .sent
            .get(&self.node(d))
            .map_or(&[][..], Vec::as_slice)
    }

    fn answered(&self) -> BTreeMap<MsgId, Vec<Result<Accepted, u8>>> {
        let mut out: BTreeMap<MsgId, Vec<_>> = BTreeMap::new();
        for records in self.h.sent.values() {
            for r in records {
                match r {
                    Record::Accepted { id, status, .. } => {
                        out.entry(*id).or_default().push(Ok(*status))
                    }
                    Record::Refused { id, code, .. } => {
                        out.entry(*id).or_default().push(Err(code.code()))
                    }
                    _ => {}
                }
            }
        }
        out
    }

    fn apply(&mut self, op: Op) {
        self.step(op);
        // Devices the relay disconnected are gone, with what they did not acknowledge.
        for d in 0..3 {
            if self.online.contains(&d) && !self.h.server.is_online(self.node(d)) {
                self.online.remove(&d);
                self.acked_upto[d] = self.records_of(d).len();
                self.sender_went(d);
            }
        }
    }

    /// Device `d` went offline: it hears nothing more of what it sent.
    fn sender_went(&mut self, d: usize) {
        for (id, (from, _)) in &self.forwards {
            if *from == d {
                self.sender_left.insert(*id);
            }
        }
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::Join(d) => {
                if self.online.contains(&d) {
                    self.h.leave(&self.devices[d]);
                    self.sender_went(d);
                }
                self.acked_upto[d] = self.records_of(d).len();
                self.h.join(&self.devices[d]);
                self.online.insert(d);
            }
            Op::Leave(d) => {
                if self.online.remove(&d) {
                    self.h.leave(&self.devices[d]);
                    self.sender_went(d);
                }
                // What it was handed and did not acknowledge is lost with its connection.
                self.acked_upto[d] = self.records_of(d).len();
            }
            Op::Receive(d) if self.online.contains(&d) => {
                self.h.send(&self.devices[d], &[Record::Receive]);
            }
            Op::Forward {
                from,
                to,
                answer,
                len,
            } if self.online.contains(&from) => {
                let n = self.next;
                self.next += 1;
                let mut raw = [0u8; 16];
                raw[..2].copy_from_slice(&n.to_be_bytes());
                raw[15] = 0xf0;
                let id = MsgId(raw);
                self.forwards.insert(id, (from, to));
                let to_node = self.node(to);
                self.h.send(
                    &self.devices[from],
                    &[Record::Forward {
                        to: to_node,
                        id,
                        envelope: envelope(answer, len, n),
                    }],
                );
            }
            Op::Ack(d) if self.online.contains(&d) => self.ack(d),
            Op::Lookup(d, of) if self.online.contains(&d) => {
                let cell = self.devices[of].cell_id();
                self.h
                    .send(&self.devices[d], &[Record::Lookup { request: 1, cell }]);
            }
            Op::Advance(ms) => self.h.advance(ms),
            Op::Hold => self.h.hold = true,
            Op::Commit => self.h.commit(),
            Op::Fail => {
                self.h.store.failing = true;
                self.failed = true;
            }
            Op::Heal => self.h.store.failing = false,
            Op::Restart => {
                let answered = self.answered();
                for id in self.forwards.keys() {
                    if !answered.contains_key(id) {
                        self.exempt.insert(*id);
                    }
                }
                let h = std::mem::take(&mut self.h);
                self.h = h.restart();
                self.online.clear();
                for d in 0..3 {
                    self.acked_upto[d] = self.records_of(d).len();
                    self.sender_went(d);
                }
                self.restarted.extend(self.forwards.keys().copied());
            }
            _ => {}
        }
    }

    /// Device `d` acknowledges what it was handed since the last time.
    fn ack(&mut self, d: usize) {
        let records = self.records_of(d);
        let ids: Vec<MsgId> = records[self.acked_upto[d]..]
            .iter()
            .filter_map(|r| match r {
                Record::Deliver { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        self.acked_upto[d] = records.len();
        self.acked[d].extend(ids.iter().copied());
        for chunk in ids.chunks(MAX_IDS) {
            self.h
                .send(&self.devices[d], &[Record::Delivered(chunk.to_vec())]);
        }
    }

    /// Every device comes online, receives and acknowledges until nothing more arrives.
    fn settle(&mut self) {
        self.h.store.failing = false;
        self.h.commit();
        for d in 0..3 {
            if !self.online.contains(&d) {
                self.apply(Op::Join(d));
            }
            self.h.send(&self.devices[d], &[Record::Receive]);
        }
        for _ in 0..200 {
            let before: usize = self.h.sent.values().map(Vec::len).sum();
            for d in 0..3 {
                self.ack(d);
            }
            self.h.advance(RETRY_MS);
            let after: usize = self.h.sent.values().map(Vec::len).sum();
            if after == before && self.h.server.poll_timeout() > self.h.now.plus_millis(RETRY_MS) {
                break;
            }
        }
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let answered = self.answered();
        for (id, (from, to)) in &self.forwards {
            let answers = answered.get(id).map_or(&[][..], Vec::as_slice);
            // One answer; or `pushed`, then `queued` once what its device did not acknowledge
            // before leaving was kept, or a transient refusal if it could not be.
            let once = match answers {
                [] | [_] => true,
                [Ok(Accepted::Pushed), Ok(Accepted::Queued)] => true,
                [Ok(Accepted::Pushed), Err(code)] => RefuseCode::from_code(*code).is_transient(),
                _ => false,
            };
            prop_assert!(once, "{id:?} answered {answers:?}");
            if !self.exempt.contains(id) {
                prop_assert!(
                    !answers.is_empty(),
                    "{id:?} from {from} to {to} never answered"
                );
            }
            let delivered = self.acked[*to].contains(id);
            match answers.last() {
                Some(Ok(Accepted::Queued)) => {
                    prop_assert!(delivered, "{id:?} queued for {to} and never delivered")
                }
                Some(Ok(Accepted::Pushed))
                    if !(self.restarted.contains(id)
                        || self.failed && self.sender_left.contains(id)) =>
                {
                    prop_assert!(delivered, "{id:?} pushed to {to} and never delivered")
                }
                _ => {}
            }
        }
        for d in 0..3 {
            for r in self.records_of(d) {
                if let Record::Deliver { from, id, .. } = r {
                    let sent = self.forwards.get(id);
                    prop_assert!(
                        sent.is_some_and(|(f, t)| *t == d && self.node(*f) == *from),
                        "{id:?} delivered to {d} but not forwarded to it by {from:?}"
                    );
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn nothing_queued_is_lost_and_every_forward_is_answered_once(ops in prop::collection::vec(op(), 1..80)) {
        let mut m = Model::new();
        for op in ops {
            m.apply(op);
        }
        m.settle();
        m.check()?;
    }
}
