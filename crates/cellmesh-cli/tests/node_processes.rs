//! Real `cellmesh node` processes joining one another over TCP on loopback.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const PASS: &str = "node test passphrase";

struct Proc {
    child: Child,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Proc {
    fn start(home: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cellmesh"))
            .arg("node")
            .args(args)
            .arg("--json")
            .env("CELLMESH_HOME", home)
            .env("CELLMESH_PASSPHRASE", PASS)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cellmesh node starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).expect("every line is JSON");
                assert!(v["event"].is_string(), "no event field: {line}");
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
    fn expect(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
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

    fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.expect("stopped", |v| v["event"] == "stopped");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "node exited with {status}");
    }
}

fn create_cell(home: &Path) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cellmesh"))
        .args(["create-cell", "--json"])
        .env("CELLMESH_HOME", home)
        .env("CELLMESH_PASSPHRASE", PASS)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["cell_id"].as_str().unwrap().to_string(),
        v["node_id"].as_str().unwrap().to_string(),
    )
}

#[test]
fn three_nodes_join_one_another_and_a_stranger_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let homes: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    let ids: Vec<_> = homes.iter().map(|h| create_cell(h)).collect();
    let (a_cell, a_node) = &ids[0];
    let (b_cell, b_node) = &ids[1];
    let (c_cell, c_node) = &ids[2];
    let (_, d_node) = &ids[3];

    let mut a = Proc::start(
        &homes[0],
        &[
            "--listen",
            "127.0.0.1:0",
            "--allow",
            b_cell,
            "--allow",
            c_cell,
        ],
    );
    let listening = a.expect("listening", |v| v["event"] == "listening");
    assert_eq!(listening["cell_id"], a_cell.as_str());
    let a_addr = listening["addr"].as_str().unwrap().to_string();
    assert!(!a_addr.ends_with(":0"), "the bound port is printed");

    let mut b = Proc::start(&homes[1], &["--listen", "127.0.0.1:0", "--join", &a_addr]);
    let b_addr = b.expect("listening", |v| v["event"] == "listening")["addr"]
        .as_str()
        .unwrap()
        .to_string();
    b.expect("B joined A", |v| {
        v["event"] == "joined" && v["node_id"] == a_node.as_str()
    });
    a.expect("A accepted B", |v| {
        v["event"] == "joined" && v["node_id"] == b_node.as_str() && v["inbound"] == true
    });

    // C joins both A and B.
    let mut c = Proc::start(&homes[2], &["--join", &a_addr, "--join", &b_addr]);
    c.expect("C joined A", |v| {
        v["event"] == "joined" && v["node_id"] == a_node.as_str()
    });
    c.expect("C joined B", |v| {
        v["event"] == "joined" && v["node_id"] == b_node.as_str()
    });
    a.expect("A accepted C", |v| {
        v["event"] == "joined" && v["node_id"] == c_node.as_str()
    });
    // A tells B about C (UPDATE).
    b.expect("B learned of C via A", |v| {
        v["event"] == "learned" && v["node_id"] == c_node.as_str() && v["via"] == a_node.as_str()
    });

    // D is not on A's allow-list.
    let mut d = Proc::start(&homes[3], &["--join", &a_addr]);
    let refused = d.expect("D refused", |v| v["event"] == "refused");
    assert_eq!(refused["code"], "unauthorized");
    assert_eq!(refused["by_peer"], true);
    let refused = a.expect("A refused D", |v| v["event"] == "refused");
    assert_eq!(refused["node_id"], d_node.as_str());
    assert_eq!(refused["by_peer"], false);

    for p in [d, c, b] {
        p.stop();
    }
    a.expect("A saw B leave", |v| {
        v["event"] == "left" && v["node_id"] == b_node.as_str()
    });
    a.stop();
}
