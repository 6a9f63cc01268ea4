//! A seeded, randomized delivery checker over real processes, in the manner of Jepsen: a
//! relay, three cells (one with two devices), and a random sequence of sends, `listen`s
//! started and stopped (SIGTERM and SIGKILL), relay restarts (SIGKILL in the middle of a
//! burst of sends among them) and connections cut in the middle of a frame. It records
//! every answer and every message each device printed ([`history`]), lets every device
//! listen until every cell's final markers have arrived, and checks that nothing promised
//! was lost, nothing was shown twice, and nothing was shown that was not sent.
//!
//! ```text
//!  seed ─► plan (ops, chosen before anything runs) ─► run ─► final phase ─► checks
//!                                                     │
//!   a1 a2 (cell A)  b (cell B)  c (cell C) ── proxy (cuts) ── relay (restarts, kill -9)
//! ```
//!
//! The plan depends on the seed alone (a model of which devices listen and whether the
//! relay is up), so a seed replays the same operations; only the processes' timing
//! differs. `CHECKER_SEED=N` replays a seed (each run prints its own), `CHECKER_OPS=N`
//! sets the number of operations (default 60, about a minute), `CHECKER_LONG=1` runs 400,
//! `CHECKER_PRINT=1` prints the history of a run that passed too. Every plan, short or long,
//! has at least one send through a running `listen` while the relay is down (answered
//! `unsent` or `unknown` by the listen's 10 s deadline).

mod common;

#[path = "checker/device.rs"]
mod device;
#[path = "checker/history.rs"]
mod history;
#[path = "checker/proxy.rs"]
mod proxy;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore as _, SeedableRng as _};
use serde_json::Value;

use device::{Device, Stop, command, reap, signal};
use history::{DeviceInfo, History, Recorder, Sent};
use proxy::Proxy;

/// Devices: (name, cell index). Cell 0 has two devices (the second restored from the
/// first's words in a home of its own).
const DEVICES: [(&str, usize); 4] = [("a1", 0), ("a2", 0), ("b", 1), ("c", 2)];
const CELLS: usize = 3;

#[test]
fn delivery_holds_under_random_restarts_kills_and_cuts() {
    let seed = std::env::var("CHECKER_SEED")
        .ok()
        .map(|s| s.trim().parse::<u64>().expect("CHECKER_SEED is a u64"))
        .unwrap_or_else(fresh_seed);
    let ops = match std::env::var("CHECKER_OPS") {
        Ok(n) => n.trim().parse().expect("CHECKER_OPS is a number"),
        Err(_) if std::env::var("CHECKER_LONG").is_ok_and(|v| v == "1") => 400,
        Err(_) => 60,
    };
    // Shown at once (with --nocapture) and in the failure message.
    eprintln!("CHECKER_SEED={seed} CHECKER_OPS={ops}");
    let plan = plan(&mut ChaCha8Rng::seed_from_u64(seed), ops);
    let dir = tempfile::tempdir().unwrap();
    let began = Instant::now();
    let mut world = World::new(dir.path(), seed);
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for (n, op) in plan.iter().enumerate() {
            world.rec.log(format!("op {n}: {op:?}"));
            world.apply(op);
        }
        world.finish();
    }));
    let history = world.rec.lock();
    let verdict = history.check();
    let took = began.elapsed();
    eprintln!(
        "checker: {ops} ops in {:.1} s; sends {:?}; {} proxy cuts; {} tolerated duplicates after SIGKILL",
        took.as_secs_f64(),
        verdict.stats,
        world.proxy.cuts(),
        verdict.tolerated.len(),
    );
    for t in &verdict.tolerated {
        eprintln!("  tolerated: {t}");
    }
    if std::env::var("CHECKER_PRINT").is_ok_and(|v| v == "1") {
        eprintln!("{}", history.render());
    }
    if ran.is_err() || !verdict.failures.is_empty() {
        let kept = dir.keep();
        let mut text = history.render();
        text.push_str(&format!(
            "\nlogs kept in {}\n\nFAILED (CHECKER_SEED={seed} CHECKER_OPS={ops} replays the choices):\n",
            kept.display()
        ));
        for f in &verdict.failures {
            text.push_str(&format!("  {f}\n"));
        }
        if ran.is_err() {
            text.push_str("  the run panicked (above)\n");
        }
        panic!("{text}");
    }
}

