//! Mailboxes against a small relay in memory, with their stores in memory too, so that a
//! device can restart (its mailbox dropped and made again over the same store) between any
//! two steps.

use std::collections::{BTreeMap, BTreeSet};

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng as _;

use super::*;
use crate::relay::records;
use crate::testing::TestNode;
use crate::world::Disk;

const T0: Timestamp = Timestamp(1_800_000_000);
const START: Instant = Instant(1_800_000_100_000);

/// A device: its identity, its store, and (while it runs) its mailbox and application.
struct Device {
    id: TestNode,
    disk: Disk,
    mailbox: Option<Mailbox>,
    config: Config,
    rng: ChaCha20Rng,
    /// What the application received, in order, over every run.
    got: Vec<Message>,
    /// Messages handed over in this run, and how many the application took.
    handed: u64,
    taken: u64,
    /// Whether the application takes what it is handed at once.
    takes: bool,
    outcomes: BTreeMap<Token, Result<Sent, SendError>>,
    /// Revocations the mailbox reported learning, and answers to its REVOKEs.
    learned: Vec<crate::token::Token>,
    revoke_answers: BTreeMap<Token, Result<(), SendError>>,
}

impl Device {
    fn node(&self) -> NodeId {
        self.id.node_id()
    }

    fn mb(&mut self) -> &mut Mailbox {
        self.mailbox.as_mut().expect("running")
    }
}

/// The relay in memory: a directory, live devices, queues.
#[derive(Default)]
struct Relay {
    directory: BTreeMap<CellId, Vec<(NodeId, DirectoryEntry)>>,
    online: BTreeSet<NodeId>,
    /// Online devices whose link said RECEIVE.
    receiving: BTreeSet<NodeId>,
    /// How much of its queue a device is handed when it says RECEIVE (all, if absent).
    first_drain: BTreeMap<NodeId, usize>,
    /// Pushed and not yet DELIVERED, by device.
    pushed: BTreeMap<NodeId, Vec<(NodeId, MsgId, Bytes)>>,
    queued: BTreeMap<NodeId, Vec<(NodeId, MsgId, Bytes)>>,
    /// Records on their way to each device.
    outgoing: BTreeMap<NodeId, Vec<Record>>,
    /// Every FORWARD, as (to, from, id, envelope): what a relay could replay.
    log: Vec<(NodeId, NodeId, MsgId, Bytes)>,
    /// Revocations it hands out with each cell's directory.
    revocations: BTreeMap<CellId, Vec<crate::token::Token>>,
    /// What it answers every REVOKE (kept, if absent).
    revoke_refusal: Option<RefuseCode>,
    /// Whether a REVOKE it kept drops the device from the directory (a relay that does not
    /// is what a sender must not trust).
    drops_revoked: bool,
}

impl Relay {
    fn register(&mut self, n: &TestNode) {
        self.directory.entry(n.cell_id()).or_default().push((
            n.node_id(),
            DirectoryEntry {
                node_token: n.node_token.clone(),
                identity: n.identity.clone(),
            },
        ));
    }

    fn connect(&mut self, node: NodeId) {
        self.online.insert(node);
    }

    /// Connects `node`, to be handed only the first `n` of its queue when it says RECEIVE
    /// (the rest later, as a relay draining a long queue in chunks does).
    fn connect_some(&mut self, node: NodeId, n: usize) {
        self.first_drain.insert(node, n);
        self.connect(node);
    }

    /// Hands `node` the rest of its queue.
    fn drain(&mut self, node: NodeId) {
        let queued = self.queued.remove(&node).unwrap_or_default();
        self.hand(node, queued);
    }

    fn hand(&mut self, node: NodeId, envelopes: Vec<(NodeId, MsgId, Bytes)>) {
        for (from, id, envelope) in envelopes {
            self.pushed
                .entry(node)
                .or_default()
                .push((from, id, envelope.clone()));
            self.send(node, Record::Deliver { from, id, envelope });
        }
    }

    fn disconnect(&mut self, node: NodeId) {
        self.online.remove(&node);
        self.receiving.remove(&node);
        self.outgoing.remove(&node);
        let pushed = self.pushed.remove(&node).unwrap_or_default();
        self.queued.entry(node).or_default().extend(pushed);
    }

    /// `node`'s link is gone, and what was pushed to it could not be kept (the relay's store
    /// failed): each sender, told `pushed`, is told REFUSED `unavailable` (13.5).
    fn disconnect_unkept(&mut self, node: NodeId) {
        self.online.remove(&node);
        self.receiving.remove(&node);
        self.outgoing.remove(&node);
        for (from, id, _) in self.pushed.remove(&node).unwrap_or_default() {
            let code = RefuseCode::Unavailable;
            self.send(from, Record::Refused { to: node, id, code });
        }
    }

    fn send(&mut self, to: NodeId, r: Record) {
        self.outgoing.entry(to).or_default().push(r);
    }

