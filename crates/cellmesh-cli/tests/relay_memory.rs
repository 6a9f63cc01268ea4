//! A `cellmesh relay` process under a device that sends it far more than it may hold: its
//! resident memory stays bounded, and other devices keep being served.
//!
//! The devices are library nodes speaking the relay protocol directly (FORWARD records built
//! with `cellmesh::core::relay`): the relay never reads envelopes, so they need no sealing.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cellmesh::Bytes;
use cellmesh::core::keystore::{KdfParams, Passphrase};
use cellmesh::core::relay::{Accepted, MAX_ENVELOPE, MsgId, Record, put_record, records};
use cellmesh::home::{Home, Unlocked};
use cellmesh::node::{Node, NodeConfig};
use common::{Proc, create_cell};
use tokio::sync::watch;

const FAST: KdfParams = KdfParams {
    memory_kib: 64,
    iterations: 1,
    lanes: 1,
};

/// The bound the relay runs with (its `--memory`), and what the process may use beyond it:
/// the binary and its runtime, allocator slack, and three connections' transport buffers.
const MEMORY_MIB: u64 = 128;
const OVERHEAD_MIB: u64 = 64;
/// Envelopes the flooder sends, each of the largest size.
const FLOOD: u64 = 2000;

fn device(dir: &std::path::Path, name: &str) -> Unlocked {
    let home = Home::new(dir.join(name));
    let pass = Passphrase::new("pw".into());
    home.create(&cellmesh::new_mnemonic(), "", &pass, FAST, false)
        .unwrap();
    home.unlock(&pass).unwrap()
}

fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib / 1024
}

fn payload(r: &Record) -> Bytes {
    let mut buf = Vec::with_capacity(r.encoded_len() + 4);
    put_record(&mut buf, r);
    Bytes::from(buf)
}

fn msg_id(tag: u8, n: u64) -> MsgId {
    let mut id = [tag; 16];
    id[8..].copy_from_slice(&n.to_be_bytes());
    MsgId(id)
}

/// A raw device joined to the relay whose link takes messages (it says RECEIVE).
async fn joined(keys: &Unlocked, relay: SocketAddr) -> Node {
    let node = Node::start(keys, NodeConfig::default()).await.unwrap();
    let peer = node.join(relay).await.unwrap();
    node.send(peer.node, payload(&Record::Receive))
        .await
        .unwrap();
    node
}

