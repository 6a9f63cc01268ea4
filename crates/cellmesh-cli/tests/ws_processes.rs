//! A real `cellmesh relay --websocket`, and `connect-cell`, `listen` and `send` reaching it as
//! `ws://127.0.0.1:PORT` and as plain `127.0.0.1:PORT` on the same port, as a user runs them.

mod common;

use common::{Proc, create_cell, run_with, success};
use serde_json::Value;

/// The port of a relay's `listening` line.
fn port_of(listening: &Value) -> String {
    let addr = listening["addr"].as_str().unwrap();
    addr.rsplit_once(':').unwrap().1.to_string()
}

#[test]
fn cells_talk_through_a_relay_over_websocket_and_plain_tcp_on_one_port() {
    let dir = tempfile::tempdir().unwrap();
    let (relay_home, alice, bob, bob2) = (
        dir.path().join("relay"),
        dir.path().join("alice"),
        dir.path().join("bob"),
        dir.path().join("bob2"),
    );
    create_cell(&relay_home);
    let (alice_cell, _) = create_cell(&alice);
    let created = success(&run_with(&bob, &["create-cell", "--json"], &[], None));
    let bob_cell = created["cell_id"].as_str().unwrap().to_string();

    let data = dir.path().join("relay-data");
    let mut relay = Proc::start(
        &relay_home,
        "relay",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
            "--websocket",
        ],
    );
    let listening = relay.expect("listening", |v| v["event"] == "listening");
    assert_eq!(listening["websocket"], true);
    assert_eq!(listening["tls"], false);
    let port = port_of(&listening);
    let ws = format!("ws://127.0.0.1:{port}");
    let plain = format!("127.0.0.1:{port}");

    // Bob's second device registers over WebSocket with a path; the URL is remembered as
    // written and used by a later `listen` without --relay.
    let saved_url = format!("ws://localhost:{port}/cellmesh");
    let words = created["mnemonic"].as_str().unwrap().as_bytes();
    let connected = success(&run_with(
        &bob2,
        &["connect-cell", "--relay", &saved_url, "--json"],
        &[],
        Some(words),
    ));
    assert_eq!(connected["relay"], saved_url.as_str());

    let mut bob_listen = Proc::start(&bob, "listen", &["--relay", &ws, "--count", "2"]);
    bob_listen.expect("listening", |v| v["event"] == "listening");
    let mut bob2_listen = Proc::start(&bob2, "listen", &["--count", "2"]);
    bob2_listen.expect("listening", |v| v["event"] == "listening");

    // Alice sends once over WebSocket and once over plain TCP, to the same port.
    for (relay_arg, body) in [(&ws, "hello over websocket"), (&plain, "hello over tcp")] {
        let sent = success(&run_with(
            &alice,
            &["send", &bob_cell, body, "--relay", relay_arg, "--json"],
            &[],
            None,
        ));
        assert_eq!(sent["status"], "delivered", "{relay_arg}");
        assert_eq!(sent["devices"], 2);
    }
    for l in [&mut bob_listen, &mut bob2_listen] {
        for body in ["hello over websocket", "hello over tcp"] {
            let m = l.expect("message", |v| v["body"] == body);
            assert_eq!(m["from"], alice_cell.as_str());
        }
    }
    bob_listen.finish();
    bob2_listen.finish();

    // And back: Bob over WebSocket to Alice, who listens over plain TCP. (One process per
    // device at a time: two on one device would take each other's place at the relay.)
    let mut alice_listen = Proc::start(&alice, "listen", &["--relay", &plain, "--count", "1"]);
    alice_listen.expect("listening", |v| v["event"] == "listening");
    let back = success(&run_with(
        &bob,
        &["send", &alice_cell, "and back", "--relay", &ws, "--json"],
        &[],
        None,
    ));
    assert_eq!(back["status"], "delivered");
    let m = alice_listen.expect("message", |v| v["body"] == "and back");
    assert_eq!(m["from"], bob_cell.as_str());
    alice_listen.finish();

    // A malformed URL is a usage error that names the problem.
    let out = run_with(
        &alice,
        &["send", &bob_cell, "hi", "--relay", "ws://bad host/"],
        &[],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad host"), "{stderr}");

    // WebSocket to a relay run without --websocket: one clear line, exit 1, no hang.
    let mut old = Proc::start(
        &relay_home,
        "relay",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data",
            dir.path().join("old-data").to_str().unwrap(),
        ],
    );
    let old_listening = old.expect("listening", |v| v["event"] == "listening");
    assert_eq!(old_listening["websocket"], false);
    let old_url = format!("ws://127.0.0.1:{}/", port_of(&old_listening));
    let started = std::time::Instant::now();
    let out = run_with(
        &alice,
        &["send", &bob_cell, "hi", "--relay", &old_url],
        &[],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("relay {old_url}: WebSocket failed"))
            && stderr.contains("--websocket"),
        "{stderr}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(8));
    old.stop();
    relay.stop();
}
