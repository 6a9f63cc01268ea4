//! Nodes over real TCP on loopback.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use cellmesh::core::connection::Authorization;
use cellmesh::core::keystore::{KdfParams, Passphrase};
use cellmesh::core::wire::NackCode;
use cellmesh::home::{Home, Unlocked};
use cellmesh::node::{JoinError, Node, NodeConfig, NodeEvent, NodeLimits};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio::sync::broadcast;

const FAST: KdfParams = KdfParams {
    memory_kib: 64,
    iterations: 1,
    lanes: 1,
};

fn device(dir: &std::path::Path, name: &str) -> Unlocked {
    let home = Home::new(dir.join(name));
    let pass = Passphrase::new("pw".into());
    home.create(&cellmesh::new_mnemonic(), "", &pass, FAST, false)
        .unwrap();
    home.unlock(&pass).unwrap()
}

fn listening() -> NodeConfig {
    NodeConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        ..NodeConfig::default()
    }
}

async fn next_matching(
    events: &mut broadcast::Receiver<NodeEvent>,
    mut want: impl FnMut(&NodeEvent) -> bool,
) -> NodeEvent {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = events.recv().await.unwrap();
            if want(&e) {
                return e;
            }
        }
    })
    .await
    .expect("event within 10 s")
}

/// The reason of the next `Left` event.
async fn left_reason(events: &mut broadcast::Receiver<NodeEvent>) -> String {
    match next_matching(events, |e| matches!(e, NodeEvent::Left { .. })).await {
        NodeEvent::Left { reason, .. } => reason,
        _ => unreachable!("matched Left"),
    }
}

fn addr(node: &Node) -> SocketAddr {
    node.local_addrs()[0]
}

#[tokio::test]
async fn three_nodes_join_and_the_first_peer_learns_of_the_second() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Node::start(&device(dir.path(), "hub"), listening())
        .await
        .unwrap();
    let mut hub_events = hub.subscribe();
    let b = Node::start(&device(dir.path(), "b"), listening())
        .await
        .unwrap();
    let mut b_events = b.subscribe();
    let c = Node::start(&device(dir.path(), "c"), NodeConfig::default())
        .await
        .unwrap();

    let joined = b.join(addr(&hub)).await.unwrap();
    assert_eq!(joined.node, hub.node_id());
    assert_eq!(joined.cell, hub.cell());
    next_matching(
        &mut hub_events,
        |e| matches!(e, NodeEvent::Joined(p) if p.node == b.node_id()),
    )
    .await;
    c.join(addr(&hub)).await.unwrap();

    let learned = next_matching(&mut b_events, |e| matches!(e, NodeEvent::Learned { .. })).await;
    assert_eq!(
        learned,
        NodeEvent::Learned {
            node: c.node_id(),
            cell: c.cell(),
            via: hub.node_id()
        }
    );
    let peers: BTreeSet<_> = hub.peers().into_iter().map(|p| p.node).collect();
    assert_eq!(peers, BTreeSet::from([b.node_id(), c.node_id()]));
}

#[tokio::test]
async fn an_unauthorized_join_is_refused_with_its_code_and_leaves_no_peer() {
    let dir = tempfile::tempdir().unwrap();
    let friend = device(dir.path(), "friend");
    let friend_cell = friend.keystore.cell;
    let config = NodeConfig {
        policy: cellmesh::core::connection::JoinPolicy {
            authorize: Authorization::AllowCells(BTreeSet::from([friend_cell])),
            ..Default::default()
        },
        ..listening()
    };
    let hub = Node::start(&device(dir.path(), "hub"), config)
        .await
        .unwrap();
    let mut hub_events = hub.subscribe();
    let stranger = Node::start(&device(dir.path(), "stranger"), NodeConfig::default())
        .await
        .unwrap();
    let err = stranger.join(addr(&hub)).await.unwrap_err();
    assert!(
        matches!(
            err,
            JoinError::Refused {
                code: NackCode::Unauthorized,
                ..
            }
        ),
        "{err}"
    );
    let refused = next_matching(&mut hub_events, |e| {
        matches!(e, NodeEvent::JoinRefused { .. })
    })
    .await;
    assert!(matches!(
        refused,
        NodeEvent::JoinRefused {
            by_peer: false,
            code: NackCode::Unauthorized,
            ..
        }
    ));
    assert!(hub.peers().is_empty());

    let friend = Node::start(&friend, NodeConfig::default()).await.unwrap();
    friend.join(addr(&hub)).await.unwrap();
    assert_eq!(hub.peers().len(), 1);
}

