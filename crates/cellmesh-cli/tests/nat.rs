//! NAT in network namespaces: two devices on a private network behind a masquerading router
//! (from which only outbound connections get out) reach each other through a relay on the
//! "public" network, with the real `cellmesh` binary in each namespace.
//!
//! ```text
//!  cmnat<pid>-relay            cmnat<pid>-router                       cmnat<pid>-a, -b
//!  eth0 203.0.113.10/24 ------ pub1 203.0.113.1/24
//!  (route to 10.77.0.0/24      br0  10.77.0.1/24 --+-- a1 ------------ eth0 10.77.0.2/24
//!   via the router, so only    masquerade out pub1 '-- b1 ------------ eth0 10.77.0.3/24
//!   its firewall keeps it out) NEW from pub1 dropped
//! ```
//!
//! Every interface is created inside a namespace whose name carries this process's id, so
//! parallel runs do not collide and deleting the namespaces (in a drop guard, also on failure)
//! removes everything. Needs root, `ip` (iproute2), `nft` (nftables), `bash` and `timeout`;
//! where the machine lacks them or forbids namespaces the test prints
//! `SKIPPED nat test: <reason>` on stderr and passes; under `CI=true` it fails instead.

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

const PASS: &str = "nat test passphrase";
const PREFIX: &str = "cmnat";
const RELAY_IP: &str = "203.0.113.10";
const RELAY_ADDR: &str = "203.0.113.10:7000";
const ROUTER_PUBLIC_IP: &str = "203.0.113.1";
const ROUTER_PRIVATE_IP: &str = "10.77.0.1";
const A_IP: &str = "10.77.0.2";
const B_IP: &str = "10.77.0.3";
/// The longest any single step may take before the test fails (and its guards clean up).
const WAIT: Duration = Duration::from_secs(30);

/// Masquerade what leaves through the public interface; drop connections that the public side
/// tries to open towards the private side (replies to outbound ones still pass).
const RULESET: &str = r#"
table inet cellmesh_nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "pub1" masquerade
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        ct state established,related accept
        iifname "pub1" ct state new drop
    }
}
"#;

/// Says so on the real stderr (a skip must be seen in CI's log), or, under `CI=true`, fails.
fn skip(reason: &str) {
    common::skip("nat test", reason);
}

/// Why this machine cannot run the test, if it cannot.
fn unsupported() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|e| e.parse::<u32>().ok());
    match euid {
        Some(0) => {}
        Some(uid) => {
            return Some(format!(
                "not root (euid {uid}); network namespaces need root"
            ));
        }
        None => return Some("cannot tell the effective uid from /proc/self/status".into()),
    }
    for (tool, arg, package) in [
        ("ip", "-V", "iproute2"),
        ("nft", "--version", "nftables"),
        ("bash", "--version", "bash"),
        ("timeout", "--version", "coreutils"),
    ] {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Some(format!("`{tool}` is missing (Debian package {package})"));
        }
    }
    None
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

/// `ip ARGS`, with ARGS formatted like `format!` and split on whitespace; must succeed.
macro_rules! ip {
    ($($fmt:tt)*) => {
        run(Command::new("ip").args(format!($($fmt)*).split_whitespace()))
    };
}

/// Kills what still runs in namespace `name` (only this test's processes run there) and
/// deletes it, which also destroys its interfaces.
fn remove_namespace(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    match Command::new("ip").args(["netns", "del", name]).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "nat test: cannot delete namespace {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("nat test: cannot delete namespace {name}: {e}"),
    }
}

/// Removes namespaces left by an earlier run of this test that was killed before its guard
/// ran (their names carry the pid of a process that no longer exists).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("nat test: removing stale namespace {name}");
            remove_namespace(name);
        }
    }
}

/// The namespaces of one run; dropping it deletes them (and with them every interface).
struct Net {
    prefix: String,
    made: Vec<String>,
}

