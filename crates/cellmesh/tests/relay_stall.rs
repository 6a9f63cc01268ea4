//! A relay keeps serving every device while one works through a long queue: its store work
//! runs off the relay's loop, and DELIVEREDs are committed in batches.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cellmesh::core::relay::{Accepted, MsgId, Record};
use cellmesh::relay::{Relay, RelayConfig};
use common::{RawDevice, device, offline, reader, registered};

mod common;

const QUEUED: usize = 10_000;

/// Round trips of `n` messages from `a` to `b`, each acknowledged end to end, in µs, sorted.
async fn round_trips(a: &common::Reader, b: &mut common::Reader, n: usize) -> Vec<u128> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        let sent = a
            .send(b.cell(), Bytes::from(format!("ping {i}")))
            .await
            .unwrap();
        assert_eq!(sent.status, cellmesh::mailbox::Status::Delivered);
        out.push(start.elapsed().as_micros());
        b.next().await;
    }
    out.sort_unstable();
    out
}

/// Issue 11: while one device acknowledges 10,000 queued messages one DELIVERED at a time,
/// two others keep their round trip. Before the relay's store work left its loop, every
/// DELIVERED was an fsync the loop waited for, and the others' records waited behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_acknowledging_ten_thousand_queued_one_by_one_does_not_stall_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let config = RelayConfig::new(
        vec!["127.0.0.1:0".parse().unwrap()],
        dir.path().join("data"),
    );
    let relay = Relay::start(&device(dir.path(), "relay"), config)
        .await
        .unwrap();
    let addr = relay.local_addrs()[0];
    let mut events = relay.subscribe();

    // The slow device registers, goes, and 10,000 envelopes are queued for it.
    let slow_keys = device(dir.path(), "slow");
    let slow = RawDevice::join(&slow_keys, addr).await;
    let slow_node = slow.node.node_id();
    registered(&mut events, slow_node).await;
    slow.node.shutdown(Duration::from_secs(1)).await;
    offline(&mut events, slow_node).await;
    let mut sender = RawDevice::join(&device(dir.path(), "sender"), addr).await;
    let forwards: Vec<Record> = (0..QUEUED)
        .map(|i| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            Record::Forward {
                to: slow_node,
                id: MsgId(id),
                envelope: Bytes::from(vec![0x02; 100]),
            }
        })
        .collect();
    sender.send(&forwards).await;
    for _ in 0..QUEUED {
        assert!(matches!(
            sender.next().await,
            Record::Accepted {
                status: Accepted::Queued,
                ..
            }
        ));
    }

    // Two others, and their round trip on a quiet relay.
    let a = reader(
        common::connect(&device(dir.path(), "a"), addr, Default::default())
            .await
            .unwrap(),
    );
    let mut b = reader(
        common::connect(&device(dir.path(), "b"), addr, Default::default())
            .await
            .unwrap(),
    );
    // Measured once b's link takes messages (until
    // its RECEIVE reaches the relay, what a sends it is queued).
    let b_cell = b.cell();
    for i in 0.. {
        let sent = a
            .send(b_cell, Bytes::from(format!("warm {i}")))
            .await
            .unwrap();
        b.next().await;
        if sent.status == cellmesh::mailbox::Status::Delivered {
            break;
        }
        assert!(i < 100, "b never took a message live");
    }
    let quiet = round_trips(&a, &mut b, 30).await;

    // The slow device comes back and acknowledges each envelope in a DELIVERED of its own,
    // on a task of its own, while the others go on.
    let mut slow = RawDevice::join(&slow_keys, addr).await;
    slow.send(&[Record::Receive]).await;
    let acker = tokio::spawn(async move {
        let mut acked = 0;
        while acked < QUEUED {
            if let Record::Deliver { id, .. } = slow.next().await {
                slow.send(&[Record::Delivered(vec![id])]).await;
                acked += 1;
            }
        }
        slow
    });
    let busy = round_trips(&a, &mut b, 30).await;
    let acker_done = acker.is_finished();
    let _slow = acker.await.unwrap();

    let p50 = |v: &[u128]| v[v.len() / 2];
    eprintln!(
        "round trip p50 {} µs quiet, {} µs while 10,000 are acknowledged one by one (max {} µs); acker done first: {acker_done}",
        p50(&quiet),
        p50(&busy),
        busy[busy.len() - 1]
    );
    // "Normal": the median within a few times the quiet one (the machine is shared with the
    // acknowledging device's own work), and no round trip waits for the queue.
    assert!(
        p50(&busy) < 4 * p50(&quiet) + 20_000,
        "p50 {} µs while busy, {} µs quiet",
        p50(&busy),
        p50(&quiet)
    );
    assert!(
        busy[busy.len() - 1] < 1_000_000,
        "a round trip took {} µs",
        busy[busy.len() - 1]
    );
}
