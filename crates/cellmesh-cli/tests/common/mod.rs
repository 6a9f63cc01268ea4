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

/// The binary with `home`, the passphrase and no relay settings from outside, to be given
/// arguments and stdio by the test.
pub fn command(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cellmesh"));
    cmd.env("CELLMESH_HOME", home)
        .env("CELLMESH_PASSPHRASE", PASS)
        .env_remove("CELLMESH_RELAY")
        .env_remove("CELLMESH_RELAY_CA")
        .env_remove("CELLMESH_SEED_PASSPHRASE");
    cmd
}

/// A relay on a free loopback port, its home and store under `dir`: the process and its
/// address.
pub fn start_relay(dir: &Path) -> (Proc, String) {
    let home = dir.join("relay");
    create_cell(&home);
    let data = dir.join("relay-data");
    let mut relay = Proc::start(
        &home,
        "relay",
        &["--listen", "127.0.0.1:0", "--data", data.to_str().unwrap()],
    );
    let addr = relay.expect("listening", |v| v["event"] == "listening")["addr"]
        .as_str()
        .unwrap()
        .to_string();
    (relay, addr)
}

/// Checks that a command failed the way a user can act on: exit 1 (not a panic's 101, not
/// a signal), no panic message. Returns its stderr.
pub fn failed_cleanly(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Whether the tests run as root: those that play another user (with chown) need it.
pub fn root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A test that cannot run here says so on the real stderr and passes, except under CI
/// (`CI=true`), where a skip would hide that it never ran: there it fails.
pub fn skip(test: &str, reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{test} cannot run on this CI machine, and CI runs every test: {reason}");
    }
    use std::io::Write as _;
    let banner = format!(
        "\n************************************************************\n\
         SKIPPED {test}: {reason}\n\
         ************************************************************\n"
    );
    let _ = std::io::stderr().write_all(banner.as_bytes());
}

/// A uid that is not ours, for files another user owns.
pub const STRANGER: u32 = 12345;

/// A pseudo-terminal, as in a terminal window: a child started with [`Pty::spawn`] has it as
/// its controlling terminal and stdio (through util-linux `setsid --ctty`); the test types on
/// the master side and reads what the child shows there.
pub struct Pty {
    master: std::fs::File,
    slave: std::fs::File,
    shown: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    /// Where the last [`Pty::expect`] matched, in `shown`.
    matched: std::cell::Cell<usize>,
}

impl Pty {
    pub fn open() -> Self {
        let (master, slave) = pty_pair();
        let shown = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (mut reader, sink) = (master.try_clone().unwrap(), shown.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once no slave side is open, or with the test.
            while let Ok(n @ 1..) = std::io::Read::read(&mut reader, &mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self {
            master,
            slave,
            shown,
            matched: std::cell::Cell::new(0),
        }
    }

    /// `cellmesh ARGS` in `home` on this terminal, with no passphrase in its environment (it
    /// must ask).
    pub fn spawn(&self, home: &Path, args: &[&str]) -> OnTerminal {
        let stdio = || Stdio::from(self.slave.try_clone().unwrap());
        Command::new("setsid")
            .arg("--ctty")
            .arg(env!("CARGO_BIN_EXE_cellmesh"))
            .args(args)
            .env("CELLMESH_HOME", home)
            .env_remove("CELLMESH_PASSPHRASE")
            .env_remove("CELLMESH_RELAY")
            .env_remove("CELLMESH_RELAY_CA")
            .env_remove("CELLMESH_SEED_PASSPHRASE")
            .stdin(stdio())
            .stdout(stdio())
            .stderr(stdio())
            .spawn()
            .map(OnTerminal)
            .expect("util-linux setsid runs")
    }

    /// Waits (10 s at most) until the terminal shows `text` after what earlier calls found.
    pub fn expect(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let from = self.matched.get();
            if let Some(at) = self.shown()[from..].find(text) {
                self.matched.set(from + at + text.len());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the terminal never showed {text:?}; it shows {:?}",
                self.shown()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the terminal has shown so far.
    pub fn shown(&self) -> String {
        String::from_utf8_lossy(&self.shown.lock().unwrap()).into_owned()
    }

    /// Keys typed on the terminal.
    pub fn type_keys(&self, keys: &[u8]) {
        std::io::Write::write_all(&mut &self.master, keys).unwrap();
    }

    /// The terminal's local modes (echo, line editing, signals from keys).
    pub fn modes(&self) -> rustix::termios::LocalModes {
        rustix::termios::tcgetattr(&self.slave).unwrap().local_modes
    }

    /// Whether the terminal echoes what is typed.
    pub fn echoes(&self) -> bool {
        self.modes().contains(rustix::termios::LocalModes::ECHO)
    }
}

/// A command started on a [`Pty`]; killed if the test ends before it does.
pub struct OnTerminal(Child);

impl OnTerminal {
    /// Waits (30 s at most) for it to exit.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "still running after 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for OnTerminal {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The terminal side of a pseudo-terminal whose other side is closed, as after its window
/// was closed: every write to it fails with EIO.
pub fn dead_terminal() -> std::fs::File {
    let (master, slave) = pty_pair();
    drop(master);
    slave
}

/// A new pseudo-terminal: (master, slave).
fn pty_pair() -> (std::fs::File, std::fs::File) {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    use std::os::unix::fs::OpenOptionsExt as _;
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        // Not the test's controlling terminal: it belongs to the child that asks for it.
        .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
        .open(name.to_str().unwrap())
        .unwrap();
    (std::fs::File::from(master), slave)
}
