//! Revocations reaching the relay and every sender (issue 10, finding 10), over real TCP on
//! loopback: a cell revokes one of its devices at its relay; the relay refuses the device and
//! drops it with its queue; a sender of another cell that never imported the revocation gets
//! it with the directory, seals only for the devices left, and keeps it in its home; the
//! relay still knows after a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use cellmesh::core::relay::RefuseCode;
use cellmesh::core::wire::NackCode;
use cellmesh::home::{Home, Unlocked};
use cellmesh::mailbox::{Mailbox, MailboxConfig, MailboxError, SendError, Status};
use cellmesh::node::JoinError;
use cellmesh::relay::{Relay, RelayConfig, RelayEvent};
use common::{device, device_of, reader, registered, relay_event};

mod common;

async fn relay_at(unlocked: &Unlocked, listen: SocketAddr, data: &Path) -> Relay {
    Relay::start(unlocked, RelayConfig::new(vec![listen], data.to_path_buf()))
        .await
        .unwrap()
}

/// A mailbox that keeps what directories teach it in the home at `dir/name`.
async fn mailbox(
    unlocked: &Unlocked,
    relay: SocketAddr,
    home: Option<&Path>,
) -> Result<Mailbox, MailboxError> {
    let mut config = MailboxConfig::new(relay);
    config.ack_timeout = Duration::from_secs(5);
    config.home = home.map(Path::to_path_buf);
    Mailbox::connect(unlocked, config).await
}

fn refused_as_revoked(r: Result<Mailbox, MailboxError>) -> bool {
    matches!(
        r,
        Err(MailboxError::Relay(JoinError::Refused {
            code: NackCode::Revoked,
            ..
        }))
    )
}

#[tokio::test]
async fn a_revoked_device_is_refused_and_a_sender_that_never_imported_it_does_not_seal_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_at(
        &device(dir.path(), "relay"),
        "127.0.0.1:0".parse().unwrap(),
        &dir.path().join("data"),
    )
    .await;
    let addr = relay.local_addrs()[0];
    let mut events = relay.subscribe();
    let words = cellmesh::new_mnemonic();
    let mut laptop = device_of(dir.path(), "laptop", &words);
    let phone = device_of(dir.path(), "phone", &words);
    let alice = device(dir.path(), "alice");
    let alice_home = dir.path().join("alice");

    let mut l = reader(mailbox(&laptop, addr, None).await.unwrap());
    let mut p = mailbox(&phone, addr, None).await.unwrap();
    let (cell, phone_node) = (l.cell(), p.node());
    registered(&mut events, phone_node).await;
    // Something queued for the phone, which must not survive the revocation.
    let early = mailbox(&alice, addr, None).await.unwrap();
    assert_eq!(
        early
            .send(cell, Bytes::from_static(b"before"))
            .await
            .unwrap()
            .devices,
        2
    );
    early.close().await;
    assert_eq!(p.recv().await.unwrap().body, &b"before"[..]);
    assert_eq!(l.next().await.body, &b"before"[..]);

    // The laptop revokes the (lost) phone and hands the revocation to the relay.
    let token = Home::new(dir.path().join("laptop"))
        .revoke(&mut laptop, phone_node, false)
        .unwrap();
    l.sender().revoke(token.clone()).await.unwrap();
    let (by, gone) = relay_event(&mut events, "Revoked", |e| match e {
        RelayEvent::Revoked {
            node, by, messages, ..
        } if *node == phone_node => Some((*by, *messages)),
        _ => None,
    })
    .await;
    assert_eq!((by, gone), (l.node(), 0));
    // The phone's mailbox was cut off and gives up: the relay refuses it.
    assert!(
        tokio::time::timeout(Duration::from_secs(10), p.recv())
            .await
            .expect("the phone's mailbox ends")
            .is_none()
    );
    assert!(refused_as_revoked(mailbox(&phone, addr, None).await));
    // Handing it again is fine (known already).
    l.sender().revoke(token).await.unwrap();

    // Alice never imported it: the directory teaches her, she seals for the laptop only,
    // and her home keeps it.
    let a = mailbox(&alice, addr, Some(&alice_home)).await.unwrap();
    let sent = a.send(cell, Bytes::from_static(b"after")).await.unwrap();
    assert_eq!((sent.status, sent.devices), (Status::Delivered, 1));
    assert_eq!(l.next().await.body, &b"after"[..]);
    a.close().await;
    let kept = Home::new(&alice_home).load().unwrap().revocations();
    assert!(kept.is_revoked(cell, phone_node));
    l.close().await;
    relay.shutdown().await;
}

