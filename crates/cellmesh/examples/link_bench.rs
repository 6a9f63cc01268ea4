//! End-to-end figures for docs/BENCHMARKS.md: session throughput between two nodes over
//! loopback TCP, and memory per idle session.
//!
//! `cargo run --release -p cellmesh --example link_bench [seconds-per-size [sizes...]]`
//! (sizes in bytes; default 64 1024 16384 65536, then the idle-session memory figure)
//!
//! Two nodes run in this process on a two-worker tokio runtime (everything, the sending and
//! receiving loops included, runs on those two workers); B joins A over 127.0.0.1 and streams
//! messages to A, which counts what it receives. Each trial's figure is the receiver's rate
//! over the whole trial (first send to last receive); the table gives the median of 5 trials
//! and their range. Beside it, in the same run, the machine's limit for the same work: plain
//! loopback TCP between two tokio tasks, 64 KiB writes, no encryption or framing. Memory per idle session: K more nodes
//! join A, and the growth of this process's resident memory is divided by K (it includes
//! both ends of each session, since both run here).

use std::time::{Duration, Instant};

use bytes::Bytes;
use cellmesh::core::keystore::{KdfParams, Passphrase};
use cellmesh::home::{Home, Unlocked};
use cellmesh::node::{Node, NodeConfig};

/// The benchmark's throwaway keystores do not need real stretching.
const FAST: KdfParams = KdfParams {
    memory_kib: 64,
    iterations: 1,
    lanes: 1,
};

fn device(dir: &std::path::Path, name: &str) -> Unlocked {
    let home = Home::new(dir.join(name));
    let pass = Passphrase::new("bench".into());
    home.create(&cellmesh::new_mnemonic(), "", &pass, FAST, false)
        .expect("create keystore");
    home.unlock(&pass).expect("unlock keystore")
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let sizes: Vec<usize> = std::env::args()
        .skip(2)
        .filter_map(|s| s.parse().ok())
        .collect();
    let run = rt.spawn(run(Duration::from_secs_f64(secs), sizes));
    rt.block_on(run).expect("benchmark task");
}

async fn run(per_size: Duration, sizes: Vec<usize>) {
    let all = sizes.is_empty();
    let sizes = if all {
        vec![64, 1024, 16 * 1024, 64 * 1024]
    } else {
        sizes
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = NodeConfig {
        listen: vec!["127.0.0.1:0".parse().expect("addr")],
        ..NodeConfig::default()
    };
    let mut a = Node::start(&device(dir.path(), "a"), listen.clone())
        .await
        .expect("start a");
    let addr = a.local_addrs()[0];
    let b = Node::start(&device(dir.path(), "b"), NodeConfig::default())
        .await
        .expect("start b");
    b.join(addr).await.expect("join");
    let to_a = b.sender(a.node_id()).expect("sender");

    println!("| payload | msgs/s (median of 5) | range | MB/s at receiver (median) |");
    println!("| --- | --- | --- | --- |");
    for size in sizes {
        let payload = Bytes::from(vec![0x5a; size]);
        // Warm up and size each trial to last about a fifth of `per_size`.
        let probe = 20_000usize;
        let t = transfer(&mut a, &to_a, &payload, probe).await;
        let n = ((probe as f64 / t.as_secs_f64()) * per_size.as_secs_f64() / 5.0) as usize;
        let n = n.max(probe);
        let mut rates = Vec::new();
        for _ in 0..5 {
            let t = transfer(&mut a, &to_a, &payload, n).await;
            rates.push(n as f64 / t.as_secs_f64());
        }
        rates.sort_by(f64::total_cmp);
        let median = rates[2];
        println!(
            "| {} | {:.0} | {:.0} to {:.0} | {:.0} |",
            human(size),
            median,
            rates[0],
            rates[4],
            median * size as f64 / 1e6
        );
    }

    if !all {
        return;
    }
    let tcp = raw_tcp(per_size).await;
    println!(
        "\nmachine limit, same run: plain loopback TCP, 64 KiB writes: {:.0} MB/s",
        tcp / 1e6
    );
    // Memory per idle session.
    let k = 1000;
    let mut clients = Vec::new();
    for i in 0..k {
        clients.push(
            Node::start(&device(dir.path(), &format!("c{i}")), NodeConfig::default())
                .await
                .expect("start client"),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_bytes();
    for c in &clients {
        c.join(addr).await.expect("client join");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes();
    println!(
        "\nidle sessions: {k}; resident memory grew {:.1} MiB: {:.1} KiB per session (both ends)",
        (after - before) as f64 / (1 << 20) as f64,
        (after.saturating_sub(before)) as f64 / k as f64 / 1024.0
    );
    for c in clients {
        c.shutdown(Duration::from_millis(200)).await;
    }
    b.shutdown(Duration::from_millis(200)).await;
    a.shutdown(Duration::from_millis(200)).await;
}

async fn transfer(
    a: &mut Node,
    to_a: &cellmesh::node::PeerSender,
    payload: &Bytes,
    n: usize,
) -> Duration {
    let started = Instant::now();
    let sender = to_a.clone();
    let payload = payload.clone();
    let send = tokio::spawn(async move {
        for _ in 0..n {
            sender.send(payload.clone()).await.expect("send");
        }
    });
    let mut got = 0usize;
    let mut buf = Vec::with_capacity(4096);
    while got < n {
        buf.clear();
        let k = a.recv_many(&mut buf, 4096).await;
        assert!(k > 0, "inbox closed");
        got += k;
    }
    let elapsed = started.elapsed();
    send.await.expect("sender task");
    elapsed
}

fn human(size: usize) -> String {
    if size >= 1024 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

/// Bytes per second through a plain loopback TCP connection, one way.
async fn raw_tcp(duration: Duration) -> f64 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n as u64,
            }
        }
    });
    let mut w = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let chunk = vec![0x5au8; 64 * 1024];
    let started = Instant::now();
    while started.elapsed() < duration {
        w.write_all(&chunk).await.expect("write");
    }
    drop(w);
    let total = reader.await.expect("reader");
    total as f64 / started.elapsed().as_secs_f64()
}
