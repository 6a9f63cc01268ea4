//! Cell-to-cell figures through one relay, for docs/BENCHMARKS.md.
//!
//! `cargo run --release -p cellmesh --example relay_bench [seconds-per-size [sizes...]]`
//! (sizes in bytes; default 64 1024 16384; `rtt` instead of sizes: the round trip only)
//!
//! One publisher cell, one relay, one subscriber cell, each on its own node and its own TCP
//! connection over 127.0.0.1, in this process on a two-worker tokio runtime (the machine's two
//! cores: publisher, relay and subscriber share them, as they do when NATS runs as three
//! processes). The publisher submits messages as fast as the mailbox's flow control lets it
//! (at most `max_in_flight` sends without an outcome); every message is sealed end to end for
//! the subscriber's device, forwarded by the relay, opened and acknowledged end to end by the
//! subscriber. Throughput is counted at the subscriber, first to last message of a trial; the
//! table gives the median of 3 trials. Round trip: the publisher sends 64 B, the subscriber's
//! application answers with 64 B, one at a time, 5,000 times after 500 of warm-up.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cellmesh::core::keystore::{KdfParams, Passphrase};
use cellmesh::home::{Home, Unlocked};
use cellmesh::mailbox::{Mailbox, MailboxConfig};
use cellmesh::relay::{Relay, RelayConfig};

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

fn main() {
    // Diagnostics on stderr with CELLMESH_LOG (e.g. `info`), as the CLI does.
    if let Ok(filter) = std::env::var("CELLMESH_LOG") {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .init();
    }
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let mut sizes: Vec<usize> = std::env::args()
        .skip(2)
        .filter_map(|s| s.parse().ok())
        .collect();
    let rtt_only = std::env::args().skip(2).any(|a| a == "rtt");
    if sizes.is_empty() && !rtt_only {
        sizes = vec![64, 1024, 16384];
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(Duration::from_secs_f64(secs), sizes));
}

/// The relay under test: its own process (`cellmesh relay`, as users run it) when
/// `CELLMESH_BENCH_RELAY` names the binary, else in this process.
enum RelayUnder {
    Process(std::process::Child),
    InProcess(Relay),
}

impl RelayUnder {
    async fn start(dir: &std::path::Path) -> (Self, std::net::SocketAddr) {
        let keys = device(dir, "relay");
        if let Ok(bin) = std::env::var("CELLMESH_BENCH_RELAY") {
            drop(keys);
            let mut child = std::process::Command::new(bin)
                .args([
                    "relay",
                    "--listen",
                    "127.0.0.1:0",
                    "--json",
                    "--cell-rate",
                    "1000000000",
                ])
                .arg("--data")
                .arg(dir.join("relay-data"))
                .env("CELLMESH_HOME", dir.join("relay"))
                .env("CELLMESH_PASSPHRASE", "bench")
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("cellmesh relay starts");
            let stdout = child.stdout.take().expect("stdout");
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
            let addr = loop {
                let line = lines.next().expect("a line").expect("readable");
                let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
                if v["event"] == "listening" {
                    break v["addr"].as_str().expect("addr").parse().expect("address");
                }
            };
            // Its later lines (the periodic summary) are read and dropped.
            std::thread::spawn(move || for _ in lines {});
            return (Self::Process(child), addr);
        }
        let mut config = RelayConfig::new(
            vec!["127.0.0.1:0".parse().expect("addr")],
            dir.join("relay-data"),
        );
        config.rate_per_cell = u32::MAX / 2;
        config.burst_per_cell = u32::MAX / 2;
        let relay = Relay::start(&keys, config).await.expect("relay");
        let addr = relay.local_addrs()[0];
        (Self::InProcess(relay), addr)
    }

    async fn stop(self) {
        match self {
            Self::Process(mut child) => {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let _ = child.wait();
            }
            Self::InProcess(relay) => {
                let stats = relay.stats();
                println!(
                    "relay: {} pushed, {} queued, {} refused",
                    stats.pushed, stats.queued, stats.refused
                );
                relay.shutdown().await;
            }
        }
    }
}