#[tokio::test]
async fn a_revocation_survives_a_relay_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let relay_id = device(dir.path(), "relay");
    let relay = relay_at(&relay_id, "127.0.0.1:0".parse().unwrap(), &data).await;
    let addr = relay.local_addrs()[0];
    let mut events = relay.subscribe();
    let words = cellmesh::new_mnemonic();
    let mut laptop = device_of(dir.path(), "laptop", &words);
    let phone = device_of(dir.path(), "phone", &words);
    let alice = device(dir.path(), "alice");

    let p = mailbox(&phone, addr, None).await.unwrap();
    let phone_node = p.node();
    registered(&mut events, phone_node).await;
    p.close().await;
    // Queued for the offline phone, then dropped with it.
    let a = mailbox(&alice, addr, None).await.unwrap();
    let l = mailbox(&laptop, addr, None).await.unwrap();
    let cell = l.cell();
    let sent = a.send(cell, Bytes::from_static(b"queued")).await.unwrap();
    assert_eq!(sent.devices, 2);
    a.close().await;
    let token = Home::new(dir.path().join("laptop"))
        .revoke(&mut laptop, phone_node, false)
        .unwrap();
    l.revoke(token).await.unwrap();
    let gone = relay_event(&mut events, "Revoked", |e| match e {
        RelayEvent::Revoked { node, messages, .. } if *node == phone_node => Some(*messages),
        _ => None,
    })
    .await;
    assert_eq!(gone, 1, "the phone's queue went with it");
    l.close().await;
    relay.shutdown().await;

    let relay = relay_at(&relay_id, addr, &data).await;
    assert!(refused_as_revoked(mailbox(&phone, addr, None).await));
    let a = mailbox(&alice, addr, None).await.unwrap();
    let dir_now = a.lookup(cell).await.unwrap();
    assert_eq!(dir_now.devices.len(), 1);
    assert!(dir_now.devices.iter().all(|d| d.node() != phone_node));
    a.close().await;
    relay.shutdown().await;
}

#[tokio::test]
async fn a_relay_refuses_revocations_it_must_not_keep() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_at(
        &device(dir.path(), "relay"),
        "127.0.0.1:0".parse().unwrap(),
        &dir.path().join("data"),
    )
    .await;
    let addr = relay.local_addrs()[0];
    let mut events = relay.subscribe();
    let mut bob = device(dir.path(), "bob");
    let alice = device(dir.path(), "alice");
    let a = reader(mailbox(&alice, addr, None).await.unwrap());
    let alice_node = a.node();
    registered(&mut events, alice_node).await;
    let b = mailbox(&bob, addr, None).await.unwrap();
    // Bob's cell "revoking" Alice's device, registered here under her cell.
    let forged = Home::new(dir.path().join("bob"))
        .revoke(&mut bob, alice_node, false)
        .unwrap();
    let refused = b.revoke(forged).await.unwrap_err();
    assert!(
        matches!(
            refused,
            MailboxError::Send(SendError::Refused(RefuseCode::NotAllowed))
        ),
        "{refused}"
    );
    let code = relay_event(&mut events, "RevokeRefused", |e| match e {
        RelayEvent::RevokeRefused { code, .. } => Some(*code),
        _ => None,
    })
    .await;
    assert_eq!(code, RefuseCode::NotAllowed);
    // Alice is still served.
    let sent = b
        .send(a.cell(), Bytes::from_static(b"still here"))
        .await
        .unwrap();
    assert_eq!(sent.devices, 1);
    a.close().await;
    b.close().await;
    relay.shutdown().await;
}

/// A device that revokes itself (`revoke-device --force`) hears the relay's answer before it
/// is refused.
#[tokio::test]
async fn a_device_that_revokes_itself_hears_the_answer_then_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_at(
        &device(dir.path(), "relay"),
        "127.0.0.1:0".parse().unwrap(),
        &dir.path().join("data"),
    )
    .await;
    let addr = relay.local_addrs()[0];
    let mut events = relay.subscribe();
    let mut me = device(dir.path(), "me");
    let m = mailbox(&me, addr, None).await.unwrap();
    let node = m.node();
    registered(&mut events, node).await;
    let token = Home::new(dir.path().join("me"))
        .revoke(&mut me, node, true)
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), m.revoke(token))
        .await
        .expect("an answer")
        .unwrap();
    m.close().await;
    assert!(refused_as_revoked(mailbox(&me, addr, None).await));
    relay.shutdown().await;
}
