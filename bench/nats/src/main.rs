//! NATS loopback benchmark client (driven by ../run.sh), over TLS (`--ca`) or plain TCP
//! (`--plain`).
//!
//! One process, two connections to one nats-server: a publisher connection and a
//! subscriber connection, each driven by its own task on a 2-worker tokio runtime.
//!
//! Throughput, per size: the subscriber subscribes (and flushes, so the server has the
//! SUB), then the publisher publishes N messages as fast as it can and flushes. The
//! subscriber's rate counts from the first to the last message it receives.
//!
//! Latency (64 B): request-reply ping-pong, one outstanding at a time. The responder
//! (subscriber connection) echoes each request to its reply subject; the requester
//! (publisher connection) publishes with a reply inbox and waits for the echo.
//!
//! Output, one line per measurement on stdout:
//!   nats-tls size=64 msgs_per_s=1080000 mb_per_s=69.1
//!   nats-tls rtt size=64 p50_us=151 p99_us=300
//! (`nats-plain` in place of `nats-tls` with `--plain`; MB = 10^6 bytes of payload.) Diagnostics go to stderr.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::{Client, ConnectOptions, Event, Subject};
use bytes::Bytes;
use futures::StreamExt;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Messages the client may buffer per subscription before async-nats drops them and
/// reports a slow consumer (default 65,536). Raised so that the subscriber is never
/// the one to drop: any loss makes the run fail rather than skew the figure.
const SUBSCRIPTION_CAPACITY: usize = 4 * 1024 * 1024;
/// Commands (publishes) queued from the API to the connection task (default 2,048).
const CLIENT_CAPACITY: usize = 2048;
/// How long the subscriber may still take after the publisher's flush returned (plus
/// twice the publish time) before the missing messages count as lost.
const RECEIVE_GRACE: Duration = Duration::from_secs(10);

struct Args {
    url: String,
    /// `None`: plain TCP (`--plain`).
    ca: Option<PathBuf>,
    plain: bool,
    sizes: Vec<usize>,
    counts: Vec<(usize, u64)>,
    rtt: usize,
    warmup: usize,
    client_capacity: usize,
    sub_capacity: usize,
    workers: usize,
}

fn default_count(size: usize) -> u64 {
    // Chosen so that each size runs for about 2-3 s on the project's 2-core machine
    // (measured: ~0.55 M/s at 64 B, ~185 k/s at 1 KiB, ~13.5 k/s at 16 KiB).
    match size {
        0..=128 => 1_500_000,
        129..=2048 => 500_000,
        _ => 40_000,
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: nats-bench --url tls://127.0.0.1:PORT (--ca CA.pem | --plain) [--sizes 64,1024,16384] \
         [--count SIZE=N]... [--rtt 20000] [--warmup 2000] [--client-capacity N] \
         [--sub-capacity N] [--workers 2]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        url: String::new(),
        ca: None,
        plain: false,
        sizes: vec![64, 1024, 16384],
        counts: Vec::new(),
        rtt: 20_000,
        warmup: 2_000,
        client_capacity: CLIENT_CAPACITY,
        sub_capacity: SUBSCRIPTION_CAPACITY,
        workers: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--plain" {
            a.plain = true;
            continue;
        }
        let v = it.next().unwrap_or_else(|| usage());
        let num = |s: &str| s.parse::<u64>().unwrap_or_else(|_| usage());
        match k.as_str() {
            "--url" => a.url = v,
            "--ca" => a.ca = Some(PathBuf::from(v)),
            "--sizes" => a.sizes = v.split(',').map(|s| num(s) as usize).collect(),
            "--count" => {
                let (s, n) = v.split_once('=').unwrap_or_else(|| usage());
                a.counts.push((num(s) as usize, num(n)));
            }
            "--rtt" => a.rtt = num(&v) as usize,
            "--warmup" => a.warmup = num(&v) as usize,
            "--client-capacity" => a.client_capacity = num(&v) as usize,
            "--sub-capacity" => a.sub_capacity = num(&v) as usize,
            "--workers" => a.workers = num(&v) as usize,
            _ => usage(),
        }
    }
    if a.url.is_empty() || a.plain == a.ca.is_some() {
        usage()
    }
    a
}