/// A seed for this run: the clock's nanoseconds and the process id.
fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// One step of the plan.
#[derive(Clone, Debug)]
enum Op {
    /// A send from a device to a cell; with `cut`, every connection through the proxy is
    /// cut once that many more bytes have passed (mid-frame, as a rule).
    Send {
        from: usize,
        to: usize,
        cut: Option<usize>,
    },
    /// Sends at once, and the relay killed (SIGKILL) after `kill_after_ms`, then started
    /// again.
    Burst {
        sends: Vec<(usize, usize)>,
        kill_after_ms: u64,
    },
    Listen(usize),
    Unlisten(usize, Stop),
    /// The device's listen stopped and started again.
    Relisten(usize, Stop),
    RelayRestart(Stop),
    RelayDown(Stop),
    RelayUp,
    /// Every connection through the proxy cut now.
    Cut,
}

/// The operations for a seed: chosen from a model of the world (who listens, whether the
/// relay is up) that does not depend on what the processes answer.
fn plan(rng: &mut ChaCha8Rng, n: usize) -> Vec<Op> {
    let below = |rng: &mut ChaCha8Rng, n: u64| rng.next_u64() % n;
    let devices = DEVICES.len() as u64;
    let mut listening = [false; DEVICES.len()];
    // While the relay is down: operations left before it comes back.
    let mut down: Option<u64> = None;
    // Where the plan makes sure of a send through a listen while the relay is down (left
    // to chance, a short plan often had none).
    let through_listen_at = (n / 4) as u64 + below(rng, (n / 2).max(1) as u64);
    let mut through_listen = false;
    let mut ops = Vec::with_capacity(n);
    let stop = |rng: &mut ChaCha8Rng| {
        if rng.next_u32().is_multiple_of(2) {
            Stop::Term
        } else {
            Stop::Kill
        }
    };
    while ops.len() < n {
        let pick = |rng: &mut ChaCha8Rng, want: bool, l: &[bool]| {
            let some: Vec<usize> = (0..l.len()).filter(|&d| l[d] == want).collect();
            (!some.is_empty()).then(|| some[(rng.next_u64() % some.len() as u64) as usize])
        };
        let send = |rng: &mut ChaCha8Rng| Op::Send {
            from: below(rng, devices) as usize,
            to: below(rng, CELLS as u64) as usize,
            cut: None,
        };
        if down.is_none() && !through_listen && ops.len() as u64 >= through_listen_at {
            through_listen = true;
            let from = match pick(rng, true, &listening) {
                Some(d) => d,
                None => {
                    let d = below(rng, devices) as usize;
                    listening[d] = true;
                    ops.push(Op::Listen(d));
                    d
                }
            };
            ops.push(Op::RelayDown(stop(rng)));
            ops.push(Op::Send {
                from,
                to: below(rng, CELLS as u64) as usize,
                cut: None,
            });
            ops.push(Op::RelayUp);
            continue;
        }
        if let Some(left) = down {
            if left == 0 {
                ops.push(Op::RelayUp);
                down = None;
                continue;
            }
            down = Some(left - 1);
            // No listen starts while the relay is down (it would fail to connect).
            match (below(rng, 3), pick(rng, true, &listening)) {
                (0, Some(d)) => {
                    listening[d] = false;
                    ops.push(Op::Unlisten(d, stop(rng)));
                }
                _ => ops.push(send(rng)),
            }
            continue;
        }
        let op = match below(rng, 100) {
            0..40 => send(rng),
            40..47 => Op::Send {
                from: below(rng, devices) as usize,
                to: below(rng, CELLS as u64) as usize,
                cut: Some(below(rng, 8000) as usize),
            },
            47..53 => Op::Burst {
                sends: (0..3 + below(rng, 4))
                    .map(|_| {
                        (
                            below(rng, devices) as usize,
                            below(rng, CELLS as u64) as usize,
                        )
                    })
                    .collect(),
                kill_after_ms: below(rng, 1200),
            },
            53..63 => match pick(rng, false, &listening) {
                Some(d) => {
                    listening[d] = true;
                    Op::Listen(d)
                }
                None => send(rng),
            },
            63..73 => match pick(rng, true, &listening) {
                Some(d) => {
                    listening[d] = false;
                    Op::Unlisten(d, stop(rng))
                }
                None => send(rng),
            },
            73..80 => match pick(rng, true, &listening) {
                Some(d) => Op::Relisten(d, stop(rng)),
                None => send(rng),
            },
            80..85 => Op::RelayRestart(stop(rng)),
            85..88 => {
                down = Some(below(rng, 2));
                Op::RelayDown(stop(rng))
            }
            88..93 => Op::Cut,
            // A send-only process of a device whose messages wait at the relay.
            _ => match pick(rng, false, &listening) {
                Some(from) => Op::Send {
                    from,
                    to: below(rng, CELLS as u64) as usize,
                    cut: None,
                },
                None => send(rng),
            },
        };
        ops.push(op);
    }
    if down.is_some() {
        ops.push(Op::RelayUp);
    }
    ops
}

