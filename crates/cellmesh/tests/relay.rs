//! Relays and mailboxes over real TCP on loopback: fan-out, offline queues, restarts, and
//! what crosses the relay's sockets.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cellmesh::home::Unlocked;
use cellmesh::mailbox::{Mailbox, MailboxConfig, MailboxError, SendError, Status};
use cellmesh::relay::{Relay, RelayConfig, RelayEvent};
use common::{device, device_of, offline, reader, recv, registered, relay_event, tap};

mod common;

async fn relay_at(unlocked: &Unlocked, listen: SocketAddr, data: &Path) -> Relay {
    Relay::start(unlocked, RelayConfig::new(vec![listen], data.to_path_buf()))
        .await
        .unwrap()
}

/// A relay on a free loopback port, its store in `dir`.
async fn loopback_relay(dir: &Path) -> Relay {
    relay_at(
        &device(dir, "relay"),
        "127.0.0.1:0".parse().unwrap(),
        &dir.join("data"),
    )
    .await
}

/// A mailbox whose queue to the application has room for `capacity` messages.
async fn mailbox_holding(unlocked: &Unlocked, relay: SocketAddr, capacity: usize) -> Mailbox {
    let mut config = MailboxConfig::new(relay);
    config.inbox_capacity = capacity;
    Mailbox::connect(unlocked, config).await.unwrap()
}

async fn mailbox(unlocked: &Unlocked, relay: SocketAddr) -> Mailbox {
    let mut config = MailboxConfig::new(relay);
    config.ack_timeout = Duration::from_secs(5);
    Mailbox::connect(unlocked, config).await.unwrap()
}

#[tokio::test]
async fn messages_flow_both_ways_and_reach_every_device_of_the_cell() {
    let dir = tempfile::tempdir().unwrap();
    let relay = loopback_relay(dir.path()).await;
    let addr = relay.local_addrs()[0];
    let alice = device(dir.path(), "alice");
    let bob_words = cellmesh::new_mnemonic();
    let (bob1, bob2) = (
        device_of(dir.path(), "bob1", &bob_words),
        device_of(dir.path(), "bob2", &bob_words),
    );
    let mut a = reader(mailbox(&alice, addr).await);
    let mut b1 = reader(mailbox(&bob1, addr).await);
    let mut b2 = reader(mailbox(&bob2, addr).await);

    let sent = a
        .send(b1.cell(), Bytes::from_static(b"hello bob"))
        .await
        .unwrap();
    assert_eq!(sent.status, Status::Delivered);
    assert_eq!(sent.devices, 2, "sealed for both of bob's devices");
    for b in [&mut b1, &mut b2] {
        let m = b.next().await;
        assert_eq!(m.body, &b"hello bob"[..]);
        assert_eq!(m.from_cell, a.cell());
        assert_eq!(m.id, sent.id);
    }
    let back = b2
        .send(a.cell(), Bytes::from_static(b"hi alice"))
        .await
        .unwrap();
    assert_eq!(back.status, Status::Delivered);
    let m = a.next().await;
    assert_eq!(
        (m.body.as_ref(), m.from_cell),
        (&b"hi alice"[..], b2.cell())
    );

    // Many in flight at once, all delivered to both devices, none twice. Submitted together,
    // they travel in bundles (one envelope per device for many messages), while each keeps
    // its own id and outcome.
    let before = relay.stats();
    let mut tickets = Vec::new();
    for i in 0..200u32 {
        let body = Bytes::from(i.to_be_bytes().to_vec());
        tickets.push(a.submit(b1.cell(), body).await.unwrap());
    }
    let mut ids = std::collections::BTreeMap::new();
    for (i, t) in tickets.into_iter().enumerate() {
        let sent = t.await.unwrap();
        assert_eq!((sent.status, sent.devices), (Status::Delivered, 2));
        assert!(ids.insert(sent.id, i as u32).is_none(), "ids differ");
    }
    for b in [&mut b1, &mut b2] {
        let mut got = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let m = b.next().await;
            assert!(got.insert(m.body.clone()), "delivered twice: {:?}", m.body);
            assert_eq!(
                ids[&m.id].to_be_bytes(),
                m.body[..],
                "id and body belong together"
            );
        }
    }
    let envelopes = relay.stats().pushed - before.pushed;
    assert!(
        envelopes < 2 * 200,
        "{envelopes} envelopes for 200 messages × 2 devices"
    );
    // Nothing more: a message sent after them is the next each device gets. Everything went
    // on each device's one ordered link (nothing through the store), so a second copy of any
    // of the 200 would have come first.
    let last = a
        .send(b1.cell(), Bytes::from_static(b"last"))
        .await
        .unwrap();
    for b in [&mut b1, &mut b2] {
        assert_eq!(b.next().await.id, last.id, "delivered twice");
    }
    assert_eq!(
        relay.stats().queued,
        before.queued,
        "none went by the store"
    );

    let unknown = device(dir.path(), "nobody");
    let nobody = cellmesh::core::id::CellId::from_key(unknown.secrets.cell.signing().public());
    assert!(matches!(
        a.send(nobody, Bytes::from_static(b"?")).await,
        Err(MailboxError::Send(SendError::UnknownCell(c))) if c == nobody
    ));
    let too_large = Bytes::from(vec![0u8; cellmesh::core::e2e::MAX_BODY + 1]);
    assert!(matches!(
        a.send(b1.cell(), too_large).await,
        Err(MailboxError::Send(SendError::Seal(_)))
    ));
}

