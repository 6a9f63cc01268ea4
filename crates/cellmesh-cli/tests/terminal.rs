//! `cellmesh` on a terminal, as a user types at it: prompts are visible or hidden as they
//! should be, and the terminal is left as it was found. A pseudo-terminal stands in for the
//! window (see `common::Pty`).

mod common;

use common::{PASS, Proc, Pty, create_cell, start_relay};

/// A message typed on the terminal is asked for visibly, so a user cannot mistake it for
/// the passphrase prompt and send the passphrase to the recipient.
#[test]
fn send_without_a_message_on_a_terminal_asks_for_it_visibly() {
    let dir = tempfile::tempdir().unwrap();
    let (_relay, addr) = start_relay(dir.path());
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    create_cell(&alice);
    let (bob_cell, _) = create_cell(&bob);
    let mut listen = Proc::start(&bob, "listen", &["--relay", &addr, "--count", "1"]);
    listen.expect("listening", |v| v["event"] == "listening");

    let pty = Pty::open();
    let mut send = pty.spawn(&alice, &["send", &bob_cell, "--relay", &addr]);
    pty.expect("Message to");
    pty.type_keys(b"hello bob\n\x04");
    pty.expect("Keystore passphrase: ");
    pty.type_keys(format!("{PASS}\n").as_bytes());
    let status = send.wait().unwrap();
    assert!(status.success(), "{status}: {}", pty.shown());
    pty.expect("delivered");
    assert!(
        !pty.shown().contains(PASS),
        "the passphrase was shown: {}",
        pty.shown()
    );
    let got = listen.expect("message", |v| v["body"].is_string());
    assert_eq!(got["body"], "hello bob\n");
    listen.finish();
    assert!(pty.echoes());
}
