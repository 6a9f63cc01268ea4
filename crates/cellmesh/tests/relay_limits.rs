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
use cellmesh::core::relay::{MsgId, Record, RefuseCode};
use cellmesh::core::wire::NackCode;
use cellmesh::home::Unlocked;
use cellmesh::mailbox::{Mailbox, MailboxConfig, Status};
use cellmesh::node::{JoinError, Node, NodeConfig, NodeEvent};
use cellmesh::relay::{Relay, RelayConfig, RelayEvent};
use common::{RawDevice, device, offline, recv, registered, tap};
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
        c.node.limits.join_rate_per_ip = Rate::UNLIMITED;
        c.node.limits.join_rate = Rate::UNLIMITED;
        c.node.limits.max_joined_per_ip = 1000;
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
    // How many bytes the relay's answer to the watched mailbox's LOOKUP takes on its link.
    // Asked again after the joins, the same answer comes down that link after whatever the
    // relay sent it for them (both wait in the link's one queue).
    let down_len = || down.lock().unwrap().len();
    let at = down_len();
    watched.lookup(other.cell()).await.unwrap();
    let answer = down_len() - at;
    let before = down_len();

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
    watched
        .lookup(other.cell())
        .await
        .expect("the watched mailbox is still there");

    let grew = (down_len() - before).saturating_sub(answer);
    // An UPDATE carries two tokens, hundreds of bytes; a keepalive is a few dozen.
    assert!(
        grew < 100,
        "the relay sent the watched mailbox {grew} bytes (beyond a {answer}-byte answer) while \
         {} devices joined in {took:?}",
        joined.len()
    );
    while let Ok(ev) = events.try_recv() {
        if let RelayEvent::Offline { node } = ev {
            assert_ne!(node, watched.node(), "the watched mailbox was knocked off");
        }
    }
    let to = watched.cell();
    let (sent, got) = tokio::join!(
        other.send(to, Bytes::from_static(b"still there?")),
        recv(&mut watched)
    );
    assert_eq!(sent.unwrap().status, Status::Delivered);
    assert_eq!(got.body, &b"still there?"[..]);
    for n in joined {
        n.shutdown(Duration::from_millis(100)).await;
    }
}

/// A node of `keys` (no listener) joined to `relay`, or the join's error.
async fn try_join(keys: &Unlocked, relay: SocketAddr) -> Result<Node, JoinError> {
    let node = Node::start(keys, NodeConfig::default()).await.unwrap();
    node.join(relay).await.map(|_| node)
}

fn busy(r: &Result<Node, JoinError>) -> bool {
    matches!(
        r,
        Err(JoinError::Refused {
            code: NackCode::Busy,
            ..
        })
    )
}

/// Makes `keys` another device of its cell.
fn sibling(keys: &mut Unlocked) {
    keys.secrets.node = KeyPair::generate(&mut OsRng);
}

/// A relay config that lets every join from loopback through the rates and the address cap,
/// for the tests of the other limits.
fn open_doors(c: &mut RelayConfig) {
    c.node.limits.join_rate_per_ip = Rate::UNLIMITED;
    c.node.limits.join_rate = Rate::UNLIMITED;
    c.node.limits.max_joined_per_ip = 10_000;
}

async fn stop_all(nodes: Vec<Node>) {
    for n in nodes {
        n.shutdown(Duration::from_millis(50)).await;
    }
}

/// Issue 10, finding 8: every join with a fresh node key added a permanent registration. A
/// cell now registers at most 64 devices (as many as a DIRECTORY lists), with the default
/// configuration; a registered device still gets in, and other cells are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_registers_at_most_sixty_four_devices() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), open_doors).await;
    let addr = relay.local_addrs()[0];
    let mut keys = device(dir.path(), "cell");
    let first = keys.secrets.dangerous_clone();
    let mut nodes = vec![try_join(&keys, addr).await.expect("room in the cell")];
    for _ in 1..64 {
        sibling(&mut keys);
        nodes.push(try_join(&keys, addr).await.expect("room in the cell"));
    }
    sibling(&mut keys);
    let refused = try_join(&keys, addr).await;
    assert!(busy(&refused), "the 65th device: {:?}", refused.err());
    // The first device, gone and back, is registered: it gets in.
    nodes.remove(0).shutdown(Duration::from_millis(100)).await;
    keys.secrets = first;
    nodes.push(try_join(&keys, addr).await.expect("a registered device"));
    let mut other = device(dir.path(), "other");
    fresh_identity(&mut other);
    nodes.push(try_join(&other, addr).await.expect("another cell"));
    stop_all(nodes).await;
}