/// A burst to two cells, with bodies that fill bundles past their size and messages too big to
/// share an envelope: every message reaches its cell once, with the id its sender was told.
#[tokio::test]
async fn a_burst_to_several_cells_splits_into_bundles_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let relay = loopback_relay(dir.path()).await;
    let addr = relay.local_addrs()[0];
    let a = mailbox(&device(dir.path(), "alice"), addr).await;
    let mut b = reader(mailbox(&device(dir.path(), "bob"), addr).await);
    let mut c = reader(mailbox(&device(dir.path(), "carol"), addr).await);
    // Directories first, so the burst is sealed in one turn.
    for to in [b.cell(), c.cell()] {
        a.lookup(to).await.unwrap();
    }
    let sizes = [40_000, 40_000, 100_000, 10, 65_536, 0, 70_000];
    let mut tickets = Vec::new();
    for i in 0..600usize {
        let to = if i % 3 == 0 { c.cell() } else { b.cell() };
        let mut body = vec![(i % 251) as u8; sizes[i % sizes.len()].max(4)];
        body[..4].copy_from_slice(&(i as u32).to_be_bytes());
        tickets.push((
            to,
            body.clone(),
            a.submit(to, Bytes::from(body)).await.unwrap(),
        ));
    }
    let mut expected = std::collections::HashMap::new();
    for (to, body, t) in tickets {
        let sent = t.await.unwrap();
        assert_eq!(sent.status, Status::Delivered);
        assert!(expected.insert(sent.id, (to, body)).is_none(), "ids differ");
    }
    for m in [&mut b, &mut c] {
        let cell = m.cell();
        let mine = expected.values().filter(|(to, _)| *to == cell).count();
        for _ in 0..mine {
            let got = m.next().await;
            let (to, body) = expected
                .remove(&got.id)
                .expect("a message sent once, to here");
            assert_eq!((to, &body[..]), (cell, &got.body[..]));
        }
    }
    assert!(expected.is_empty());
}