impl Net {
    /// Creates the four namespaces, or says why the machine does not allow it.
    fn create() -> Result<Self, String> {
        let mut net = Self {
            prefix: format!("{PREFIX}{}", std::process::id()),
            made: Vec::new(),
        };
        for role in ["relay", "router", "a", "b"] {
            let name = net.ns(role);
            let out = Command::new("ip")
                .args(["netns", "add", &name])
                .output()
                .map_err(|e| format!("cannot run `ip netns add`: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "`ip netns add {name}` failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            net.made.push(name);
        }
        Ok(net)
    }

    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    /// Wires the topology drawn at the top of this file.
    fn wire(&self, scratch: &Path) {
        let [relay, router, a, b] = ["relay", "router", "a", "b"].map(|r| self.ns(r));
        for ns in [&relay, &router, &a, &b] {
            ip!("-n {ns} link set lo up");
        }
        // Public side: relay <-> router.
        ip!("-n {router} link add pub1 type veth peer name eth0 netns {relay}");
        ip!("-n {router} addr add {ROUTER_PUBLIC_IP}/24 dev pub1");
        ip!("-n {relay} addr add {RELAY_IP}/24 dev eth0");
        // Private side: a bridge in the router, one veth per device.
        ip!("-n {router} link add br0 type bridge");
        ip!("-n {router} addr add {ROUTER_PRIVATE_IP}/24 dev br0");
        for (port, ns, addr) in [("a1", &a, A_IP), ("b1", &b, B_IP)] {
            ip!("-n {router} link add {port} type veth peer name eth0 netns {ns}");
            ip!("-n {router} link set {port} master br0 up");
            ip!("-n {ns} addr add {addr}/24 dev eth0");
            ip!("-n {ns} link set eth0 up");
            ip!("-n {ns} route add default via {ROUTER_PRIVATE_IP}");
        }
        ip!("-n {router} link set pub1 up");
        ip!("-n {router} link set br0 up");
        ip!("-n {relay} link set eth0 up");
        // The public side knows the way to the private net: only the router's firewall, not a
        // missing route, keeps the relay from connecting to a device.
        ip!("-n {relay} route add 10.77.0.0/24 via {ROUTER_PUBLIC_IP}");
        // The router forwards (the sysctl is per namespace) and masquerades.
        run(Command::new("ip").args([
            "netns",
            "exec",
            &router,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
        ]));
        let rules = scratch.join("router.nft");
        std::fs::write(&rules, RULESET).unwrap();
        run(Command::new("ip")
            .args(["netns", "exec", &router, "nft", "-f"])
            .arg(&rules));
    }

    /// Whether a TCP connection from namespace `role` to `ip:port` opens within 2 s: `Ok`, or
    /// the exit status of `timeout` (124: no answer at all).
    fn tcp_connect(&self, role: &str, ip: &str, port: u16) -> Result<(), ExitStatus> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(role)])
            .args([
                "timeout",
                "2",
                "bash",
                "-c",
                &format!("exec 3<>/dev/tcp/{ip}/{port}"),
            ])
            .stdin(Stdio::null())
            .output()
            .expect("ip netns exec runs");
        if out.status.success() {
            Ok(())
        } else {
            Err(out.status)
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for name in self.made.iter().rev() {
            remove_namespace(name);
        }
    }
}