/// The relay as a whole registers at most `registrations.total` devices.
#[tokio::test]
async fn the_relay_registers_at_most_its_total_of_devices() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), |c| {
        open_doors(c);
        c.registrations.total = 3;
    })
    .await;
    let addr = relay.local_addrs()[0];
    let mut keys = device(dir.path(), "template");
    let mut nodes = Vec::new();
    let mut third = None;
    for _ in 0..3 {
        fresh_identity(&mut keys);
        third = Some(keys.secrets.dangerous_clone());
        nodes.push(try_join(&keys, addr).await.unwrap());
    }
    fresh_identity(&mut keys);
    let refused = try_join(&keys, addr).await;
    assert!(busy(&refused), "{:?}", refused.err());
    // A registered device gets in again, even while its old connection is still open.
    keys.secrets = third.unwrap();
    nodes.push(try_join(&keys, addr).await.expect("registered"));
    stop_all(nodes).await;
}

/// Joined connections are capped per cell and per address (an IPv4 address here; an IPv6
/// /64 counts as one address, see the namespace test below). A device already joined gets
/// in again: its new connection replaces the old.
#[tokio::test]
async fn joined_connections_are_capped_per_cell_and_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), |c| {
        open_doors(c);
        c.node.limits.max_joined_per_cell = 2;
        c.node.limits.max_joined_per_ip = 3;
    })
    .await;
    let addr = relay.local_addrs()[0];
    let mut events = relay.subscribe();
    let mut keys = device(dir.path(), "cell");
    let first = keys.secrets.dangerous_clone();
    let mut nodes = vec![try_join(&keys, addr).await.unwrap()];
    let mut replaced = nodes[0].subscribe();
    sibling(&mut keys);
    nodes.push(try_join(&keys, addr).await.unwrap());
    let second = nodes[1].node_id();
    sibling(&mut keys);
    let refused = try_join(&keys, addr).await;
    assert!(busy(&refused), "a third of the cell: {:?}", refused.err());
    keys.secrets = first;
    nodes.push(try_join(&keys, addr).await.expect("a device joining again"));
    let reason = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(NodeEvent::Left { reason, .. }) = replaced.recv().await {
                return reason;
            }
        }
    })
    .await
    .expect("the old connection was closed");
    assert!(reason.contains("replaced"), "{reason}");
    // Two of the cell and one more from 127.0.0.1: the address is full. The old connection
    // gives its slot back as its driver ends, a moment after it said so to the device, and
    // nothing tells when: polled.
    let mut other = device(dir.path(), "other");
    let deadline = Instant::now() + Duration::from_secs(5);
    let third = loop {
        let joined = try_join(&other, addr).await;
        if !busy(&joined) || Instant::now() > deadline {
            break joined;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    nodes.push(third.expect("the third from this address"));
    fresh_identity(&mut other);
    let refused = try_join(&other, addr).await;
    assert!(
        busy(&refused),
        "a fourth from this address: {:?}",
        refused.err()
    );
    // Room again once one leaves (the second device: the first's old connection was
    // replaced already). The relay handles a departure a moment after the connection ended
    // and gave its slot back.
    nodes.remove(1).shutdown(Duration::from_millis(100)).await;
    offline(&mut events, second).await;
    nodes.push(try_join(&other, addr).await.expect("room again"));
    stop_all(nodes).await;
}

/// Joins are rate-limited per address: with the default configuration, 100 at once from one
/// address, then 20 a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_from_one_address_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), |_| {}).await;
    let addr = relay.local_addrs()[0];
    let mut keys = device(dir.path(), "template");
    let mut nodes = Vec::new();
    let started = Instant::now();
    let refused_at = loop {
        fresh_identity(&mut keys);
        let joined = try_join(&keys, addr).await;
        if busy(&joined) {
            break nodes.len();
        }
        nodes.push(joined.unwrap());
        assert!(
            nodes.len() < 400,
            "400 joins from one address in {:?}",
            started.elapsed()
        );
    };
    let took = started.elapsed().as_secs_f64();
    assert!(
        refused_at >= 100 && (refused_at as f64) <= 100.0 + 20.0 * took + 2.0,
        "refused after {refused_at} joins in {took:.2} s"
    );
    // The bucket refills: a join gets in a moment later (time passing is what this waits
    // for: a token every 50 ms).
    tokio::time::sleep(Duration::from_millis(200)).await;
    nodes.push(try_join(&keys, addr).await.expect("a token again"));
    stop_all(nodes).await;
}