async fn run(per_trial: Duration, sizes: Vec<usize>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (relay, addr) = RelayUnder::start(dir.path()).await;
    if matches!(relay, RelayUnder::Process(_)) {
        println!("relay: its own process (cellmesh relay)");
    }
    let connect = |keys: Unlocked| async move {
        let mut config = MailboxConfig::new(addr);
        config.ack_timeout = Duration::from_secs(60);
        Mailbox::connect(&keys, config).await.expect("mailbox")
    };
    let publisher = connect(device(dir.path(), "publisher")).await;
    let mut subscriber = connect(device(dir.path(), "subscriber")).await;
    let to = subscriber.cell();
    // Warm the directory cache and the session (its first flight carries HPKE and tokens).
    // (A send is delivered once the subscriber's application takes it: both at once.)
    let (sent, got) = tokio::join!(
        publisher.send(to, Bytes::from_static(b"warm up")),
        subscriber.recv()
    );
    sent.expect("warm-up send");
    got.expect("warm-up message");

    println!("size     msgs/s     MB/s at receiver   (median of 3; range)");
    for size in sizes {
        let mut trials = Vec::new();
        for _ in 0..3 {
            trials.push(transfer(&publisher, &mut subscriber, to, size, per_trial).await);
        }
        trials.sort_by(|a, b| a.total_cmp(b));
        let median = trials[1];
        println!(
            "{:<8} {:>9.0}  {:>9.1}         ({:.0} .. {:.0} msgs/s)",
            human(size),
            median,
            median * size as f64 / 1e6,
            trials[0],
            trials[2]
        );
    }
    let mut publisher = publisher;
    let (p50, p99) = round_trips(&mut publisher, subscriber, 5000).await;
    println!("round trip 64 B, one at a time: p50 {p50:.0} us, p99 {p99:.0} us");
    publisher.close().await;
    relay.stop().await;
}

/// Streams `size`-byte messages for about `duration`; returns messages/s at the receiver.
async fn transfer(
    publisher: &Mailbox,
    subscriber: &mut Mailbox,
    to: cellmesh::core::id::CellId,
    size: usize,
    duration: Duration,
) -> f64 {
    let body = Bytes::from(vec![0x5a; size]);
    let start = Instant::now();
    let (count_tx, count_rx) = tokio::sync::oneshot::channel();
    let sending = async {
        let mut sent = 0u64;
        let mut tickets = std::collections::VecDeque::new();
        while start.elapsed() < duration {
            for _ in 0..256 {
                tickets.push_back(publisher.submit(to, body.clone()).await.expect("submit"));
                sent += 1;
            }
            // Outcomes are collected as they come so the ticket queue stays short.
            while tickets.len() > 32_768 {
                if let Some(t) = tickets.pop_front() {
                    t.await.expect("send");
                }
            }
        }
        let _ = count_tx.send(sent);
        for t in tickets {
            t.await.expect("send");
        }
    };
    let receiving = async {
        let mut first = None;
        let mut got = 0u64;
        let mut expected = u64::MAX;
        let mut count_rx = Some(count_rx);
        while got < expected {
            tokio::select! {
                m = subscriber.recv() => {
                    m.expect("message");
                    first.get_or_insert_with(Instant::now);
                    got += 1;
                }
                n = async { count_rx.as_mut().expect("once").await }, if count_rx.is_some() => {
                    expected = n.expect("count");
                    count_rx = None;
                }
            }
        }
        let elapsed = first.map_or(Duration::ZERO, |f| f.elapsed());
        got as f64 / elapsed.as_secs_f64().max(1e-9)
    };
    let ((), rate) = tokio::join!(sending, receiving);
    rate
}

/// p50 and p99 in microseconds of `n` request/answer round trips of 64 B, after 500 of
/// warm-up. The subscriber's application answers each message with one of the same size.
async fn round_trips(a: &mut Mailbox, mut b: Mailbox, n: usize) -> (f64, f64) {
    let a_cell = a.cell();
    let b_cell = b.cell();
    let answerer = tokio::spawn(async move {
        while let Some(m) = b.recv().await {
            if b.submit(a_cell, m.body).await.is_err() {
                break;
            }
        }
        b.close().await;
    });
    let body = Bytes::from(vec![7u8; 64]);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 500 {
        let start = Instant::now();
        let _ticket = a.submit(b_cell, body.clone()).await.expect("submit");
        a.recv().await.expect("answer");
        if i >= 500 {
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    answerer.abort();
    samples.sort_by(|x, y| x.total_cmp(y));
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.50), at(0.99))
}

fn human(size: usize) -> String {
    if size >= 1024 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}