/// Issue 10, finding 7: a relay kept up to 65,536 pushed and unacknowledged envelopes of up to
/// 1 MiB for each online device, as slices pinning whole frames, bounding nothing in bytes.
#[test]
fn a_device_that_never_acknowledges_cannot_grow_the_relay_past_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let relay_home = dir.path().join("relay");
    create_cell(&relay_home);
    let data = dir.path().join("relay-data");
    let memory = MEMORY_MIB.to_string();
    let mut relay = Proc::start(
        &relay_home,
        "relay",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
            "--memory",
            &memory,
        ],
    );
    let listening = relay.expect("listening", |v| v["event"] == "listening");
    let addr: SocketAddr = listening["addr"].as_str().unwrap().parse().unwrap();
    let pid = relay.pid();
    let bound = MEMORY_MIB + OVERHEAD_MIB;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let report = rt.block_on(async {
        let mut flooder = joined(&device(dir.path(), "flooder"), addr).await;
        let b = joined(&device(dir.path(), "b"), addr).await;
        let mut c = joined(&device(dir.path(), "c"), addr).await;
        let relay_node = flooder.peers()[0].node;
        let (me, c_node) = (flooder.node_id(), c.node_id());
        let flood_link = flooder.sender(relay_node).unwrap();

        // The relay's resident memory, sampled every 10 ms until the flood ends; past the
        // bound the flood stops at once (an unbounded relay would take gigabytes).
        let done = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_mib(pid)));
        let sampler = {
            let (done, peak) = (Arc::clone(&done), Arc::clone(&peak));
            tokio::spawn(async move {
                while !done.load(Ordering::Relaxed) {
                    let now = rss_mib(pid);
                    peak.fetch_max(now, Ordering::Relaxed);
                    if now > bound {
                        done.store(true, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };

        // The flooder reads everything the relay sends it and acknowledges nothing.
        let (pushed, queued, refused) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        // How many FORWARDs were answered so far, for the test to wait on.
        let (answers, mut answered) = watch::channel(0u64);
        let reader = {
            let (pushed, queued, refused) = (
                Arc::clone(&pushed),
                Arc::clone(&queued),
                Arc::clone(&refused),
            );
            tokio::spawn(async move {
                while let Some(m) = flooder.recv().await {
                    let mut n = 0;
                    for r in records(m.data).flatten() {
                        let count = match r {
                            Record::Accepted {
                                status: Accepted::Pushed,
                                ..
                            } => &pushed,
                            Record::Accepted { .. } => &queued,
                            Record::Refused { .. } => &refused,
                            _ => continue,
                        };
                        count.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                    }
                    answers.send_modify(|a| *a += n);
                }
            })
        };

        // Meanwhile b sends c a small envelope every 50 ms, and c acknowledges what it gets.
        let b_link = b.sender(relay_node).unwrap();
        let c_link = c.sender(relay_node).unwrap();
        let to_c = {
            let done = Arc::clone(&done);
            tokio::spawn(async move {
                let mut n = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let forward = Record::Forward {
                        to: c_node,
                        id: msg_id(0xbb, n),
                        envelope: Bytes::from(n.to_be_bytes().to_vec()),
                    };
                    b_link.send(payload(&forward)).await.unwrap();
                    n += 1;
                    // The pace is the point: a message every 50 ms, whose gaps are measured.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                n
            })
        };
        let gaps = Arc::new(AtomicU64::new(0));
        let (serves, mut served) = watch::channel(0u64);
        let at_c = {
            let gaps = Arc::clone(&gaps);
            tokio::spawn(async move {
                let mut last = Instant::now();
                while let Some(m) = c.recv().await {
                    for r in records(m.data).flatten() {
                        if let Record::Deliver { id, .. } = r {
                            serves.send_modify(|s| *s += 1);
                            gaps.fetch_max(last.elapsed().as_millis() as u64, Ordering::Relaxed);
                            last = Instant::now();
                            c_link
                                .send(payload(&Record::Delivered(vec![id])))
                                .await
                                .unwrap();
                        }
                    }
                }
            })
        };

        let envelope = Bytes::from(vec![0x5a; MAX_ENVELOPE]);
        let mut sent = 0;
        while sent < FLOOD && !done.load(Ordering::Relaxed) {
            let forward = Record::Forward {
                to: me,
                id: msg_id(0xaa, sent),
                envelope: envelope.clone(),
            };
            if flood_link.send(payload(&forward)).await.is_err() {
                break;
            }
            sent += 1;
        }
        // Every FORWARD answered (20 s at most; the wait ends early if the link is gone), then
        // every message b sent c served (10 s at most).
        let _ =
            tokio::time::timeout(Duration::from_secs(20), answered.wait_for(|n| *n >= sent)).await;
        done.store(true, Ordering::Relaxed);
        let b_sent = to_c.await.unwrap();
        let _ =
            tokio::time::timeout(Duration::from_secs(10), served.wait_for(|n| *n >= b_sent)).await;
        sampler.await.unwrap();
        reader.abort();
        at_c.abort();
        (
            sent,
            peak.load(Ordering::Relaxed),
            [
                pushed.load(Ordering::Relaxed),
                queued.load(Ordering::Relaxed),
                refused.load(Ordering::Relaxed),
            ],
            b_sent,
            *served.borrow(),
            gaps.load(Ordering::Relaxed),
        )
    });
    let (sent, peak, [pushed, queued, refused], b_sent, served, gap) = report;
    eprintln!(
        "{sent} sent in {:?}: {pushed} pushed, {queued} queued, {refused} refused; relay peak \
         RSS {peak} MiB; c got {served} of {b_sent}, longest gap {gap} ms",
        started.elapsed()
    );
    assert!(
        peak <= bound,
        "the relay's resident memory reached {peak} MiB, over its {MEMORY_MIB} MiB bound and \
         {OVERHEAD_MIB} MiB of overhead, after {sent} envelopes"
    );
    assert_eq!(sent, FLOOD, "the flood was sent in full");
    assert_eq!(pushed + queued + refused, FLOOD, "every FORWARD answered");
    assert!(
        served >= b_sent && b_sent > 10,
        "c was served: {served} of {b_sent}"
    );
    assert!(
        gap < 2000,
        "c waited {gap} ms for a message sent every 50 ms"
    );
    relay.stop();
}
