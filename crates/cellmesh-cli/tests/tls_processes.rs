//! A real `cellmesh relay` serving TLS, and `connect-cell`, `listen` and `send` reaching it
//! as `tls://localhost:PORT` with a private CA, as a user runs them.

mod common;

use common::{Proc, create_cell, run_with, success};
use serde_json::Value;

#[test]
fn cells_talk_through_a_relay_serving_tls_and_an_untrusted_certificate_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (relay_home, alice, bob, bob2) = (
        dir.path().join("relay"),
        dir.path().join("alice"),
        dir.path().join("bob"),
        dir.path().join("bob2"),
    );
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let ck = rcgen::generate_simple_self_signed(names).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let (cert_arg, key_arg) = (cert.to_str().unwrap(), key.to_str().unwrap());
    create_cell(&relay_home);
    let (alice_cell, _) = create_cell(&alice);
    let created = success(&run_with(&bob, &["create-cell", "--json"], &[], None));
    let bob_cell = created["cell_id"].as_str().unwrap().to_string();

    // Only one of the pair is a usage error.
    let out = run_with(
        &relay_home,
        &["relay", "--listen", "127.0.0.1:0", "--tls-cert", cert_arg],
        &[],
        None,
    );
    assert_eq!(out.status.code(), Some(2), "--tls-cert needs --tls-key");

    let data = dir.path().join("relay-data");
    let mut relay = Proc::start(
        &relay_home,
        "relay",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
            "--tls-cert",
            cert_arg,
            "--tls-key",
            key_arg,
        ],
    );
    let listening = relay.expect("listening", |v| v["event"] == "listening");
    assert_eq!(listening["tls"], true);
    let port = listening["addr"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .to_string();
    // By name: `localhost` may resolve to ::1 first, where nothing listens; the next address
    // is tried.
    let url = format!("tls://localhost:{port}");

    // Bob's second device registers with the CA from the environment; both are remembered.
    let words = created["mnemonic"].as_str().unwrap().as_bytes();
    let connected = success(&run_with(
        &bob2,
        &["connect-cell", "--relay", &url, "--json"],
        &[("CELLMESH_RELAY_CA", &cert)],
        Some(words),
    ));
    assert_eq!(connected["relay"], url.as_str());
    let saved: Value =
        serde_json::from_slice(&std::fs::read(bob2.join("config.json")).unwrap()).unwrap();
    assert_eq!(saved["relay"], url.as_str());

    let mut bob_listen = Proc::start(
        &bob,
        "listen",
        &["--relay", &url, "--relay-ca", cert_arg, "--count", "1"],
    );
    bob_listen.expect("listening", |v| v["event"] == "listening");
    let mut bob2_listen = Proc::start(&bob2, "listen", &["--count", "1"]);
    bob2_listen.expect("listening", |v| v["event"] == "listening");
    let sent = success(&run_with(
        &alice,
        &[
            "send",
            &bob_cell,
            "hello over tls",
            "--relay",
            &url,
            "--json",
        ],
        &[("CELLMESH_RELAY_CA", &cert)],
        None,
    ));
    assert_eq!(sent["status"], "delivered");
    assert_eq!(sent["devices"], 2);
    for l in [&mut bob_listen, &mut bob2_listen] {
        let m = l.expect("message", |v| v["body"] == "hello over tls");
        assert_eq!(m["from"], alice_cell.as_str());
    }
    bob_listen.finish();
    bob2_listen.finish();

    // Without the CA, the web's roots do not vouch for the relay: one clear line, exit 1.
    let out = run_with(
        &alice,
        &["send", &bob_cell, "hi", "--relay", &url],
        &[],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("relay {url}: TLS certificate not trusted")),
        "{stderr}"
    );
    // Plain TCP to the TLS port fails too, rather than hanging.
    let out = run_with(
        &alice,
        &[
            "send",
            &bob_cell,
            "hi",
            "--relay",
            &format!("127.0.0.1:{port}"),
        ],
        &[],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    relay.stop();
}