/// The processes and what they recorded.
struct World {
    rec: Arc<Recorder>,
    relay: Relay,
    proxy: Proxy,
    devices: Vec<Device>,
    cells: Vec<String>,
    seq: u32,
}

impl World {
    /// The relay, the proxy in front of it, and every device registered through the proxy.
    fn new(dir: &Path, seed: u64) -> Self {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let rec = Arc::new(Recorder::new(History {
            seed,
            devices: DEVICES
                .iter()
                .map(|&(name, cell)| DeviceInfo {
                    name: name.to_string(),
                    cell,
                })
                .collect(),
            ..History::default()
        }));
        let mut relay = Relay::new(dir, &logs);
        relay.start(&rec);
        let proxy = Proxy::start(relay.addr);
        let via = proxy.addr().to_string();
        let mut cells = Vec::new();
        let mut words: Vec<String> = Vec::new();
        let mut devices = Vec::new();
        for (index, &(name, cell)) in DEVICES.iter().enumerate() {
            let home = dir.join(name);
            if cell == cells.len() {
                let created =
                    common::success(&common::run(&home, &["create-cell", "--json"], None));
                cells.push(created["cell_id"].as_str().unwrap().to_string());
                words.push(created["mnemonic"].as_str().unwrap().to_string());
            }
            let connected = common::success(&common::run(
                &home,
                &["connect-cell", "--relay", &via, "--json"],
                Some(words[cell].as_bytes()),
            ));
            assert_eq!(connected["cell_id"], cells[cell].as_str());
            devices.push(Device::new(index, name, home, logs.clone()));
        }
        rec.lock().cells = cells.clone();
        Self {
            rec,
            relay,
            proxy,
            devices,
            cells,
            seq: 0,
        }
    }

    fn apply(&mut self, op: &Op) {
        let rec = Arc::clone(&self.rec);
        match *op {
            Op::Send { from, to, cut } => {
                if let Some(bytes) = cut {
                    self.proxy.arm(bytes);
                }
                let pending = self.start_send(from, to, false);
                self.finish_send(pending);
                if cut.is_some() {
                    let fired = self.proxy.disarm();
                    rec.log(format!(
                        "cut {}",
                        if fired { "made" } else { "not reached" }
                    ));
                }
            }
            Op::Burst {
                ref sends,
                kill_after_ms,
            } => {
                let pending: Vec<_> = sends
                    .iter()
                    .map(|&(from, to)| self.start_send(from, to, false))
                    .collect();
                // Not synchronisation: the moment of the crash, among the sends.
                std::thread::sleep(Duration::from_millis(kill_after_ms));
                self.relay.stop(&rec, Stop::Kill);
                self.relay.start(&rec);
                for p in pending {
                    self.finish_send(p);
                }
            }
            Op::Listen(d) => self.devices[d].start_listen(&rec),
            Op::Unlisten(d, stop) => self.devices[d].stop_listen(&rec, stop),
            Op::Relisten(d, stop) => {
                self.devices[d].stop_listen(&rec, stop);
                self.devices[d].start_listen(&rec);
            }
            Op::RelayRestart(stop) => {
                self.relay.stop(&rec, stop);
                self.relay.start(&rec);
            }
            Op::RelayDown(stop) => self.relay.stop(&rec, stop),
            Op::RelayUp => self.relay.start(&rec),
            Op::Cut => self.proxy.cut(),
        }
    }