/// A `cellmesh` process, in a namespace or not; killed when dropped if still running.
struct Proc {
    name: String,
    child: Child,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
    stderr: Arc<Mutex<String>>,
    /// The thread reading stderr, which ends once the process and its children are gone.
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Proc {
    /// `cellmesh --home HOME ARGS...`, inside namespace `ns` when given. Its stdout lines are
    /// parsed as JSON (a line that is not JSON is kept as a string) and, like its stderr,
    /// echoed with a `[name]` prefix (shown with `--nocapture` or when the test fails).
    fn start(name: &str, ns: Option<&str>, home: &Path, args: &[&str]) -> Self {
        let bin = env!("CARGO_BIN_EXE_cellmesh");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, bin]);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("--home")
            .arg(home)
            .args(args)
            .env("CELLMESH_PASSPHRASE", PASS)
            .env_remove("CELLMESH_HOME")
            .env_remove("CELLMESH_RELAY")
            .env_remove("CELLMESH_SEED_PASSPHRASE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {cmd:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let tag = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (errout, buf) = (child.stderr.take().unwrap(), stderr.clone());
        let tag = name.to_string();
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(errout).lines().map_while(Result::ok) {
                eprintln!("[{tag} stderr] {line}");
                let mut buf = buf.lock().unwrap();
                buf.push_str(&line);
                buf.push('\n');
            }
        });
        Self {
            name: name.to_string(),
            child,
            lines,
            seen: Vec::new(),
            stderr,
            stderr_reader: Some(stderr_reader),
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (`WAIT` at most) for a stdout line matching `want`.
    fn expect(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        self.expect_nth(what, 1, want)
    }

    /// Waits (`WAIT` at most) until `n` stdout lines matched `want`; returns the `n`th.
    fn expect_nth(&mut self, what: &str, n: usize, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = self.seen.iter().filter(|v| want(v)).nth(n - 1) {
                return v.clone();
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match self.lines.recv_timeout(left) {
                Ok(v) => self.seen.push(v),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        let exited = self.child.try_wait().ok().flatten();
        panic!(
            "{}: no {what} line (#{n}; exited: {exited:?}); stdout: {:#?}\nstderr:\n{}",
            self.name,
            self.seen,
            self.stderr()
        );
    }

    /// Waits (`WAIT` at most) for the process to exit.
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: still running after {WAIT:?}; stdout: {:#?}\nstderr:\n{}",
                self.name,
                self.seen,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a successful exit and returns every stdout line.
    fn finish(mut self) -> Vec<Value> {
        let status = self.wait();
        // The process is gone, so its stdout reaches EOF and the reader thread ends.
        while let Ok(v) = self.lines.recv_timeout(WAIT) {
            self.seen.push(v);
        }
        // All of stderr read too (its end of file came with the process's exit).
        if let Some(reader) = self.stderr_reader.take() {
            reader.join().unwrap();
        }
        assert!(
            status.success(),
            "{}: exited with {status}; stdout: {:#?}\nstderr:\n{}",
            self.name,
            self.seen,
            self.stderr()
        );
        std::mem::take(&mut self.seen)
    }

    /// SIGTERM, then expects `stopped` and a successful exit.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        run(Command::new("kill").args(["-TERM", &pid]));
        self.expect("stopped", |v| v["event"] == "stopped");
        let status = self.wait();
        assert!(
            status.success(),
            "{}: exited with {status} after SIGTERM; stderr:\n{}",
            self.name,
            self.stderr()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct Cell {
    cell_id: String,
    node_id: String,
}

#[test]
fn devices_behind_nat_reach_each_other_through_a_relay() {
    let started = Instant::now();
    if let Some(reason) = unsupported() {
        skip(&reason);
        return;
    }
    remove_stale_namespaces();
    let net = match Net::create() {
        Ok(net) => net,
        Err(reason) => {
            skip(&reason);
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    net.wire(dir.path());
    let [relay_ns, a_ns, b_ns] = ["relay", "a", "b"].map(|r| net.ns(r));
    let home = |who: &str| dir.path().join(who);

    // Three cells, created side by side (key derivation takes a moment each).
    let creating = ["relay", "alice", "bob"].map(|who| {
        let name = format!("create-cell {who}");
        Proc::start(&name, None, &home(who), &["create-cell", "--json"])
    });
    let [relay_cell, alice, bob] = creating.map(|p| {
        let out = p.finish();
        Cell {
            cell_id: out[0]["cell_id"].as_str().unwrap().to_string(),
            node_id: out[0]["node_id"].as_str().unwrap().to_string(),
        }
    });

    // The relay on the public network.
    let relay_data = dir.path().join("relay-data");
    let mut relay = Proc::start(
        "relay",
        Some(&relay_ns),
        &home("relay"),
        &[
            "relay",
            "--listen",
            RELAY_ADDR,
            "--data",
            relay_data.to_str().unwrap(),
            // What this test follows, device by device.
            "--log-metadata",
            "--json",
        ],
    );
    let listening = relay.expect("listening", |v| v["event"] == "listening");
    assert_eq!(listening["addr"], RELAY_ADDR);
    assert!(
        listening["relay_node"]
            .as_str()
            .is_some_and(|n| n.starts_with("node1")),
        "{listening}"
    );
    let relay_started = relay.expect("started", |v| v["event"] == "started");
    assert_eq!(relay_started["cell_id"], relay_cell.cell_id.as_str());

    // The NAT itself: a device's listening port is reachable on the private side, not from
    // the public side (which has a route there; the router drops the attempt).
    let probe_addr = format!("{A_IP}:7001");
    let mut probe = Proc::start(
        "probe in a",
        Some(&a_ns),
        &home("alice"),
        &["node", "--listen", &probe_addr, "--json"],
    );
    let probe_listening = probe.expect("listening", |v| v["event"] == "listening");
    assert_eq!(probe_listening["addr"], probe_addr.as_str());
    assert_eq!(
        net.tcp_connect("router", A_IP, 7001),
        Ok(()),
        "control: the router reaches device a's port on the private side"
    );
    // (Both attempts at once: each takes the full 2 s when dropped.)
    let (to_a, to_b) = std::thread::scope(|s| {
        let to_b = s.spawn(|| net.tcp_connect("relay", B_IP, 9));
        (net.tcp_connect("relay", A_IP, 7001), to_b.join().unwrap())
    });
    let to_a = to_a.expect_err("the public side opened a connection to device a behind the NAT");
    assert_eq!(
        to_a.code(),
        Some(124),
        "the router drops (not refuses) connections from the public side"
    );
    let to_b = to_b.expect_err("the public side opened a connection to device b behind the NAT");
    assert_eq!(to_b.code(), Some(124), "dropped, not refused by b");
    probe.stop();
    // ...while outbound connections from the private side go out (masqueraded).
    assert_eq!(net.tcp_connect("a", RELAY_IP, 7000), Ok(()));

    // Bob (in b) listens; the relay sees him from the router's public address.
    let mut bob_listen = Proc::start(
        "bob listen",
        Some(&b_ns),
        &home("bob"),
        &["listen", "--relay", RELAY_ADDR, "--json", "--count", "1"],
    );
    let l = bob_listen.expect("listening", |v| v["event"] == "listening");
    assert_eq!(l["cell_id"], bob.cell_id.as_str());
    let reg = relay.expect("bob registered", |v| {
        v["event"] == "registered" && v["node_id"] == bob.node_id.as_str()
    });
    assert_eq!(reg["cell_id"], bob.cell_id.as_str());
    let seen_from = reg["addr"].as_str().unwrap();
    assert!(
        seen_from.starts_with(&format!("{ROUTER_PUBLIC_IP}:")),
        "the relay sees bob from {seen_from}, not from the router's public address"
    );

    // Alice (in a) sends to Bob: delivered, and Bob's listen prints it.
    let body = "hello bob, from behind the NAT ✓";
    let sent = Proc::start(
        "alice send",
        Some(&a_ns),
        &home("alice"),
        &["send", &bob.cell_id, body, "--relay", RELAY_ADDR, "--json"],
    )
    .finish();
    assert_eq!(sent.len(), 1, "{sent:#?}");
    assert_eq!(sent[0]["status"], "delivered", "{}", sent[0]);
    assert_eq!(sent[0]["devices"], 1);
    assert_eq!(sent[0]["to"], bob.cell_id.as_str());
    let got = bob_listen.expect("message", |v| v.get("body").is_some());
    assert_eq!(got["from"], alice.cell_id.as_str());
    assert_eq!(got["device"], alice.node_id.as_str());
    assert_eq!(got["body"], body);
    assert_eq!(got["id"], sent[0]["id"]);
    assert!(got.get("encoding").is_none(), "{got}");
    let reg = relay.expect("alice registered", |v| {
        v["event"] == "registered" && v["node_id"] == alice.node_id.as_str()
    });
    assert!(
        reg["addr"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{ROUTER_PUBLIC_IP}:")),
        "{reg}"
    );
    let fwd = relay.expect("forwarded to bob", |v| {
        v["event"] == "forwarded" && v["to"] == bob.node_id.as_str()
    });
    assert_eq!(fwd["status"], "pushed");
    assert_eq!(fwd["from"], alice.node_id.as_str());
    bob_listen.finish();
    // Each command is one connection of its device to the relay: wait until the relay saw
    // alice's send go, so that her listen below is the only connection of her device.
    relay.expect("alice's send gone", |v| {
        v["event"] == "offline" && v["node_id"] == alice.node_id.as_str()
    });

    // The other way: Alice (in a) listens, Bob (in b) sends.
    let mut alice_listen = Proc::start(
        "alice listen",
        Some(&a_ns),
        &home("alice"),
        &["listen", "--relay", RELAY_ADDR, "--json", "--count", "1"],
    );
    alice_listen.expect("listening", |v| v["event"] == "listening");
    let body = "hi alice, bob here";
    let sent = Proc::start(
        "bob send",
        Some(&b_ns),
        &home("bob"),
        &[
            "send",
            &alice.cell_id,
            body,
            "--relay",
            RELAY_ADDR,
            "--json",
        ],
    )
    .finish();
    assert_eq!(sent[0]["status"], "delivered", "{}", sent[0]);
    assert_eq!(sent[0]["devices"], 1);
    let got = alice_listen.expect("message", |v| v.get("body").is_some());
    assert_eq!(got["from"], bob.cell_id.as_str());
    assert_eq!(got["body"], body);
    assert_eq!(got["id"], sent[0]["id"]);
    alice_listen.finish();

    // Offline: Bob is not listening (the relay saw both his listen and his send go), so the
    // relay keeps the message and hands it over when Bob's device next connects out through
    // the NAT.
    relay.expect_nth("bob's listen and send gone", 2, |v| {
        v["event"] == "offline" && v["node_id"] == bob.node_id.as_str()
    });
    let body = "while you were away";
    let sent = Proc::start(
        "alice send (queued)",
        Some(&a_ns),
        &home("alice"),
        &["send", &bob.cell_id, body, "--relay", RELAY_ADDR, "--json"],
    )
    .finish();
    assert_eq!(sent[0]["status"], "queued", "{}", sent[0]);
    let mut bob_listen = Proc::start(
        "bob listen (later)",
        Some(&b_ns),
        &home("bob"),
        &["listen", "--relay", RELAY_ADDR, "--json", "--count", "1"],
    );
    let got = bob_listen.expect("queued message", |v| v.get("body").is_some());
    assert_eq!(got["from"], alice.cell_id.as_str());
    assert_eq!(got["body"], body);
    bob_listen.finish();
    relay.expect("drained to bob", |v| {
        v["event"] == "drained" && v["node_id"] == bob.node_id.as_str()
    });

    relay.stop();
    eprintln!(
        "nat test: passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
