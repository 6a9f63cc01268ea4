//! The `cellmesh` binary, run as a user would run it.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use cellmesh::core::keystore::Passphrase;
use cellmesh::core::mnemonic::Mnemonic;
use cellmesh::home::Home;
use serde_json::Value;

const PASS: &str = "correct horse battery staple";

fn cellmesh(home: &Path, args: &[&str], stdin: &str) -> Output {
    cellmesh_with(home, args, stdin, PASS)
}

fn cellmesh_with(home: &Path, args: &[&str], stdin: &str, passphrase: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cellmesh"))
        .args(args)
        .env("CELLMESH_HOME", home)
        .env("CELLMESH_PASSPHRASE", passphrase)
        .env_remove("CELLMESH_SEED_PASSPHRASE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the cellmesh binary runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn create_then_restore_on_another_home_gives_same_cell_new_device() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let created = json(&cellmesh(&a, &["create-cell", "--json"], ""));
    let words = created["mnemonic"].as_str().unwrap();
    assert_eq!(words.split(' ').count(), 12);
    let cell = created["cell_id"].as_str().unwrap();
    assert!(cell.starts_with("cell1"));

    let restored = json(&cellmesh(
        &b,
        &["connect-cell", "--json"],
        &format!("{words}\n"),
    ));
    assert_eq!(restored["cell_id"], created["cell_id"]);
    assert_ne!(restored["node_id"], created["node_id"]);
    assert_eq!(restored["new_device"], true);

    let who = json(&cellmesh(&b, &["whoami", "--json"], ""));
    assert_eq!(who["cell_id"], created["cell_id"]);
    assert_eq!(who["node_id"], restored["node_id"]);
    assert_eq!(who["devices"][0]["this_device"], true);

    // Connecting the same words again keeps this device's key.
    let again = json(&cellmesh(&b, &["connect-cell", "--json"], words));
    assert_eq!(again["node_id"], restored["node_id"]);
    assert_eq!(again["new_device"], false);

    // Revoking the second device from the first shows up in whoami. The first has never
    // seen it (no relay lists it), so it must insist: an id it does not know is refused.
    let b_node = restored["node_id"].as_str().unwrap();
    let unknown = cellmesh(&a, &["revoke-device", b_node, "--json"], "");
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains("--unconfirmed"),
        "{}",
        stderr(&unknown)
    );
    let revoked = json(&cellmesh(
        &a,
        &["revoke-device", b_node, "--unconfirmed", "--json"],
        "",
    ));
    assert_eq!(revoked["relay_status"], "not_sent");
    assert_eq!(revoked["revoked"], b_node);
    let who = json(&cellmesh(&a, &["whoami", "--json"], ""));
    let devices = who["devices"].as_array().unwrap();
    assert!(
        devices
            .iter()
            .any(|d| d["node_id"] == b_node && d["revoked"] == true)
    );

    // Another cell's home keeps the revocation, from an argument or from stdin.
    let c = dir.path().join("c");
    json(&cellmesh(&c, &["create-cell", "--json"], ""));
    let token = revoked["revocation"].as_str().unwrap();
    let kept = json(&cellmesh(&c, &["import-revocation", token, "--json"], ""));
    assert_eq!(kept["revoked"], b_node);
    assert_eq!(kept["issuer"], created["cell_id"]);
    json(&cellmesh(&c, &["import-revocation", "-", "--json"], token));
    let stored = std::fs::read_to_string(c.join("keystore.json")).unwrap();
    let stored: Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored["revocations"].as_array().unwrap().len(), 1);
    // A forged one (a flipped byte) is refused.
    let mut bytes = data_encoding::BASE64.decode(token.as_bytes()).unwrap();
    let in_signature = bytes.len() - 10; // token = core || signature[64] || co-signature flag
    bytes[in_signature] ^= 1;
    let forged = data_encoding::BASE64.encode(&bytes);
    let out = cellmesh(&c, &["import-revocation", &forged], "");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("bad signature"), "{}", stderr(&out));
}

#[test]
fn human_output_shows_words_once_and_the_ids() {
    let dir = tempfile::tempdir().unwrap();
    let out = cellmesh(dir.path(), &["create-cell"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Cell ID:  cell1") && text.contains("12. "));
    assert!(stderr(&out).contains("shown only this once"));
    let who = cellmesh(dir.path(), &["whoami"], "");
    let who = String::from_utf8_lossy(&who.stdout);
    assert!(who.contains("this device") && !who.contains(" 1. "));
}

#[test]
fn bad_word_and_bad_checksum_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let typo = "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abuot";
    let out = cellmesh(dir.path(), &["connect-cell"], typo);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("word 12 is not in the BIP39 English word list")
            && !stderr(&out).contains("abuot"),
        "{}",
        stderr(&out)
    );
    let checksum = "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon";
    let out = cellmesh(dir.path(), &["connect-cell"], checksum);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("checksum mismatch"),
        "{}",
        stderr(&out)
    );
    let out = cellmesh(dir.path(), &["connect-cell"], "abandon about");
    assert!(stderr(&out).contains("expected 12 words, got 2"));
    assert!(!dir.path().join("keystore.json").exists());
}