async fn connect(a: &Args, name: &str, slow: Arc<AtomicU64>) -> Result<Client> {
    let name_owned = name.to_string();
    let mut options = ConnectOptions::new().name(name);
    if let Some(ca) = &a.ca {
        options = options.require_tls(true).add_root_certificates(ca.clone());
    }
    let client = options
        .subscription_capacity(a.sub_capacity)
        .client_capacity(a.client_capacity)
        .event_callback(move |ev| {
            let slow = slow.clone();
            let name = name_owned.clone();
            async move {
                match ev {
                    Event::SlowConsumer(_) => {
                        slow.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::Connected | Event::Closed => {}
                    other => eprintln!("nats-bench: {name}: event: {other}"),
                }
            }
        })
        .connect(a.url.as_str())
        .await?;
    let info = client.server_info();
    if info.tls_required == a.plain {
        return Err(format!(
            "server tls_required={} against --plain={}",
            info.tls_required, a.plain
        )
        .into());
    }
    Ok(client)
}

/// Waits until the server has processed everything this connection sent before.
///
/// async-nats's `Client::flush` only flushes the socket (unlike the Go client's
/// `Flush`, it does not wait for a PONG), so `subscribe` + `flush` on the subscriber
/// connection does not mean the server has the SUB yet: the first messages from the
/// publisher's connection can then find no subscriber and are dropped (seen here under
/// CPU contention). The server handles one connection's protocol in order, so a
/// message this connection publishes to itself coming back proves the earlier SUBs
/// are registered.
async fn server_roundtrip(c: &Client) -> Result<()> {
    let probe = Subject::from(c.new_inbox());
    let mut s = c.subscribe(probe.clone()).await?;
    c.publish(probe, Bytes::new()).await?;
    match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
        Ok(Some(_)) => Ok(()),
        _ => Err("no round trip through the server (echo disabled?)".into()),
    }
}