/// A mailbox holds `inbox_capacity` messages for an application that is not reading, however
/// they arrive: here one per turn of its driver (each send waits for the one before).
#[tokio::test]
async fn a_mailbox_holds_its_inbox_capacity_in_messages_not_in_arrivals() {
    let dir = tempfile::tempdir().unwrap();
    let relay = loopback_relay(dir.path()).await;
    let addr = relay.local_addrs()[0];
    let a = mailbox(&device(dir.path(), "alice"), addr).await;
    let mut b = mailbox_holding(&device(dir.path(), "bob"), addr, 100).await;
    // One envelope at a time (each waits for the relay's answer to the one before), while
    // Bob's application takes nothing yet.
    let mut tickets = Vec::new();
    let before = relay.stats().pushed;
    for i in 0..100u32 {
        tickets.push(
            a.submit(b.cell(), Bytes::from(i.to_be_bytes().to_vec()))
                .await
                .unwrap(),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while relay.stats().pushed < before + u64::from(i) + 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "message {i} not pushed"
            );
            tokio::task::yield_now().await;
        }
    }
    for i in 0..100u32 {
        assert_eq!(recv(&mut b).await.body, &i.to_be_bytes()[..]);
    }
    // Taken (the last one by closing): all delivered.
    b.close().await;
    for t in tickets {
        assert_eq!(t.await.unwrap().status, Status::Delivered);
    }
}

/// Closing a mailbox whose application stopped reading returns at once (the driver may be
/// holding back the relay link when asked to stop), and acknowledges nothing it did not take:
/// the next run of the device gets those.
#[tokio::test]
async fn closing_a_mailbox_with_a_full_queue_returns_and_leaves_the_rest_for_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let relay = loopback_relay(dir.path()).await;
    let addr = relay.local_addrs()[0];
    let a = mailbox(&device(dir.path(), "alice"), addr).await;
    let bob = device(dir.path(), "bob");
    let state = dir.path().join("bob-state");
    let mut config = MailboxConfig::new(addr);
    config.inbox_capacity = 2;
    config.state = Some(state.clone());
    let mut b = Mailbox::connect(&bob, config).await.unwrap();
    let (sender, to) = (a.sender(), b.cell());
    let mut tickets = Vec::new();
    for i in 0..10u32 {
        tickets.push(
            sender
                .submit(to, Bytes::from(i.to_be_bytes().to_vec()))
                .await
                .unwrap(),
        );
    }
    let first = recv(&mut b).await;
    tokio::time::timeout(Duration::from_secs(5), b.close())
        .await
        .expect("close returns");
    let mut config = MailboxConfig::new(addr);
    config.state = Some(state);
    let mut b = reader(Mailbox::connect(&bob, config).await.unwrap());
    let mut rest = std::collections::BTreeSet::new();
    while rest.len() < 9 {
        let m = b.next().await;
        assert_ne!(m.id, first.id, "the one taken before is not shown again");
        rest.insert(m.id);
    }
    // Each was delivered, or queued when Bob's first run left without taking it.
    for t in tickets {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn queued_messages_survive_a_relay_restart_and_reach_the_device_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let relay_id = device(dir.path(), "relay");
    let relay = relay_at(&relay_id, "127.0.0.1:0".parse().unwrap(), &data).await;
    let addr = relay.local_addrs()[0];
    let alice = device(dir.path(), "alice");
    let bob = device(dir.path(), "bob");
    // Bob registers, then goes offline.
    let mut events = relay.subscribe();
    let b = mailbox(&bob, addr).await;
    let (bob_cell, bob_node) = (b.cell(), b.node());
    registered(&mut events, bob_node).await;
    b.close().await;
    offline(&mut events, bob_node).await;

    let a = mailbox(&alice, addr).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let sent = a
            .send(bob_cell, Bytes::from(format!("while away {i}")))
            .await
            .unwrap();
        assert_eq!(sent.status, Status::Queued);
        ids.push(sent.id);
    }
    // And a burst submitted together (a bundle in the queue).
    let mut tickets = Vec::new();
    for i in 5..50 {
        let body = Bytes::from(format!("while away {i}"));
        tickets.push(a.submit(bob_cell, body).await.unwrap());
    }
    for t in tickets {
        let sent = t.await.unwrap();
        assert_eq!(sent.status, Status::Queued);
        ids.push(sent.id);
    }
    a.close().await;
    relay.shutdown().await;

    let relay = relay_at(&relay_id, addr, &data).await;
    let mut events = relay.subscribe();
    let mut b = mailbox(&bob, addr).await;
    registered(&mut events, bob_node).await;
    for (i, id) in ids.iter().enumerate() {
        let m = recv(&mut b).await;
        assert_eq!(m.id, *id);
        assert_eq!(m.body, format!("while away {i}").as_bytes());
    }
    b.close().await;
    offline(&mut events, bob_node).await;
    // Acknowledged: a later connection gets nothing again, but what was queued since, which
    // the relay hands over together with anything still queued before it.
    let a = mailbox(&alice, addr).await;
    let since = a
        .send(bob_cell, Bytes::from_static(b"since"))
        .await
        .unwrap();
    assert_eq!(since.status, Status::Queued);
    let mut b = mailbox(&bob, addr).await;
    let handed = relay_event(&mut events, "Drained", |e| match e {
        RelayEvent::Drained { node, count } if *node == bob_node => Some(*count),
        _ => None,
    })
    .await;
    assert_eq!(handed, 1, "only what was queued since");
    assert_eq!(recv(&mut b).await.id, since.id);
    relay.shutdown().await;
}

