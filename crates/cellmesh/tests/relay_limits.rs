//! What a relay bounds against its own users: announcements, registrations, connection slots,
//! joins and LOOKUPs, over real TCP on loopback.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellmesh::core::keys::KeyPair;
use cellmesh::core::limits::Rate;
use cellmesh::core::mnemonic::CellSecrets;
use cellmesh::home::Unlocked;
use cellmesh::mailbox::{Mailbox, MailboxConfig, Status};
use cellmesh::node::{Node, NodeConfig};
use cellmesh::relay::{Relay, RelayConfig, RelayEvent};
use common::{device, recv, tap};
use rand_core::{OsRng, RngCore as _};

mod common;

/// Gives `keys` a new cell and a new device: a fresh identity, as cheaply as a test can make
/// one (no keystore on disk).
fn fresh_identity(keys: &mut Unlocked) {
    let mut seed = [0u8; 64];
    OsRng.fill_bytes(&mut seed);
    keys.secrets.cell = CellSecrets::from_bip39_seed(&seed);
    keys.secrets.node = KeyPair::generate(&mut OsRng);
}

async fn mailbox(unlocked: &Unlocked, relay: SocketAddr) -> Mailbox {
    let mut config = MailboxConfig::new(relay);
    config.ack_timeout = Duration::from_secs(5);
    Mailbox::connect(unlocked, config).await.unwrap()
}

async fn start_relay(dir: &Path, config: impl FnOnce(&mut RelayConfig)) -> Relay {
    let mut c = RelayConfig::new(vec!["127.0.0.1:0".parse().unwrap()], dir.join("data"));
    config(&mut c);
    Relay::start(&device(dir, "relay"), c).await.unwrap()
}

/// Finding 6 of issue 10: every join made the relay send UPDATE to every connected device, and
/// devices close a link past 256 UPDATEs in a burst (then 20 a second). So 300 fresh
/// identities joining knocked every device off the relay, and told every user of every join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_joins_leave_a_mailbox_connected_and_told_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // The joins all come from 127.0.0.1: the per-address limits must let them in.
    let relay = start_relay(dir.path(), |c| {
        c.node.join_rate_per_ip = Rate::UNLIMITED;
        c.node.join_rate = Rate::UNLIMITED;
        c.node.max_joined_per_ip = 1000;
    })
    .await;
    let addr = relay.local_addrs()[0];
    let mut events = relay.subscribe();
    // What the relay sends the watched mailbox crosses this tap.
    let down = Arc::new(Mutex::new(Vec::new()));
    let tapped = tap(addr, Arc::new(Mutex::new(Vec::new())), Arc::clone(&down)).await;
    let mut watched = mailbox(&device(dir.path(), "watched"), tapped).await;
    let other = mailbox(&device(dir.path(), "other"), addr).await;
    // Both registered, and the watched one's directory entry known to the other.
    other.lookup(watched.cell()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = down.lock().unwrap().len();

    // 300 fresh identities, eight joins at a time (the relay admits eight connections from one
    // address before they have joined), each staying joined.
    let started = Instant::now();
    let mut keys = device(dir.path(), "template");
    let mut joined = Vec::new();
    while joined.len() < 300 {
        let mut wave = Vec::new();
        for _ in 0..8.min(300 - joined.len()) {
            fresh_identity(&mut keys);
            let node = Node::start(&keys, NodeConfig::default()).await.unwrap();
            wave.push(tokio::spawn(
                async move { node.join(addr).await.map(|_| node) },
            ));
        }
        for j in wave {
            joined.push(j.await.unwrap().expect("joined"));
        }
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let grew = down.lock().unwrap().len() - before;
    // An UPDATE carries two tokens, hundreds of bytes; a keepalive is a few dozen.
    assert!(
        grew < 100,
        "the relay sent the watched mailbox {grew} bytes while {} devices joined in {took:?}",
        joined.len()
    );
    while let Ok(ev) = events.try_recv() {
        if let RelayEvent::Offline { node } = ev {
            assert_ne!(node, watched.node(), "the watched mailbox was knocked off");
        }
    }
    let sent = other
        .send(watched.cell(), Bytes::from_static(b"still there?"))
        .await
        .unwrap();
    assert_eq!(sent.status, Status::Delivered);
    assert_eq!(recv(&mut watched).await.body, &b"still there?"[..]);
    for n in joined {
        n.shutdown(Duration::from_millis(100)).await;
    }
}
