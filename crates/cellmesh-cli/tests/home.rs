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
        assert_eq!(names, ["config.json", "keystore.json", "keystore.lock"]);
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
    success(&run(&home, &["revoke-device", &lost, "--json"], None));
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
        &["revoke-device", s2["node_id"].as_str().unwrap(), "--json"],
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
