//! WebSocket on a relay's listener over real TCP on loopback: mailboxes over `ws://` and
//! `wss://` talk with mailboxes over plain TCP and TLS on the same port, a WebSocket client of
//! a listener without WebSocket fails quickly and clearly, and a WebSocket peer that breaks
//! the rules (text, oversized messages, a handshake that never ends) is disconnected. The
//! link inside (Noise, tokens, end-to-end envelopes) is the one of tests/relay.rs.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellmesh::home::Unlocked;
use cellmesh::mailbox::{Mailbox, MailboxError, Status};
use cellmesh::node::{JoinError, Node, NodeConfig, NodeLimits, Transport};
use cellmesh::relay::{Relay, RelayConfig};
use cellmesh::tls::ServerName;
use cellmesh::ws::{MAX_INCOMING_MESSAGE, WsRequest};
use common::{connect, device, failure, flood_both_ways, recv, self_signed, tap};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

mod common;

/// `ws://127.0.0.1:PORT/`.
fn ws_to(addr: SocketAddr) -> Transport {
    Transport::WebSocket {
        request: WsRequest::new("127.0.0.1", Some(addr.port()), "/").unwrap(),
        tls: None,
    }
}

/// `wss://localhost:PORT/cellmesh`, trusting `ca`.
fn wss_to(addr: SocketAddr, ca: &Path) -> Transport {
    Transport::WebSocket {
        request: WsRequest::new("localhost", Some(addr.port()), "/cellmesh").unwrap(),
        tls: Some((
            ServerName::try_from("localhost").unwrap(),
            cellmesh::tls::client_config(Some(ca)).unwrap(),
        )),
    }
}

fn tls_to(ca: &Path) -> Transport {
    Transport::Tls {
        server_name: ServerName::try_from("localhost").unwrap(),
        config: cellmesh::tls::client_config(Some(ca)).unwrap(),
    }
}

async fn relay(unlocked: &Unlocked, dir: &Path, tls: Option<(&Path, &Path)>, ws: bool) -> Relay {
    let mut config = RelayConfig::new(vec!["127.0.0.1:0".parse().unwrap()], dir.join("data"));
    config.tls = tls.map(|(cert, key)| cellmesh::tls::server_config(cert, key).unwrap());
    config.node.websocket = ws;
    Relay::start(unlocked, config).await.unwrap()
}

/// One message each way, then many from `a` to `b`, from a few bytes to several WebSocket
/// messages each: all arrive intact and are acknowledged.
async fn exchange(a: &mut Mailbox, b: &mut Mailbox, greeting: &'static [u8]) {
    // Delivered means the recipient's application took it: it receives meanwhile.
    let (a_cell, b_cell) = (a.cell(), b.cell());
    let (sent, m) = tokio::join!(a.send(b_cell, Bytes::from_static(greeting)), recv(b));
    assert_eq!(sent.unwrap().status, Status::Delivered);
    assert_eq!((m.body.as_ref(), m.from_cell), (greeting, a_cell));
    let (back, m) = tokio::join!(b.send(a_cell, Bytes::from_static(b"and back")), recv(a));
    assert_eq!(back.unwrap().status, Status::Delivered);
    assert_eq!(m.body, &b"and back"[..]);

    const N: usize = 40;
    let size = |i: usize| 100 + 15_000 * i;
    let mut tickets = Vec::new();
    for i in 0..N {
        let body = Bytes::from(vec![i as u8; size(i)]);
        tickets.push(a.submit(b.cell(), body).await.unwrap());
    }
    let mut sizes = Vec::new();
    for _ in 0..N {
        let m = recv(b).await;
        assert!(m.body.iter().all(|&x| x == m.body[0]), "body intact");
        sizes.push(m.body.len());
    }
    sizes.sort_unstable();
    assert_eq!(sizes, (0..N).map(size).collect::<Vec<_>>());
    for t in tickets {
        assert_eq!(t.await.unwrap().status, Status::Delivered);
    }
}