/// A registration not seen for its time to live is dropped with its queue: the device is
/// unknown again, and out of the directory.
#[tokio::test]
async fn registrations_expire_with_their_queues() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), |c| c.registrations.ttl_secs = 2).await;
    let addr = relay.local_addrs()[0];
    let mut events = relay.subscribe();
    let gone = device(dir.path(), "gone");
    let stays = device(dir.path(), "stays");
    let gone_node = try_join(&gone, addr).await.unwrap();
    let gone_id = gone_node.node_id();
    let gone_cell = gone_node.cell();
    // Online at the relay (it takes the join in a moment after the device has it)...
    registered(&mut events, gone_id).await;
    gone_node.shutdown(Duration::from_millis(100)).await;
    // ... then offline (it handles a departure a moment after the link closes).
    offline(&mut events, gone_id).await;
    let m = mailbox(&stays, addr).await;
    // Queued for it while it is away.
    let mut raw = RawDevice::join(&device(dir.path(), "raw"), addr).await;
    raw.send(&[Record::Forward {
        to: gone_id,
        id: MsgId([7; 16]),
        envelope: Bytes::from_static(b"for later"),
    }])
    .await;
    assert!(matches!(
        raw.next().await,
        Record::Accepted {
            status: cellmesh::core::relay::Accepted::Queued,
            ..
        }
    ));
    let expired = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(RelayEvent::Expired { devices, messages }) = events.recv().await {
                return (devices, messages);
            }
        }
    })
    .await
    .expect("registrations swept");
    assert_eq!(expired, (1, 1), "the away device and its queued envelope");
    raw.send(&[Record::Forward {
        to: gone_id,
        id: MsgId([8; 16]),
        envelope: Bytes::from_static(b"too late"),
    }])
    .await;
    assert!(matches!(
        raw.next().await,
        Record::Refused {
            code: RefuseCode::UnknownDevice,
            ..
        }
    ));
    raw.send(&[Record::Lookup {
        request: 1,
        cell: gone_cell,
    }])
    .await;
    assert!(matches!(raw.next().await, Record::Directory { devices, .. } if devices.is_empty()));
    // The devices online stayed: the mailbox is still in the directory.
    assert_eq!(m.lookup(m.cell()).await.unwrap().devices.len(), 1);
    drop(m);
}

/// A LOOKUP over its cell's rate waits for its turn rather than being answered at once: with
/// the default configuration, 500 at once, then 50 a second.
#[tokio::test]
async fn lookups_over_the_rate_wait_their_turn() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), |_| {}).await;
    let addr = relay.local_addrs()[0];
    let mut raw = RawDevice::join(&device(dir.path(), "asker"), addr).await;
    let cell = raw.node.cell();
    let started = Instant::now();
    let lookups: Vec<Record> = (0..600)
        .map(|request| Record::Lookup { request, cell })
        .collect();
    raw.send(&lookups).await;
    let mut answered = std::collections::BTreeSet::new();
    while answered.len() < 600 {
        if let Record::Directory {
            request, devices, ..
        } = raw.next().await
        {
            assert_eq!(devices.len(), 1, "the asker itself");
            answered.insert(request);
        }
    }
    let took = started.elapsed();
    // 100 over the burst, at 50 a second.
    assert!(
        took >= Duration::from_millis(1500),
        "600 LOOKUPs answered in {took:?}"
    );

    // One device with more than 256 waiting is disconnected.
    let flood: Vec<Record> = (0..800)
        .map(|request| Record::Lookup { request, cell })
        .collect();
    let mut events = relay.subscribe();
    raw.send(&flood).await;
    let reason = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(RelayEvent::Disconnected { node, reason }) = events.recv().await
                && node == raw.node.node_id()
            {
                return reason;
            }
        }
    })
    .await
    .expect("the asker disconnected");
    assert_eq!(reason, "too many LOOKUPs");
}

const SLASH_64_TEST: &str = "addresses_of_one_ipv6_slash_64_share_the_per_address_limit";

/// The namespace test cannot run here: it says so and passes, except under CI (`CI=true`),
/// where a skip would hide that it never ran.
fn skip(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{SLASH_64_TEST} cannot run on this CI machine, and CI runs every test: {reason}");
    }
    eprintln!("SKIPPED {SLASH_64_TEST}: {reason}");
}

