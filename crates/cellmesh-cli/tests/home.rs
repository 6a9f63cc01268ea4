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
