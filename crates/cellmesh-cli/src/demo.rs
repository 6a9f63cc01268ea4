//! `cellmesh demo`: the whole system so far, on one machine, in a temporary directory, with
//! no configuration. Everything it shows goes through the same library calls the commands use.

use anyhow::{Context as _, Result, bail};
use cellmesh::core::device::{self, BindError};
use cellmesh::core::keystore::{KdfParams, Passphrase};
use cellmesh::core::mnemonic::Mnemonic;
use cellmesh::core::token::DEFAULT_SKEW;
use cellmesh::home::{Created, Home, HomeError, Unlocked};

const PASSPHRASE: &str = "demo passphrase";

/// One line on stdout, written and flushed; a failed write ends the demo with an error.
macro_rules! say {
    ($($arg:tt)*) => {
        crate::out::stdout(&format!("{}\n", format_args!($($arg)*)))?
    };
}

pub fn run() -> Result<()> {
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let laptop = Home::new(tmp.path().join("laptop"));
    let phone = Home::new(tmp.path().join("phone"));
    let pass = || Passphrase::new(PASSPHRASE.into());

    step("1. create-cell on the first device (\"laptop\")")?;
    let words = cellmesh::new_mnemonic();
    let a = created(laptop.create(&words, "", &pass(), KdfParams::DEFAULT, false)?);
    say!("   recovery phrase: {}", words.phrase().as_str());
    say!("   (a throwaway demo cell; a real cell's words are shown once and never stored)");
    say!("   cell id  {}", a.cell);
    say!("   node id  {}  (laptop)", a.node);

    step("2. connect-cell on a second device (\"phone\") from the same 12 words")?;
    let typed = Mnemonic::parse(&words.phrase()).context("the words did not parse")?;
    let b = created(phone.create(&typed, "", &pass(), KdfParams::DEFAULT, false)?);
    say!("   cell id  {}", b.cell);
    say!("   node id  {}  (phone)", b.node);
    if a.cell != b.cell || a.node == b.node {
        bail!("restore did not give the same cell with a new device key");
    }
    say!("   same Cell ID, a different node key on each device");

    step("3. each device proves it acts for the cell (node token <-> identity token)")?;
    let mut laptop_keys = laptop.unlock(&pass())?;
    let phone_keys = phone.unlock(&pass())?;
    for (name, keys) in [("laptop", &laptop_keys), ("phone", &phone_keys)] {
        let binding = bind(keys, &device::Revocations::new())?;
        say!(
            "   {name:<6}  {} acts for {}  (both tokens verified)",
            binding.node().short(),
            binding.cell().short()
        );
    }

    step("4. the laptop revokes the phone; verifiers now refuse it")?;
    let revocation = laptop.revoke(&mut laptop_keys, b.node, false)?;
    say!(
        "   revocation token {} ({} bytes, signed by the cell)",
        revocation.fingerprint(),
        revocation.encoded_len()
    );
    match bind(&phone_keys, &laptop_keys.keystore.revocations()) {
        Err(e) => say!("   phone refused: {e}"),
        Ok(_) => bail!("a revoked device was accepted"),
    }
    for d in &laptop.load()?.devices {
        let state = if d.revoked { "revoked" } else { "active" };
        say!("   device {}  {state}", d.node.short());
    }

    step("5. the keystore at rest")?;
    let stored = std::fs::read_to_string(laptop.keystore_path())?;
    let has_words = stored.contains(words.phrase().as_str());
    say!(
        "   {} bytes, mode {:o}, contains the recovery words: {}",
        stored.len(),
        file_mode(&laptop.keystore_path())?,
        if has_words { "YES" } else { "no" }
    );
    match laptop.unlock(&Passphrase::new("wrong".into())) {
        Err(HomeError::Keystore(e)) => say!("   wrong passphrase: {e}"),
        _ => bail!("a wrong passphrase was not refused"),
    }

    step(
        "6. a hub and three nodes on loopback: handshake (Noise XX + tokens), join, update, refusal",
    )?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(mesh(&tmp.path().join("mesh"), &laptop_keys))?;

    step("7. a relay on loopback: two cells, one of them on two devices, sealed end to end")?;
    runtime.block_on(relayed(&tmp.path().join("relay")))?;

    say!("\nDemo finished; its temporary homes are deleted.");
    Ok(())
}

