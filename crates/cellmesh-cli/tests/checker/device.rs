//! A device of the checker's world: a home, its `listen` (started and stopped at will, its
//! printed messages recorded) and its sends.
//!
//! ```text
//!  listen --json ──stdout──► reader thread ──► Recorder (receipts, "listening", EOF)
//!  send --json   ──stdout──► Outcome ────────► Recorder (the send's answer)
//! ```
//!
//! Each process's stderr goes to a file of its own under the world's `logs/`, named in the
//! history, so that a failure can be read beside the timeline.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use super::history::{Outcome, Receipt, Recorder};

/// How a process is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM, and a clean exit expected.
    Term,
    /// SIGKILL.
    Kill,
}

/// The binary, in `home`, with the tests' passphrase and nothing from outside.
pub fn command(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cellmesh"));
    cmd.env("CELLMESH_HOME", home)
        .env("CELLMESH_PASSPHRASE", crate::common::PASS)
        .env_remove("CELLMESH_RELAY")
        .env_remove("CELLMESH_RELAY_CA")
        .env_remove("CELLMESH_SEED_PASSPHRASE")
        .stdin(Stdio::null());
    cmd
}

/// Sends `signal` to `child`.
pub fn signal(child: &Child, stop: Stop) {
    use rustix::process::{Pid, Signal, kill_process};
    let sig = match stop {
        Stop::Term => Signal::TERM,
        Stop::Kill => Signal::KILL,
    };
    let _ = kill_process(Pid::from_child(child), sig);
}

/// Waits for `child` to exit, `patience` at most; kills it after that (and returns `None`).
pub fn reap(mut child: Child, patience: Duration) -> Option<std::process::ExitStatus> {
    let pid = rustix::process::Pid::from_child(&child);
    let (tx, exited) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match exited.recv_timeout(patience) {
        Ok(status) => status.ok(),
        Err(_) => {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            let _ = exited.recv();
            None
        }
    }
}

/// One device.
pub struct Device {
    pub index: usize,
    pub name: String,
    pub home: PathBuf,
    logs: PathBuf,
    listen: Option<Listen>,
    /// `listen` runs started so far.
    runs: u32,
    /// Processes started so far (for log file names).
    procs: u32,
}

struct Listen {
    child: Child,
    run: u32,
    reader: JoinHandle<()>,
}

impl Device {
    pub fn new(index: usize, name: &str, home: PathBuf, logs: PathBuf) -> Self {
        Self {
            index,
            name: name.to_string(),
            home,
            logs,
            listen: None,
            runs: 0,
            procs: 0,
        }
    }

    pub fn listening(&self) -> bool {
        self.listen.is_some()
    }

    /// A stderr file for the next process, and its name.
    fn stderr(&mut self, what: &str) -> (Stdio, String) {
        self.procs += 1;
        let name = format!("{}-{:03}-{what}.stderr", self.name, self.procs);
        let file = std::fs::File::create(self.logs.join(&name)).expect("the log file opens");
        (Stdio::from(file), name)
    }

