//! Real `cellmesh relay`, `listen` and `send` processes on loopback, as a user runs them.

mod common;

use common::{Proc, create_cell, run, success};
use serde_json::Value;

fn send(home: &std::path::Path, to: &str, body: &str, relay: Option<&str>) -> Value {
    let mut args = vec!["send", to, body, "--json"];
    if let Some(r) = relay {
        args.extend(["--relay", r]);
    }
    success(&run(home, &args, None))
}

fn failure(out: &std::process::Output) -> String {
    assert_eq!(out.status.code(), Some(1), "expected exit 1");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn two_cells_talk_through_a_relay_that_restarts_without_losing_what_it_queued() {
    let dir = tempfile::tempdir().unwrap();
    let (relay_home, alice, bob, bob2) = (
        dir.path().join("relay"),
        dir.path().join("alice"),
        dir.path().join("bob"),
        dir.path().join("bob2"),
    );
    create_cell(&relay_home);
    let (alice_cell, _) = create_cell(&alice);
    let out = run(&bob, &["create-cell", "--json"], None);
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bob_cell = created["cell_id"].as_str().unwrap().to_string();
    let data = dir.path().join("relay-data");
    let data_arg = data.to_str().unwrap();

    let mut relay = Proc::start(
        &relay_home,
        "relay",
        &["--listen", "127.0.0.1:0", "--data", data_arg],
    );
    let addr = relay.expect("listening", |v| v["event"] == "listening")["addr"]
        .as_str()
        .unwrap()
        .to_string();

    // Bob's second device: restored from the words and registered with the relay, which
    // it then remembers (no --relay afterwards).
    let words = created["mnemonic"].as_str().unwrap().as_bytes();
    let out = run(
        &bob2,
        &["connect-cell", "--relay", &addr, "--json"],
        Some(words),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let connected: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(connected["cell_id"], bob_cell.as_str());
    assert_eq!(connected["relay"], addr.as_str());

    // Alice -> Bob: both of Bob's devices get it.
    let mut bob_listen = Proc::start(&bob, "listen", &["--relay", &addr, "--count", "1"]);
    bob_listen.expect("listening", |v| v["event"] == "listening");
    let mut bob2_listen = Proc::start(&bob2, "listen", &["--count", "1"]);
    bob2_listen.expect("listening", |v| v["event"] == "listening");
    let sent = send(&alice, &bob_cell, "hello bob", Some(&addr));
    assert_eq!(sent["status"], "delivered");
    assert_eq!(sent["devices"], 2);
    for l in [&mut bob_listen, &mut bob2_listen] {
        let m = l.expect("message", |v| v["body"] == "hello bob");
        assert_eq!(m["from"], alice_cell.as_str());
        assert_eq!(m["id"], sent["id"]);
    }
    bob_listen.finish();
    bob2_listen.finish();

    // Bob -> Alice.
    let mut alice_listen = Proc::start(&alice, "listen", &["--relay", &addr, "--count", "1"]);
    alice_listen.expect("listening", |v| v["event"] == "listening");
    let back = send(&bob2, &alice_cell, "hi alice", None);
    assert_eq!(back["status"], "delivered");
    alice_listen.expect("message", |v| {
        v["body"] == "hi alice" && v["from"] == bob_cell.as_str()
    });
    alice_listen.finish();

    // Bob offline: queued. The relay restarts; Bob's devices still get it, once.
    let queued = send(&alice, &bob_cell, "while you were away", Some(&addr));
    assert_eq!(queued["status"], "queued");
    relay.stop();
    let mut relay = Proc::start(
        &relay_home,
        "relay",
        &["--listen", &addr, "--data", data_arg, "--log-metadata"],
    );
    relay.expect("listening", |v| v["event"] == "listening");
    let mut bob_listen = Proc::start(&bob, "listen", &["--relay", &addr, "--count", "1"]);
    let m = bob_listen.expect("queued message", |v| v["body"].is_string());
    assert_eq!(m["body"], "while you were away");
    assert_eq!(m["id"], queued["id"]);
    bob_listen.finish();
    relay.expect("drained", |v| v["event"] == "drained");

    // Clear errors: an unknown cell, a message too large, an unreachable relay.
    let (stranger, _) = create_cell(&dir.path().join("stranger"));
    let out = run(&alice, &["send", &stranger, "?", "--relay", &addr], None);
    assert!(failure(&out).contains("unknown cell"));
    let big = vec![b'x'; 2 << 20];
    let out = run(
        &alice,
        &["send", &bob_cell, "-", "--relay", &addr],
        Some(&big),
    );
    assert!(failure(&out).contains("too large"));
    relay.stop();
    let out = run(&alice, &["send", &bob_cell, "hi", "--relay", &addr], None);
    assert!(failure(&out).contains("unreachable"));
}

/// A chat on one device: `listen` keeps running while `send` runs from the same home. The
/// send goes through the listen's connection (a second one for the same device would replace
/// it), and the listen keeps receiving.
#[test]
fn send_from_a_home_whose_listen_is_running_goes_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let (relay_home, alice, bob) = (
        dir.path().join("relay"),
        dir.path().join("alice"),
        dir.path().join("bob"),
    );
    create_cell(&relay_home);
    let (alice_cell, _) = create_cell(&alice);
    let (bob_cell, _) = create_cell(&bob);
    let data = dir.path().join("relay-data");
    // Joins and envelopes, device by device, are shown only with --log-metadata.
    let mut relay = Proc::start(
        &relay_home,
        "relay",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
            "--log-metadata",
        ],
    );
    let addr = relay.expect("listening", |v| v["event"] == "listening")["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let mut alice_listen = Proc::start(&alice, "listen", &["--relay", &addr]);
    let alice_node =
        alice_listen.expect("listening", |v| v["event"] == "listening")["node_id"].clone();
    let mut bob_listen = Proc::start(&bob, "listen", &["--relay", &addr]);
    bob_listen.expect("listening", |v| v["event"] == "listening");
    let mut last = Value::Null;
    for round in 0..3 {
        let text = format!("ping {round}");
        let sent = send(&alice, &bob_cell, &text, Some(&addr));
        assert_eq!(sent["status"], "delivered");
        let m = bob_listen.expect("ping", |v| v["body"] == text.as_str());
        assert_eq!(m["id"], sent["id"]);
        let text = format!("pong {round}");
        let back = send(&bob, &alice_cell, &text, Some(&addr));
        assert_eq!(back["status"], "delivered");
        alice_listen.expect("pong", |v| v["body"] == text.as_str());
        last = sent["id"].clone();
    }
    // Alice's device joined the relay once: her sends did not open connections of their own
    // (each would have replaced the listen's, and the listen's return replaced it back).
    relay.expect("the last ping", |v| {
        v["event"] == "forwarded" && v["id"] == last
    });
    let joins = relay
        .seen()
        .iter()
        .filter(|v| v["event"] == "registered" && v["node_id"] == alice_node)
        .count();
    assert_eq!(joins, 1, "{:#?}", relay.seen());
    // The errors are the same as without a listen running.
    let (stranger, _) = create_cell(&dir.path().join("stranger"));
    let out = run(&alice, &["send", &stranger, "?", "--relay", &addr], None);
    assert!(failure(&out).contains("unknown cell"));
    alice_listen.stop();
    bob_listen.stop();
    // Without the listen, send connects itself again.
    let queued = send(&alice, &bob_cell, "after you left", Some(&addr));
    assert_eq!(queued["status"], "queued");
    relay.stop();
}

/// Issue 10, finding 13: by default the relay printed a line for every envelope, naming its
/// sending and receiving devices, its id and size. Now it prints its start, new
/// registrations, refusals of joins and a summary of counts, and names no envelope.
#[test]
fn by_default_the_relay_logs_no_envelope_and_who_sent_it() {
    let dir = tempfile::tempdir().unwrap();
    let (relay_home, alice, bob) = (
        dir.path().join("relay"),
        dir.path().join("alice"),
        dir.path().join("bob"),
    );
    create_cell(&relay_home);
    let (_, alice_node) = create_cell(&alice);
    let (bob_cell, bob_node) = create_cell(&bob);
    let data = dir.path().join("relay-data");
    let mut relay = Proc::start(
        &relay_home,
        "relay",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
            "--summary-secs",
            "1",
        ],
    );
    let addr = relay.expect("listening", |v| v["event"] == "listening")["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let mut bob_listen = Proc::start(&bob, "listen", &["--relay", &addr, "--count", "2"]);
    bob_listen.expect("listening", |v| v["event"] == "listening");
    let sent = send(&alice, &bob_cell, "first", Some(&addr));
    assert_eq!(sent["status"], "delivered");
    // Alice's device joins again for this one: no second registration line.
    let again = send(&alice, &bob_cell, "second", Some(&addr));
    assert_eq!(again["status"], "delivered");
    bob_listen.finish();
    let summary = relay.expect("a summary with the sends", |v| {
        v["event"] == "summary" && v["pushed"].as_u64().is_some_and(|n| n > 0)
    });
    assert!(summary["online"].is_u64() && summary["registered"].is_u64());
    let queued = send(&alice, &bob_cell, "while away", Some(&addr));
    assert_eq!(queued["status"], "queued");
    relay.expect("a summary with the queued one", |v| {
        v["event"] == "summary" && v["queued"].as_u64().is_some_and(|n| n > 0)
    });
    let seen = relay.seen().to_vec();
    relay.stop();

    let text = serde_json::to_string(&seen).unwrap();
    for id in [&sent["id"], &again["id"], &queued["id"]] {
        assert!(
            !text.contains(id.as_str().unwrap()),
            "an envelope id was logged: {text}"
        );
    }
    for ev in &seen {
        let kind = ev["event"].as_str().unwrap();
        assert!(
            ["listening", "started", "registered", "summary"].contains(&kind),
            "a {kind} line by default: {ev}"
        );
        assert!(
            ev.get("addr").is_none() || kind == "listening",
            "an address logged: {ev}"
        );
    }
    let registered: Vec<&str> = seen
        .iter()
        .filter(|v| v["event"] == "registered")
        .filter_map(|v| v["node_id"].as_str())
        .collect();
    assert_eq!(registered.len(), 2, "one line per new device: {seen:#?}");
    assert!(registered.contains(&alice_node.as_str()) && registered.contains(&bob_node.as_str()));
}

/// A SIGTERM sent the moment a relay says it listens stops it cleanly: its handler is in
/// place before it announces anything (the delivery checker found it killed by the signal).
#[test]
fn a_relay_stopped_the_moment_it_listens_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..5 {
        let (relay, _) = common::start_relay(&dir.path().join(i.to_string()));
        relay.stop();
    }
}