    fn handle(&mut self, from: NodeId, payload: Bytes) {
        for record in records(payload) {
            match record.expect("a mailbox writes well-formed records") {
                Record::Lookup { request, cell } => {
                    let devices = self
                        .directory
                        .get(&cell)
                        .map(|d| d.iter().map(|(_, e)| e.clone()).collect())
                        .unwrap_or_default();
                    let revocations = self.revocations.get(&cell).cloned().unwrap_or_default();
                    self.send(
                        from,
                        Record::Directory {
                            request,
                            cell,
                            devices,
                            revocations,
                        },
                    );
                }
                Record::Revoke {
                    request,
                    revocation,
                } => {
                    let result = match self.revoke_refusal {
                        Some(code) => Err(code),
                        None => {
                            let r = CellRevocation::verify(&revocation).expect("a valid one");
                            if self.drops_revoked
                                && let Some(list) = self.directory.get_mut(&r.cell())
                            {
                                list.retain(|(n, _)| *n != r.node());
                            }
                            self.revocations
                                .entry(r.cell())
                                .or_default()
                                .push(*revocation);
                            Ok(())
                        }
                    };
                    self.send(from, Record::Revoked { request, result });
                }
                Record::Forward { to, id, envelope } => {
                    self.log.push((to, from, id, envelope.clone()));
                    let queued_copy = self
                        .queued
                        .get_mut(&to)
                        .and_then(|q| q.iter_mut().find(|(f, i, _)| (*f, *i) == (from, id)));
                    // As the relay does: a copy sealed anew takes the queued one's place.
                    let status = if let Some(copy) = queued_copy {
                        copy.2 = envelope;
                        Accepted::Queued
                    } else if self.receiving.contains(&to)
                        || (self.online.contains(&to) && crate::e2e::is_answer(&envelope))
                    {
                        let pushed = self.pushed.entry(to).or_default();
                        pushed.retain(|(f, i, _)| (*f, *i) != (from, id));
                        pushed.push((from, id, envelope.clone()));
                        self.send(to, Record::Deliver { from, id, envelope });
                        Accepted::Pushed
                    } else {
                        self.queued
                            .entry(to)
                            .or_default()
                            .push((from, id, envelope));
                        Accepted::Queued
                    };
                    self.send(from, Record::Accepted { to, id, status });
                }
                Record::Receive => {
                    self.receiving.insert(from);
                    let mut queued = self.queued.remove(&from).unwrap_or_default();
                    if let Some(n) = self.first_drain.remove(&from) {
                        let rest = queued.split_off(n.min(queued.len()));
                        if !rest.is_empty() {
                            self.queued.insert(from, rest);
                        }
                    }
                    self.hand(from, queued);
                }
                Record::Delivered(ids) => {
                    for list in [self.pushed.get_mut(&from), self.queued.get_mut(&from)]
                        .into_iter()
                        .flatten()
                    {
                        list.retain(|(_, i, _)| !ids.contains(i));
                    }
                }
                other => panic!("a device sent {other:?}"),
            }
        }
    }

    fn waiting_for(&self, node: NodeId) -> usize {
        self.pushed.get(&node).map_or(0, Vec::len) + self.queued.get(&node).map_or(0, Vec::len)
    }
}

struct World {
    relay_node: NodeId,
    relay: Relay,
    devices: Vec<Device>,
    now: Instant,
    next_token: Token,
}

const ALICE: usize = 0;
const BOB: usize = 1;
const BOB2: usize = 2;

fn world() -> World {
    world_of(true)
}

/// With Bob's second device registered at the relay, or not.
fn world_of(with_bob2: bool) -> World {
    let alice = TestNode::new(1, T0);
    let bob = TestNode::new(2, T0);
    let bob2 = bob.sibling(3, T0);
    let relay_node = TestNode::new(9, T0).node_id();
    let mut relay = Relay::default();
    relay.register(&alice);
    relay.register(&bob);
    if with_bob2 {
        relay.register(&bob2);
    }
    let devices = [alice, bob, bob2]
        .into_iter()
        .enumerate()
        .map(|(i, id)| Device {
            id,
            disk: Disk::default(),
            mailbox: None,
            config: Config::default(),
            rng: ChaCha20Rng::from_seed([i as u8 + 40; 32]),
            got: Vec::new(),
            handed: 0,
            taken: 0,
            takes: true,
            outcomes: BTreeMap::new(),
            learned: Vec::new(),
            revoke_answers: BTreeMap::new(),
        })
        .collect();
    World {
        relay_node,
        relay,
        devices,
        now: START,
        next_token: 1,
    }
}

impl World {
    /// Starts device `d`'s mailbox over its store and connects it.
    fn start(&mut self, d: usize) {
        let dev = &mut self.devices[d];
        let local = dev.id.local();
        let mailbox = Mailbox::new(
            local,
            self.relay_node,
            dev.config.clone(),
            dev.disk.saved(),
            Revocations::new(),
            self.now,
            &mut dev.rng,
        );
        dev.mailbox = Some(mailbox);
        dev.handed = 0;
        dev.taken = 0;
        let node = dev.node();
        self.relay.connect(node);
        self.devices[d].mb().handle_connected();
        self.settle();
    }

    /// Closes device `d`'s mailbox cleanly: what it took is acknowledged, then it goes.
    fn stop(&mut self, d: usize) {
        let taken = self.devices[d].taken;
        self.devices[d].mb().close(taken);
        self.settle();
        self.crash(d);
    }

    /// Device `d`'s process ends here (what its store committed stays).
    fn crash(&mut self, d: usize) {
        let node = self.devices[d].node();
        self.devices[d].mailbox = None;
        self.relay.disconnect(node);
    }

    /// Device `d`'s link to the relay goes down (its process runs on).
    fn cut(&mut self, d: usize) {
        let node = self.devices[d].node();
        self.devices[d].mb().handle_disconnected();
        self.relay.disconnect(node);
    }

    /// Device `d`'s link to the relay is up again.
    fn reconnect(&mut self, d: usize) {
        let node = self.devices[d].node();
        self.relay.connect(node);
        self.devices[d].mb().handle_connected();
        self.settle();
    }

    fn send(&mut self, from: usize, to_cell: CellId, body: &[u8]) -> Token {
        self.send_with(from, to_cell, body, None)
    }

    fn send_with(&mut self, from: usize, to_cell: CellId, body: &[u8], id: Option<MsgId>) -> Token {
        let token = self.next_token;
        self.next_token += 1;
        let now = self.now;
        self.devices[from]
            .mb()
            .submit(to_cell, Bytes::copy_from_slice(body), id, token, now);
        self.settle();
        token
    }

