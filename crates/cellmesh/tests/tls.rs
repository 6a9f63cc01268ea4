//! TLS on a relay's listener over real TCP on loopback: mailboxes talk through it, a client
//! that does not trust the certificate is refused quickly, and what crosses the socket is TLS
//! records only. The link inside (Noise, tokens, end-to-end envelopes) is the one of
//! tests/relay.rs.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellmesh::home::Unlocked;
use cellmesh::mailbox::{MailboxError, Status};
use cellmesh::node::{JoinError, Node, NodeConfig, NodeLimits, Transport};
use cellmesh::relay::{Relay, RelayConfig};
use cellmesh::tls::{ServerName, TlsFailure};
use common::{connect, device, failure, flood_both_ways, recv, self_signed, tap};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

mod common;

/// TLS to `name`, trusting the web roots and `ca` when given.
fn tls_to(name: &str, ca: Option<&Path>) -> Transport {
    Transport::Tls {
        server_name: ServerName::try_from(name.to_string()).unwrap(),
        config: cellmesh::tls::client_config(ca).unwrap(),
    }
}

async fn tls_relay(unlocked: &Unlocked, dir: &Path, cert: &Path, key: &Path) -> Relay {
    let mut config = RelayConfig::new(vec!["127.0.0.1:0".parse().unwrap()], dir.join("data"));
    config.tls = Some(cellmesh::tls::server_config(cert, key).unwrap());
    Relay::start(unlocked, config).await.unwrap()
}

#[tokio::test]
async fn two_mailboxes_talk_both_ways_through_a_relay_behind_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let relay = tls_relay(&device(dir.path(), "relay"), dir.path(), &cert, &key).await;
    let addr = relay.local_addrs()[0];
    let (alice, bob) = (device(dir.path(), "alice"), device(dir.path(), "bob"));
    // One by name, one by IP address: the certificate is valid for both.
    let mut a = connect(&alice, addr, tls_to("localhost", Some(&cert)))
        .await
        .unwrap();
    let mut b = connect(&bob, addr, tls_to("127.0.0.1", Some(&cert)))
        .await
        .unwrap();
    assert_eq!(a.relay_node(), relay.node_id());

    // Delivered means the recipient's application took it: it receives meanwhile.
    let (a_cell, b_cell) = (a.cell(), b.cell());
    let (sent, m) = tokio::join!(
        a.send(b_cell, Bytes::from_static(b"hello over tls")),
        recv(&mut b)
    );
    assert_eq!(sent.unwrap().status, Status::Delivered);
    assert_eq!(
        (m.body.as_ref(), m.from_cell),
        (&b"hello over tls"[..], a_cell)
    );
    let (back, m) = tokio::join!(
        b.send(a_cell, Bytes::from_static(b"and back")),
        recv(&mut a)
    );
    assert_eq!(back.unwrap().status, Status::Delivered);
    assert_eq!(m.body, &b"and back"[..]);

    // Many in flight, and messages larger than a TLS record (16 KiB), all arrive intact.
    // (Bob reads as they come: a device acknowledges only what its application took.)
    let mut tickets = Vec::new();
    for i in 0..100u32 {
        let body = Bytes::from(vec![i as u8; 100 + 1000 * i as usize]);
        tickets.push(a.submit(b.cell(), body).await.unwrap());
    }
    let mut sizes = Vec::new();
    for _ in 0..100 {
        let m = recv(&mut b).await;
        assert!(m.body.iter().all(|&x| x == m.body[0]), "body intact");
        sizes.push(m.body.len());
    }
    sizes.sort_unstable();
    assert_eq!(sizes, (0..100).map(|i| 100 + 1000 * i).collect::<Vec<_>>());
    for t in tickets {
        assert_eq!(t.await.unwrap().status, Status::Delivered);
    }
    a.close().await;
    b.close().await;
    relay.shutdown().await;
}

#[tokio::test]
async fn clients_that_do_not_trust_the_certificate_or_do_not_speak_tls_fail_fast() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let relay = tls_relay(&device(dir.path(), "relay"), dir.path(), &cert, &key).await;
    let addr = relay.local_addrs()[0];
    let alice = device(dir.path(), "alice");
    let started = Instant::now();

    // The web roots alone do not vouch for a self-signed certificate.
    let err = connect(&alice, addr, tls_to("localhost", None))
        .await
        .unwrap_err();
    assert_certificate_refused(&err);
    // Trusted, but not for this name.
    let err = connect(&alice, addr, tls_to("relay.example.org", Some(&cert)))
        .await
        .unwrap_err();
    assert_certificate_refused(&err);
    // Plain TCP to a TLS listener: the relay answers the link's first message with a TLS
    // alert, which the link refuses.
    let err = connect(&alice, addr, Transport::Tcp).await.unwrap_err();
    assert!(
        matches!(&err, MailboxError::Relay(JoinError::Failed { .. })),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failures are prompt, not timeouts: {:?}",
        started.elapsed()
    );
    // The relay is still fine for a client that trusts it.
    let ok = connect(&alice, addr, tls_to("localhost", Some(&cert))).await;
    assert!(ok.is_ok(), "{:?}", ok.err());
    relay.shutdown().await;
}