#[test]
fn wrong_passphrase_fails_cleanly_and_overwrites_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let created = json(&cellmesh(dir.path(), &["create-cell", "--json"], ""));
    let path = dir.path().join("keystore.json");
    let before = std::fs::read(&path).unwrap();
    let node = created["node_id"].as_str().unwrap();
    let out = cellmesh_with(dir.path(), &["revoke-device", node, "--force"], "", "wrong");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("wrong passphrase"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn create_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let first = json(&cellmesh(dir.path(), &["create-cell", "--json"], ""));
    let path = dir.path().join("keystore.json");
    let before = std::fs::read(&path).unwrap();
    let out = cellmesh(dir.path(), &["create-cell"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert!(
        out.stdout.is_empty(),
        "no words may be shown for a cell that is not kept"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let second = json(&cellmesh(
        dir.path(),
        &["create-cell", "--force", "--json"],
        "",
    ));
    assert_ne!(first["cell_id"], second["cell_id"]);
}

#[test]
fn keystore_holds_neither_words_nor_secret_keys_and_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let created = json(&cellmesh(dir.path(), &["create-cell", "--json"], ""));
    let words = created["mnemonic"].as_str().unwrap();
    let path = dir.path().join("keystore.json");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let stored = std::fs::read(&path).unwrap();
    let text = String::from_utf8_lossy(&stored);
    assert!(!text.contains(words));
    // Words are looked for in the stored values, not in the file's own field names (a word
    // such as "secret" may well be one of those).
    fn values(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::String(s) => {
                out.push_str(s);
                out.push('\n');
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| values(v, out)),
            serde_json::Value::Object(o) => o.values().for_each(|v| values(v, out)),
            _ => {}
        }
    }
    let mut stored_values = String::new();
    values(
        &serde_json::from_slice(&stored).unwrap(),
        &mut stored_values,
    );
    for w in words.split(' ').filter(|w| w.len() >= 5) {
        assert!(
            !stored_values.contains(w),
            "word {w:?} found in the keystore"
        );
    }
    let cell = Mnemonic::parse(words).unwrap().derive("");
    let unlocked = Home::new(dir.path())
        .unlock(&Passphrase::new(PASS.into()))
        .unwrap();
    let secrets = [
        *cell.signing().dangerous_seed(),
        *cell.agreement().dangerous_bytes(),
        *unlocked.secrets.node.signing.dangerous_seed(),
        *unlocked.secrets.node.agreement.dangerous_bytes(),
    ];
    for secret in secrets {
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let b64 = data_encoding::BASE64.encode(&secret);
        assert!(!stored.windows(32).any(|w| w == secret));
        assert!(!text.contains(&hex) && !text.contains(&b64[..40]));
    }
}

#[test]
fn exit_codes_and_help() {
    let dir = tempfile::tempdir().unwrap();
    let out = cellmesh(dir.path(), &["whoami"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no cell in"), "{}", stderr(&out));
    // A home without a cell says so before any passphrase is asked for (or found wanting).
    let out = cellmesh_with(dir.path(), &["listen", "--relay", "127.0.0.1:9"], "", "");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no cell in"), "{}", stderr(&out));
    assert_eq!(
        cellmesh(dir.path(), &["--bogus"], "").status.code(),
        Some(2)
    );
    assert_eq!(
        cellmesh(dir.path(), &["revoke-device", "node1nope"], "")
            .status
            .code(),
        Some(2)
    );
    for cmd in [
        "create-cell",
        "connect-cell",
        "whoami",
        "revoke-device",
        "demo",
    ] {
        let out = cellmesh(dir.path(), &[cmd, "--help"], "");
        assert_eq!(out.status.code(), Some(0), "{cmd} --help");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage:"));
    }
    let out = cellmesh_with(dir.path(), &["create-cell"], "", "");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("must not be empty"));
}

/// The README's first command: the whole system in a temporary directory, exiting by itself.
#[test]
fn the_demo_runs_to_its_end_and_shows_every_part() {
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let out = cellmesh(dir.path(), &["demo"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for part in [
        "same Cell ID",
        "phone refused",
        "contains the recovery words: no",
        "stranger refused: NACK unauthorized",
        "alice -> bob: delivered to 2 devices",
        "bob -> alice: delivered",
        "phone back online, caught up",
        "contains a message body: no",
        "Demo finished",
    ] {
        assert!(text.contains(part), "no {part:?} in:\n{text}");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}
