//! Issue 10, finding 10, as a user meets it with the real binaries: a revocation reaches the
//! relay and every sender, and `revoke-device` refuses ids that are not this cell's devices.

mod common;

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{command, failed_cleanly, run, start_relay, success};
use serde_json::Value;

/// `listen --json` in `home`, its stdout lines parsed as they come and its stderr kept for
/// when it ends.
struct Listen {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Listen {
    fn start(home: &Path) -> Self {
        let mut child = command(home)
            .args(["listen", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    fn expect(&mut self, what: &str, want: impl Fn(&Value) -> bool) {
        loop {
            let v = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no {what} line"));
            if want(&v) {
                return;
            }
        }
    }

    /// Waits (10 s at most) for it to end by itself: its stderr and exit status.
    fn exit(mut self) -> (String, std::process::ExitStatus) {
        let (tx, rx) = mpsc::channel();
        let mut stderr = self.child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            let _ = tx.send(text);
        });
        let text = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("listen ends within 10 s");
        (text, self.child.wait().unwrap())
    }
}

impl Drop for Listen {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A new cell in `home`, registered at the relay: (cell id, node id, its words).
fn new_cell(home: &Path, addr: &str) -> (String, String, Vec<u8>) {
    let created = success(&run(home, &["create-cell", "--json"], None));
    let words = created["mnemonic"].as_str().unwrap().as_bytes().to_vec();
    success(&run(
        home,
        &["connect-cell", "--relay", addr, "--json"],
        Some(&words),
    ));
    (
        created["cell_id"].as_str().unwrap().to_string(),
        created["node_id"].as_str().unwrap().to_string(),
        words,
    )
}

/// Another device of the cell of `words`, registered at the relay: its node id.
fn second_device(home: &Path, addr: &str, words: &[u8]) -> String {
    let joined = success(&run(
        home,
        &["connect-cell", "--relay", addr, "--json"],
        Some(words),
    ));
    joined["node_id"].as_str().unwrap().to_string()
}

fn revoke(home: &Path, node: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["revoke-device", node, "--json"];
    args.extend_from_slice(extra);
    run(home, &args, None)
}

#[test]
fn a_revoked_device_is_cut_off_and_no_sender_of_another_cell_seals_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, addr) = start_relay(dir.path());
    let (laptop, phone, alice) = (
        dir.path().join("laptop"),
        dir.path().join("phone"),
        dir.path().join("alice"),
    );
    let (cell, _, words) = new_cell(&laptop, &addr);
    let phone_node = second_device(&phone, &addr, &words);
    let (_, alice_node, _) = new_cell(&alice, &addr);
    // Before: Alice's messages are sealed for both devices.
    let sent = success(&run(&alice, &["send", &cell, "before", "--json"], None));
    assert_eq!(sent["devices"], 2);

    // The phone is lost while it listens; the laptop revokes it.
    let mut phone_listen = Listen::start(&phone);
    phone_listen.expect("listening", |v| v["event"] == "listening");
    phone_listen.expect("the queued message", |v| v["body"] == "before");
    let revoked = success(&revoke(&laptop, &phone_node, &[]));
    assert_eq!(revoked["revoked"], phone_node.as_str());
    assert_eq!(revoked["relay_status"], "accepted");
    assert_eq!(revoked["relay"], addr.as_str());
    assert!(
        revoked["revocation"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );
    relay.expect("revoked", |v| {
        v["event"] == "revoked" && v["node_id"] == phone_node.as_str()
    });
    // The listening phone is cut off and told why; it is refused from now on.
    let (phone_ended, phone_status) = phone_listen.exit();
    assert!(!phone_status.success());
    assert!(phone_ended.contains("revoked"), "{phone_ended}");
    let again = run(&phone, &["listen", "--json"], None);
    let stderr = failed_cleanly(&again);
    assert!(stderr.contains("revoked"), "{stderr}");

    // Alice never imported the revocation: her send is sealed for the laptop only.
    let sent = success(&run(&alice, &["send", &cell, "after", "--json"], None));
    assert_eq!(sent["devices"], 1, "{sent}");
    assert_eq!(sent["status"], "queued");
    // Running the command again hands the same revocation over, and is accepted.
    let twice = success(&revoke(&laptop, &phone_node, &[]));
    assert_eq!(twice["revocation"], revoked["revocation"]);
    assert_eq!(twice["relay_status"], "accepted");

    // A node id of another cell is refused before anything is revoked...
    let foreign = revoke(&laptop, &alice_node, &[]);
    let stderr = failed_cleanly(&foreign);
    assert!(
        stderr.contains("not a device of this cell") && stderr.contains("--unconfirmed"),
        "{stderr}"
    );
    let whoami: Value = success(&run(&laptop, &["whoami", "--json"], None));
    let listed: Vec<&str> = whoami["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["node_id"].as_str())
        .collect();
    assert!(!listed.contains(&alice_node.as_str()), "{whoami}");
    // ... and with --unconfirmed, the relay refuses to keep it: Alice's device is hers.
    let insisted = revoke(&laptop, &alice_node, &["--unconfirmed"]);
    let stderr = failed_cleanly(&insisted);
    assert!(stderr.contains("not_allowed"), "{stderr}");
    let shown: Value = serde_json::from_slice(&insisted.stdout).unwrap();
    assert_eq!(shown["relay_status"], "refused");
    assert_eq!(shown["relay_code"], "not_allowed");
    // Alice is still served.
    let back = success(&run(
        &laptop,
        &["send", &alice_node_cell(&alice), "hi", "--json"],
        None,
    ));
    assert_eq!(back["devices"], 1);
}

fn alice_node_cell(home: &Path) -> String {
    let whoami: Value = success(&run(home, &["whoami", "--json"], None));
    whoami["cell_id"].as_str().unwrap().to_string()
}
