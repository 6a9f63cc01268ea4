//! `cellmesh relay`, `listen` and `send`: messages between cells through a relay.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use cellmesh::core::id::{CellId, NodeId};
use cellmesh::home::{Home, Unlocked};
use cellmesh::mailbox::{Mailbox, MailboxConfig, MailboxError};
use cellmesh::relay::{Relay, RelayConfig, RelayEvent};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{PassphraseArgs, Printer, keystore_passphrase};

/// Arguments of `cellmesh relay`.
#[derive(Args)]
pub struct RelayArgs {
    /// Address to listen on (repeatable; the bound address is printed first).
    #[arg(long, value_name = "ADDR", required = true)]
    listen: Vec<SocketAddr>,
    /// Directory of the relay's store [default: `relay` in the home directory].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Only these cells may register and send (repeatable; default: any cell).
    #[arg(long, value_name = "CELL_ID")]
    allow: Vec<CellId>,
    /// Print every line as a JSON object with an `event` field.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    secrets: PassphraseArgs,
}

/// Where the relay is: `--relay`, else `CELLMESH_RELAY`, else the home's config file.
#[derive(Args, Clone)]
pub struct RelayAddr {
    /// The relay's address [env: CELLMESH_RELAY; default: the one `connect-cell --relay` saved].
    #[arg(long, value_name = "ADDR", env = "CELLMESH_RELAY")]
    relay: Option<SocketAddr>,
}

/// Arguments of `cellmesh listen`.
#[derive(Args)]
pub struct ListenArgs {
    #[command(flatten)]
    relay: RelayAddr,
    /// Print one JSON object per message.
    #[arg(long)]
    json: bool,
    /// Exit after this many messages (default: run until interrupted).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    #[command(flatten)]
    secrets: PassphraseArgs,
}

/// Arguments of `cellmesh send`.
#[derive(Args)]
pub struct SendArgs {
    /// The recipient's Cell ID.
    to: CellId,
    /// The message; `-` or nothing reads it from stdin.
    message: Option<String>,
    #[command(flatten)]
    relay: RelayAddr,
    /// Print one JSON object (`status`, `id`, `devices`).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    secrets: PassphraseArgs,
}

/// What `connect-cell --relay` remembers in the home directory.
#[derive(Serialize, Deserialize)]
pub struct Config {
    relay: SocketAddr,
    /// The relay's node id, seen at the first connection: later connections refuse any other.
    relay_node: Option<String>,
}

fn config_path(home: &Home) -> PathBuf {
    home.dir().join("config.json")
}

fn load_config(home: &Home) -> Option<Config> {
    let text = std::fs::read_to_string(config_path(home)).ok()?;
    serde_json::from_str(&text).ok()
}

fn save_config(home: &Home, config: &Config) -> Result<()> {
    let path = config_path(home);
    let text = serde_json::to_string_pretty(config)?;
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The relay to use, and the node id to pin when it is the saved one.
fn relay_of(home: &Home, arg: &RelayAddr) -> Result<(SocketAddr, Option<NodeId>)> {
    let saved = load_config(home);
    let addr = match (arg.relay, &saved) {
        (Some(a), _) => a,
        (None, Some(c)) => c.relay,
        (None, None) => bail!(
            "no relay: pass --relay ADDR, set CELLMESH_RELAY, or register once with `cellmesh connect-cell --relay ADDR`"
        ),
    };
    let pinned = saved
        .filter(|c| c.relay == addr)
        .and_then(|c| c.relay_node)
        .and_then(|n| n.parse().ok());
    Ok((addr, pinned))
}

async fn open_mailbox(
    unlocked: &Unlocked,
    relay: SocketAddr,
    pin: Option<NodeId>,
) -> Result<Mailbox> {
    let mut config = MailboxConfig::new(relay);
    config.relay_node = pin;
    config.node.revocations = unlocked.keystore.revocations();
    Mailbox::connect(unlocked, config)
        .await
        .map_err(|e| match e {
            MailboxError::Relay(e) => anyhow!("relay {relay} unreachable: {e}"),
            other => anyhow!(other),
        })
}

/// Registers this device with the relay and remembers the relay (and its node id) in the
/// home. Used by `connect-cell --relay` and `create-cell --relay`.
pub fn register(home: &Home, unlocked: &Unlocked, relay: SocketAddr) -> Result<NodeId> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let relay_node = runtime.block_on(async {
        let mailbox = open_mailbox(unlocked, relay, None).await?;
        let node = mailbox.relay_node();
        mailbox.close().await;
        Ok::<_, anyhow::Error>(node)
    })?;
    save_config(
        home,
        &Config {
            relay,
            relay_node: Some(relay_node.to_string()),
        },
    )?;
    Ok(relay_node)
}