#[tokio::test]
async fn plaintext_never_crosses_the_relay_nor_rests_in_its_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let relay = loopback_relay(dir.path()).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let tapped = tap(relay.local_addrs()[0], Arc::clone(&seen), Arc::clone(&seen)).await;
    let alice = device(dir.path(), "alice");
    let (bob, carol) = (device(dir.path(), "bob"), device(dir.path(), "carol"));
    let a = mailbox(&alice, tapped).await;
    let mut b = reader(mailbox(&bob, tapped).await);
    let mut events = relay.subscribe();
    let c = mailbox(&carol, tapped).await;
    let (carol_cell, carol_node) = (c.cell(), c.node());
    registered(&mut events, carol_node).await;
    c.close().await;
    offline(&mut events, carol_node).await;

    let secret = b"the eagle lands at dawn, bring 3 umbrellas";
    let sent = a.send(b.cell(), Bytes::from_static(secret)).await.unwrap();
    assert_eq!(sent.status, Status::Delivered);
    assert_eq!(b.next().await.body, &secret[..]);
    // Stored for offline Carol: the store holds only ciphertext too.
    let queued = a
        .send(carol_cell, Bytes::from_static(secret))
        .await
        .unwrap();
    assert_eq!(queued.status, Status::Queued);
    a.close().await;
    b.close().await;
    relay.shutdown().await;

    let wire = seen.lock().unwrap().clone();
    assert!(wire.len() > 1000, "the tap saw the traffic");
    let needle = &secret[..16];
    assert!(
        !wire.windows(needle.len()).any(|w| w == needle),
        "plaintext crossed the relay's socket"
    );
    let stored = std::fs::read(data.join("relay.redb")).unwrap();
    assert!(
        !stored.windows(needle.len()).any(|w| w == needle),
        "plaintext in the relay's store"
    );
}

#[tokio::test]
async fn a_device_that_restarted_gets_what_was_queued_in_its_lost_session() {
    let dir = tempfile::tempdir().unwrap();
    let relay = loopback_relay(dir.path()).await;
    let addr = relay.local_addrs()[0];
    let (alice, bob) = (device(dir.path(), "alice"), device(dir.path(), "bob"));
    let a = mailbox(&alice, addr).await;
    let mut events = relay.subscribe();
    let mut b = reader(mailbox(&bob, addr).await);
    let (bob_cell, bob_node) = (b.cell(), b.node());
    registered(&mut events, bob_node).await;
    // The first exchange moves the session past its first flight (compact, epoch 1).
    a.send(bob_cell, Bytes::from_static(b"one")).await.unwrap();
    b.next().await;
    b.close().await;
    offline(&mut events, bob_node).await;
    let sent = a.send(bob_cell, Bytes::from_static(b"two")).await.unwrap();
    assert_eq!(sent.status, Status::Queued);
    // Bob's process restarted: it no longer has the session the queued envelope is in.
    let mut b = reader(mailbox(&bob, addr).await);
    let m = b.next().await;
    assert_eq!((m.id, m.body.as_ref()), (sent.id, &b"two"[..]));
    relay.shutdown().await;
}