#[tokio::test]
async fn a_mailbox_over_websocket_talks_with_one_over_plain_tcp_on_the_same_port() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&device(dir.path(), "relay"), dir.path(), None, true).await;
    let addr = relay.local_addrs()[0];
    let (up, down) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
    );
    let tapped = tap(addr, Arc::clone(&up), Arc::clone(&down)).await;
    let (alice, bob) = (device(dir.path(), "alice"), device(dir.path(), "bob"));
    let mut a = connect(&alice, tapped, ws_to(addr)).await.unwrap();
    let mut b = connect(&bob, addr, Transport::Tcp).await.unwrap();
    assert_eq!(a.relay_node(), relay.node_id());

    exchange(&mut a, &mut b, b"hello over websocket").await;
    a.close().await;
    b.close().await;
    relay.shutdown().await;

    // What crossed alice's socket was an HTTP upgrade, then WebSocket frames.
    let up = up.lock().unwrap().clone();
    let down = down.lock().unwrap().clone();
    assert!(up.starts_with(b"GET / HTTP/1.1\r\n"), "{:?}", &up[..16]);
    assert!(
        down.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"),
        "{:?}",
        &down[..32.min(down.len())]
    );
}

#[tokio::test]
async fn a_mailbox_over_wss_talks_with_one_over_tls_on_the_same_port() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let relay = relay(
        &device(dir.path(), "relay"),
        dir.path(),
        Some((&cert, &key)),
        true,
    )
    .await;
    let addr = relay.local_addrs()[0];
    let (alice, bob) = (device(dir.path(), "alice"), device(dir.path(), "bob"));
    let mut a = connect(&alice, addr, wss_to(addr, &cert)).await.unwrap();
    let mut b = connect(&bob, addr, tls_to(&cert)).await.unwrap();
    exchange(&mut a, &mut b, b"hello over wss").await;

    // The certificate is checked under WebSocket as under TLS.
    let carol = device(dir.path(), "carol");
    let untrusted = Transport::WebSocket {
        request: WsRequest::new("localhost", None, "/").unwrap(),
        tls: Some((
            ServerName::try_from("localhost").unwrap(),
            cellmesh::tls::client_config(None).unwrap(),
        )),
    };
    let err = connect(&carol, addr, untrusted).await.unwrap_err();
    assert!(
        matches!(&err, MailboxError::Relay(JoinError::Tls { .. })),
        "{err}"
    );
    a.close().await;
    b.close().await;
    relay.shutdown().await;
}

#[tokio::test]
async fn websocket_to_a_listener_without_it_fails_fast_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let plain = relay(&device(dir.path(), "plain"), dir.path(), None, false).await;
    let dir2 = tempfile::tempdir().unwrap();
    let tls = relay(
        &device(dir2.path(), "tls"),
        dir2.path(),
        Some((&cert, &key)),
        false,
    )
    .await;
    let alice = device(dir.path(), "alice");
    let started = Instant::now();
    for (addr, transport) in [
        (plain.local_addrs()[0], ws_to(plain.local_addrs()[0])),
        (tls.local_addrs()[0], wss_to(tls.local_addrs()[0], &cert)),
    ] {
        let err = connect(&alice, addr, transport).await.unwrap_err();
        let MailboxError::Relay(JoinError::WebSocket { status, reason, .. }) = &err else {
            panic!("{err}");
        };
        assert_eq!(*status, None);
        assert!(reason.contains("does not speak WebSocket"), "{reason}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failures are prompt, not timeouts: {:?}",
        started.elapsed()
    );
    // Both relays still serve their own kind of client.
    assert!(
        connect(&alice, plain.local_addrs()[0], Transport::Tcp)
            .await
            .is_ok()
    );
    plain.shutdown().await;
    tls.shutdown().await;
}

#[tokio::test]
async fn an_upgrade_refused_with_an_http_status_reports_it() {
    // An HTTP server that answers every request with 404, as a reverse proxy would for a
    // path it does not route.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0);
            seen.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let client = Node::start(&device(dir.path(), "client"), NodeConfig::default())
        .await
        .unwrap();
    let err = client
        .join_with(addr, &ws_to(addr), None)
        .await
        .unwrap_err();
    let JoinError::WebSocket { status, reason, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(*status, Some(404));
    assert!(reason.contains("HTTP 404 Not Found"), "{reason}");
}

#[tokio::test]
async fn a_websocket_peer_that_sends_text_or_an_oversized_message_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        websocket: true,
        ..NodeConfig::default()
    };
    let hub = Node::start(&device(dir.path(), "hub"), config)
        .await
        .unwrap();
    let mut events = hub.subscribe();
    let addr = hub.local_addrs()[0];
    let url = format!("ws://{addr}/");
    // The rude peer's own limit must not stop it from sending the oversized message.
    let loose = WebSocketConfig::default().max_message_size(None);

    for (what, message, expected) in [
        ("text", Message::text("hello"), "text WebSocket message"),
        (
            "oversized",
            Message::binary(vec![0u8; MAX_INCOMING_MESSAGE + 1]),
            "over the limit",
        ),
    ] {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(&url, tcp, Some(loose))
            .await
            .unwrap();
        // The send may fail once the hub has hung up part way through a large message.
        let _ = ws.send(message).await;
        let reason = failure(&mut events).await;
        assert!(reason.contains(expected), "{what}: {reason}");
        // The hub closed the connection: a Close, then the end (or an error for a peer that
        // was still writing).
        let ended = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "{what}: the hub closed the connection");
    }

    // A well-behaved WebSocket client still joins.
    let client = Node::start(&device(dir.path(), "client"), NodeConfig::default())
        .await
        .unwrap();
    let peer = client.join_with(addr, &ws_to(addr), None).await.unwrap();
    assert_eq!(peer.node, hub.node_id());
}