#[tokio::test]
async fn a_tls_handshake_holds_an_unauthenticated_slot_and_times_out_with_the_setup_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let config = NodeConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        tls: Some(cellmesh::tls::server_config(&cert, &key).unwrap()),
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

    // A connection that never starts its TLS handshake takes 127.0.0.1's one slot (the
    // listener takes connections in the order they were made, each one's slot before the
    // next) ...
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let err = client
        .join_with(addr, &tls_to("localhost", Some(&cert)), None)
        .await
        .unwrap_err();
    assert!(!matches!(err, JoinError::Connect { .. }), "{err}");
    let refused = failure(&mut events).await;
    assert!(refused.contains("limit"), "{refused}");
    // ... until the setup deadline ends it, which frees the slot.
    let timed_out = failure(&mut events).await;
    assert!(timed_out.contains("TLS handshake timed out"), "{timed_out}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(2), silent.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the silent connection was closed");
    let peer = client
        .join_with(addr, &tls_to("localhost", Some(&cert)), None)
        .await
        .unwrap();
    assert_eq!(peer.node, hub.node_id());

    // A client that is not TLS at all is a failed connection, reported as such.
    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let reason = failure(&mut events).await;
    assert!(reason.contains("TLS handshake failed"), "{reason}");
}

#[tokio::test]
async fn two_nodes_both_sending_bulk_over_tls_lose_nothing_and_do_not_stall() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let config = NodeConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        tls: Some(cellmesh::tls::server_config(&cert, &key).unwrap()),
        inbox_capacity: 2,
        ..NodeConfig::default()
    };
    let mut hub = Node::start(&device(dir.path(), "hub"), config)
        .await
        .unwrap();
    let small_inbox = NodeConfig {
        inbox_capacity: 2,
        ..NodeConfig::default()
    };
    let mut client = Node::start(&device(dir.path(), "client"), small_inbox)
        .await
        .unwrap();
    let addr = hub.local_addrs()[0];
    let peer = client
        .join_with(addr, &tls_to("localhost", Some(&cert)), None)
        .await
        .unwrap();
    // Both write far more than the socket buffers hold while the other does not read (its
    // inbox is full), in messages from a byte to many TLS records: rustls keeps what the
    // socket did not take, and the driver must flush it once it has nothing more to write.
    flood_both_ways(&mut hub, &mut client, peer.node, 300, 200_000).await;
}

#[tokio::test]
async fn only_tls_records_cross_the_socket_and_never_the_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let relay = tls_relay(&device(dir.path(), "relay"), dir.path(), &cert, &key).await;
    let up = Arc::new(Mutex::new(Vec::new()));
    let down = Arc::new(Mutex::new(Vec::new()));
    let tapped = tap(relay.local_addrs()[0], Arc::clone(&up), Arc::clone(&down)).await;
    let (alice, bob) = (device(dir.path(), "alice"), device(dir.path(), "bob"));
    let a = connect(&alice, tapped, tls_to("localhost", Some(&cert)))
        .await
        .unwrap();
    let mut b = connect(
        &bob,
        relay.local_addrs()[0],
        tls_to("localhost", Some(&cert)),
    )
    .await
    .unwrap();

    let secret = b"the eagle lands at dawn, bring 3 umbrellas";
    let to = b.cell();
    let (sent, m) = tokio::join!(a.send(to, Bytes::from_static(secret)), recv(&mut b));
    assert_eq!(sent.unwrap().status, Status::Delivered);
    assert_eq!(m.body, &secret[..]);
    a.close().await;
    b.close().await;
    relay.shutdown().await;

    for (what, seen) in [("client to relay", &up), ("relay to client", &down)] {
        let wire = seen.lock().unwrap().clone();
        assert!(wire.len() > 500, "{what}: the tap saw the traffic");
        assert_eq!(
            &wire[..2],
            [0x16, 0x03],
            "{what}: starts with a TLS handshake record"
        );
        let kinds = tls_records(&wire).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            kinds.contains(&0x17),
            "{what}: application data records ({kinds:?})"
        );
        let needle = &secret[..16];
        assert!(
            !wire.windows(needle.len()).any(|w| w == needle),
            "{what}: plaintext crossed the socket"
        );
    }
}

/// The content types of the TLS records `wire` is made of, or why it is not a sequence of
/// whole TLS records.
fn tls_records(mut wire: &[u8]) -> Result<Vec<u8>, String> {
    let mut kinds = Vec::new();
    while !wire.is_empty() {
        let [kind, major, _minor, hi, lo, ..] = *wire else {
            return Err(format!("{} bytes left: not a record header", wire.len()));
        };
        if !(0x14..=0x17).contains(&kind) || major != 0x03 {
            return Err(format!("not a TLS record: {:02x?}", &wire[..5]));
        }
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len > (1 << 14) + 256 || wire.len() < 5 + len {
            return Err(format!("bad record length {len}"));
        }
        kinds.push(kind);
        wire = &wire[5 + len..];
    }
    Ok(kinds)
}

/// The relay's certificate was refused (not trusted, or not for the name asked).
fn assert_certificate_refused(err: &MailboxError) {
    assert!(
        matches!(
            err,
            MailboxError::Relay(JoinError::Tls {
                failure: TlsFailure::Certificate,
                ..
            })
        ),
        "{err}"
    );
}
