//! `cellmesh` on a terminal, as a user types at it: prompts are visible or hidden as they
//! should be, and the terminal is left as it was found. A pseudo-terminal stands in for the
//! window (see `common::Pty`).

mod common;

use std::os::unix::process::ExitStatusExt as _;

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
    let status = send.wait();
    assert!(status.success(), "{status}: {}", pty.shown());
    // "delivered", or "queued" when Bob's device is slow to acknowledge on a loaded machine.
    pty.expect(" (1 device)");
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

#[test]
fn ctrl_c_at_the_hidden_prompt_leaves_the_terminal_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (_, node) = create_cell(dir.path());
    let keystore = dir.path().join("keystore.json");
    let before = std::fs::read(&keystore).unwrap();
    let pty = Pty::open();
    let modes = pty.modes();
    assert!(pty.echoes());

    let mut revoke = pty.spawn(dir.path(), &["revoke-device", &node, "--force"]);
    pty.expect("Keystore passphrase: ");
    assert!(!pty.echoes(), "the prompt does not hide what is typed");
    pty.type_keys(b"half a pass");
    pty.type_keys(b"\x03");
    let status = revoke.wait();
    // Ended as Ctrl-C ends any program, having put the terminal back first.
    assert_eq!(status.signal(), Some(2), "{status}: {}", pty.shown());
    assert_eq!(pty.modes(), modes, "the terminal was left changed");
    assert!(!pty.shown().contains("half a pass"), "{}", pty.shown());
    assert_eq!(std::fs::read(&keystore).unwrap(), before);

    // And a passphrase typed to the end is taken, unseen.
    let mut revoke = pty.spawn(dir.path(), &["revoke-device", &node, "--force", "--json"]);
    pty.expect("Keystore passphrase: ");
    pty.type_keys(format!("{PASS}\n").as_bytes());
    let status = revoke.wait();
    assert!(status.success(), "{status}: {}", pty.shown());
    pty.expect("\"revoked\"");
    assert!(!pty.shown().contains(PASS), "{}", pty.shown());
    assert_eq!(pty.modes(), modes, "the terminal was left changed");
}