    /// Runs every device and the relay until nothing moves.
    fn settle(&mut self) {
        for _ in 0..100 {
            let mut moved = false;
            let now = self.now;
            for d in 0..self.devices.len() {
                let dev = &mut self.devices[d];
                let Some(mb) = dev.mailbox.as_mut() else {
                    continue;
                };
                while let Some(commit) = mb.poll_commit(now, &mut dev.rng) {
                    let id = commit.id;
                    dev.disk.apply(commit);
                    mb.handle_committed(id);
                    moved = true;
                }
                let node = dev.id.node_id();
                while let Some(payload) = mb.poll_transmit(now, &mut dev.rng) {
                    self.relay.handle(node, payload);
                    moved = true;
                }
                while let Some(ev) = mb.poll_event() {
                    moved = true;
                    match ev {
                        Event::Sent { token, result } => {
                            dev.outcomes.insert(token, result);
                        }
                        Event::Messages(m) => {
                            dev.handed += m.len() as u64;
                            dev.got.extend(m);
                        }
                        Event::Looked { .. } => {}
                        Event::Revocations(tokens) => dev.learned.extend(tokens),
                        Event::RevokeAnswered { token, result } => {
                            dev.revoke_answers.insert(token, result);
                        }
                    }
                }
                if dev.takes && dev.taken < dev.handed {
                    dev.taken = dev.handed;
                    mb.handle_taken(dev.taken);
                    moved = true;
                }
            }
            for d in 0..self.devices.len() {
                let node = self.devices[d].node();
                let records = self.relay.outgoing.remove(&node).unwrap_or_default();
                if records.is_empty() {
                    continue;
                }
                moved = true;
                let mut buf = Vec::new();
                for r in &records {
                    put_record(&mut buf, r);
                }
                let dev = &mut self.devices[d];
                if let Some(mb) = dev.mailbox.as_mut() {
                    mb.handle_payload(Bytes::from(buf), self.now, &mut dev.rng);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the world did not settle");
    }

    fn advance(&mut self, ms: u64) {
        self.now = self.now.plus_millis(ms);
        for dev in &mut self.devices {
            if let Some(mb) = dev.mailbox.as_mut() {
                mb.handle_timeout(self.now);
            }
        }
        self.settle();
    }

    fn cell(&self, d: usize) -> CellId {
        self.devices[d].id.cell_id()
    }

    fn outcome(&self, d: usize, token: Token) -> Option<&Result<Sent, SendError>> {
        self.devices[d].outcomes.get(&token)
    }

    fn bodies(&self, d: usize) -> Vec<&[u8]> {
        self.devices[d].got.iter().map(|m| &m.body[..]).collect()
    }
}

fn status(r: Option<&Result<Sent, SendError>>) -> Option<Status> {
    match r {
        Some(Ok(s)) => Some(s.status),
        _ => None,
    }
}

#[test]
fn a_message_is_delivered_to_every_device_and_acknowledged_once_taken() {
    let mut w = world();
    for d in [ALICE, BOB, BOB2] {
        w.start(d);
    }
    let bob_cell = w.cell(BOB);
    let t = w.send(ALICE, bob_cell, b"hello");
    assert_eq!(status(w.outcome(ALICE, t)), Some(Status::Delivered));
    assert_eq!(w.bodies(BOB), vec![&b"hello"[..]]);
    assert_eq!(w.bodies(BOB2), vec![&b"hello"[..]]);
    // Both devices acknowledged: nothing kept, nothing saved.
    assert_eq!(w.devices[ALICE].mb().sends_kept(), 0);
    assert!(w.devices[ALICE].disk.sends_kept() == 0);
    // Both told the relay, once the duplicate memory was on disk.
    assert_eq!(w.relay.waiting_for(w.devices[BOB].node()), 0);
    assert_eq!(w.devices[BOB].disk.seen_len(), 1);
}

#[test]
fn nothing_is_acknowledged_before_the_application_has_it() {
    let mut w = world_of(false);
    w.start(ALICE);
    w.devices[BOB].takes = false;
    w.start(BOB);
    let bob_cell = w.cell(BOB);
    let t = w.send(ALICE, bob_cell, b"are you there");
    assert_eq!(w.bodies(BOB), vec![&b"are you there"[..]]);
    assert_eq!(
        w.outcome(ALICE, t),
        None,
        "not acknowledged: Bob's application has not taken it"
    );
    // Bob's application stops without taking it (a broken pipe): nothing acknowledged, the
    // relay keeps it, and Alice hears nothing but that the outcome is unknown.
    w.stop(BOB);
    assert_eq!(w.relay.waiting_for(w.devices[BOB].node()), 1);
    w.advance(10_000);
    assert!(matches!(
        w.outcome(ALICE, t),
        Some(Err(SendError::Unknown(_)))
    ));
    // Saved all the same: a retry under its id, in this run or a later one, learns its
    // outcome instead of sending it twice (SECURITY.md, "Restarts and durable state").
    assert_eq!(w.devices[ALICE].disk.sends_kept(), 1);
    // Bob's next run gets it again, takes it: delivered, once.
    w.devices[BOB].takes = true;
    w.devices[BOB].got.clear();
    w.start(BOB);
    assert_eq!(w.bodies(BOB), vec![&b"are you there"[..]]);
    assert_eq!(w.relay.waiting_for(w.devices[BOB].node()), 0);
    // Acknowledged in the end; kept, since the application was told it did not know (a
    // retry under its id learns the outcome).
    let mb = w.devices[ALICE].mb();
    assert!(
        mb.sends
            .iter()
            .all(|s| s.devices.iter().all(|d| d.state == DevState::Acked))
    );
}

/// Issue 10, finding 2: both sides of a chat restart while messages are queued in a session
/// that had reached epoch 1; they used to be lost.
#[test]
fn queued_messages_survive_restarts_of_both_sides() {
    let mut w = world();
    w.start(ALICE);
    w.start(BOB);
    let bob_cell = w.cell(BOB);
    for n in 0..3u8 {
        let t = w.send(ALICE, bob_cell, &[b'a' + n]);
        assert_eq!(status(w.outcome(ALICE, t)), Some(Status::Delivered));
    }
    w.stop(BOB);
    let queued: Vec<Token> = (0..2u8)
        .map(|n| w.send(ALICE, bob_cell, &[b'x' + n]))
        .collect();
    for t in &queued {
        // BOB2 never ran: queued for both of Bob's devices.
        assert_eq!(status(w.outcome(ALICE, *t)), Some(Status::Queued));
    }
    // Saved before reported: the two queued, and the three BOB2 has not had.
    assert_eq!(w.devices[ALICE].disk.sends_kept(), 5);
    w.stop(ALICE);
    w.devices[BOB].got.clear();
    w.start(BOB);
    assert_eq!(w.bodies(BOB), vec![&b"x"[..], b"y"]);
    // Alice comes back: her saved sends and sessions open Bob's acknowledgements.
    w.start(ALICE);
    assert_eq!(
        w.devices[ALICE].disk.sends_kept(),
        5,
        "BOB2 has not acknowledged yet"
    );
    w.start(BOB2);
    assert_eq!(w.bodies(BOB2), vec![&b"a"[..], b"b", b"c", b"x", b"y"]);
    w.settle();
    assert!(
        w.devices[ALICE].disk.sends_kept() == 0,
        "every device acknowledged"
    );
}

/// A recipient that lost all it kept (a new home) answers RESET; a sender that restarted
/// still seals its saved sends again.
#[test]
fn a_sender_that_restarted_seals_again_for_a_device_that_lost_its_sessions() {
    let mut w = world();
    w.start(ALICE);
    w.start(BOB);
    let bob_cell = w.cell(BOB);
    w.send(ALICE, bob_cell, b"first");
    w.stop(BOB);
    let t = w.send(ALICE, bob_cell, b"second");
    assert_eq!(status(w.outcome(ALICE, t)), Some(Status::Queued));
    w.stop(ALICE);
    // Bob's store is gone: his copy of the session too.
    w.devices[BOB].disk = Disk::default();
    w.devices[BOB].got.clear();
    w.start(BOB);
    assert!(
        w.bodies(BOB).is_empty(),
        "an epoch-1 message he cannot open"
    );
    w.start(ALICE);
    assert_eq!(w.bodies(BOB), vec![&b"second"[..]]);
}

#[test]
fn a_redelivery_after_a_restart_is_not_shown_twice() {
    let mut w = world();
    w.start(ALICE);
    w.start(BOB);
    let bob_cell = w.cell(BOB);
    w.send(ALICE, bob_cell, b"once");
    let bob = w.devices[BOB].node();
    // The relay hands it again after Bob restarted (as if his DELIVERED was lost).
    let (_, from, id, envelope) = w.relay.log.iter().find(|l| l.0 == bob).cloned().unwrap();
    w.stop(BOB);
    w.start(BOB);
    w.relay.send(bob, Record::Deliver { from, id, envelope });
    w.settle();
    assert_eq!(w.bodies(BOB), vec![&b"once"[..]]);
}

#[test]
fn a_message_sent_again_under_its_id_is_delivered_once() {
    let mut w = world();
    w.start(ALICE);
    w.start(BOB);
    w.start(BOB2);
    let bob_cell = w.cell(BOB);
    let id = MsgId([0x5a; 16]);
    let t1 = w.send_with(ALICE, bob_cell, b"pay 10", Some(id));
    assert_eq!(status(w.outcome(ALICE, t1)), Some(Status::Delivered));
    // Another run of the sender, not knowing the outcome, sends it again.
    w.stop(ALICE);
    w.devices[ALICE].disk = Disk::default();
    w.start(ALICE);
    let t2 = w.send_with(ALICE, bob_cell, b"pay 10", Some(id));
    assert_eq!(status(w.outcome(ALICE, t2)), Some(Status::Delivered));
    assert_eq!(w.bodies(BOB), vec![&b"pay 10"[..]]);
    assert_eq!(w.bodies(BOB2), vec![&b"pay 10"[..]]);
}

/// Issue 10, finding 1: a mailbox that only sends (a one-shot `cellmesh send`) used to take
/// the device's queued messages and drop them.
#[test]
fn a_mailbox_that_only_sends_leaves_messages_to_the_relay() {
    let mut w = world();
    w.start(ALICE);
    let bob_cell = w.cell(BOB);
    w.send(ALICE, bob_cell, b"while you were out");
    w.devices[BOB].config.receive = false;
    w.start(BOB);
    let alice_cell = w.cell(ALICE);
    let t = w.send(BOB, alice_cell, b"just sending");
    assert_eq!(status(w.outcome(BOB, t)), Some(Status::Delivered));
    assert!(w.bodies(BOB).is_empty());
    w.stop(BOB);
    w.devices[BOB].config.receive = true;
    w.start(BOB);
    assert_eq!(w.bodies(BOB), vec![&b"while you were out"[..]]);
}

#[test]
fn a_bundle_taken_in_part_hands_only_the_rest_next_time() {
    let mut w = world();
    w.start(ALICE);
    w.devices[BOB].takes = false;
    w.start(BOB);
    let bob_cell = w.cell(BOB);
    let now = w.now;
    for n in 0..5u8 {
        let token = 100 + u64::from(n);
        w.devices[ALICE]
            .mb()
            .submit(bob_cell, Bytes::from(vec![b'0' + n]), None, token, now);
    }
    w.settle();
    assert_eq!(w.devices[BOB].got.len(), 5, "one bundle");
    // The application took two, then failed.
    w.devices[BOB].taken = 2;
    w.stop(BOB);
    w.devices[BOB].got.clear();
    w.devices[BOB].takes = true;
    w.start(BOB);
    assert_eq!(w.bodies(BOB), vec![&b"2"[..], b"3", b"4"]);
}

/// A restored session's counters come from a new lease that is on disk before anything
/// sealed under it leaves: no nonce twice, whatever restarts.
#[test]
fn envelopes_under_a_new_lease_wait_for_its_commit() {
    let mut w = world_of(false);
    w.start(ALICE);
    w.start(BOB);
    let bob_cell = w.cell(BOB);
    w.send(ALICE, bob_cell, b"one");
    w.send(ALICE, bob_cell, b"two");
    assert!(
        w.devices[ALICE]
            .disk
            .session_keys()
            .any(|k| matches!(k, SessionKey::Outbound(_)))
    );
    w.crash(ALICE);
    w.start(ALICE);
    let (now, alice) = (w.now, w.devices[ALICE].node());
    let dev = &mut w.devices[ALICE];
    let mb = dev.mailbox.as_mut().unwrap();
    mb.submit(bob_cell, Bytes::from_static(b"three"), None, 77, now);
    // The directory first (this run has none cached).
    assert!(mb.poll_commit(now, &mut dev.rng).is_none());
    let lookup = mb.poll_transmit(now, &mut dev.rng).expect("a lookup");
    w.relay.handle(alice, lookup);
    let mut buf = Vec::new();
    for r in w.relay.outgoing.remove(&alice).unwrap() {
        put_record(&mut buf, &r);
    }
    let dev = &mut w.devices[ALICE];
    let mb = dev.mailbox.as_mut().unwrap();
    mb.handle_payload(Bytes::from(buf), now, &mut dev.rng);
    // Sealed under the restored session's next lease: held until that is on disk.
    assert!(
        mb.poll_transmit(now, &mut dev.rng).is_none(),
        "held for the lease's commit"
    );
    let commit = mb.poll_commit(now, &mut dev.rng).expect("the lease");
    let id = commit.id;
    dev.disk.apply(commit);
    assert!(
        mb.poll_transmit(now, &mut dev.rng).is_none(),
        "not before it is durable"
    );
    mb.handle_committed(id);
    assert!(mb.poll_transmit(now, &mut dev.rng).is_some());
}

/// A device that lost its sessions while several epoch-1 messages were queued for it: the
/// first it gets is answered RESET, its sender seals them all anew, and the copies that
/// cannot be opened are not told DELIVERED (which would delete the new ones with them).
#[test]
fn every_queued_message_arrives_after_the_recipient_lost_its_sessions() {
    let mut w = world_of(false);
    w.start(ALICE);
    w.start(BOB);
    let bob_cell = w.cell(BOB);
    w.send(ALICE, bob_cell, b"first");
    w.stop(BOB);
    for n in 0..3u8 {
        w.send(ALICE, bob_cell, &[b'a' + n]);
    }
    w.devices[BOB].disk = Disk::default();
    w.devices[BOB].got.clear();
    // Bob's new run gets one of the three, answers RESET; Alice seals all three anew (each
    // replaces its queued copy), then Bob gets the rest of his queue.
    let bob = w.devices[BOB].node();
    let dev = &mut w.devices[BOB];
    dev.mailbox = Some(Mailbox::new(
        dev.id.local(),
        w.relay_node,
        dev.config.clone(),
        dev.disk.saved(),
        Revocations::new(),
        w.now,
        &mut dev.rng,
    ));
    dev.handed = 0;
    dev.taken = 0;
    let alice = w.devices[ALICE].node();
    let old: Vec<(MsgId, Bytes)> = w
        .relay
        .log
        .iter()
        .filter(|l| l.0 == bob && l.1 == alice)
        .map(|l| (l.2, l.3.clone()))
        .collect();
    w.relay.connect_some(bob, 1);
    w.devices[BOB].mb().handle_connected();
    w.settle();
    // A drain that read the queue before the copies sealed anew replaced it hands Bob an
    // old one now: he cannot open it, and must not tell the relay he took it.
    let (id, envelope) = old.last().cloned().unwrap();
    w.relay.send(
        bob,
        Record::Deliver {
            from: alice,
            id,
            envelope,
        },
    );
    w.settle();
    w.relay.drain(bob);
    w.settle();
    let mut got = w.bodies(BOB);
    got.sort();
    assert_eq!(got, vec![&b"a"[..], b"b", b"c"]);
    assert_eq!(
        w.relay.waiting_for(bob),
        0,
        "the relay holds nothing more for Bob"
    );
    // And the copies answered RESET are let go of by Bob's hold, not kept forever.
    w.advance(RESET_HOLD_MS);
    assert!(w.devices[BOB].mb().reset_holds.is_empty());
}

/// Found by the delivery checker: a message sent in a bundle, reported unknown, and sent
/// again under its own id (the id the application was told) went out in an envelope of its
/// own, which the recipient did not know, and arrived twice.
#[test]
fn a_bundled_message_sent_again_under_its_id_arrives_once() {
    for restart in [false, true] {
        let mut w = world_of(false);
        w.start(ALICE);
        w.devices[BOB].takes = false;
        w.start(BOB);
        let bob_cell = w.cell(BOB);
        let now = w.now;
        for n in 0..3u8 {
            let token = 200 + u64::from(n);
            let body = Bytes::from(vec![b'x', n]);
            w.devices[ALICE]
                .mb()
                .submit(bob_cell, body, None, token, now);
        }
        w.settle();
        w.advance(10_000);
        let id = match w.outcome(ALICE, 201) {
            Some(Err(SendError::Unknown(id))) => *id,
            other => panic!("{other:?}"),
        };
        if restart {
            w.stop(ALICE);
            w.start(ALICE);
        }
        let retry = w.send_with(ALICE, bob_cell, &[b'x', 1], Some(id));
        assert_eq!(
            w.outcome(ALICE, retry),
            None,
            "waits for the bundle's outcome"
        );
        w.devices[BOB].takes = true;
        w.settle();
        assert_eq!(
            status(w.outcome(ALICE, retry)),
            Some(Status::Delivered),
            "restart {restart}"
        );
        let mut got = w.bodies(BOB);
        got.sort();
        assert_eq!(
            got,
            vec![&[b'x', 0][..], &[b'x', 1], &[b'x', 2]],
            "restart {restart}"
        );
        // And asked again later, it is told at once, without sending anything.
        let again = w.send_with(ALICE, bob_cell, &[b'x', 1], Some(id));
        assert_eq!(status(w.outcome(ALICE, again)), Some(Status::Delivered));
        assert_eq!(w.devices[BOB].got.len(), 3);
    }
}

/// Found by the delivery checker: a send through a running `listen` whose relay was down
/// waited for its directory lookup with no deadline (the acknowledgement timeout started
/// only once it was sealed). It ends at its deadline, as not sent, and never goes later.
#[test]
fn a_send_waiting_for_its_lookup_while_the_relay_is_unreachable_ends_as_not_sent() {
    let mut w = world_of(false);
    w.start(ALICE);
    w.start(BOB);
    w.cut(ALICE);
    let bob_cell = w.cell(BOB);
    let t = w.send(ALICE, bob_cell, b"into the void");
    let due = w.now.plus_millis(Config::default().ack_timeout_ms);
    let wake = w.devices[ALICE].mb().poll_timeout();
    assert!(
        wake.is_some_and(|at| at <= due),
        "the mailbox asks to be woken by the deadline, not {wake:?}"
    );
    w.advance(Config::default().ack_timeout_ms - 1);
    assert_eq!(w.outcome(ALICE, t), None);
    w.advance(1);
    assert_eq!(
        w.outcome(ALICE, t),
        Some(&Err(SendError::NotSent(bob_cell)))
    );
    // The relay is back: nothing of it goes, since the application was told it did not.
    w.reconnect(ALICE);
    w.advance(60_000);
    assert!(w.bodies(BOB).is_empty());
    assert_eq!(w.devices[ALICE].mb().sends_kept(), 0);
    assert!(w.devices[ALICE].disk.sends_kept() == 0);
    // Sent again, it goes as any other.
    let again = w.send(ALICE, bob_cell, b"into the void");
    assert_eq!(status(w.outcome(ALICE, again)), Some(Status::Delivered));
    assert_eq!(w.bodies(BOB), vec![&b"into the void"[..]]);
}

/// A send has one deadline from the moment it is submitted: a lookup answered late leaves
/// it only the rest of it to be acknowledged.
#[test]
fn a_send_whose_lookup_was_answered_late_ends_by_its_deadline() {
    let mut w = world_of(false);
    w.start(ALICE);
    w.devices[BOB].takes = false;
    w.start(BOB);
    w.cut(ALICE);
    let bob_cell = w.cell(BOB);
    let t = w.send(ALICE, bob_cell, b"late");
    w.advance(6_000);
    w.reconnect(ALICE);
    assert_eq!(w.bodies(BOB), vec![&b"late"[..]], "sealed once looked up");
    assert_eq!(w.outcome(ALICE, t), None, "not taken yet");
    w.advance(Config::default().ack_timeout_ms - 6_000);
    assert!(
        matches!(w.outcome(ALICE, t), Some(Err(SendError::Unknown(_)))),
        "{:?}",
        w.outcome(ALICE, t)
    );
}

/// A send again under the id of one whose outcome was unknown, while the relay is down,
/// is answered by its own deadline too (it waited for an acknowledgement that could not
/// come).
#[test]
fn a_retry_under_the_id_of_an_unknown_send_ends_by_its_deadline() {
    let mut w = world_of(false);
    w.start(ALICE);
    w.devices[BOB].takes = false;
    w.start(BOB);
    let bob_cell = w.cell(BOB);
    let id = MsgId([0x77; 16]);
    let t = w.send_with(ALICE, bob_cell, b"once", Some(id));
    w.advance(Config::default().ack_timeout_ms);
    assert_eq!(w.outcome(ALICE, t), Some(&Err(SendError::Unknown(id))));
    w.cut(ALICE);
    let retry = w.send_with(ALICE, bob_cell, b"once", Some(id));
    assert_eq!(w.outcome(ALICE, retry), None);
    let due = w.now.plus_millis(Config::default().ack_timeout_ms);
    let wake = w.devices[ALICE].mb().poll_timeout();
    assert!(wake.is_some_and(|at| at <= due), "woken by {wake:?}");
    w.advance(Config::default().ack_timeout_ms);
    assert_eq!(w.outcome(ALICE, retry), Some(&Err(SendError::Unknown(id))));
    // Taken once the relay is back: shown once.
    w.reconnect(ALICE);
    w.devices[BOB].takes = true;
    w.settle();
    assert_eq!(w.bodies(BOB), vec![&b"once"[..]]);
}

/// SECURITY.md, "Resource limits": a send no device acknowledged is kept (and saved) for
/// the relay's time to live, 7 days, and then forgotten, in memory and on disk.
#[test]
fn a_send_no_device_acknowledges_is_kept_seven_days_then_forgotten() {
    let mut w = world_of(false);
    w.start(ALICE);
    let bob_cell = w.cell(BOB);
    let t = w.send(ALICE, bob_cell, b"for a device that never returns");
    assert_eq!(status(w.outcome(ALICE, t)), Some(Status::Queued));
    assert_eq!(w.devices[ALICE].disk.sends_kept(), 1);
    w.advance(RETAIN * 1000 - 1000);
    assert_eq!(
        w.devices[ALICE].mb().sends_kept(),
        1,
        "kept up to its expiry"
    );
    w.advance(1000);
    assert_eq!(w.devices[ALICE].mb().sends_kept(), 0);
    assert!(
        w.devices[ALICE].disk.sends_kept() == 0,
        "and deleted from disk"
    );
}

// ---------------------------------------------------------------------------------------------
// Revocations (issue 10, finding 10)
// ---------------------------------------------------------------------------------------------

fn revocation_of(w: &mut World, by: usize, node: NodeId) -> crate::token::Token {
    let dev = &mut w.devices[by];
    crate::device::revocation(&dev.id.cell, node, T0, &mut dev.rng).unwrap()
}

/// The worst case: a relay that still lists the revoked device beside the revocation. A
/// sender that never imported the revocation learns it from the directory, seals only for
/// the devices left, and is told to keep it.
#[test]
fn a_sender_learns_a_revocation_from_the_directory_and_never_seals_for_the_device() {
    let mut w = world();
    let bob2 = w.devices[BOB2].node();
    let token = revocation_of(&mut w, BOB, bob2);
    w.relay.revocations.insert(w.cell(BOB), vec![token.clone()]);
    for d in [ALICE, BOB, BOB2] {
        w.start(d);
    }
    let bob_cell = w.cell(BOB);
    let t = w.send(ALICE, bob_cell, b"not for the lost phone");
    let Some(Ok(sent)) = w.outcome(ALICE, t) else {
        panic!("not sent: {:?}", w.outcome(ALICE, t))
    };
    assert_eq!((sent.status, sent.devices), (Status::Delivered, 1));
    assert!(w.relay.log.iter().all(|(to, ..)| *to != bob2));
    assert!(w.bodies(BOB2).is_empty());
    assert_eq!(w.bodies(BOB), vec![&b"not for the lost phone"[..]]);
    assert_eq!(w.devices[ALICE].learned, vec![token]);
    // Learned once: the next lookup (after the cache) tells nothing new.
    w.advance(DIRECTORY_TTL_MS + 1);
    let t = w.send(ALICE, bob_cell, b"again");
    assert!(matches!(w.outcome(ALICE, t), Some(Ok(s)) if s.devices == 1));
    assert_eq!(w.devices[ALICE].learned.len(), 1);
}

#[test]
fn a_directory_with_a_forged_or_foreign_revocation_is_not_trusted() {
    let mut w = world();
    let alice_node = w.devices[ALICE].node();
    // Alice's cell's revocation handed out as Bob's: the relay mixes cells up.
    let foreign = revocation_of(&mut w, ALICE, alice_node);
    w.relay.revocations.insert(w.cell(BOB), vec![foreign]);
    w.start(ALICE);
    let bob_cell = w.cell(BOB);
    let t = w.send(ALICE, bob_cell, b"x");
    assert!(matches!(
        w.outcome(ALICE, t),
        Some(Err(SendError::Directory {
            error: DirectoryError::WrongCell(_),
            ..
        }))
    ));
    // An identity token passed off as a revocation.
    let identity = w.devices[BOB].id.identity.clone();
    w.relay.revocations.insert(bob_cell, vec![identity]);
    w.advance(DIRECTORY_TTL_MS + 1);
    let t = w.send(ALICE, bob_cell, b"y");
    assert!(matches!(
        w.outcome(ALICE, t),
        Some(Err(SendError::Directory {
            error: DirectoryError::Revocation(_),
            ..
        }))
    ));
    assert!(w.relay.log.is_empty());
}

#[test]
fn a_revoke_goes_to_the_relay_and_its_answer_comes_back() {
    let mut w = world();
    w.relay.drops_revoked = true;
    w.start(ALICE);
    w.start(BOB);
    let bob2 = w.devices[BOB2].node();
    let token = revocation_of(&mut w, BOB, bob2);
    w.devices[BOB].mb().revoke(token.clone(), 77);
    w.settle();
    assert_eq!(w.devices[BOB].revoke_answers.get(&77), Some(&Ok(())));
    assert_eq!(
        w.relay.revocations.get(&w.cell(BOB)),
        Some(&vec![token.clone()])
    );
    // Bob's own mailbox honours it at once: a send to its own cell skips the device.
    let bob_cell = w.cell(BOB);
    let t = w.send(BOB, bob_cell, b"note to self");
    assert!(
        w.relay.log.iter().all(|(to, ..)| *to != bob2),
        "{:?}",
        w.outcome(BOB, t)
    );
    // A refusal comes back with its code; a token that is no revocation never leaves.
    w.relay.revoke_refusal = Some(RefuseCode::TooMany);
    w.devices[BOB].mb().revoke(token, 78);
    let identity = w.devices[BOB].id.identity.clone();
    w.devices[BOB].mb().revoke(identity, 79);
    w.settle();
    let answers = &w.devices[BOB].revoke_answers;
    assert_eq!(
        answers.get(&78),
        Some(&Err(SendError::Refused(RefuseCode::TooMany)))
    );
    assert_eq!(
        answers.get(&79),
        Some(&Err(SendError::Refused(RefuseCode::Invalid)))
    );
}

#[test]
fn a_revoke_is_sent_again_after_a_reconnection_and_ends_closed_on_close() {
    let mut w = world();
    w.start(BOB);
    let bob2 = w.devices[BOB2].node();
    let token = revocation_of(&mut w, BOB, bob2);
    let node = w.devices[BOB].node();
    // The link goes down before the REVOKE reaches the relay.
    w.devices[BOB].mb().handle_disconnected();
    w.relay.disconnect(node);
    w.devices[BOB].mb().revoke(token.clone(), 5);
    w.settle();
    assert!(w.devices[BOB].revoke_answers.is_empty());
    w.relay.connect(node);
    w.devices[BOB].mb().handle_connected();
    w.settle();
    assert_eq!(w.devices[BOB].revoke_answers.get(&5), Some(&Ok(())));
    assert_eq!(w.relay.revocations.get(&w.cell(BOB)).map(Vec::len), Some(1));
    // One never answered ends closed.
    w.devices[BOB].mb().handle_disconnected();
    w.devices[BOB].mb().revoke(token, 6);
    w.devices[BOB].mb().close(0);
    w.settle();
    assert_eq!(
        w.devices[BOB].revoke_answers.get(&6),
        Some(&Err(SendError::Closed))
    );
}

/// A relay older than this device answers LOOKUP with the DIRECTORY of before revocations
/// (0x30): every send waiting for it, and every one after, fails as an incompatible relay.
#[test]
fn a_directory_of_the_old_shape_is_an_incompatible_relay() {
    let mut w = world();
    w.start(ALICE);
    let bob_cell = w.cell(BOB);
    let now = w.now;
    let dev = &mut w.devices[ALICE];
    let mb = dev.mailbox.as_mut().unwrap();
    mb.submit(bob_cell, Bytes::from_static(b"hi"), None, 1, now);
    // Take the LOOKUP out, and answer it the old way.
    let mut request = None;
    while let Some(p) = mb.poll_transmit(now, &mut dev.rng) {
        for r in records(p) {
            if let Ok(Record::Lookup { request: n, .. }) = r {
                request = Some(n);
            }
        }
    }
    let request = request.expect("a LOOKUP");
    let mut record = vec![0x30];
    record.extend_from_slice(&request.to_be_bytes());
    record.extend_from_slice(bob_cell.key().as_bytes());
    record.push(0);
    let mut payload = (record.len() as u32).to_be_bytes().to_vec();
    payload.extend_from_slice(&record);
    mb.handle_payload(Bytes::from(payload), now, &mut dev.rng);
    mb.submit(bob_cell, Bytes::from_static(b"again"), None, 2, now);
    let mut outcomes = BTreeMap::new();
    while let Some(ev) = mb.poll_event() {
        if let Event::Sent { token, result } = ev {
            outcomes.insert(token, result);
        }
    }
    assert_eq!(outcomes.get(&1), Some(&Err(SendError::IncompatibleRelay)));
    assert_eq!(outcomes.get(&2), Some(&Err(SendError::IncompatibleRelay)));
    assert!(
        SendError::IncompatibleRelay
            .to_string()
            .contains("upgrade the relay")
    );
}

/// A send kept for a device that has not acknowledged it stops waiting for it once the
/// device is found revoked: nothing (a RESET least of all) seals it for the device again.
#[test]
fn a_kept_send_stops_waiting_for_a_device_found_revoked() {
    let mut w = world();
    w.devices[BOB2].takes = false;
    for d in [ALICE, BOB, BOB2] {
        w.start(d);
    }
    let bob_cell = w.cell(BOB);
    let t = w.send(ALICE, bob_cell, b"first");
    assert!(matches!(w.outcome(ALICE, t), Some(Ok(s)) if s.devices == 2));
    assert_eq!(w.devices[ALICE].mb().sends_kept(), 1, "kept for Bob 2");
    let bob2 = w.devices[BOB2].node();
    let token = revocation_of(&mut w, BOB, bob2);
    w.relay.revocations.insert(bob_cell, vec![token]);
    w.advance(DIRECTORY_TTL_MS + 1);
    let t = w.send(ALICE, bob_cell, b"second");
    assert!(matches!(w.outcome(ALICE, t), Some(Ok(s)) if s.devices == 1));
    let mb = w.devices[ALICE].mb();
    assert!(mb.sends.iter().all(|s| {
        s.devices
            .iter()
            .all(|d| d.node != bob2 || d.state == DevState::Refused(RefuseCode::NotAllowed))
    }),);
    assert_eq!(mb.sends_kept(), 0);
}

/// The review of 2026-12-02, finding A: the relay could not keep what it had pushed to a
/// device that left before taking it, and told nobody. It tells the sender REFUSED
/// `unavailable` after `pushed` now, and the sender sends it again as after any transient
/// refusal, rather than waiting for a reconnection that may never come.
#[test]
fn a_pushed_envelope_the_relay_could_not_keep_is_sent_again() {
    let mut w = world_of(false);
    w.start(ALICE);
    // Bob is handed the message and goes before taking it.
    w.devices[BOB].takes = false;
    w.start(BOB);
    let bob_cell = w.cell(BOB);
    let t = w.send(ALICE, bob_cell, b"hello");
    let bob = w.devices[BOB].node();
    assert_eq!(w.relay.waiting_for(bob), 1, "pushed, not taken");
    w.devices[BOB].mailbox = None;
    w.devices[BOB].got.clear();
    w.relay.disconnect_unkept(bob);
    w.settle();
    assert_eq!(w.relay.waiting_for(bob), 0, "lost at the relay");
    w.advance(RETRY_AFTER_MS);
    assert_eq!(w.relay.waiting_for(bob), 1, "sent again, and queued");
    w.devices[BOB].takes = true;
    w.start(BOB);
    assert_eq!(w.bodies(BOB), vec![&b"hello"[..]]);
    // Reported once it was queued, and finished once Bob acknowledged it.
    assert_eq!(status(w.outcome(ALICE, t)), Some(Status::Queued));
    assert_eq!(w.devices[ALICE].mb().sends_kept(), 0);
}
