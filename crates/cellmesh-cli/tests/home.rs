//! The files a home holds, as `cellmesh` commands leave them: the relay config, the keystore's
//! revocations across `--force`, and who may own the home and the socket `listen` serves.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use common::{create_cell, failed_cleanly, run, start_relay, success};
use serde_json::Value;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_relay_config_is_private_and_written_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (_relay, addr) = start_relay(dir.path());
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    create_cell(&alice);
    let created = success(&run(&bob, &["create-cell", "--json"], None));
    let words = created["mnemonic"].as_str().unwrap().to_string();
    for _ in 0..2 {
        success(&run(
            &alice,
            &["connect-cell", "--force", "--relay", &addr, "--json"],
            Some(words.as_bytes()),
        ));
        let config = alice.join("config.json");
        assert_eq!(mode(&config), 0o600);
        let saved: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
        assert_eq!(saved["relay"], addr.as_str());
        // Nothing half-written left beside it.
        let mut names: Vec<String> = std::fs::read_dir(&alice)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "config.json",
                "keystore.json",
                "keystore.lock",
                "state.redb"
            ]
        );
    }
}

#[test]
fn a_damaged_relay_config_is_an_error_naming_it_never_no_config() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("alice");
    let (cell, _) = create_cell(&home);
    // Cut short, as by a crash in the middle of an in-place write: it held the relay's pin.
    std::fs::write(
        home.join("config.json"),
        r#"{"relay": "127.0.0.1:9", "relay_no"#,
    )
    .unwrap();
    for args in [
        &["send", &cell, "hi", "--relay", "127.0.0.1:9"][..],
        &["send", &cell, "hi"],
        &["listen"],
    ] {
        let stderr = failed_cleanly(&run(&home, args, None));
        assert!(
            stderr.contains(&format!("{}", home.join("config.json").display()))
                && stderr.contains("damaged"),
            "{args:?}: {stderr}"
        );
    }
}

/// The revocations a home holds are signed statements about other devices: replacing the
/// home's cell (`--force`) keeps them, its own cell's and those imported from others alike.
#[test]
fn replacing_the_cell_with_force_keeps_the_revocations() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let revocations = || -> usize {
        let stored: Value =
            serde_json::from_slice(&std::fs::read(home.join("keystore.json")).unwrap()).unwrap();
        stored["revocations"].as_array().unwrap().len()
    };
    // This home's cell revokes its other device ...
    let created = success(&run(&home, &["create-cell", "--json"], None));
    let words = created["mnemonic"].as_str().unwrap().to_string();
    let other_device = dir.path().join("other-device");
    let (_, lost) = {
        let v = success(&run(
            &other_device,
            &["connect-cell", "--json"],
            Some(words.as_bytes()),
        ));
        (
            v["cell_id"].clone(),
            v["node_id"].as_str().unwrap().to_string(),
        )
    };
    success(&run(
        &home,
        &["revoke-device", &lost, "--unconfirmed", "--json"],
        None,
    ));
    // ... and keeps another cell's revocation of one of its devices.
    let (stranger, stranger2) = (dir.path().join("s"), dir.path().join("s2"));
    let s = success(&run(&stranger, &["create-cell", "--json"], None));
    let s2 = success(&run(
        &stranger2,
        &["connect-cell", "--json"],
        Some(s["mnemonic"].as_str().unwrap().as_bytes()),
    ));
    let token = success(&run(
        &stranger,
        &[
            "revoke-device",
            s2["node_id"].as_str().unwrap(),
            "--unconfirmed",
            "--json",
        ],
        None,
    ))["revocation"]
        .as_str()
        .unwrap()
        .to_string();
    success(&run(&home, &["import-revocation", &token, "--json"], None));
    assert_eq!(revocations(), 2);

    success(&run(&home, &["create-cell", "--force", "--json"], None));
    assert_eq!(revocations(), 2, "create-cell --force dropped revocations");
    // Back to the first cell on a new device key: its revoked device is still shown revoked.
    success(&run(
        &home,
        &["connect-cell", "--force", "--json"],
        Some(words.as_bytes()),
    ));
    assert_eq!(revocations(), 2, "connect-cell --force dropped revocations");
    let who = success(&run(&home, &["whoami", "--json"], None));
    assert!(
        who["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["node_id"] == lost.as_str() && d["revoked"] == true),
        "{who:#}"
    );
}