    fn start_send(&mut self, from: usize, to: usize, marker: bool) -> device::Pending {
        self.seq += 1;
        let seq = self.seq;
        self.rec.lock().sends.insert(
            seq,
            Sent {
                seq,
                from,
                to,
                marker,
                id: None,
                outcome: None,
            },
        );
        let cell = self.cells[to].clone();
        self.devices[from].start_send(&self.rec, &cell, seq)
    }

    fn finish_send(&self, pending: device::Pending) {
        let seq = pending.seq;
        let (outcome, id) = pending.wait();
        self.rec.log(format!("m{seq} answered {outcome:?}"));
        let mut h = self.rec.lock();
        let sent = h.sends.get_mut(&seq).expect("recorded when started");
        sent.outcome = Some(outcome);
        sent.id = id;
    }

    /// The final phase: the relay up, every device listening, a marker from every device to
    /// every cell; then waits until every device printed every marker and every message it
    /// was promised (or a minute passes), and stops the listens.
    fn finish(&mut self) {
        let rec = Arc::clone(&self.rec);
        rec.log("final phase");
        self.proxy.disarm();
        if !self.relay.running() {
            self.relay.start(&rec);
        }
        for d in 0..self.devices.len() {
            if !self.devices[d].listening() {
                self.devices[d].start_listen(&rec);
            }
        }
        let markers: Vec<_> = (0..self.devices.len())
            .flat_map(|from| (0..CELLS).map(move |to| (from, to)))
            .collect();
        let pending: Vec<_> = markers
            .into_iter()
            .map(|(from, to)| self.start_send(from, to, true))
            .collect();
        for p in pending {
            self.finish_send(p);
        }
        if !rec.wait_until(Duration::from_secs(60), History::complete) {
            rec.log("final phase: not every promised message arrived within 60 s");
        } else {
            rec.log("final phase: every marker and every promised message arrived");
        }
        for d in &mut self.devices {
            d.stop_listen(&rec, Stop::Term);
        }
    }
}

/// The relay process, on one address for its whole life (restarts bind it again).
struct Relay {
    home: PathBuf,
    data: PathBuf,
    logs: PathBuf,
    addr: SocketAddr,
    child: Option<(Child, std::thread::JoinHandle<()>)>,
    runs: u32,
}

impl Relay {
    fn new(dir: &Path, logs: &Path) -> Self {
        let home = dir.join("relay");
        common::create_cell(&home);
        Self {
            home,
            data: dir.join("relay-data"),
            logs: logs.to_path_buf(),
            addr: "127.0.0.1:0".parse().unwrap(),
            child: None,
            runs: 0,
        }
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts it and waits for its `listening` line (the first run picks a free port).
    fn start(&mut self, rec: &Arc<Recorder>) {
        assert!(self.child.is_none(), "the relay runs already");
        self.runs += 1;
        let log = format!("relay-{:03}.stderr", self.runs);
        let stderr = std::fs::File::create(self.logs.join(&log)).unwrap();
        let mut child = command(&self.home)
            .args([
                "relay",
                "--listen",
                &self.addr.to_string(),
                "--json",
                "--data",
            ])
            .arg(&self.data)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("cellmesh starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, ready) = mpsc::channel();
        let (rec2, run) = (Arc::clone(rec), self.runs);
        let reader = std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if v["event"] == "listening" {
                    let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_string());
                } else if v["event"] != "summary" {
                    rec2.log(format!("relay#{run} {v}"));
                }
            }
        });
        let Ok(addr) = ready.recv_timeout(Duration::from_secs(20)) else {
            let status = reap(child, Duration::from_secs(1));
            panic!("relay#{} did not start ({status:?}; see {log})", self.runs);
        };
        self.addr = addr.parse().expect("the relay prints its address");
        rec.log(format!("relay#{} listening on {addr}", self.runs));
        self.child = Some((child, reader));
    }

    fn stop(&mut self, rec: &Recorder, stop: Stop) {
        let Some((child, reader)) = self.child.take() else {
            return;
        };
        signal(&child, stop);
        let status = reap(child, Duration::from_secs(15));
        let _ = reader.join();
        match (stop, status) {
            (Stop::Kill, _) => rec.log(format!("relay#{} killed", self.runs)),
            (Stop::Term, Some(s)) if s.success() => rec.log(format!("relay#{} stopped", self.runs)),
            (Stop::Term, other) => rec.anomaly(format!(
                "relay#{} did not exit cleanly on SIGTERM: {other:?}",
                self.runs
            )),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some((mut child, _)) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