#[tokio::test]
async fn data_flows_and_shutdown_tells_the_peer() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = Node::start(&device(dir.path(), "hub"), listening())
        .await
        .unwrap();
    let mut b = Node::start(&device(dir.path(), "b"), NodeConfig::default())
        .await
        .unwrap();
    let mut b_events = b.subscribe();
    b.join(addr(&hub)).await.unwrap();
    b.send(hub.node_id(), Bytes::from_static(b"ping"))
        .await
        .unwrap();
    let got = hub.recv().await.unwrap();
    assert_eq!((got.from, &got.data[..]), (b.node_id(), &b"ping"[..]));
    hub.send(b.node_id(), Bytes::from_static(b"pong"))
        .await
        .unwrap();
    assert_eq!(&b.recv().await.unwrap().data[..], b"pong");
    let too_big = Bytes::from(vec![0u8; cellmesh::core::wire::MAX_PAYLOAD + 1]);
    assert!(b.send(hub.node_id(), too_big).await.is_err());

    hub.shutdown(Duration::from_secs(2)).await;
    let reason = left_reason(&mut b_events).await;
    assert!(reason.contains("shutting down"), "{reason}");
}

#[tokio::test]
async fn a_socket_that_says_nothing_is_closed_and_limits_hold() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        setup_timeout: Duration::from_millis(300),
        limits: NodeLimits {
            max_unauthenticated: 8,
            max_unauthenticated_per_ip: 1,
            ..NodeLimits::default()
        },
        ..listening()
    };
    let hub = Node::start(&device(dir.path(), "hub"), config)
        .await
        .unwrap();
    let mut events = hub.subscribe();
    // The listener takes connections in the order they were made, and the first one's slot
    // before it takes the next.
    let mut silent = TcpStream::connect(addr(&hub)).await.unwrap();
    // Over the unauthenticated limit for 127.0.0.1: refused, and closed at once.
    let mut second = TcpStream::connect(addr(&hub)).await.unwrap();
    let from = second.local_addr().unwrap();
    let refused = next_matching(&mut events, |e| matches!(e, NodeEvent::Failed { .. })).await;
    assert!(
        matches!(&refused, NodeEvent::Failed { addr, reason } if *addr == from && reason.contains("limit")),
        "{refused:?}"
    );
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), second.read(&mut buf)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "second connection not closed: {n:?}"
    );
    // The silent one is closed at the setup deadline.
    let started = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "silent connection not closed: {n:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // The permit came back: a real node can join now.
    let b = Node::start(&device(dir.path(), "b"), NodeConfig::default())
        .await
        .unwrap();
    b.join(addr(&hub)).await.unwrap();
}

#[tokio::test]
async fn bootstrap_peers_are_joined_on_start_and_unreachable_ones_reported() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Node::start(&device(dir.path(), "hub"), listening())
        .await
        .unwrap();
    // A port nothing listens on: bind, note the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = NodeConfig {
        bootstrap: vec![addr(&hub), dead],
        ..NodeConfig::default()
    };
    let b = Node::start(&device(dir.path(), "b"), config).await.unwrap();
    let mut events = b.subscribe();
    let joined = next_matching(&mut events, |e| matches!(e, NodeEvent::Joined(_))).await;
    assert!(matches!(joined, NodeEvent::Joined(p) if p.node == hub.node_id()));
    let failed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(NodeEvent::Failed { addr, .. }) = events.recv().await {
                return addr;
            }
        }
    })
    .await
    .expect("the unreachable peer is reported");
    assert_eq!(failed, dead);
}

#[tokio::test]
async fn a_node_refuses_a_device_its_home_holds_a_revocation_for() {
    let dir = tempfile::tempdir().unwrap();
    let pass = Passphrase::new("pw".into());
    // One cell on two devices; the first revokes the second.
    let words = cellmesh::new_mnemonic();
    let (laptop, phone) = (
        Home::new(dir.path().join("laptop")),
        Home::new(dir.path().join("phone")),
    );
    laptop.create(&words, "", &pass, FAST, false).unwrap();
    let restored = cellmesh::core::mnemonic::Mnemonic::parse(&words.phrase()).unwrap();
    phone.create(&restored, "", &pass, FAST, false).unwrap();
    let phone_keys = phone.unlock(&pass).unwrap();
    let mut laptop_keys = laptop.unlock(&pass).unwrap();
    let revocation = laptop
        .revoke(&mut laptop_keys, phone_keys.keystore.node, false)
        .unwrap();

    // The hub belongs to another cell and imports the revocation.
    let hub_home = Home::new(dir.path().join("hub"));
    hub_home
        .create(&cellmesh::new_mnemonic(), "", &pass, FAST, false)
        .unwrap();
    hub_home.import_revocation(revocation).unwrap();
    let hub_keys = hub_home.unlock(&pass).unwrap();
    let config = NodeConfig {
        revocations: hub_keys.keystore.revocations(),
        ..listening()
    };
    let hub = Node::start(&hub_keys, config).await.unwrap();

    let phone_node = Node::start(&phone_keys, NodeConfig::default())
        .await
        .unwrap();
    let err = phone_node.join(addr(&hub)).await.unwrap_err();
    assert!(matches!(err, JoinError::Failed { .. }), "{err}");
    assert!(hub.peers().is_empty());
    // The laptop, not revoked, still joins.
    let laptop_node = Node::start(&laptop_keys, NodeConfig::default())
        .await
        .unwrap();
    laptop_node.join(addr(&hub)).await.unwrap();
}