/// `cellmesh ARGS` in `home`, killed after 10 s if it has not exited by then (a command that
/// should have refused to start may otherwise run until stopped).
fn run_briefly(home: &Path, args: &[&str]) -> std::process::Output {
    let mut child = common::command(home)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

/// Every command that uses the keystore's secrets, writes the keystore or serves the socket.
fn commands_that_need_a_private_home(cell: &str, node: &str) -> Vec<Vec<String>> {
    [
        &["create-cell", "--force"][..],
        &["revoke-device", node, "--force"],
        &["import-revocation", "AAAA"],
        &["node"],
        &["relay", "--listen", "127.0.0.1:0"],
        &["listen", "--relay", "127.0.0.1:9"],
        &["send", cell, "hi", "--relay", "127.0.0.1:9"],
    ]
    .iter()
    .map(|a| a.iter().map(|s| s.to_string()).collect())
    .collect()
}

fn refused_for(home: &Path, says: &str) {
    let (cell, node) = {
        let who = success(&run(home, &["whoami", "--json"], None));
        (
            who["cell_id"].as_str().unwrap().to_string(),
            who["node_id"].as_str().unwrap().to_string(),
        )
    };
    let keystore = std::fs::read(home.join("keystore.json")).unwrap();
    for args in commands_that_need_a_private_home(&cell, &node) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let stderr = failed_cleanly(&run_briefly(home, &args));
        assert!(
            stderr.contains(&home.display().to_string()) && stderr.contains(says),
            "{args:?}: {stderr}"
        );
    }
    let words = "abandon ".repeat(11) + "about";
    let stderr = failed_cleanly(&run(
        home,
        &["connect-cell", "--force"],
        Some(words.as_bytes()),
    ));
    assert!(stderr.contains(says), "connect-cell: {stderr}");
    assert_eq!(std::fs::read(home.join("keystore.json")).unwrap(), keystore);
    // whoami reads only what is public, and still answers.
    success(&run(home, &["whoami", "--json"], None));
}

#[test]
fn a_home_others_can_write_to_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    create_cell(&home);
    for mode in [0o770, 0o702] {
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(mode)).unwrap();
        refused_for(&home, "chmod 700");
    }
}

#[test]
fn a_home_owned_by_another_user_is_refused() {
    if !common::root() {
        common::skip("this test", "playing another user (chown) needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    create_cell(&home);
    std::os::unix::fs::chown(&home, Some(common::STRANGER), None).unwrap();
    refused_for(&home, &format!("uid {}", common::STRANGER));
}

/// A Unix socket server run by another user, on a thread of its own: it binds `paths` as
/// root (so the files are ours), then takes uid STRANGER for this thread only (the kernel's
/// credentials are per thread) before it listens, so that is the uid its peers see. It
/// answers every request with an invented `delivered` and reports what it got.
fn fake_agent(paths: &[&Path]) -> std::sync::mpsc::Receiver<String> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketType, bind, listen, socket};
    let sockets: Vec<_> = paths
        .iter()
        .map(|path| {
            let fd = socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
            bind(&fd, &SocketAddrUnix::new(*path).unwrap()).unwrap();
            fd
        })
        .collect();
    let (tx, got) = std::sync::mpsc::channel();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    for fd in sockets {
        let (tx, ready_tx) = (tx.clone(), ready_tx.clone());
        // One thread a socket, taking its connections in the order they were made.
        std::thread::spawn(move || {
            let stranger = rustix::process::Uid::from_raw(common::STRANGER);
            rustix::thread::set_thread_res_uid(None, stranger, None).unwrap();
            listen(&fd, 4).unwrap();
            let listener = std::os::unix::net::UnixListener::from(fd);
            ready_tx.send(()).unwrap();
            for mut stream in listener.incoming().map_while(Result::ok) {
                stream
                    .set_read_timeout(Some(std::time::Duration::from_secs(2)))
                    .unwrap();
                let mut line = String::new();
                let _ =
                    std::io::BufRead::read_line(&mut std::io::BufReader::new(&stream), &mut line);
                let _ = tx.send(line);
                let _ = std::io::Write::write_all(
                    &mut stream,
                    format!(
                        r#"{{"status":"delivered","id":"{}","devices":1}}"#,
                        "00".repeat(16)
                    )
                    .as_bytes(),
                );
                let _ = std::io::Write::write_all(&mut stream, b"\n");
            }
        });
    }
    for _ in paths {
        ready.recv().unwrap();
    }
    got
}

/// Every line the sockets at `paths` of [`fake_agent`] got (through `got`) before a last one
/// sent to each now: what anyone sent them earlier, they read first.
fn lines_until_now(paths: &[&Path], got: &std::sync::mpsc::Receiver<String>) -> Vec<String> {
    const LAST: &str = "(the test's last line)";
    for path in paths {
        let mut stream = std::os::unix::net::UnixStream::connect(path).unwrap();
        std::io::Write::write_all(&mut stream, format!("{LAST}\n").as_bytes()).unwrap();
    }
    let (mut lines, mut last) = (Vec::new(), 0);
    while last < paths.len() {
        let line = got
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the fake agent reads its sockets");
        if line.trim_end() == LAST {
            last += 1;
        } else {
            lines.push(line);
        }
    }
    lines
}

