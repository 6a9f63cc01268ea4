//! Running `cellmesh` commands as real processes, for the process tests.
#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const PASS: &str = "node test passphrase";

/// A long-running command (`node`, `relay`, `listen`) with `--json`, its stdout lines parsed.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Proc {
    pub fn start(home: &Path, command: &str, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cellmesh"))
            .arg(command)
            .args(args)
            .arg("--json")
            .env("CELLMESH_HOME", home)
            .env("CELLMESH_PASSPHRASE", PASS)
            .env_remove("CELLMESH_RELAY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cellmesh starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).expect("every line is JSON");
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (10 s at most) for a line matching `want`.
    pub fn expect(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.seen.iter().find(|v| want(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if want(&v) {
                        return v;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no {what} line; saw {:#?}", self.seen);
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The lines read so far.
    pub fn seen(&self) -> &[Value] {
        &self.seen
    }

    /// SIGTERM, then expects a `stopped` line and a clean exit.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.expect("stopped", |v| v["event"] == "stopped");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "exited with {status}");
    }

    /// Waits for the process to exit by itself (10 s at most) and checks it succeeded.
    pub fn finish(mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exited with {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "did not exit; saw {:#?}",
                self.seen
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a short command to its end.
pub fn run(home: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    run_with(home, args, &[], stdin)
}

/// Runs a short command to its end, with `envs` set (and no relay settings from outside).
pub fn run_with(
    home: &Path,
    args: &[&str],
    envs: &[(&str, &Path)],
    stdin: Option<&[u8]>,
) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cellmesh"))
        .args(args)
        .env("CELLMESH_HOME", home)
        .env("CELLMESH_PASSPHRASE", PASS)
        .env_remove("CELLMESH_RELAY")
        .env_remove("CELLMESH_RELAY_CA")
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        // The command may stop reading early (a message over the limit): a broken pipe is fine.
        let _ = std::io::Write::write_all(&mut input, bytes);
    }
    drop(input);
    child.wait_with_output().unwrap()
}

/// The JSON a command that succeeded printed.
pub fn success(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `create-cell --json` in `home`: (cell id, node id).
pub fn create_cell(home: &Path) -> (String, String) {
    let out = run(home, &["create-cell", "--json"], None);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["cell_id"].as_str().unwrap().to_string(),
        v["node_id"].as_str().unwrap().to_string(),
    )
}