/// A hub that admits only two cells, two members that join it, and a stranger it refuses.
async fn mesh(dir: &std::path::Path, laptop: &Unlocked) -> Result<()> {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use cellmesh::core::connection::{Authorization, JoinPolicy};
    use cellmesh::node::{JoinError, Node, NodeConfig, NodeEvent};

    let device = |name: &str| -> Result<Unlocked> {
        let home = Home::new(dir.join(name));
        let pass = Passphrase::new(PASSPHRASE.into());
        home.create(
            &cellmesh::new_mnemonic(),
            "",
            &pass,
            KdfParams::DEFAULT,
            false,
        )?;
        Ok(home.unlock(&pass)?)
    };
    let office = device("office")?;
    let stranger = device("stranger")?;
    let allowed = BTreeSet::from([laptop.keystore.cell, office.keystore.cell]);
    let hub_config = NodeConfig {
        listen: vec!["127.0.0.1:0".parse()?],
        policy: JoinPolicy {
            authorize: Authorization::AllowCells(allowed),
            ..JoinPolicy::default()
        },
        ..NodeConfig::default()
    };
    let mut hub = Node::start(&device("hub")?, hub_config).await?;
    let addr = hub.local_addrs()[0];
    say!("   hub listening on {addr}, admitting the demo cell and one other");

    let member = Node::start(laptop, NodeConfig::default()).await?;
    let mut member_events = member.subscribe();
    let peer = member.join(addr).await?;
    say!(
        "   laptop joined the hub: {} (cell {})",
        peer.node.short(),
        peer.cell.short()
    );
    let office = Node::start(&office, NodeConfig::default()).await?;
    office.join(addr).await?;
    say!("   office joined the hub");
    let learned = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(NodeEvent::Learned { node, via, .. }) = member_events.recv().await {
                return (node, via);
            }
        }
    })
    .await
    .context("no update arrived")?;
    say!(
        "   laptop learned of {} via {} (UPDATE)",
        learned.0.short(),
        learned.1.short()
    );

    let stranger = Node::start(&stranger, NodeConfig::default()).await?;
    match stranger.join(addr).await {
        Err(JoinError::Refused { code, reason, .. }) => {
            say!("   stranger refused: NACK {} ({reason})", code.name())
        }
        other => bail!("the stranger was not refused: {other:?}"),
    }

    member
        .send(hub.node_id(), bytes_of("hello over an AES-256-GCM session"))
        .await?;
    let got = tokio::time::timeout(Duration::from_secs(5), hub.recv())
        .await
        .context("no message arrived")?
        .context("hub inbox closed")?;
    say!(
        "   hub received {:?} from {}",
        String::from_utf8_lossy(&got.data),
        got.from.short()
    );
    say!("   hub peers: {}", hub.peers().len());
    for node in [stranger, office, member, hub] {
        node.shutdown(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// A relay, cell Alice on one device and cell Bob on two: both ways, fan-out, an offline
/// device catching up, and what the relay saw.
async fn relayed(dir: &std::path::Path) -> Result<()> {
    use std::time::Duration;

    use cellmesh::mailbox::{Mailbox, MailboxConfig};
    use cellmesh::relay::{Relay, RelayConfig, RelayEvent};

    let pass = || Passphrase::new(PASSPHRASE.into());
    let device = |name: &str, words: &Mnemonic| -> Result<Unlocked> {
        let home = Home::new(dir.join(name));
        home.create(words, "", &pass(), KdfParams::DEFAULT, false)?;
        Ok(home.unlock(&pass())?)
    };
    let bob_words = cellmesh::new_mnemonic();
    let relay_keys = device("relay", &cellmesh::new_mnemonic())?;
    let alice = device("alice", &cellmesh::new_mnemonic())?;
    let (desk, phone) = (
        device("bob-desk", &bob_words)?,
        device("bob-phone", &bob_words)?,
    );

    let data = dir.join("relay-data");
    // The demo shows what the relay saw, envelope by envelope: it asks for the events that
    // a relay does not make by default (they record who talks to whom).
    let mut relay_config = RelayConfig::new(vec!["127.0.0.1:0".parse()?], data.clone());
    relay_config.envelope_events = true;
    let relay = Relay::start(&relay_keys, relay_config).await?;
    let mut seen = relay.subscribe();
    let addr = relay.local_addrs()[0];
    say!("   relay {} listening on {addr}", relay.node_id().short());
    let config = || MailboxConfig {
        relay_node: Some(relay.node_id()),
        ..MailboxConfig::new(addr)
    };
    let mut a = Mailbox::connect(&alice, config()).await?;
    let mut bd = Mailbox::connect(&desk, config()).await?;
    let mut bp = Mailbox::connect(&phone, config()).await?;
    say!(
        "   alice ({}) and bob ({}) on desk and phone connected outbound and registered",
        a.cell().short(),
        bd.cell().short()
    );
    async fn take(m: &mut Mailbox) -> Result<cellmesh::core::e2e::Message> {
        tokio::time::timeout(Duration::from_secs(5), m.recv())
            .await
            .ok()
            .flatten()
            .context("no message arrived")
    }

    // "Delivered" means a device's application took the message: Bob's take it meanwhile.
    let bob = bd.cell();
    let (sent, desk_got, phone_got) = tokio::join!(
        a.send(bob, bytes_of("lunch at noon?")),
        take(&mut bd),
        take(&mut bp)
    );
    let sent = sent?;
    say!(
        "   alice -> bob: {} to {} devices (id {})",
        sent.status.name(),
        sent.devices,
        sent.id
    );
    for (name, got) in [("desk", desk_got?), ("phone", phone_got?)] {
        say!(
            "     bob's {name:<5} opened {:?} from {}",
            String::from_utf8_lossy(&got.body),
            got.from_cell.short()
        );
    }
    let alice_cell = a.cell();
    let (reply, got) = tokio::join!(
        bp.send(alice_cell, bytes_of("yes, see you there")),
        take(&mut a)
    );
    let (reply, got) = (reply?, got?);
    say!(
        "   bob -> alice: {}; alice opened {:?}",
        reply.status.name(),
        String::from_utf8_lossy(&got.body)
    );

    bp.close().await;
    // The relay handles a departure 200 ms after it, once the device's last records are in.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (later, desk_got) = tokio::join!(
        a.send(bob, bytes_of("running 10 minutes late")),
        take(&mut bd)
    );
    let later = later?;
    desk_got?;
    say!(
        "   bob's phone is offline; alice -> bob: {} (the desk took it; the relay keeps the phone's copy)",
        later.status.name()
    );
    let mut bp = Mailbox::connect(&phone, config()).await?;
    let caught = take(&mut bp).await?;
    say!(
        "   phone back online, caught up: {:?}",
        String::from_utf8_lossy(&caught.body)
    );
    for m in [a, bd, bp] {
        m.close().await;
    }
    let stats = relay.stats();
    relay.shutdown().await;

    say!("   what the relay saw:");
    let mut shown = 0;
    while let Ok(ev) = seen.try_recv() {
        if let RelayEvent::Forwarded {
            from,
            to,
            bytes,
            status,
            ..
        } = ev
            && shown < 8
        {
            shown += 1;
            say!(
                "     {:?} {bytes:>4} sealed bytes {} -> {}",
                status,
                from.short(),
                to.short()
            );
        }
    }
    say!(
        "     in all: {} pushed, {} queued, {} refused, {} bytes; no key to open any of them",
        stats.pushed,
        stats.queued,
        stats.refused,
        stats.bytes
    );
    let stored = std::fs::read(data.join("relay.redb"))?;
    let leaked = [
        &b"lunch at noon"[..],
        b"running 10 minutes",
        b"see you there",
    ]
    .iter()
    .any(|p| stored.windows(p.len()).any(|w| w == *p));
    say!(
        "     its store ({} bytes) contains a message body: {}",
        stored.len(),
        if leaked { "YES" } else { "no" }
    );
    if leaked {
        bail!("plaintext reached the relay's store");
    }
    Ok(())
}

fn bytes_of(s: &'static str) -> cellmesh::Bytes {
    cellmesh::Bytes::from_static(s.as_bytes())
}

fn bind(keys: &Unlocked, revocations: &device::Revocations) -> Result<device::DeviceBinding> {
    let now = cellmesh::now();
    let s = &keys.secrets;
    let node = device::node_token(&s.node, s.cell.cell_id(), now, &mut cellmesh::OsRng)?
        .sign(&s.node.signing)?
        .verify(now, DEFAULT_SKEW)?;
    let identity = keys
        .keystore
        .devices
        .iter()
        .find(|d| d.node == keys.keystore.node)
        .and_then(|d| d.identity.clone())
        .context("this device's identity token is missing")?
        .verify(now, DEFAULT_SKEW)?;
    device::bind(&node, &identity, revocations).map_err(|e: BindError| e.into())
}

fn created(c: Created) -> cellmesh::home::Keystore {
    match c {
        Created::New(k) | Created::AlreadyPresent(k) => k,
    }
}

fn step(title: &str) -> Result<(), crate::out::OutputError> {
    crate::out::stdout(&format!("\n{title}\n"))
}

fn file_mode(path: &std::path::Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
}
