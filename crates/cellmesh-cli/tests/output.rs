//! What `cellmesh` prints, and what it does when it cannot print: a closed pipe (EPIPE), a
//! full disk (ENOSPC), a terminal that went away (EIO). Real processes, as a user runs them.

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::{command, create_cell, dead_terminal, failed_cleanly, run, start_relay, success};

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

/// Where a command's output goes: a pipe nobody reads any more (EPIPE), a full disk
/// (ENOSPC, `/dev/full`), a terminal whose window was closed (EIO).
#[derive(Clone, Copy, Debug)]
enum Broken {
    Pipe,
    Full,
    Terminal,
}

const BROKEN: [Broken; 3] = [Broken::Pipe, Broken::Full, Broken::Terminal];

impl Broken {
    fn stdio(self) -> Stdio {
        match self {
            Self::Pipe => {
                let (reader, writer) = std::io::pipe().unwrap();
                drop(reader);
                Stdio::from(writer)
            }
            Self::Full => Stdio::from(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/dev/full")
                    .unwrap(),
            ),
            Self::Terminal => Stdio::from(dead_terminal()),
        }
    }

    /// What the error line says (a closed pipe says nothing: its reader has gone).
    fn says(self) -> &'static str {
        match self {
            Self::Pipe => "",
            Self::Full => "No space left on device",
            Self::Terminal => "Input/output error",
        }
    }
}

/// `cellmesh ARGS` in `home` with its stdout broken; stderr is read.
fn with_broken_stdout(
    home: &std::path::Path,
    args: &[&str],
    broken: Broken,
) -> std::process::Output {
    // std starts children with SIGPIPE at its default (death), so this also checks that
    // the binary ignores it and sees EPIPE as an error.
    command(home)
        .args(args)
        .stdin(Stdio::null())
        .stdout(broken.stdio())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn whoami_with_nowhere_to_write_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    create_cell(dir.path());
    for broken in BROKEN {
        for args in [&["whoami"][..], &["whoami", "--json"]] {
            let out = with_broken_stdout(dir.path(), args, broken);
            let stderr = failed_cleanly(&out);
            assert!(stderr.contains(broken.says()), "{broken:?}: {stderr}");
            if let Broken::Pipe = broken {
                assert!(
                    stderr.is_empty(),
                    "a closed pipe is not worth a line: {stderr}"
                );
            } else {
                assert!(
                    stderr.starts_with("error: cannot write to stdout"),
                    "{stderr}"
                );
                assert_eq!(stderr.lines().count(), 1, "{stderr}");
            }
        }
    }
}

/// A cell must never exist without its words having been shown: when they cannot be
/// written, no keystore is left, and one that `--force` would have replaced is untouched.
#[test]
fn create_cell_keeps_no_cell_whose_words_could_not_be_shown() {
    let dir = tempfile::tempdir().unwrap();
    for broken in BROKEN {
        for args in [&["create-cell"][..], &["create-cell", "--json"]] {
            let home = tempfile::tempdir_in(dir.path()).unwrap();
            let out = with_broken_stdout(home.path(), args, broken);
            let stderr = failed_cleanly(&out);
            assert!(
                stderr.contains("no cell was created") && stderr.contains(broken.says()),
                "{broken:?} {args:?}: {stderr}"
            );
            assert!(
                !home.path().join("keystore.json").exists(),
                "{broken:?} {args:?}"
            );
        }
        let home = tempfile::tempdir_in(dir.path()).unwrap();
        create_cell(home.path());
        let before = std::fs::read(home.path().join("keystore.json")).unwrap();
        let out = with_broken_stdout(home.path(), &["create-cell", "--force"], broken);
        failed_cleanly(&out);
        assert_eq!(
            std::fs::read(home.path().join("keystore.json")).unwrap(),
            before
        );
    }
    // The warning that comes with the words goes to stderr: if that is gone, no cell either.
    for broken in [Broken::Pipe, Broken::Terminal] {
        let home = tempfile::tempdir_in(dir.path()).unwrap();
        let out = command(home.path())
            .arg("create-cell")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(broken.stdio())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{broken:?}: {}", out.status);
        assert!(!home.path().join("keystore.json").exists(), "{broken:?}");
    }
}

#[test]
fn listen_and_send_with_nowhere_to_write_stop_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (_relay, addr) = start_relay(dir.path());
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    create_cell(&alice);
    let (bob_cell, _) = create_cell(&bob);

    // `cellmesh listen | head -n 1`: the reader takes one line and goes.
    let (reader, writer) = std::io::pipe().unwrap();
    let mut listen = command(&bob)
        .args(["listen", "--relay", &addr, "--json"])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(reader).read_line(&mut first).unwrap();
    assert!(first.contains("listening"), "{first}");
    // (the BufReader, and with it the read end, is gone)
    success(&run(
        &alice,
        &["send", &bob_cell, "one", "--relay", &addr, "--json"],
        None,
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while listen.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "listen kept running");
        std::thread::sleep(Duration::from_millis(20));
    }
    failed_cleanly(&listen.wait_with_output().unwrap());

    // A listen whose very first line fails stops too.
    for broken in BROKEN {
        let out = with_broken_stdout(&bob, &["listen", "--relay", &addr], broken);
        let stderr = failed_cleanly(&out);
        assert!(stderr.contains(broken.says()), "{broken:?}: {stderr}");
    }
    // send: the message went, but saying so failed: exit 1, one line.
    for broken in BROKEN {
        let out = with_broken_stdout(
            &alice,
            &["send", &bob_cell, "two", "--relay", &addr],
            broken,
        );
        let stderr = failed_cleanly(&out);
        assert!(stderr.contains(broken.says()), "{broken:?}: {stderr}");
    }
}

#[test]
fn node_relay_and_demo_with_nowhere_to_write_stop_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    create_cell(dir.path());
    for broken in BROKEN {
        for args in [
            &["node", "--listen", "127.0.0.1:0"][..],
            &["node", "--listen", "127.0.0.1:0", "--json"],
            &["relay", "--listen", "127.0.0.1:0"],
            &["relay", "--listen", "127.0.0.1:0", "--json"],
            &["demo"],
        ] {
            let out = with_broken_stdout(dir.path(), args, broken);
            let stderr = failed_cleanly(&out);
            assert!(
                stderr.contains(broken.says()),
                "{broken:?} {args:?}: {stderr}"
            );
        }
    }
}