    /// Starts `listen --json` and waits for its `listening` line. A listen that cannot start
    /// is an anomaly.
    pub fn start_listen(&mut self, rec: &Arc<Recorder>) {
        assert!(self.listen.is_none(), "{} listens already", self.name);
        self.runs += 1;
        let run = self.runs;
        let (stderr, log) = self.stderr("listen");
        let mut child = command(&self.home)
            .args(["listen", "--json"])
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("cellmesh starts");
        rec.log(format!("{}#{run} listen starts (stderr {log})", self.name));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (ready_tx, ready) = mpsc::channel();
        let (rec2, device, name) = (Arc::clone(rec), self.index, self.name.clone());
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let at = rec2.now();
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    rec2.anomaly(format!(
                        "{name}#{run} printed a line that is not JSON: {line:?}"
                    ));
                    continue;
                };
                if v["event"] == "listening" {
                    let _ = ready_tx.send(());
                    continue;
                }
                if v["event"].is_string() {
                    rec2.log(format!("{name}#{run} {}", v["event"]));
                    continue;
                }
                let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                rec2.receipt(Receipt {
                    device,
                    run,
                    at,
                    body: text("body"),
                    from: text("from"),
                    id: text("id"),
                });
            }
        });
        if ready.recv_timeout(Duration::from_secs(20)).is_err() {
            let status = reap(child, Duration::from_secs(1));
            let _ = reader.join();
            rec.anomaly(format!(
                "{}#{run} listen did not start ({status:?}; see {log})",
                self.name
            ));
            return;
        }
        rec.log(format!("{}#{run} listening", self.name));
        self.listen = Some(Listen { child, run, reader });
    }

    /// Stops the listen, if one runs: SIGTERM (a clean exit expected) or SIGKILL.
    pub fn stop_listen(&mut self, rec: &Recorder, stop: Stop) {
        let Some(mut l) = self.listen.take() else {
            return;
        };
        if let Ok(Some(status)) = l.child.try_wait() {
            rec.anomaly(format!(
                "{}#{} listen had exited by itself: {status}",
                self.name, l.run
            ));
        }
        signal(&l.child, stop);
        let status = reap(l.child, Duration::from_secs(15));
        let _ = l.reader.join();
        match stop {
            Stop::Kill => {
                rec.lock().killed.insert((self.index, l.run));
                rec.log(format!("{}#{} listen killed", self.name, l.run));
            }
            Stop::Term => match status {
                Some(s) if s.success() => {
                    rec.log(format!("{}#{} listen stopped", self.name, l.run))
                }
                other => rec.anomaly(format!(
                    "{}#{} listen did not exit cleanly on SIGTERM: {other:?}",
                    self.name, l.run
                )),
            },
        }
    }

    /// Starts `send --json` to `cell` with body `m<seq>`; finish it with [`Pending::wait`].
    pub fn start_send(&mut self, rec: &Recorder, cell_id: &str, seq: u32) -> Pending {
        let (stderr, log) = self.stderr(&format!("send-m{seq}"));
        let child = command(&self.home)
            .args(["send", cell_id, &format!("m{seq}"), "--json"])
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("cellmesh starts");
        rec.log(format!(
            "{} sends m{seq}{} (stderr {log})",
            self.name,
            if self.listening() {
                " through its listen"
            } else {
                " on its own"
            },
        ));
        Pending {
            child,
            seq,
            log: self.logs.join(log),
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(mut l) = self.listen.take() {
            let _ = l.child.kill();
            let _ = l.child.wait();
        }
    }
}

/// A send under way.
pub struct Pending {
    child: Child,
    pub seq: u32,
    log: PathBuf,
}

impl Pending {
    /// Waits for its answer (60 s at most: past that it counts as an error): the outcome and
    /// the id it printed.
    pub fn wait(self) -> (Outcome, Option<String>) {
        let Pending { child, log, .. } = self;
        let out = wait_output(child, Duration::from_secs(60));
        let Some(out) = out else {
            return (Outcome::Error("send hung for 60 s".into()), None);
        };
        let line = String::from_utf8_lossy(&out.stdout);
        let v: Option<Value> = line
            .lines()
            .next()
            .and_then(|l| serde_json::from_str(l).ok());
        let stderr = std::fs::read_to_string(&log).unwrap_or_default();
        let last = stderr
            .lines()
            .last()
            .unwrap_or("(nothing on stderr)")
            .to_string();
        let Some(v) = v else {
            return (Outcome::Error(format!("{}: {last}", out.status)), None);
        };
        let id = v["id"].as_str().map(str::to_string);
        let devices = v["devices"].as_u64().unwrap_or(0);
        let outcome = match v["status"].as_str() {
            Some("delivered") => Outcome::Delivered(devices),
            Some("queued") => Outcome::Queued(devices),
            Some("unknown") => Outcome::Unknown,
            Some("unsent") => Outcome::Unsent,
            Some("refused") => Outcome::Refused(v["code"].as_str().unwrap_or("?").to_string()),
            _ => Outcome::Error(format!("{}: {line:?}", out.status)),
        };
        (outcome, id)
    }
}

/// The child's output once it exits, or `None` (and the child killed) after `patience`.
fn wait_output(mut child: Child, patience: Duration) -> Option<std::process::Output> {
    let mut stdout = child.stdout.take()?;
    let reading = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut buf);
        buf
    });
    let status = reap(child, patience);
    let stdout = reading.join().unwrap_or_default();
    Some(std::process::Output {
        status: status?,
        stdout,
        stderr: Vec::new(),
    })
}
