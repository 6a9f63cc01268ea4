//! What happened in a run of the checker, and the checks over it.
//!
//! Every operation is logged with the time it began, every send with its answer, every
//! line a device's `listen` printed with the device and the run of `listen` that printed
//! it. The reader threads of the `listen`s and the test thread write here under one lock;
//! the test waits on [`Recorder::wait_until`] for what it needs to see (no sleeps).
//!
//! The checks, once every device has listened to the end:
//! 1. a message answered `delivered` or `queued` was printed exactly once by every device
//!    of its recipient cell;
//! 2. nothing was printed that was not sent, or that was sent to another cell, or that
//!    names another sender or id than the send's;
//! 3. a message answered `delivered` was printed by some device of its cell (implied by 1,
//!    and reported on its own); one answered otherwise (`unknown`, `refused`, an error)
//!    was printed at most once per device;
//! 4. a message answered `unsent` (it never left its device) was printed by no device.
//!
//! One duplicate is tolerated and counted: a copy printed by a `listen` killed with
//! SIGKILL, shown again by the device's next `listen`. A listen acknowledges a message
//! after its line is written and flushed (the mailbox documents it), so a kill between the
//! two shows it again; no process can close that window.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A device of the world: its name and the index of its cell.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub cell: usize,
}

/// How a send ended, as `send --json` said it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered(u64),
    Queued(u64),
    Unknown,
    /// Never sealed: the relay did not list the cell's devices in time.
    Unsent,
    Refused(String),
    /// No status line: the error on stderr.
    Error(String),
}

impl Outcome {
    /// Whether the answer promises delivery to every device of the cell.
    pub fn promised(&self) -> bool {
        matches!(self, Self::Delivered(_) | Self::Queued(_))
    }
}

/// One message sent by the checker.
#[derive(Clone, Debug)]
pub struct Sent {
    pub seq: u32,
    /// The sending device.
    pub from: usize,
    /// The recipient cell.
    pub to: usize,
    /// A final marker, sent once every device listens.
    pub marker: bool,
    pub id: Option<String>,
    pub outcome: Option<Outcome>,
}

/// One message a device's `listen` printed.
#[derive(Clone, Debug)]
pub struct Receipt {
    pub device: usize,
    /// Which `listen` of the device (1, 2, ...).
    pub run: u32,
    pub at: Duration,
    pub body: String,
    pub from: String,
    pub id: String,
}

/// Everything recorded.
#[derive(Default)]
pub struct History {
    pub seed: u64,
    pub devices: Vec<DeviceInfo>,
    /// Cell ids, by cell index.
    pub cells: Vec<String>,
    /// The timeline, readable.
    pub log: Vec<(Duration, String)>,
    pub sends: BTreeMap<u32, Sent>,
    pub receipts: Vec<Receipt>,
    /// Things no correct run does (a listen that fails to start or stop cleanly).
    pub anomalies: Vec<String>,
    /// `listen` runs that ended with SIGKILL: (device, run).
    pub killed: HashSet<(usize, u32)>,
}

/// The history under a lock, with a signal for every change.
pub struct Recorder {
    start: Instant,
    history: Mutex<History>,
    changed: Condvar,
}

impl Recorder {
    pub fn new(history: History) -> Self {
        Self {
            start: Instant::now(),
            history: Mutex::new(history),
            changed: Condvar::new(),
        }
    }

    /// Time since the run began.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn lock(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a line to the timeline.
    pub fn log(&self, text: impl Into<String>) {
        let at = self.now();
        self.lock().log.push((at, text.into()));
        self.changed.notify_all();
    }

    /// Records something no correct run does, and logs it.
    pub fn anomaly(&self, text: impl Into<String>) {
        let text = text.into();
        let at = self.now();
        let mut h = self.lock();
        h.log.push((at, format!("ANOMALY {text}")));
        h.anomalies.push(text);
        drop(h);
        self.changed.notify_all();
    }

    /// Records a printed message.
    pub fn receipt(&self, receipt: Receipt) {
        let mut h = self.lock();
        let name = h.devices[receipt.device].name.clone();
        h.log.push((
            receipt.at,
            format!(
                "  {name}#{} printed {:?} id {}",
                receipt.run, receipt.body, receipt.id
            ),
        ));
        h.receipts.push(receipt);
        drop(h);
        self.changed.notify_all();
    }