pub fn relay(home: &Home, args: &RelayArgs) -> Result<()> {
    let passphrase = keystore_passphrase(&args.secrets, false)?;
    let unlocked = home.unlock(&passphrase)?;
    drop(passphrase);
    let data = args
        .data
        .clone()
        .unwrap_or_else(|| home.dir().join("relay"));
    let mut config = RelayConfig::new(args.listen.clone(), data.clone());
    config.node.revocations = unlocked.keystore.revocations();
    if !args.allow.is_empty() {
        config.allow = Some(args.allow.iter().copied().collect::<BTreeSet<_>>());
    }
    let out = Printer { json: args.json };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let relay = Relay::start(&unlocked, config).await?;
        drop(unlocked);
        let mut events = relay.subscribe();
        for addr in relay.local_addrs() {
            out.line(
                json!({"event": "listening", "addr": addr.to_string(), "relay_node": relay.node_id().to_string(), "data": data}),
                format!("listening on {addr}"),
            );
        }
        out.line(
            json!({"event": "started", "cell_id": relay.cell().to_string(), "node_id": relay.node_id().to_string()}),
            format!("relay {} started (store in {})", relay.node_id(), data.display()),
        );
        loop {
            tokio::select! {
                _ = crate::node::shutdown_signal() => break,
                ev = events.recv() => match ev {
                    Ok(ev) => print_relay_event(out, &ev),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => out.line(
                        json!({"event": "lagged", "missed": n}),
                        format!("(missed {n} events)"),
                    ),
                    Err(_) => break,
                },
            }
        }
        relay.shutdown().await;
        out.line(json!({"event": "stopped"}), "stopped".to_string());
        Ok(())
    })
}

fn print_relay_event(out: Printer, ev: &RelayEvent) {
    match ev {
        RelayEvent::Registered { cell, node, addr } => out.line(
            json!({"event": "registered", "cell_id": cell.to_string(), "node_id": node.to_string(), "addr": addr.to_string()}),
            format!("registered {} of {} from {addr}", node.short(), cell.short()),
        ),
        RelayEvent::Offline { node } => out.line(
            json!({"event": "offline", "node_id": node.to_string()}),
            format!("offline {}", node.short()),
        ),
        RelayEvent::Forwarded {
            from,
            to,
            id,
            bytes,
            status,
        } => {
            let status = match status {
                cellmesh::core::relay::Accepted::Pushed => "pushed",
                cellmesh::core::relay::Accepted::Queued => "queued",
            };
            out.line(
                json!({"event": "forwarded", "from": from.to_string(), "to": to.to_string(), "id": id.to_hex(), "bytes": bytes, "status": status}),
                format!("{status} {id} {} -> {} ({bytes} bytes, sealed)", from.short(), to.short()),
            )
        }
        RelayEvent::Refused { from, id, code } => out.line(
            json!({"event": "refused", "from": from.to_string(), "id": id.to_hex(), "code": code.name()}),
            format!("refused {id} from {}: {}", from.short(), code.name()),
        ),
        RelayEvent::Drained { node, count } => out.line(
            json!({"event": "drained", "node_id": node.to_string(), "count": count}),
            format!("handed {count} queued to {}", node.short()),
        ),
        _ => {}
    }
}