async fn throughput(
    pubc: &Client,
    subc: &Client,
    slow: &AtomicU64,
    size: usize,
    n: u64,
) -> Result<(f64, f64)> {
    let subject = format!("bench.tp.{size}");
    let (ss, ps) = (subc.statistics(), pubc.statistics());
    let sub_in0 = ss.in_messages.load(Ordering::Relaxed);
    let pub_out0 = ps.out_messages.load(Ordering::Relaxed);
    let mut sub = subc.subscribe(subject.clone()).await?;
    server_roundtrip(subc).await?; // the server has now processed the SUB

    // The receiver reads the clock only at the first and the last message (no
    // per-message timer: it costs measurably at 64 B).
    let got = Arc::new(AtomicU64::new(0));
    let mut receiver = {
        let got = got.clone();
        tokio::spawn(async move {
            let mut count: u64 = 0;
            let mut bytes: u64 = 0;
            let mut first = None;
            while let Some(m) = sub.next().await {
                count += 1;
                bytes += m.payload.len() as u64;
                if count == 1 {
                    first = Some(Instant::now());
                }
                if count == n {
                    return Ok((first.unwrap(), Instant::now(), count, bytes));
                }
                got.store(count, Ordering::Relaxed);
            }
            Err(format!("subscription closed after {count}/{n}"))
        })
    };

    let publisher = {
        let pubc = pubc.clone();
        tokio::spawn(async move {
            let subject = Subject::from(subject);
            let payload = Bytes::from(vec![0x5au8; size]);
            let start = Instant::now();
            for _ in 0..n {
                pubc.publish(subject.clone(), payload.clone()).await?;
            }
            pubc.flush().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(start.elapsed())
        })
    };

    let pub_elapsed = publisher.await??;
    // Once the publisher's flush has returned, everything is at the server; allow the
    // subscriber a bounded time to drain what is queued on its side, then call it loss.
    let grace = RECEIVE_GRACE + 2 * pub_elapsed;
    let (first, last, got, bytes) = match tokio::time::timeout(grace, &mut receiver).await {
        Ok(r) => r?.map_err(|e| format!("size={size}: {e}"))?,
        Err(_) => {
            receiver.abort();
            let g = got.load(Ordering::Relaxed);
            return Err(format!(
                "size={size}: only {g}/{n} received {grace:?} after the publisher finished \
                 (publisher connection sent {}, subscriber connection read {}, connects {}/{}, \
                 client slow-consumer events {})",
                ps.out_messages.load(Ordering::Relaxed) - pub_out0,
                ss.in_messages.load(Ordering::Relaxed) - sub_in0,
                ps.connects.load(Ordering::Relaxed),
                ss.connects.load(Ordering::Relaxed),
                slow.load(Ordering::Relaxed),
            )
            .into());
        }
    };
    let secs = (last - first).as_secs_f64();
    let mps = (got - 1) as f64 / secs; // intervals between first and last
    let mbps = bytes as f64 * (got - 1) as f64 / got as f64 / secs / 1e6;
    eprintln!(
        "nats-bench: size={size} n={n} sub_window={secs:.3}s publisher_done={:.3}s pub_rate={:.0}/s",
        pub_elapsed.as_secs_f64(),
        n as f64 / pub_elapsed.as_secs_f64()
    );
    Ok((mps, mbps))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    // Nearest rank.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn rtt(
    pubc: &Client,
    subc: &Client,
    size: usize,
    warmup: usize,
    n: usize,
) -> Result<(f64, f64)> {
    let subject = Subject::from_static("bench.rtt");
    let mut req_sub = subc.subscribe(subject.clone()).await?;
    server_roundtrip(subc).await?;
    let responder = {
        let subc = subc.clone();
        tokio::spawn(async move {
            while let Some(m) = req_sub.next().await {
                if let Some(reply) = m.reply
                    && subc.publish(reply, m.payload).await.is_err()
                {
                    break;
                }
            }
        })
    };

    let inbox = Subject::from(pubc.new_inbox());
    let mut replies = pubc.subscribe(inbox.clone()).await?;
    server_roundtrip(pubc).await?;
    let payload = Bytes::from(vec![0x5au8; size]);
    let mut samples = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let t = Instant::now();
        pubc.publish_with_reply(subject.clone(), inbox.clone(), payload.clone())
            .await?;
        match tokio::time::timeout(Duration::from_secs(5), replies.next()).await {
            Ok(Some(m)) if m.payload.len() == size => {}
            Ok(_) => return Err("bad or missing reply".into()),
            Err(_) => return Err(format!("rtt: no reply after {i} round trips").into()),
        }
        if i >= warmup {
            samples.push(t.elapsed().as_nanos() as u64);
        }
    }
    responder.abort();
    samples.sort_unstable();
    let us = |ns: u64| ns as f64 / 1e3;
    eprintln!(
        "nats-bench: rtt size={size} n={n} min={:.1}us mean={:.1}us max={:.1}us",
        us(samples[0]),
        us(samples.iter().sum::<u64>() / n as u64),
        us(*samples.last().unwrap())
    );
    Ok((
        us(percentile(&samples, 0.50)),
        us(percentile(&samples, 0.99)),
    ))
}

async fn run(a: Args) -> Result<()> {
    let slow = Arc::new(AtomicU64::new(0));
    let subc = connect(&a, "bench-sub", slow.clone()).await?;
    let pubc = connect(&a, "bench-pub", slow.clone()).await?;
    eprintln!(
        "nats-bench: server {} {} tls_required={} max_payload={} sub_capacity={} client_capacity={}",
        pubc.server_info().server_name,
        pubc.server_info().version,
        pubc.server_info().tls_required,
        pubc.server_info().max_payload,
        a.sub_capacity,
        a.client_capacity
    );
    let label = if a.plain { "nats-plain" } else { "nats-tls" };
    for &size in &a.sizes {
        let n = a
            .counts
            .iter()
            .find(|c| c.0 == size)
            .map_or(default_count(size), |c| c.1);
        let (mps, mbps) = throughput(&pubc, &subc, &slow, size, n).await?;
        println!("{label} size={size} msgs_per_s={mps:.0} mb_per_s={mbps:.1}");
    }
    if a.rtt > 0 {
        let (p50, p99) = rtt(&pubc, &subc, 64, a.warmup, a.rtt).await?;
        println!("{label} rtt size=64 p50_us={p50:.0} p99_us={p99:.0}");
    }
    pubc.flush().await?;
    subc.flush().await?;
    let s = slow.load(Ordering::Relaxed);
    if s > 0 {
        return Err(format!("{s} slow-consumer events (client dropped messages)").into());
    }
    Ok(())
}

fn main() {
    let a = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.workers)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(a)) {
        eprintln!("nats-bench: error: {e}");
        std::process::exit(1);
    }
}