#[tokio::test]
async fn a_full_inbox_pauses_reading_but_not_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    // The hub's inbox has room for one byte of messages.
    let config = NodeConfig {
        inbox_bytes: 1,
        ..listening()
    };
    let mut hub = Node::start(&device(dir.path(), "hub"), config)
        .await
        .unwrap();
    let b = Node::start(&device(dir.path(), "b"), NodeConfig::default())
        .await
        .unwrap();
    let mut b_events = b.subscribe();
    b.join(addr(&hub)).await.unwrap();
    // An empty message (it takes no room), then two of one byte, queued without a pause so
    // that B's driver writes them at once and the hub reads them in one go: it hands the
    // first two to its inbox, which is then full, and keeps the third.
    let link = b.sender(hub.node_id()).unwrap();
    for data in [&b""[..], b"x", b"y"] {
        link.try_send(Bytes::from_static(data)).unwrap();
    }
    // So once the empty one is out of the inbox, the hub has stopped reading; taking it
    // frees no room (this test runs on one thread: the hub's driver went as far as it could
    // before this task runs again).
    assert!(hub.recv().await.unwrap().data.is_empty());
    // The hub's driver for B still takes commands: shutdown's CLOSE reaches B.
    hub.shutdown(Duration::from_secs(2)).await;
    let reason = left_reason(&mut b_events).await;
    assert!(reason.contains("shutting down"), "{reason}");
}

#[tokio::test]
async fn tokens_are_renewed_and_joins_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        token_renewal: Duration::from_millis(100),
        ..listening()
    };
    let hub = Node::start(&device(dir.path(), "hub"), config)
        .await
        .unwrap();
    let first = hub.node_token().fingerprint();
    // Polled (within 5 s): a renewal makes no event.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let later = loop {
        let token = hub.node_token();
        if token.fingerprint() != first {
            break token;
        }
        assert!(tokio::time::Instant::now() < deadline, "never renewed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(later.claims().key, hub.node_id().key());
    let b = Node::start(&device(dir.path(), "b"), NodeConfig::default())
        .await
        .unwrap();
    b.join(addr(&hub)).await.unwrap();
}

#[tokio::test]
async fn join_node_refuses_whoever_else_answers() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Node::start(&device(dir.path(), "hub"), listening())
        .await
        .unwrap();
    let b = Node::start(&device(dir.path(), "b"), NodeConfig::default())
        .await
        .unwrap();
    let other = Node::start(&device(dir.path(), "other"), NodeConfig::default())
        .await
        .unwrap();
    let err = b.join_node(addr(&hub), other.node_id()).await.unwrap_err();
    assert!(err.to_string().contains("expected node"), "{err}");
    assert!(hub.peers().is_empty());
    let peer = b.join_node(addr(&hub), hub.node_id()).await.unwrap();
    assert_eq!(peer.node, hub.node_id());
}

/// The contract a relay's ordered departures rest on: every message a peer sent before its
/// connection ended is in the inbox before the `Left` of that end is sent.
#[tokio::test]
async fn a_peer_s_last_messages_are_in_the_inbox_before_its_departure_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = Node::start(&device(dir.path(), "hub"), listening())
        .await
        .unwrap();
    let mut events = hub.subscribe();
    let b = Node::start(&device(dir.path(), "b"), NodeConfig::default())
        .await
        .unwrap();
    b.join(addr(&hub)).await.unwrap();
    for i in 0..50u32 {
        b.send(hub.node_id(), Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .unwrap();
    }
    b.shutdown(Duration::from_secs(5)).await;
    left_reason(&mut events).await;
    assert_eq!(hub.inbox_len(), 50);
    for i in 0..50u32 {
        let msg = hub.recv().await.unwrap();
        assert_eq!(&msg.data[..], &i.to_be_bytes());
    }
    assert_eq!(hub.inbox_len(), 0);
}
