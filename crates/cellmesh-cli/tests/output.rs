//! What `cellmesh` prints, and what it does when it cannot print: a closed pipe (EPIPE), a
//! full disk (ENOSPC), a terminal that went away (EIO). Real processes, as a user runs them.

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::{command, create_cell, run, start_relay, success};

/// `listen` in text mode: the lines it prints, as they come.
fn text_listen(
    home: &std::path::Path,
    relay: &str,
) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = command(home)
        .args(["listen", "--relay", relay, "--count", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

fn next_line(lines: &mpsc::Receiver<String>) -> String {
    lines
        .recv_timeout(Duration::from_secs(10))
        .expect("a line within 10 s")
}

#[test]
fn listen_text_escapes_bidirectional_and_invisible_characters() {
    let dir = tempfile::tempdir().unwrap();
    let (_relay, addr) = start_relay(dir.path());
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    create_cell(&alice);
    let (bob_cell, _) = create_cell(&bob);
    let (mut listen, lines) = text_listen(&bob, &addr);
    assert!(next_line(&lines).starts_with("listening for"));
    // Shown raw, U+202E would make the line read "... says: pay 1000 to evil" backwards.
    let body =
        "pay \u{202E}0001 ot live\u{202C}, a\u{200B}b, \u{2066}x\u{2069}, \u{061C}\u{2028}end";
    success(&run(
        &alice,
        &["send", &bob_cell, body, "--relay", &addr, "--json"],
        None,
    ));
    let line = next_line(&lines);
    assert!(
        line.ends_with(
            r"pay \u{202e}0001 ot live\u{202c}, a\u{200b}b, \u{2066}x\u{2069}, \u{61c}\u{2028}end"
        ),
        "{line:?}"
    );
    assert!(listen.wait().unwrap().success());
}