/// A relay that lies: a node speaking the relay protocol, run by the test.
struct LyingRelay {
    node: cellmesh::node::Node,
}

impl LyingRelay {
    async fn start(keys: &Unlocked) -> Self {
        let node = cellmesh::node::Node::start(
            keys,
            cellmesh::node::NodeConfig {
                listen: vec!["127.0.0.1:0".parse().unwrap()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        Self { node }
    }

    fn addr(&self) -> SocketAddr {
        self.node.local_addrs()[0]
    }

    /// The next record a device sent (but RECEIVE, which every mailbox says first), and
    /// which device.
    async fn next(&mut self) -> (cellmesh::core::id::NodeId, cellmesh::core::relay::Record) {
        loop {
            let incoming = tokio::time::timeout(Duration::from_secs(10), self.node.recv())
                .await
                .unwrap()
                .unwrap();
            let from = incoming.from;
            let first = cellmesh::core::relay::records(incoming.data)
                .flatten()
                .find(|r| !matches!(r, cellmesh::core::relay::Record::Receive));
            if let Some(r) = first {
                return (from, r);
            }
        }
    }

    async fn answer(&self, to: cellmesh::core::id::NodeId, r: cellmesh::core::relay::Record) {
        let mut out = Vec::new();
        cellmesh::core::relay::put_record(&mut out, &r);
        self.node.send(to, Bytes::from(out)).await.unwrap();
    }
}

fn tokens(keys: &Unlocked) -> cellmesh::core::relay::DirectoryEntry {
    let minted = cellmesh::identity::DeviceIdentity::mint(&keys.secrets, None).unwrap();
    cellmesh::core::relay::DirectoryEntry {
        node_token: minted.local.token().clone(),
        identity: minted.identity,
    }
}

#[tokio::test]
async fn a_relay_that_swaps_keys_or_forges_messages_is_caught() {
    use cellmesh::core::e2e::{Endpoint, LocalDevice, Padding, RemoteDevice};
    use cellmesh::core::relay::{DirectoryEntry, MsgId, Record};

    let dir = tempfile::tempdir().unwrap();
    let mut relay = LyingRelay::start(&device(dir.path(), "relay")).await;
    let (alice, bob, mallory) = (
        device(dir.path(), "alice"),
        device(dir.path(), "bob"),
        device(dir.path(), "mallory"),
    );
    let bob_cell = bob.keystore.cell;
    let mut a = mailbox(&alice, relay.addr()).await;

    // 1. Asked for Bob's devices, the relay answers with Mallory's; then with Bob's identity
    // token over Mallory's node token (her X25519 key).
    let spliced = DirectoryEntry {
        node_token: tokens(&mallory).node_token,
        identity: tokens(&bob).identity,
    };
    for lie in [tokens(&mallory), spliced] {
        let lying = async {
            let (from, record) = relay.next().await;
            let Record::Lookup { request, cell } = record else {
                panic!("expected a lookup, got {record:?}")
            };
            assert_eq!(cell, bob_cell);
            let devices = vec![lie];
            relay
                .answer(
                    from,
                    Record::Directory {
                        request,
                        cell,
                        devices,
                        revocations: Vec::new(),
                    },
                )
                .await;
        };
        let (answer, ()) = tokio::join!(a.lookup(bob_cell), lying);
        assert!(
            matches!(answer, Err(MailboxError::Send(SendError::Directory { .. }))),
            "{answer:?}"
        );
    }

    // 2. The relay (with Mallory's keys) forges a message from Bob, and alters a real one.
    let alice_device = RemoteDevice::verify(
        &tokens(&alice).node_token,
        &tokens(&alice).identity,
        cellmesh::now(),
        &Default::default(),
    )
    .unwrap();
    let endpoint_of = |keys: &Unlocked, entry: DirectoryEntry| {
        let agreement = cellmesh::core::keys::AgreementSecret::from_bytes(
            &keys.secrets.node.agreement.dangerous_bytes(),
        );
        Endpoint::new(
            LocalDevice::new(entry.node_token, entry.identity, agreement).unwrap(),
            Padding::None,
        )
    };
    // Bob's identity token (public, the relay has it) with Mallory's own node token and key:
    // the best a relay can do without Bob's secrets.
    let mut forger = endpoint_of(
        &mallory,
        DirectoryEntry {
            node_token: tokens(&mallory).node_token,
            identity: tokens(&bob).identity,
        },
    );
    let id = MsgId([1; 16]);
    let forged = forger
        .seal(
            &alice_device,
            id,
            cellmesh::clock::now(),
            b"from bob, honest",
            &mut rand_core::OsRng,
        )
        .unwrap();
    let a_node = a.node();
    let bob_node = cellmesh::core::id::NodeId::from_key(bob.secrets.node.signing.public());
    relay
        .answer(
            a_node,
            Record::Deliver {
                from: bob_node,
                id,
                envelope: forged,
            },
        )
        .await;
    let mut real = endpoint_of(&mallory, tokens(&mallory));
    let id2 = MsgId([2; 16]);
    let sealed = real
        .seal(
            &alice_device,
            id2,
            cellmesh::clock::now(),
            b"genuine",
            &mut rand_core::OsRng,
        )
        .unwrap();
    let mut altered = sealed.to_vec();
    let last = altered.len() - 20;
    altered[last] ^= 1;
    let mallory_node = cellmesh::core::id::NodeId::from_key(mallory.secrets.node.signing.public());
    relay
        .answer(
            a_node,
            Record::Deliver {
                from: mallory_node,
                id: id2,
                envelope: Bytes::from(altered),
            },
        )
        .await;
    // Neither reaches Alice; the genuine one, unaltered, does.
    relay
        .answer(
            a_node,
            Record::Deliver {
                from: mallory_node,
                id: id2,
                envelope: sealed,
            },
        )
        .await;
    // And one more after it: what Alice is shown is the genuine one, then this one, so
    // neither forgery was shown before or between them.
    let id3 = MsgId([3; 16]);
    let next = real
        .seal(
            &alice_device,
            id3,
            cellmesh::clock::now(),
            b"next",
            &mut rand_core::OsRng,
        )
        .unwrap();
    relay
        .answer(
            a_node,
            Record::Deliver {
                from: mallory_node,
                id: id3,
                envelope: next,
            },
        )
        .await;
    let m = recv(&mut a).await;
    assert_eq!((m.id, m.body.as_ref()), (id2, &b"genuine"[..]));
    let m = recv(&mut a).await;
    assert_eq!((m.id, m.body.as_ref()), (id3, &b"next"[..]));
}

/// A device that comes back to a long queue gets it drained while new messages are pushed
/// to it live: those overtake what was queued, by far more than a small replay window
/// spans. Every message must still arrive, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_messages_overtaking_a_long_queue_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let relay = loopback_relay(dir.path()).await;
    let addr = relay.local_addrs()[0];
    let (alice, bob) = (device(dir.path(), "alice"), device(dir.path(), "bob"));
    let a = mailbox(&alice, addr).await;
    let b = mailbox(&bob, addr).await;
    let to = b.cell();
    b.close().await;
    const QUEUED: u32 = 3000;
    const LIVE: u32 = 3000;
    let mut tickets = Vec::new();
    for i in 0..QUEUED {
        tickets.push(
            a.submit(to, Bytes::from(i.to_be_bytes().to_vec()))
                .await
                .unwrap(),
        );
    }
    for t in tickets {
        assert_eq!(t.await.unwrap().status, Status::Queued);
    }
    // Bob comes back while Alice keeps sending.
    let a = Arc::new(a);
    let sender = {
        let a = Arc::clone(&a);
        tokio::spawn(async move {
            let mut tickets = Vec::new();
            for i in QUEUED..QUEUED + LIVE {
                tickets.push(
                    a.submit(to, Bytes::from(i.to_be_bytes().to_vec()))
                        .await
                        .unwrap(),
                );
            }
            for t in tickets {
                t.await.unwrap();
            }
        })
    };
    let mut b = reader(mailbox(&bob, addr).await);
    let mut got = std::collections::BTreeSet::new();
    while got.len() < (QUEUED + LIVE) as usize {
        let m = b.next().await;
        assert!(got.insert(m.body.clone()), "delivered twice: {:?}", m.body);
    }
    sender.await.unwrap();
}

/// A relay that lets little wait for a device's link: 64 KiB in its outbox, 4 payloads in
/// the link's queue.
async fn tight_relay(dir: &Path) -> Relay {
    let mut config = RelayConfig::new(vec!["127.0.0.1:0".parse().unwrap()], dir.join("data"));
    config.outlet_bytes = 64 * 1024;
    config.node.send_capacity = 4;
    Relay::start(&device(dir, "relay"), config).await.unwrap()
}

/// A device whose application stops reading: what the relay cannot hand it spills to its
/// queue instead of piling up in memory, and it all arrives, once, when the device reads
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_to_a_device_that_does_not_read_spill_to_its_queue() {
    let dir = tempfile::tempdir().unwrap();
    let relay = tight_relay(dir.path()).await;
    let addr = relay.local_addrs()[0];
    let (alice, bob) = (device(dir.path(), "alice"), device(dir.path(), "bob"));
    let a = Arc::new(mailbox(&alice, addr).await);
    let mut config = MailboxConfig::new(addr);
    config.ack_timeout = Duration::from_secs(30);
    config.inbox_capacity = 256;
    let mut b = Mailbox::connect(&bob, config).await.unwrap();
    const COUNT: u32 = 8000;
    let to = b.cell();
    let sender = {
        let a = Arc::clone(&a);
        tokio::spawn(async move {
            let body = vec![0x42; 2048];
            let mut tickets = Vec::new();
            for i in 0..COUNT {
                let mut body = body.clone();
                body[..4].copy_from_slice(&i.to_be_bytes());
                tickets.push(a.submit(to, Bytes::from(body)).await.unwrap());
            }
            let mut queued = 0;
            for t in tickets {
                queued += usize::from(t.await.unwrap().status == Status::Queued);
            }
            queued
        })
    };
    // Bob reads nothing until the relay had to queue for him. Polled: the counters have no
    // event, and per-envelope events (`envelope_events`) would be thousands.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while relay.stats().queued == 0 {
        assert!(tokio::time::Instant::now() < deadline, "nothing was queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut got = std::collections::BTreeSet::new();
    while got.len() < COUNT as usize {
        let m = recv(&mut b).await;
        assert!(got.insert(m.body[..4].to_vec()), "delivered twice");
    }
    let queued = sender.await.unwrap();
    assert!(queued > 0, "some sends resolved as queued");
    // The relay counts envelopes; messages submitted together share one (a bundle).
    let envelopes = relay.stats().queued as usize;
    assert!(
        (1..=queued).contains(&envelopes),
        "{envelopes} envelopes queued for {queued} messages"
    );
}

/// A device that keeps sending but never reads the relay's answers is disconnected once they
/// pass twice `outlet_bytes`; the relay's loop never waits on it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_reads_its_answers_is_disconnected() {
    use cellmesh::core::relay::{MsgId, Record, put_record};
    let dir = tempfile::tempdir().unwrap();
    let relay = tight_relay(dir.path()).await;
    let mut events = relay.subscribe();
    let addr = relay.local_addrs()[0];
    // A raw node whose application never takes what arrives: its inbox fills, its link stops
    // reading, and the relay's answers back up.
    let node = cellmesh::node::Node::start(
        &device(dir.path(), "mute"),
        cellmesh::node::NodeConfig {
            inbox_capacity: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mute = node.node_id();
    let relay_node = node
        .join_with(addr, &Default::default(), None)
        .await
        .unwrap()
        .node;
    let link = node.sender(relay_node).unwrap();
    let nobody = device(dir.path(), "nobody");
    let unknown = cellmesh::core::id::NodeId::from_key(nobody.secrets.node.signing.public());
    let mut payload = Vec::new();
    for i in 0..1000u32 {
        let mut id = [0; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        put_record(
            &mut payload,
            &Record::Forward {
                to: unknown,
                id: MsgId(id),
                envelope: Bytes::from_static(b"x"),
            },
        );
    }
    let payload = Bytes::from(payload);
    let flood = tokio::spawn(async move { while link.send(payload.clone()).await.is_ok() {} });
    let offline = async {
        loop {
            if let Ok(cellmesh::relay::RelayEvent::Offline { node }) = events.recv().await
                && node == mute
            {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), offline)
        .await
        .expect("the relay disconnected the device that does not read");
    flood.abort();
    assert!(relay.stats().refused > 0);
    // The relay still serves others.
    let (alice, bob) = (device(dir.path(), "alice"), device(dir.path(), "bob"));
    let a = mailbox(&alice, addr).await;
    let mut b = reader(mailbox(&bob, addr).await);
    let sent = a
        .send(b.cell(), Bytes::from_static(b"still here"))
        .await
        .unwrap();
    assert_eq!(sent.status, Status::Delivered);
    assert_eq!(b.next().await.body, &b"still here"[..]);
}

/// A proxy to `upstream` that can become a black hole, as a relay whose packets are dropped
/// looks: [`BlackHole::swallow`] cuts every connection through it, and later connections are
/// accepted and read but never answered, so a join waits out its whole setup deadline.
struct BlackHole {
    addr: SocketAddr,
    swallowing: Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<bool>,
}

impl BlackHole {
    async fn start(upstream: SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let swallowing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let holes = Arc::clone(&swallowing);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if holes.load(Ordering::SeqCst) {
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        while matches!(client.read(&mut buf).await, Ok(1..)) {}
                    });
                    continue;
                }
                let mut server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let mut cut = cut_rx.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Self {
            addr,
            swallowing,
            cut,
        }
    }

    fn swallow(&self) {
        self.swallowing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.cut.send(true);
    }
}

/// A send while the relay is unreachable in the worst way, dropping packets rather than
/// refusing connections (each attempt to join it again then takes the whole 10 s setup
/// deadline): it still ends by its own deadline, as not sent. The mailbox's driver used to
/// wait on each attempt, and its timers and new sends with it.
#[tokio::test]
async fn a_send_while_the_relay_drops_packets_ends_by_its_deadline_as_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let relay = loopback_relay(dir.path()).await;
    let hole = BlackHole::start(relay.local_addrs()[0]).await;
    let (alice, bob) = (device(dir.path(), "alice"), device(dir.path(), "bob"));
    let a = mailbox(&alice, hole.addr).await;
    let bob_cell = bob.keystore.cell;
    hole.swallow();
    let began = std::time::Instant::now();
    let sent = tokio::time::timeout(
        Duration::from_secs(30),
        a.send(bob_cell, Bytes::from_static(b"into the hole")),
    )
    .await
    .expect("an outcome within 30 s");
    let took = began.elapsed();
    assert!(
        matches!(&sent, Err(MailboxError::Send(SendError::NotSent(c))) if *c == bob_cell),
        "{sent:?}"
    );
    // The deadline is 5 s (`mailbox`); a driver waiting on joins answered after 10 s or more.
    assert!(took < Duration::from_secs(8), "answered after {took:?}");
    tokio::time::timeout(Duration::from_secs(20), a.close())
        .await
        .expect("closed within 20 s");
    drop(relay);
}
