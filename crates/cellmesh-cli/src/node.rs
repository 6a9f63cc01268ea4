//! `cellmesh node`: a node in the foreground, one line per event on stdout.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result};
use cellmesh::core::connection::{Authorization, JoinPolicy};
use cellmesh::core::id::CellId;
use cellmesh::home::Home;
use cellmesh::node::{Node, NodeConfig, NodeEvent};
use clap::Args;
use serde_json::json;

use crate::out::OutputError;
use crate::{PassphraseArgs, Printer};

/// Arguments of `cellmesh node`.
#[derive(Args)]
pub struct NodeArgs {
    /// Address to listen on (repeatable; `127.0.0.1:0` picks a free port; the bound address is
    /// printed first).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// A node to join on start (repeatable; unreachable ones are retried for about 15 s).
    #[arg(long, value_name = "ADDR")]
    join: Vec<SocketAddr>,
    /// Only these cells may be peers, whichever side dials (repeatable; default: any cell whose
    /// tokens verify).
    #[arg(long, value_name = "CELL_ID")]
    allow: Vec<CellId>,
    /// Print every line as a JSON object with an `event` field.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    secrets: PassphraseArgs,
}

pub fn run(home: &Home, args: &NodeArgs) -> Result<()> {
    let unlocked = crate::unlock(home, &args.secrets)?;
    let mut config = NodeConfig {
        listen: args.listen.clone(),
        bootstrap: args.join.clone(),
        revocations: unlocked.keystore.revocations(),
        ..NodeConfig::default()
    };
    if !args.allow.is_empty() {
        config.policy = JoinPolicy {
            authorize: Authorization::AllowCells(
                args.allow.iter().copied().collect::<BTreeSet<_>>(),
            ),
            ..JoinPolicy::default()
        };
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let stop = shutdown_signal();
        let mut node = Node::start(&unlocked, config).await?;
        drop(unlocked);
        let out = Printer { json: args.json };
        let mut events = node.subscribe();
        tokio::pin!(stop);
        // Runs until stopped, or until a line cannot be printed.
        let printed: Result<(), OutputError> = async {
            for addr in node.local_addrs() {
                out.line(
                    json!({"event": "listening", "addr": addr.to_string(),
                           "cell_id": node.cell().to_string(), "node_id": node.node_id().to_string()}),
                    format!("listening on {addr}  (cell {}, node {})", node.cell(), node.node_id()),
                )?;
            }
            if node.local_addrs().is_empty() {
                out.line(
                    json!({"event": "started", "cell_id": node.cell().to_string(), "node_id": node.node_id().to_string()}),
                    format!("started, not listening  (cell {}, node {})", node.cell(), node.node_id()),
                )?;
            }
            loop {
                tokio::select! {
                    event = events.recv() => match event {
                        Ok(e) => out.event(&e)?,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            out.line(json!({"event": "lagged", "missed": n}), format!("({n} events missed)"))?;
                        }
                        Err(_) => return Ok(()),
                    },
                    msg = node.recv() => match msg {
                        Some(m) => out.line(
                            json!({"event": "message", "node_id": m.from.to_string(),
                                   "cell_id": m.cell.to_string(), "bytes": m.data.len()}),
                            format!("message from {} (cell {}): {} bytes", m.from, m.cell, m.data.len()),
                        )?,
                        None => return Ok(()),
                    },
                    _ = &mut stop => return Ok(()),
                }
            }
        }
        .await;
        node.shutdown(Duration::from_secs(2)).await;
        printed?;
        out.line(json!({"event": "stopped"}), "stopped")?;
        Ok(())
    })
}