pub fn listen(home: &Home, args: &ListenArgs) -> Result<()> {
    let (relay, pin) = relay_of(home, &args.relay)?;
    let passphrase = keystore_passphrase(&args.secrets, false)?;
    let unlocked = home.unlock(&passphrase)?;
    drop(passphrase);
    let out = Printer { json: args.json };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let mut mailbox = open_mailbox(&unlocked, relay, pin).await?;
        drop(unlocked);
        out.line(
            json!({"event": "listening", "relay": relay.to_string(), "cell_id": mailbox.cell().to_string(), "node_id": mailbox.node().to_string()}),
            format!("listening for {} at relay {relay}", mailbox.cell()),
        );
        let mut seen = 0u64;
        loop {
            if args.count.is_some_and(|n| seen >= n) {
                break;
            }
            let msg = tokio::select! {
                _ = crate::node::shutdown_signal() => break,
                m = mailbox.recv() => match m {
                    Some(m) => m,
                    None => bail!("the mailbox closed"),
                },
            };
            seen += 1;
            let (body, encoding) = match std::str::from_utf8(&msg.body) {
                Ok(text) => (text.to_string(), None),
                Err(_) => (data_encoding::BASE64.encode(&msg.body), Some("base64")),
            };
            let mut obj = json!({
                "from": msg.from_cell.to_string(),
                "device": msg.from_node.to_string(),
                "id": msg.id.to_hex(),
                "time": msg.time.0,
                "body": body,
            });
            if let Some(enc) = encoding {
                obj["encoding"] = json!(enc);
            }
            let shown = match encoding {
                None => crate::node::printable(&body),
                Some(_) => format!("(base64) {body}"),
            };
            out.line(obj, format!("{} at {}: {shown}", msg.from_cell, msg.time.0));
        }
        mailbox.close().await;
        Ok(())
    })
}

pub fn send(home: &Home, args: &SendArgs) -> Result<()> {
    let (relay, pin) = relay_of(home, &args.relay)?;
    let body = match args.message.as_deref() {
        Some(m) if m != "-" => m.as_bytes().to_vec(),
        _ => {
            let mut buf = Vec::new();
            std::io::stdin()
                .take(cellmesh::core::e2e::MAX_BODY as u64 + 1)
                .read_to_end(&mut buf)
                .context("cannot read the message from stdin")?;
            buf
        }
    };
    if body.len() > cellmesh::core::e2e::MAX_BODY {
        bail!(
            "message too large: at most {} bytes",
            cellmesh::core::e2e::MAX_BODY
        );
    }
    let passphrase = keystore_passphrase(&args.secrets, false)?;
    let unlocked = home.unlock(&passphrase)?;
    drop(passphrase);
    let out = Printer { json: args.json };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let mailbox = open_mailbox(&unlocked, relay, pin).await?;
        drop(unlocked);
        let sent = tokio::time::timeout(
            Duration::from_secs(30),
            mailbox.send(args.to, cellmesh::Bytes::from(body)),
        )
        .await
        .map_err(|_| anyhow!("no answer from relay {relay} within 30 s"))?;
        mailbox.close().await;
        let sent = sent.map_err(|e| match e {
            MailboxError::UnknownCell(c) => anyhow!("unknown cell {c}: no device of it is registered at relay {relay}"),
            other => anyhow!(other),
        })?;
        out.line(
            json!({"status": sent.status.name(), "id": sent.id.to_hex(), "devices": sent.devices, "to": args.to.to_string()}),
            format!("{} {} ({} device{})", sent.status.name(), sent.id, sent.devices, if sent.devices == 1 { "" } else { "s" }),
        );
        Ok(())
    })
}