/// Runs `f` on a thread that acts as uid STRANGER (for this thread only).
fn as_stranger<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let stranger = rustix::process::Uid::from_raw(common::STRANGER);
        rustix::thread::set_thread_res_uid(None, stranger, None).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn agent_dir(home: &Path) -> std::path::PathBuf {
    home.join("agent")
}

/// A socket in the home that another user answers on must not take a message: before, a
/// fake `mailbox.sock` took the body and made `send` print an invented `delivered`.
#[test]
fn send_refuses_a_socket_another_user_serves_or_owns() {
    if !common::root() {
        common::skip(
            "this test",
            "playing another user (setresuid, chown) needs root",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (cell, _) = create_cell(&home);
    std::fs::create_dir(agent_dir(&home)).unwrap();
    std::fs::set_permissions(agent_dir(&home), std::fs::Permissions::from_mode(0o700)).unwrap();
    let body = "a secret for the recipient";

    // Served by another uid, from a socket file that is ours (bound before the seteuid).
    // (mailbox.sock in the home itself is where the socket used to be.)
    let socket = agent_dir(&home).join("mailbox.sock");
    let old_place = home.join("mailbox.sock");
    let stranger = common::STRANGER.to_string();
    let got = fake_agent(&[&socket, &old_place]);
    let out = run(
        &home,
        &["send", &cell, body, "--relay", "127.0.0.1:9"],
        None,
    );
    let stderr = failed_cleanly(&out);
    assert!(
        stderr.contains(&socket.display().to_string())
            && stderr.contains(&format!("uid {stranger}")),
        "{stderr}"
    );
    assert!(
        lines_until_now(&[&socket, &old_place], &got)
            .iter()
            .all(|l| !l.contains(body)),
        "the body reached the fake socket"
    );
    std::fs::remove_file(&socket).unwrap();
    std::fs::remove_file(&old_place).unwrap();

    // A socket file another user owns is not even connected to.
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::os::unix::fs::chown(&socket, Some(common::STRANGER), None).unwrap();
    let stderr = failed_cleanly(&run(
        &home,
        &["send", &cell, body, "--relay", "127.0.0.1:9"],
        None,
    ));
    assert!(
        stderr.contains(&socket.display().to_string())
            && stderr.contains(&format!("uid {stranger}")),
        "{stderr}"
    );
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "send connected to it");

    // Nor is one in a directory others could have put it in.
    std::os::unix::fs::chown(&socket, Some(0), None).unwrap();
    std::fs::set_permissions(agent_dir(&home), std::fs::Permissions::from_mode(0o777)).unwrap();
    let stderr = failed_cleanly(&run(
        &home,
        &["send", &cell, body, "--relay", "127.0.0.1:9"],
        None,
    ));
    assert!(stderr.contains("chmod 700"), "{stderr}");
    assert!(listener.accept().is_err(), "send connected to it");
}

/// A client connecting as another user, as it could if the directory were opened up, gets
/// no answer from `listen`.
#[test]
fn listen_answers_only_its_own_user_on_the_socket() {
    if !common::root() {
        common::skip("this test", "playing another user (setresuid) needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_relay, addr) = start_relay(dir.path());
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    create_cell(&alice);
    let (bob_cell, _) = create_cell(&bob);
    let mut listen = common::Proc::start(&alice, "listen", &["--relay", &addr]);
    listen.expect("listening", |v| v["event"] == "listening");
    let socket = agent_dir(&alice).join("mailbox.sock");
    assert_eq!(mode(&agent_dir(&alice)), 0o700);
    assert_eq!(
        std::fs::symlink_metadata(&socket)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // Opened up so that uid STRANGER can reach the socket at all.
    for (path, m) in [
        (dir.path(), 0o711),
        (alice.as_path(), 0o711),
        (agent_dir(&alice).as_path(), 0o711),
        (socket.as_path(), 0o666),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m)).unwrap();
    }
    let request = serde_json::json!({
        "to": bob_cell, "body": "aGk=", "relay": addr,
    });
    let paths = [socket.clone(), alice.join("mailbox.sock")];
    let answer = as_stranger(move || {
        // (the second is where the socket used to be)
        let Some(mut stream) = paths
            .iter()
            .find_map(|p| std::os::unix::net::UnixStream::connect(p).ok())
        else {
            return "no socket to connect to".to_string();
        };
        let _ = std::io::Write::write_all(&mut stream, format!("{request}\n").as_bytes());
        let mut answer = String::new();
        // Closed on us, or an empty read: no answer either way.
        let _ = std::io::Read::read_to_string(&mut stream, &mut answer);
        answer
    });
    assert_eq!(answer, "", "another user got an answer");
    listen.stop();
}