    /// Waits until `done` holds of the history, or `timeout` passes: whether it held.
    pub fn wait_until(&self, timeout: Duration, done: impl Fn(&History) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut h = self.lock();
        loop {
            if done(&h) {
                return true;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            h = self
                .changed
                .wait_timeout(h, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// What the checks found.
pub struct Verdict {
    pub failures: Vec<String>,
    /// Duplicates after a SIGKILL, tolerated (see the module docs).
    pub tolerated: Vec<String>,
    /// Sends by outcome.
    pub stats: BTreeMap<&'static str, usize>,
}

impl History {
    /// The devices of cell `cell`.
    pub fn devices_of(&self, cell: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.devices.len()).filter(move |&d| self.devices[d].cell == cell)
    }

    /// The seq a body names (`m<seq>`), if it is one of ours.
    pub fn seq_of(body: &str) -> Option<u32> {
        body.strip_prefix('m')?.parse().ok()
    }

    /// How many times device `d` printed message `seq`.
    pub fn printed(&self, d: usize, seq: u32) -> usize {
        let body = format!("m{seq}");
        self.receipts
            .iter()
            .filter(|r| r.device == d && r.body == body)
            .count()
    }

    /// Whether every device printed every message it was promised, and every marker.
    pub fn complete(&self) -> bool {
        self.sends.values().all(|s| {
            let must = s.marker || s.outcome.as_ref().is_some_and(Outcome::promised);
            !must || self.devices_of(s.to).all(|d| self.printed(d, s.seq) >= 1)
        })
    }

    /// Runs the checks.
    pub fn check(&self) -> Verdict {
        let mut failures = self.anomalies.clone();
        let mut tolerated = Vec::new();
        let mut stats: BTreeMap<&'static str, usize> = BTreeMap::new();
        let name = |d: usize| self.devices[d].name.as_str();
        let mut copies: HashMap<(usize, u32), Vec<&Receipt>> = HashMap::new();
        // 2: nothing printed that was not sent to this cell, by this sender, under this id.
        for r in &self.receipts {
            let here = format!(
                "{}#{} printed {:?} at {:?}",
                name(r.device),
                r.run,
                r.body,
                r.at
            );
            let Some(s) = History::seq_of(&r.body).and_then(|seq| self.sends.get(&seq)) else {
                failures.push(format!("{here}: never sent"));
                continue;
            };
            let cell = self.devices[r.device].cell;
            if s.to != cell {
                failures.push(format!("{here}: sent to cell {} (another cell)", s.to));
            }
            let sender_cell = &self.cells[self.devices[s.from].cell];
            if &r.from != sender_cell {
                failures.push(format!(
                    "{here}: from {} but sent by {}",
                    r.from,
                    name(s.from)
                ));
            }
            if s.id.as_ref().is_some_and(|id| id != &r.id) {
                failures.push(format!("{here}: id {} but sent as {:?}", r.id, s.id));
            }
            copies.entry((r.device, s.seq)).or_default().push(r);
        }
        // 1 and 3: each send against what each device of its cell printed.
        for s in self.sends.values() {
            let outcome = s
                .outcome
                .clone()
                .unwrap_or(Outcome::Error("no answer".into()));
            *stats
                .entry(match outcome {
                    Outcome::Delivered(_) => "delivered",
                    Outcome::Queued(_) => "queued",
                    Outcome::Unknown => "unknown",
                    Outcome::Unsent => "unsent",
                    Outcome::Refused(_) => "refused",
                    Outcome::Error(_) => "error",
                })
                .or_default() += 1;
            let what = format!(
                "m{} ({} -> cell {}, {outcome:?})",
                s.seq,
                name(s.from),
                s.to
            );
            let mut anywhere = 0;
            for d in self.devices_of(s.to) {
                let got = copies.get(&(d, s.seq)).map(Vec::as_slice).unwrap_or(&[]);
                anywhere += got.len();
                if got.is_empty() {
                    if s.marker || outcome.promised() {
                        failures.push(format!("{what}: {} never printed it", name(d)));
                    }
                    continue;
                }
                if outcome == Outcome::Unsent {
                    failures.push(format!(
                        "{what}: answered unsent, yet {} printed it",
                        name(d)
                    ));
                }
                if got.len() == 1 {
                    continue;
                }
                // Every copy but the last printed by a listen that was killed: tolerated.
                let (last, earlier) = got.split_last().expect("two copies or more");
                let after_kills = earlier
                    .iter()
                    .all(|r| self.killed.contains(&(r.device, r.run)) && r.run < last.run);
                let runs: Vec<u32> = got.iter().map(|r| r.run).collect();
                let text = format!(
                    "{what}: {} printed it {} times (runs {runs:?})",
                    name(d),
                    got.len()
                );
                if after_kills {
                    tolerated.push(text);
                } else {
                    failures.push(text);
                }
            }
            if matches!(outcome, Outcome::Delivered(_)) && anywhere == 0 {
                failures.push(format!("{what}: answered delivered, printed by no device"));
            }
        }
        Verdict {
            failures,
            tolerated,
            stats,
        }
    }

    /// The whole history, readable: the world, then the timeline.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "CHECKER_SEED={}", self.seed);
        for (c, id) in self.cells.iter().enumerate() {
            let devices: Vec<&str> = self
                .devices_of(c)
                .map(|d| self.devices[d].name.as_str())
                .collect();
            let _ = writeln!(out, "cell {c} = {id}: devices {devices:?}");
        }
        for (at, line) in &self.log {
            let _ = writeln!(out, "{:>8.3} {line}", at.as_secs_f64());
        }
        out
    }
}

/// Check 4 can fail: a message answered `unsent` and printed anyway is reported.
#[test]
fn a_message_answered_unsent_that_is_printed_fails_the_check() {
    let mut h = History {
        devices: vec![
            DeviceInfo {
                name: "a".into(),
                cell: 0,
            },
            DeviceInfo {
                name: "b".into(),
                cell: 1,
            },
        ],
        cells: vec!["cell-a".into(), "cell-b".into()],
        ..History::default()
    };
    h.sends.insert(
        1,
        Sent {
            seq: 1,
            from: 0,
            to: 1,
            marker: false,
            id: None,
            outcome: Some(Outcome::Unsent),
        },
    );
    assert!(h.check().failures.is_empty(), "not printed: fine");
    h.receipts.push(Receipt {
        device: 1,
        run: 1,
        at: Duration::ZERO,
        body: "m1".into(),
        from: "cell-a".into(),
        id: String::new(),
    });
    let failures = h.check().failures;
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].contains("answered unsent"), "{failures:?}");
}