/// Resolves at the first SIGINT or SIGTERM. The handlers are installed when this is called
/// (not when it is first polled): call it before announcing anything, so that a signal sent
/// as soon as a process says it is ready is handled, not fatal.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let int = signal(SignalKind::interrupt());
        let term = signal(SignalKind::terminate());
        async move {
            match (int, term) {
                (Ok(mut int), Ok(mut term)) => {
                    tokio::select! {
                        _ = int.recv() => {},
                        _ = term.recv() => {},
                    }
                }
                _ => std::future::pending().await,
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

impl Printer {
    fn event(&self, e: &NodeEvent) -> Result<(), OutputError> {
        match e {
            NodeEvent::Joined(p) => self.line(
                json!({"event": "joined", "node_id": p.node.to_string(), "cell_id": p.cell.to_string(),
                       "addr": p.addr.to_string(), "inbound": p.inbound}),
                format!(
                    "joined  {} (cell {}) at {} {}",
                    p.node,
                    p.cell,
                    p.addr,
                    if p.inbound { "inbound" } else { "outbound" }
                ),
            ),
            NodeEvent::JoinRefused { addr, node, cell, code, reason, by_peer } => {
                let reason = printable(reason);
                self.line(
                json!({"event": "refused", "node_id": node.to_string(), "cell_id": cell.to_string(),
                       "addr": addr.to_string(), "code": code.name(), "code_value": code.code(),
                       "reason": reason, "by_peer": by_peer}),
                format!(
                    "refused {node} (claims cell {cell}) at {addr}: {} ({reason}){}",
                    code.name(),
                    if *by_peer { ", by the peer" } else { "" }
                ),
            )
            }
            NodeEvent::Learned { node, cell, via } => self.line(
                json!({"event": "learned", "node_id": node.to_string(), "cell_id": cell.to_string(),
                       "via": via.to_string()}),
                format!("learned {node} (cell {cell}) via {via}"),
            ),
            NodeEvent::Left { peer, reason } => self.line(
                json!({"event": "left", "node_id": peer.node.to_string(), "cell_id": peer.cell.to_string(),
                       "addr": peer.addr.to_string(), "reason": reason}),
                format!("left    {} at {}: {}", peer.node, peer.addr, printable(reason)),
            ),
            NodeEvent::Failed { addr, reason } => self.line(
                json!({"event": "failed", "addr": addr.to_string(), "reason": reason}),
                format!("failed  {addr}: {}", printable(reason)),
            ),
            _ => Ok(()),
        }
    }
}

/// Text from a peer (NACK and CLOSE reasons, message bodies) with control characters,
/// bidirectional controls and other invisible characters escaped, so it cannot forge output
/// lines, send terminal escapes, or show one text while holding another (U+202E shows what
/// follows it backwards). JSON output is escaped by the encoder.
pub(crate) fn printable(text: &str) -> String {
    let mut shown = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            shown.extend(c.escape_default());
        } else if invisible(c) {
            shown.extend(c.escape_unicode());
        } else {
            shown.push(c);
        }
    }
    shown
}

/// The format characters (Unicode general category Cf, as of Unicode 15: the bidirectional
/// controls, zero-width characters, invisible operators, tags) and the line and paragraph
/// separators: a terminal shows none of them as itself.
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061C}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08E2}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0001}'
            | '\u{E0020}'..='\u{E007F}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_controls_bidi_overrides_and_invisible_characters() {
        assert_eq!(printable("plain text, ünïcödé ✓"), "plain text, ünïcödé ✓");
        assert_eq!(printable("a\nb\x1b[2Jc\u{7f}"), r"a\nb\u{1b}[2Jc\u{7f}");
        // Every bidirectional control.
        for c in [
            '\u{061C}', '\u{200E}', '\u{200F}', '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}',
            '\u{202E}', '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}',
        ] {
            assert_eq!(
                printable(&format!("x{c}y")),
                format!("x\\u{{{:x}}}y", c as u32)
            );
        }
        // Other invisible format characters, and the separators that break a line.
        for c in [
            '\u{00AD}',
            '\u{180E}',
            '\u{200B}',
            '\u{200D}',
            '\u{2028}',
            '\u{2029}',
            '\u{2060}',
            '\u{FEFF}',
            '\u{E0041}',
        ] {
            let shown = printable(&c.to_string());
            assert!(shown.starts_with("\\u{"), "{c:?} shown as {shown:?}");
        }
    }
}