#[tokio::test]
async fn telling_websocket_apart_holds_an_unauthenticated_slot_within_the_setup_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        websocket: true,
        limits: NodeLimits {
            max_unauthenticated_per_ip: 1,
            ..NodeLimits::default()
        },
        setup_timeout: Duration::from_millis(700),
        ..NodeConfig::default()
    };
    let hub = Node::start(&device(dir.path(), "hub"), config)
        .await
        .unwrap();
    let mut events = hub.subscribe();
    let addr = hub.local_addrs()[0];
    let client = Node::start(&device(dir.path(), "client"), NodeConfig::default())
        .await
        .unwrap();

    // A connection that sends nothing takes 127.0.0.1's one slot (the listener takes
    // connections in the order they were made, each one's slot before the next) ...
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let err = client
        .join_with(addr, &ws_to(addr), None)
        .await
        .unwrap_err();
    assert!(!matches!(err, JoinError::Connect { .. }), "{err}");
    let refused = failure(&mut events).await;
    assert!(refused.contains("limit"), "{refused}");
    // ... until the setup deadline ends it, which frees the slot.
    let timed_out = failure(&mut events).await;
    assert!(timed_out.contains("opening bytes"), "{timed_out}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(2), silent.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the silent connection was closed");

    // An upgrade request that never ends, sent a byte at a time (slowly: that is the
    // attack).
    let mut slow = TcpStream::connect(addr).await.unwrap();
    for b in b"GET / HT" {
        slow.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let timed_out = failure(&mut events).await;
    assert!(
        timed_out.contains("WebSocket handshake timed out"),
        "{timed_out}"
    );

    // An HTTP request that is not an upgrade is a failed connection, reported as such.
    let mut http = TcpStream::connect(addr).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let reason = failure(&mut events).await;
    assert!(reason.contains("WebSocket handshake failed"), "{reason}");

    // Then plain links and WebSocket both still join.
    let peer = client.join_with(addr, &ws_to(addr), None).await.unwrap();
    assert_eq!(peer.node, hub.node_id());
    let other = Node::start(&device(dir.path(), "other"), NodeConfig::default())
        .await
        .unwrap();
    assert_eq!(other.join(addr).await.unwrap().node, hub.node_id());
}

#[tokio::test]
async fn two_nodes_both_sending_bulk_over_websocket_lose_nothing_and_do_not_stall() {
    let dir = tempfile::tempdir().unwrap();
    bulk(dir.path(), None).await;
}

#[tokio::test]
async fn two_nodes_both_sending_bulk_over_wss_lose_nothing_and_do_not_stall() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    bulk(dir.path(), Some((&cert, &key))).await;
}

/// Both nodes write far more than the socket buffers hold while the other does not read (its
/// inbox is full), in messages from a byte to several WebSocket messages: tungstenite keeps
/// what the socket did not take, and the driver must flush it once it has nothing more to
/// write.
async fn bulk(dir: &Path, tls: Option<(&Path, &Path)>) {
    let config = NodeConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        tls: tls.map(|(cert, key)| cellmesh::tls::server_config(cert, key).unwrap()),
        websocket: true,
        inbox_capacity: 2,
        ..NodeConfig::default()
    };
    let mut hub = Node::start(&device(dir, "hub"), config).await.unwrap();
    let small_inbox = NodeConfig {
        inbox_capacity: 2,
        ..NodeConfig::default()
    };
    let mut client = Node::start(&device(dir, "client"), small_inbox)
        .await
        .unwrap();
    let addr = hub.local_addrs()[0];
    let transport = match tls {
        None => ws_to(addr),
        Some((cert, _)) => wss_to(addr, cert),
    };
    let peer = client.join_with(addr, &transport, None).await.unwrap();
    flood_both_ways(&mut hub, &mut client, peer.node, 200, 600_000).await;
}