/// Issue 10, finding 8: the limit of 8 unauthenticated connections per IP counted exact
/// addresses, so one IPv6 /64 (2^64 addresses, one subscriber's usual share) got around it.
/// Now an IPv6 /64 counts as one address. Run in a network namespace of its own (re-running
/// this test inside `unshare --net`), with addresses of one /64 and of another on its
/// loopback; skipped, saying so, where namespaces or `ip` are not available.
#[test]
fn addresses_of_one_ipv6_slash_64_share_the_per_address_limit() {
    if std::env::var_os("CELLMESH_NETNS_CHILD").is_none() {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new("unshare")
            .args(["--net", "--"])
            .arg(exe)
            .args(["--exact", SLASH_64_TEST, "--nocapture", "--test-threads=1"])
            .env("CELLMESH_NETNS_CHILD", "1")
            .output();
        let out = match out {
            Ok(out) => out,
            Err(e) => return skip(&format!("no unshare ({e})")),
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && stderr.starts_with("unshare:") {
            return skip(stderr.trim());
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "in the namespace:\n{stdout}\n{stderr}"
        );
        eprint!("{stderr}");
        assert!(stdout.contains("1 passed"), "{stdout}");
        return;
    }
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut ready = ip(&["link", "set", "lo", "up"]);
    for a in [
        "2001:db8:1:2::1",
        "2001:db8:1:2::2",
        "2001:db8:1:2::3",
        "2001:db8:1:2::4",
        "2001:db8:1:3::1",
    ] {
        ready &= ip(&[
            "-6",
            "addr",
            "add",
            &format!("{a}/64"),
            "dev",
            "lo",
            "nodad",
        ]);
    }
    if !ready {
        return skip("could not set up addresses with `ip`");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RelayConfig::new(
            vec!["[2001:db8:1:2::1]:0".parse().unwrap()],
            dir.path().join("data"),
        );
        config.node.limits.max_unauthenticated_per_ip = 2;
        let relay = Relay::start(&device(dir.path(), "relay"), config)
            .await
            .unwrap();
        let addr = relay.local_addrs()[0];
        // Connections that say nothing hold their unauthenticated slots until the deadline.
        let from = |source: &str| {
            let source: SocketAddr = format!("[{source}]:0").parse().unwrap();
            async move {
                let socket = tokio::net::TcpSocket::new_v6().unwrap();
                socket.bind(source).unwrap();
                socket.connect(addr).await.unwrap()
            }
        };
        // Closed by the relay within `wait` (read gives end of file), or still open.
        async fn closed(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
            use tokio::io::AsyncReadExt as _;
            let mut b = [0u8; 1];
            matches!(
                tokio::time::timeout(wait, stream.read(&mut b)).await,
                Ok(Ok(0) | Err(_))
            )
        }
        // The listener takes connections in the order they were made, and each one's slot
        // before it takes the next.
        let mut held = vec![from("2001:db8:1:2::2").await, from("2001:db8:1:2::3").await];
        let mut same_64 = from("2001:db8:1:2::4").await;
        assert!(
            closed(&mut same_64, Duration::from_secs(2)).await,
            "a third connection from the same /64 was kept"
        );
        let mut other_64 = from("2001:db8:1:3::1").await;
        // Refused too, once the relay has decided on the one before it: had that one been
        // refused, it would have been closed first.
        let mut after = from("2001:db8:1:2::4").await;
        assert!(
            closed(&mut after, Duration::from_secs(2)).await,
            "a fourth connection from the same /64 was kept"
        );
        assert!(
            !closed(&mut other_64, Duration::ZERO).await,
            "another /64 was refused"
        );
        for s in &mut held {
            assert!(!closed(s, Duration::ZERO).await, "a held slot was let go");
        }
        relay.shutdown().await;
    });
}

/// SECURITY.md, "Resource limits": FORWARDs are bounded per sending cell by a token bucket
/// (200,000 a second, bursts of 400,000 by default). Past its burst a cell's FORWARDs are
/// refused `rate_limited` (a mailbox sends them again 100 ms later), and another cell's are
/// not held back by it.
#[tokio::test]
async fn forwards_past_a_cells_burst_are_refused_and_other_cells_are_not_held_back() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), |c| {
        c.rate_per_cell = 1;
        c.burst_per_cell = 3;
    })
    .await;
    let addr = relay.local_addrs()[0];
    let mut a = RawDevice::join(&device(dir.path(), "a"), addr).await;
    let mut b = RawDevice::join(&device(dir.path(), "b"), addr).await;
    assert_ne!(a.node.cell(), b.node.cell());
    let to = a.node.node_id();
    let forward = |n: u8| Record::Forward {
        to,
        id: MsgId([n; 16]),
        envelope: Bytes::from_static(b"sealed"),
    };
    a.send(&(0..6).map(forward).collect::<Vec<_>>()).await;
    let (mut accepted, mut limited) = (0, 0);
    for _ in 0..6 {
        match a.next().await {
            Record::Accepted { .. } => accepted += 1,
            Record::Refused {
                code: RefuseCode::RateLimited,
                ..
            } => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((accepted, limited), (3, 3), "the burst, then refusals");
    b.send(&[forward(9)]).await;
    assert!(
        matches!(b.next().await, Record::Accepted { .. }),
        "another cell is not held back"
    );
}
