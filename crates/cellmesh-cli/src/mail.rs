//! `cellmesh relay`, `listen` and `send`: messages between cells through a relay.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{IsTerminal as _, Read as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use cellmesh::core::id::{CellId, NodeId};
use cellmesh::core::relay::MsgId;
use cellmesh::home::{Home, Unlocked};
use cellmesh::mailbox::{Mailbox, MailboxConfig, MailboxError, SendError};
use cellmesh::node::{JoinError, Transport};
use cellmesh::relay::{Relay, RelayConfig, RelayEvent};
use cellmesh::state::StateError;
use cellmesh::tls::{ClientConfig, ServerName, TlsFailure};
use cellmesh::ws::WsRequest;
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::out::OutputError;
use crate::{PassphraseArgs, Printer};

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
    /// Memory to size the relay for, in MiB: what it holds for devices and its buffers stay
    /// within about this plus 40 MiB and its connections' buffers.
    #[arg(long, value_name = "MIB", default_value_t = cellmesh::relay::DEFAULT_MEMORY >> 20)]
    memory: usize,
    /// Envelopes a second each sending cell may forward, sustained (bursts of twice this);
    /// envelopes over it are refused as rate-limited (the sending mailbox retries them).
    #[arg(long, value_name = "N", default_value_t = 200_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000_000))]
    cell_rate: u32,
    /// Drop a device's registration, and its queue, after this many days without it.
    #[arg(long, value_name = "DAYS", default_value_t = 30)]
    registration_days: u64,
    /// Print a summary of counts (no device or message named) every SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    summary_secs: u64,
    /// Also print a line for every envelope forwarded or refused (its sending and receiving
    /// devices, id and size), every connection with its address, departure and queue
    /// drained. THIS LOGS METADATA: who talks to whom, when and how much, which the relay
    /// otherwise keeps nowhere.
    #[arg(long)]
    log_metadata: bool,
    /// Serve TLS with this PEM certificate chain (leaf first), for standard ports such as 443;
    /// devices then use `tls://HOST:PORT`. Needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Also accept WebSocket on every listener, on the same port (a connection's first bytes
    /// tell an HTTP upgrade from a link), for networks that pass only web traffic; devices
    /// then use `ws://HOST:PORT/`, or `wss://HOST:PORT/` with --tls-cert.
    #[arg(long)]
    websocket: bool,
    /// Print every line as a JSON object with an `event` field.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    secrets: PassphraseArgs,
}

/// Where the relay is: `--relay`, else `CELLMESH_RELAY`, else the home's config file.
#[derive(Args, Clone)]
pub struct RelayAddr {
    /// The relay's address: `HOST:PORT`, `tls://HOST:PORT`, or for a relay run with
    /// --websocket `ws://HOST[:PORT][/PATH]` or `wss://HOST[:PORT][/PATH]` (ports 80 and 443
    /// by default) [env: CELLMESH_RELAY; default: the one `connect-cell --relay` saved].
    #[arg(long, value_name = "ADDR", env = "CELLMESH_RELAY")]
    relay: Option<RelayTarget>,
    /// A PEM file of CA certificates (or the relay's self-signed certificate) to trust for a
    /// `tls://` or `wss://` relay, besides the web's usual roots [default: the one saved with
    /// the relay].
    #[arg(long, value_name = "FILE", env = "CELLMESH_RELAY_CA")]
    relay_ca: Option<PathBuf>,
}

/// A relay's address as a user writes it: `HOST:PORT`, `tls://HOST:PORT` for a relay that
/// serves TLS, or `ws://HOST[:PORT][/PATH]` and `wss://HOST[:PORT][/PATH]` for one that
/// accepts WebSocket (without and with TLS; ports 80 and 443 by default, path `/`). HOST is a
/// DNS name or an IP address (an IPv6 one in brackets); under TLS the relay's certificate must
/// be valid for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RelayTarget {
    scheme: Scheme,
    /// Without brackets.
    host: String,
    /// As written: `None` for a WebSocket URL without one (the scheme's default).
    port: Option<u16>,
    /// A WebSocket URL's path (and query) as written, `None` when it has none (`/`).
    path: Option<String>,
}

/// How a relay is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scheme {
    Tcp,
    Tls,
    Ws,
    Wss,
}

impl Scheme {
    fn prefix(self) -> &'static str {
        match self {
            Self::Tcp => "",
            Self::Tls => "tls://",
            Self::Ws => "ws://",
            Self::Wss => "wss://",
        }
    }

    fn tls(self) -> bool {
        matches!(self, Self::Tls | Self::Wss)
    }

    fn websocket(self) -> bool {
        matches!(self, Self::Ws | Self::Wss)
    }
}

const FORMS: &str =
    "use HOST:PORT, tls://HOST:PORT, ws://HOST[:PORT][/PATH] or wss://HOST[:PORT][/PATH]";

impl FromStr for RelayTarget {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (scheme, rest) = match text.split_once("://") {
            None => (Scheme::Tcp, text),
            Some(("tls", rest)) => (Scheme::Tls, rest),
            Some(("ws", rest)) => (Scheme::Ws, rest),
            Some(("wss", rest)) => (Scheme::Wss, rest),
            Some((scheme, _)) => {
                return Err(format!("unknown scheme {scheme}:// in {text:?}: {FORMS}"));
            }
        };
        let (authority, path) = match rest.find('/') {
            Some(at) if scheme.websocket() => (&rest[..at], Some(&rest[at..])),
            _ => (rest, None),
        };
        let (host, port) = host_port(authority, text)?;
        if port.is_none() && !scheme.websocket() {
            return Err(format!("{text:?} has no port: {FORMS}"));
        }
        let target = Self {
            scheme,
            host,
            port,
            path: path.map(str::to_string),
        };
        if scheme.websocket() {
            // Checked here once, so that making the transport cannot fail later.
            target
                .ws_request()
                .map_err(|e| format!("{e} in {text:?}"))?;
        }
        Ok(target)
    }
}

/// `HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT`: the host without brackets, and the port if
/// written.
fn host_port(authority: &str, text: &str) -> Result<(String, Option<u16>), String> {
    let bad_host = |host: &str| format!("bad host {host:?} in {text:?}");
    let parse_port = |port: &str| {
        port.parse::<u16>()
            .map_err(|_| format!("bad port {port:?} in {text:?}"))
    };
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (v6, after) = bracketed
            .split_once(']')
            .ok_or_else(|| bad_host(authority))?;
        let ip: std::net::Ipv6Addr = v6.parse().map_err(|_| bad_host(v6))?;
        let port = match after {
            "" => None,
            _ => Some(parse_port(
                after.strip_prefix(':').ok_or_else(|| bad_host(authority))?,
            )?),
        };
        return Ok((ip.to_string(), port));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(parse_port(port)?)),
        None => (authority, None),
    };
    // A DNS name or an IPv4 address; IPv6 needs its brackets.
    if host.contains(':') || ServerName::try_from(host).is_err() {
        return Err(bad_host(host));
    }
    Ok((host.to_string(), port))
}

impl TryFrom<String> for RelayTarget {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<RelayTarget> for String {
    fn from(target: RelayTarget) -> Self {
        target.to_string()
    }
}

impl fmt::Display for RelayTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.scheme.prefix())?;
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        f.write_str(self.path.as_deref().unwrap_or(""))
    }
}

impl RelayTarget {
    /// How to reach it: TCP, TLS to HOST trusting the web's roots and `ca`, or WebSocket over
    /// either.
    fn transport(&self, ca: Option<&Path>) -> Result<Transport> {
        Ok(match self.scheme {
            Scheme::Tcp => Transport::Tcp,
            Scheme::Tls => {
                let (server_name, config) = self.tls(ca)?;
                Transport::Tls {
                    server_name,
                    config,
                }
            }
            Scheme::Ws | Scheme::Wss => Transport::WebSocket {
                request: self
                    .ws_request()
                    .map_err(|e| anyhow!("relay {self}: {e}"))?,
                tls: match self.scheme {
                    Scheme::Wss => Some(self.tls(ca)?),
                    _ => None,
                },
            },
        })
    }

    /// TLS to HOST, trusting the web's roots and `ca`.
    fn tls(&self, ca: Option<&Path>) -> Result<(ServerName<'static>, Arc<ClientConfig>)> {
        let server_name =
            ServerName::try_from(self.host.clone()).map_err(|e| anyhow!("relay {self}: {e}"))?;
        let config = cellmesh::tls::client_config(ca).map_err(|e| anyhow!("--relay-ca: {e}"))?;
        Ok((server_name, config))
    }

    /// The WebSocket upgrade request for HOST and PATH.
    fn ws_request(&self) -> Result<WsRequest, cellmesh::ws::WsRequestError> {
        WsRequest::new(&self.host, self.port, self.path.as_deref().unwrap_or("/"))
    }

    /// The port dialed: as written, or the WebSocket scheme's default.
    fn port(&self) -> u16 {
        let default = if self.scheme.tls() { 443 } else { 80 };
        self.port.unwrap_or(default)
    }

    /// Whether `other` is reached the same way (scheme and, for WebSocket, path).
    pub(crate) fn same_kind(&self, other: &Self) -> bool {
        self.scheme == other.scheme && self.path == other.path
    }

    /// Its addresses (a name may have several, IPv6 and IPv4).
    pub(crate) async fn resolve(&self) -> Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port()))
            .await
            .with_context(|| format!("relay {self}: cannot resolve {}", self.host))?
            .collect();
        if addrs.is_empty() {
            bail!("relay {self}: {} has no address", self.host);
        }
        Ok(addrs)
    }
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
    /// The message; `-` or nothing reads it from stdin (asking for it, on a terminal).
    message: Option<String>,
    #[command(flatten)]
    relay: RelayAddr,
    /// The message's id (32 hex digits) [default: a random one]: sending again under the id of
    /// a send whose outcome was `unknown` delivers it at most once.
    #[arg(long, value_name = "HEX", value_parser = parse_id)]
    id: Option<MsgId>,
    /// Print one JSON object (`status`: delivered, queued, unknown, unsent or refused; `id`,
    /// `devices`).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    secrets: PassphraseArgs,
}

fn parse_id(text: &str) -> Result<MsgId, String> {
    let bytes = data_encoding::HEXLOWER_PERMISSIVE
        .decode(text.trim().as_bytes())
        .map_err(|_| format!("{text:?} is not hex"))?;
    <[u8; 16]>::try_from(bytes)
        .map(MsgId)
        .map_err(|b| format!("an id is 32 hex digits (16 bytes), not {}", 2 * b.len()))
}

/// What `connect-cell --relay` remembers in the home directory.
#[derive(Serialize, Deserialize)]
pub struct Config {
    /// As the user wrote it (`HOST:PORT`, `tls://HOST:PORT`, `ws://...` or `wss://...`);
    /// older files hold a socket address, which reads the same.
    relay: RelayTarget,
    /// The relay's node id, seen at the first connection: later connections refuse any other.
    relay_node: Option<String>,
    /// The CA file trusted for a `tls://` or `wss://` relay (`CELLMESH_RELAY_CA` at
    /// registration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    relay_ca: Option<PathBuf>,
}

/// The config's name in the home directory.
const CONFIG_FILE: &str = "config.json";

fn config_path(home: &Home) -> PathBuf {
    home.dir().join(CONFIG_FILE)
}

/// The saved config: `None` only when there is no file. A file that cannot be read or does
/// not parse is an error, never "no config": it may hold the relay's pin.
fn load_config(home: &Home) -> Result<Option<Config>> {
    let path = config_path(home);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let config = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is damaged (fix it, or remove it and register again with `cellmesh connect-cell --relay ADDR`)",
            path.display()
        )
    })?;
    Ok(Some(config))
}

fn save_config(home: &Home, config: &Config) -> Result<()> {
    let text = serde_json::to_string_pretty(config)?;
    Ok(home.write_file(CONFIG_FILE, text.as_bytes())?)
}

/// The relay to use, the CA file to trust for it, and the node id to pin when it is the
/// saved one.
struct RelayChoice {
    relay: RelayTarget,
    ca: Option<PathBuf>,
    pin: Option<NodeId>,
}

fn relay_of(home: &Home, arg: &RelayAddr) -> Result<RelayChoice> {
    let saved = load_config(home)?;
    let relay = match (&arg.relay, &saved) {
        (Some(a), _) => a.clone(),
        (None, Some(c)) => c.relay.clone(),
        (None, None) => bail!(
            "no relay: pass --relay ADDR, set CELLMESH_RELAY, or register once with `cellmesh connect-cell --relay ADDR`"
        ),
    };
    let saved = saved.filter(|c| c.relay == relay);
    let ca = arg
        .relay_ca
        .clone()
        .or_else(|| saved.as_ref().and_then(|c| c.relay_ca.clone()));
    let pin = saved
        .and_then(|c| c.relay_node)
        .and_then(|n| n.parse().ok());
    Ok(RelayChoice { relay, ca, pin })
}

/// What a mailbox of the CLI is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    /// `listen`: it takes the device's messages.
    Receive,
    /// `send`, `connect-cell --relay`: it only sends, and leaves the device's messages to the
    /// relay for the next `listen`.
    Send,
}

/// Connects to the relay as this home's device (each of the relay's addresses in turn until
/// one answers), carrying on from the device's state in the home. One process at a time is
/// the device: a mailbox that only sends waits (up to 30 s) for another one to finish.
async fn open_mailbox(
    home: &Home,
    unlocked: &Unlocked,
    choice: &RelayChoice,
    purpose: Use,
) -> Result<Mailbox> {
    let patience = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match try_open(home, unlocked, choice, purpose).await {
            Err(Opening::Busy(path))
                if purpose == Use::Send && tokio::time::Instant::now() < patience =>
            {
                tracing::debug!(path = %path.display(), "the device is busy; waiting");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(Opening::Busy(path)) => {
                bail!(
                    "another process of this device is running ({} is in use): {}",
                    path.display(),
                    match purpose {
                        Use::Receive =>
                            "is a `cellmesh listen` of this home running already? One listen per home",
                        Use::Send => "it did not finish within 30 s",
                    }
                )
            }
            Err(Opening::Failed(e)) => return Err(e),
            Ok(mailbox) => return Ok(mailbox),
        }
    }
}

enum Opening {
    Busy(PathBuf),
    Failed(anyhow::Error),
}

async fn try_open(
    home: &Home,
    unlocked: &Unlocked,
    choice: &RelayChoice,
    purpose: Use,
) -> Result<Mailbox, Opening> {
    let relay = &choice.relay;
    let transport = relay
        .transport(choice.ca.as_deref())
        .map_err(Opening::Failed)?;
    let mut unreachable = None;
    for addr in relay.resolve().await.map_err(Opening::Failed)? {
        let mut config = MailboxConfig::new(addr);
        config.relay_node = choice.pin;
        config.transport = transport.clone();
        config.node.revocations = unlocked.keystore.revocations();
        config.state = Some(home.dir().to_path_buf());
        // Revocations a directory carries are kept in the keystore, for every later run.
        config.home = Some(home.dir().to_path_buf());
        config.receive = purpose == Use::Receive;
        match Mailbox::connect(unlocked, config).await {
            Ok(mailbox) => return Ok(mailbox),
            Err(MailboxError::State(StateError::Busy { path })) => return Err(Opening::Busy(path)),
            Err(MailboxError::Relay(e @ JoinError::Connect { .. })) => unreachable = Some(e),
            Err(e) => return Err(Opening::Failed(explain(relay, e))),
        }
    }
    Err(Opening::Failed(match unreachable {
        Some(e) => explain(relay, MailboxError::Relay(e)),
        None => anyhow!("relay {relay} unreachable"),
    }))
}

/// One line a user can act on.
fn explain(relay: &RelayTarget, e: MailboxError) -> anyhow::Error {
    match e {
        MailboxError::Relay(JoinError::Tls {
            failure: TlsFailure::Certificate,
            reason,
            ..
        }) => anyhow!(
            "relay {relay}: TLS certificate not trusted: {reason} (for a private CA, pass --relay-ca FILE)"
        ),
        MailboxError::Relay(JoinError::Tls { reason, .. }) => anyhow!(
            "relay {relay}: TLS handshake failed: {reason} (does the relay serve TLS, with --tls-cert?)"
        ),
        MailboxError::Relay(JoinError::WebSocket {
            status: Some(_),
            reason,
            ..
        }) => anyhow!("relay {relay}: WebSocket {reason} (is the path right?)"),
        MailboxError::Relay(JoinError::WebSocket { reason, .. }) => anyhow!(
            "relay {relay}: WebSocket failed: {reason} (does the relay accept WebSocket, with --websocket?)"
        ),
        MailboxError::Relay(JoinError::Refused {
            code: cellmesh::core::wire::NackCode::Revoked,
            ..
        }) => anyhow!(
            "relay {relay} refuses this device: its cell has revoked it (a device of the cell that is not revoked can run `cellmesh connect-cell` in a new home)"
        ),
        MailboxError::Relay(e) => anyhow!("relay {relay} unreachable: {e}"),
        other => anyhow!(other),
    }
}

/// What `revoke-device` is asked.
pub struct Revoke {
    /// The device to revoke.
    pub node: NodeId,
    /// Allow revoking this very device.
    pub force: bool,
    /// Allow a node id that is not a known device of this cell.
    pub unconfirmed: bool,
    /// Print JSON.
    pub json: bool,
}

/// `revoke-device`: checks that the id is one of this cell's devices (as this home knows
/// them, and as the relay's directory of the cell does, checked against the cell id),
/// revokes it in the home (or finds the revocation made before), hands it to the relay and
/// says what the relay did. Without a relay (none given, none saved) it is kept here only.
pub fn revoke_device(
    home: &Home,
    unlocked: &mut Unlocked,
    relay: &RelayAddr,
    how: Revoke,
) -> Result<()> {
    let node = how.node;
    let keystore = &unlocked.keystore;
    if node == keystore.node && !how.force {
        bail!("{node} is this device; revoke it from another device of the cell, or pass --force");
    }
    let choice = match (&relay.relay, load_config(home)?) {
        (None, None) => None,
        _ => Some(relay_of(home, relay)?),
    };
    let known_here = keystore.devices.iter().any(|d| d.node == node);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let mailbox = match &choice {
        Some(c) => Some(
            runtime
                .block_on(open_mailbox(home, unlocked, c, Use::Send))
                .context("nothing was revoked")?,
        ),
        None => None,
    };
    let known_at_relay = match &mailbox {
        Some(m) if !known_here => {
            let cell = unlocked.keystore.cell;
            match runtime.block_on(m.lookup(cell)) {
                Ok(dir) => dir.devices.iter().any(|d| d.node() == node),
                Err(e) => {
                    tracing::debug!(error = %e, "could not list this cell's devices at the relay");
                    false
                }
            }
        }
        _ => false,
    };
    if !(known_here || known_at_relay || how.unconfirmed) {
        if let Some(m) = mailbox {
            runtime.block_on(m.close());
        }
        let where_ = match &choice {
            Some(c) => format!("this home or relay {}", c.relay),
            None => "this home".into(),
        };
        bail!(
            "{node} is not a device of this cell known to {where_}: nothing revoked (`cellmesh whoami` lists the devices known here; pass --unconfirmed to revoke it anyway)"
        );
    }
    // Made once: running the command again hands the same revocation to the relay.
    let cell = unlocked.keystore.cell;
    let made_before = unlocked.keystore.revocation_tokens().iter().find(|t| {
        let c = t.claims();
        c.issuer == cell.key()
            && c.key_attribute(cellmesh::core::token::attr::NODE) == Some(node.key())
    });
    let token = match made_before {
        Some(t) => t.clone(),
        None => home.revoke(unlocked, node, how.force)?,
    };
    let encoded = data_encoding::BASE64.encode(&token.to_bytes());
    let answer = mailbox.map(|m| {
        runtime.block_on(async {
            let answer = tokio::time::timeout(Duration::from_secs(30), m.revoke(token))
                .await
                .unwrap_or(Err(MailboxError::Send(SendError::Unknown(MsgId([0; 16])))));
            m.close().await;
            answer
        })
    });
    let relay_text = choice.as_ref().map(|c| c.relay.to_string());
    let (status, code, line, failure) = match (&answer, &relay_text) {
        (None, _) | (_, None) => (
            "not_sent",
            None,
            "No relay was told (none given, none saved): pass --relay ADDR to tell one."
                .to_string(),
            None,
        ),
        (Some(Ok(())), Some(r)) => (
            "accepted",
            None,
            format!(
                "Relay {r} accepted it: it refuses the device and gives the revocation to every sender."
            ),
            None,
        ),
        (Some(Err(MailboxError::Send(SendError::Refused(code)))), Some(r)) => (
            "refused",
            Some(code.name()),
            String::new(),
            Some(format!(
                "relay {r} refused the revocation ({}): {}",
                code.name(),
                match code {
                    cellmesh::core::relay::RefuseCode::NotAllowed =>
                        "the device is not this cell's there, or no device of this cell is registered there",
                    cellmesh::core::relay::RefuseCode::TooMany =>
                        "it keeps no more revocations for this cell",
                    cellmesh::core::relay::RefuseCode::RateLimited =>
                        "too many revocations at once; run the command again in a moment",
                    _ => "run the command again later",
                }
            )),
        ),
        (Some(Err(e)), Some(r)) => (
            "unknown",
            None,
            String::new(),
            Some(format!(
                "relay {r} did not answer the revocation ({e}); run the command again to hand it over"
            )),
        ),
    };
    let out = Printer { json: how.json };
    out.line(
        json!({
            "revoked": node.to_string(),
            "revocation": encoded,
            "relay": relay_text,
            "relay_status": status,
            "relay_code": code,
        }),
        format!(
            "Revoked {node}.\n{}Revocation token (base64), for `cellmesh import-revocation` elsewhere:\n{encoded}",
            if line.is_empty() { String::new() } else { format!("{line}\n") }
        ),
    )?;
    match failure {
        Some(f) => bail!("{f} (the revocation is kept in this home)"),
        None => Ok(()),
    }
}

/// Registers this device with the relay and remembers the relay (and its node id) in the
/// home. Used by `connect-cell --relay`; a `tls://` or `wss://` relay's private CA comes from
/// `CELLMESH_RELAY_CA` and is remembered too.
pub fn register(home: &Home, unlocked: &Unlocked, relay: &RelayTarget) -> Result<NodeId> {
    let ca = match std::env::var_os("CELLMESH_RELAY_CA") {
        // Absolute, so that later commands find it from any directory.
        Some(path) => Some(
            std::fs::canonicalize(&path)
                .with_context(|| format!("CELLMESH_RELAY_CA: cannot read {}", path.display()))?,
        ),
        None => None,
    };
    let choice = RelayChoice {
        relay: relay.clone(),
        ca,
        pin: None,
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let relay_node = runtime.block_on(async {
        let mailbox = open_mailbox(home, unlocked, &choice, Use::Send).await?;
        let node = mailbox.relay_node();
        mailbox.close().await;
        Ok::<_, anyhow::Error>(node)
    })?;
    save_config(
        home,
        &Config {
            relay: choice.relay,
            relay_node: Some(relay_node.to_string()),
            relay_ca: choice.ca,
        },
    )?;
    Ok(relay_node)
}

pub fn relay(home: &Home, args: &RelayArgs) -> Result<()> {
    let unlocked = crate::unlock(home, &args.secrets)?;
    let data = args
        .data
        .clone()
        .unwrap_or_else(|| home.dir().join("relay"));
    let mut config = RelayConfig::new(args.listen.clone(), data.clone());
    config.node.revocations = unlocked.keystore.revocations();
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(
            cellmesh::tls::server_config(cert, key)
                .map_err(|e| anyhow!("--tls-cert/--tls-key: {e}"))?,
        );
    }
    let tls = config.tls.is_some();
    // The relay passes its node configuration on as it is: no RelayConfig field for this.
    config.node.websocket = args.websocket;
    let websocket = args.websocket;
    let layers = match (tls, websocket) {
        (false, false) => "",
        (true, false) => " (TLS)",
        (false, true) => " (also WebSocket)",
        (true, true) => " (TLS, also WebSocket)",
    };
    if !args.allow.is_empty() {
        config.allow = Some(args.allow.iter().copied().collect::<BTreeSet<_>>());
    }
    config.fit_memory(args.memory.max(1).saturating_mul(1 << 20));
    config.rate_per_cell = args.cell_rate;
    config.burst_per_cell = args.cell_rate.saturating_mul(2);
    config.registrations.ttl_secs = args.registration_days.saturating_mul(24 * 3600);
    config.summary_every = (args.summary_secs > 0).then(|| Duration::from_secs(args.summary_secs));
    config.envelope_events = args.log_metadata;
    let metadata = args.log_metadata;
    let out = Printer { json: args.json };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // Made once, before starting: a signal that came while starting or while an event
        // was being printed is not lost.
        let stop = crate::node::shutdown_signal();
        let relay = Relay::start(&unlocked, config).await?;
        drop(unlocked);
        let mut events = relay.subscribe();
        tokio::pin!(stop);
        // Runs until stopped, or until a line cannot be printed.
        let printed: Result<(), OutputError> = async {
            for addr in relay.local_addrs() {
                out.line(
                    json!({"event": "listening", "addr": addr.to_string(), "tls": tls, "websocket": websocket, "relay_node": relay.node_id().to_string(), "data": data}),
                    format!("listening on {addr}{layers}"),
                )?;
            }
            out.line(
                json!({"event": "started", "cell_id": relay.cell().to_string(), "node_id": relay.node_id().to_string()}),
                format!("relay {} started (store in {})", relay.node_id(), data.display()),
            )?;
            loop {
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    ev = events.recv() => match ev {
                        Ok(ev) => print_relay_event(out, &ev, metadata)?,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => out.line(
                            json!({"event": "lagged", "missed": n}),
                            format!("(missed {n} events)"),
                        )?,
                        Err(_) => return Ok(()),
                    },
                }
            }
        }
        .await;
        relay.shutdown().await;
        printed?;
        out.line(json!({"event": "stopped"}), "stopped")?;
        Ok(())
    })
}

/// Prints what the relay did. By default: new registrations (device and cell, both in the
/// store's directory anyway, but not the address, which is kept nowhere), refused joins,
/// disconnected devices, expired registrations and the periodic summary. With `metadata`,
/// also every join with its address, departure, forwarded or refused envelope and drain.
fn print_relay_event(out: Printer, ev: &RelayEvent, metadata: bool) -> Result<(), OutputError> {
    match ev {
        RelayEvent::Registered {
            cell,
            node,
            addr,
            new,
        } if metadata => out.line(
            json!({"event": "registered", "cell_id": cell.to_string(), "node_id": node.to_string(), "addr": addr.to_string(), "new": new}),
            format!("registered {} of {} from {addr}", node.short(), cell.short()),
        ),
        RelayEvent::Registered {
            cell,
            node,
            new: true,
            ..
        } => out.line(
            json!({"event": "registered", "cell_id": cell.to_string(), "node_id": node.to_string(), "new": true}),
            format!("registered {} of {}", node.short(), cell.short()),
        ),
        RelayEvent::JoinRefused {
            cell,
            node,
            code,
            reason,
        } => out.line(
            json!({"event": "join_refused", "cell_id": cell.to_string(), "node_id": node.to_string(), "code": code.name(), "reason": reason}),
            format!("refused the join of {} of {}: {} ({reason})", node.short(), cell.short(), code.name()),
        ),
        // Revocations are public statements of a cell, not who talks to whom: always shown.
        RelayEvent::Revoked {
            cell,
            node,
            messages,
            ..
        } => out.line(
            json!({"event": "revoked", "cell_id": cell.to_string(), "node_id": node.to_string(), "messages": messages}),
            format!("kept the revocation of {} by {} ({messages} queued envelopes dropped)", node.short(), cell.short()),
        ),
        RelayEvent::RevokeRefused { code, reason, .. } => out.line(
            json!({"event": "revoke_refused", "code": code.name(), "reason": reason}),
            format!("refused a revocation: {} ({reason})", code.name()),
        ),
        RelayEvent::Disconnected { node, reason } => out.line(
            json!({"event": "disconnected", "node_id": node.to_string(), "reason": reason}),
            format!("disconnected {}: {reason}", node.short()),
        ),
        RelayEvent::Expired { devices, messages } => out.line(
            json!({"event": "expired", "devices": devices, "messages": messages}),
            format!("dropped {devices} registrations not seen for their time to live ({messages} queued envelopes)"),
        ),
        RelayEvent::Summary(s) => {
            let refusals: serde_json::Map<String, serde_json::Value> = s
                .refusals
                .iter()
                .map(|(code, n)| (code.name().to_string(), json!(n)))
                .collect();
            let by_code: Vec<String> = s
                .refusals
                .iter()
                .map(|(code, n)| format!("{n} {}", code.name()))
                .collect();
            let refused = if by_code.is_empty() {
                "0 refused".to_string()
            } else {
                format!("refused {}", by_code.join(", "))
            };
            let st = &s.stats;
            out.line(
                json!({"event": "summary", "period_secs": s.period.as_secs_f64(),
                       "pushed": st.pushed, "queued": st.queued, "refused": st.refused, "bytes": st.bytes,
                       "refusals": refusals, "joins": s.joins, "new_devices": s.new_devices,
                       "joins_refused": s.joins_refused, "online": s.online, "registered": s.registered,
                       "in_flight_bytes": s.in_flight_bytes, "waiting_bytes": s.waiting_bytes}),
                format!(
                    "in {:.0} s: {} pushed, {} queued, {refused}, {} bytes; {} joins ({} new, {} refused); {} online, {} registered; {} bytes held",
                    s.period.as_secs_f64(), st.pushed, st.queued, st.bytes, s.joins, s.new_devices,
                    s.joins_refused, s.online, s.registered, s.in_flight_bytes + s.waiting_bytes
                ),
            )
        }
        _ if !metadata => Ok(()),
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
        _ => Ok(()),
    }
}

pub fn listen(home: &Home, args: &ListenArgs) -> Result<()> {
    let choice = relay_of(home, &args.relay)?;
    let relay = choice.relay.clone();
    let unlocked = crate::unlock(home, &args.secrets)?;
    let out = Printer { json: args.json };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        if crate::agent::running(home.dir()).await {
            bail!(
                "a `cellmesh listen` of this home is running already: one listen per home (a `send` from this home goes through it)"
            );
        }
        let mut mailbox = open_mailbox(home, &unlocked, &choice, Use::Receive).await?;
        drop(unlocked);
        // `cellmesh send` from this home goes through this connection (see agent).
        let _served = crate::agent::serve(home.dir(), relay.to_string(), mailbox.sender()).await;
        let mut seen = 0u64;
        let stop = crate::node::shutdown_signal();
        tokio::pin!(stop);
        // Runs until stopped (true), --count is reached, or a line cannot be printed.
        let printed: Result<bool> = async {
            out.line(
                json!({"event": "listening", "relay": relay.to_string(), "cell_id": mailbox.cell().to_string(), "node_id": mailbox.node().to_string()}),
                format!("listening for {} at relay {relay}", mailbox.cell()),
            )?;
            loop {
                if args.count.is_some_and(|n| seen >= n) {
                    return Ok(false);
                }
                let msg = tokio::select! {
                    _ = &mut stop => return Ok(true),
                    m = mailbox.recv_unacked() => match m {
                        Some(m) => m,
                        None if mailbox.is_revoked() => bail!(
                            "relay {relay} refuses this device: its cell has revoked it"
                        ),
                        None => bail!("the mailbox closed"),
                    },
                };
                // Acknowledged only once its line is written and flushed.
                print_message(out, &msg)?;
                mailbox.ack();
                seen += 1;
            }
        }
        .await;
        // What was printed is acknowledged; what arrived and was not printed (a failed
        // write, --count reached, a signal) stays with the relay for the next listen.
        mailbox.close().await;
        let stopped = printed?;
        if stopped {
            out.line(json!({"event": "stopped"}), "stopped")?;
        }
        Ok(())
    })
}

/// Prints one message; returns once its line is written and flushed, so that a caller can
/// count it as shown. An error means it was not (listen stops).
fn print_message(out: Printer, msg: &cellmesh::core::e2e::Message) -> Result<(), OutputError> {
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
    out.line(obj, format!("{} at {}: {shown}", msg.from_cell, msg.time.0))
}

pub fn send(home: &Home, args: &SendArgs) -> Result<()> {
    let choice = relay_of(home, &args.relay)?;
    let relay = choice.relay.clone();
    let body = match args.message.as_deref() {
        Some(m) if m != "-" => m.as_bytes().to_vec(),
        _ => {
            if std::io::stdin().is_terminal() {
                // Typed where a passphrase prompt may be expected next: say what this is.
                crate::out::stderr(&format!(
                    "Message to {} (end it with Ctrl-D on a line of its own):\n",
                    args.to.short()
                ))?;
            }
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
    let unlocked = crate::unlock(home, &args.secrets)?;
    let out = Printer { json: args.json };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // One-shot sends always travel alone under an id of their own, so that a retry
        // with --id after an unknown outcome is recognised by the recipient.
        let id = args.id.unwrap_or_else(cellmesh::mailbox::random_id);
        let named = args.relay.relay.as_ref().map(ToString::to_string);
        // A `cellmesh listen` of this home holds the device's connection: send through it.
        let outcome =
            match crate::agent::send(home.dir(), named.as_deref(), args.to, &body, id).await? {
                Some(outcome) => outcome,
                None => {
                    let mailbox = open_mailbox(home, &unlocked, &choice, Use::Send).await?;
                    let body = cellmesh::Bytes::from(body);
                    let sent = match mailbox.submit_as(args.to, body, Some(id)).await {
                        Ok(ticket) => tokio::time::timeout(Duration::from_secs(30), ticket)
                            .await
                            .unwrap_or(Err(MailboxError::Send(SendError::Unknown(id)))),
                        Err(e) => Err(e),
                    };
                    mailbox.close().await;
                    crate::agent::Outcome::from(sent)
                }
            };
        drop(unlocked);
        report(out, args.to, id, &relay, outcome)
    })
}

/// Prints a send's outcome; an error (after the line, for --json) unless it is delivered or
/// queued.
fn report(
    out: Printer,
    to: CellId,
    id: MsgId,
    relay: &RelayTarget,
    outcome: crate::agent::Outcome,
) -> Result<()> {
    use crate::agent::Outcome;
    let to_text = to.to_string();
    match outcome {
        Outcome::Sent(sent) => {
            let devices = sent.devices;
            out.line(
                json!({"status": sent.status.name(), "id": sent.id.to_hex(), "devices": devices, "to": to_text}),
                format!(
                    "{} {} ({devices} device{})",
                    sent.status.name(),
                    sent.id,
                    if devices == 1 { "" } else { "s" }
                ),
            )?;
            Ok(())
        }
        Outcome::Unknown => {
            if out.json {
                out.line(
                    json!({"status": "unknown", "id": id.to_hex(), "to": to_text}),
                    String::new(),
                )?;
            }
            bail!(
                "unknown: no device acknowledged message {id} in time, and the relay did not say it stored it; it may still be delivered. Sending it again with `--id {id}` delivers it at most once"
            )
        }
        Outcome::NotSent(why) => {
            if out.json {
                out.line(
                    json!({"status": "unsent", "id": id.to_hex(), "to": to_text}),
                    String::new(),
                )?;
            }
            bail!("{why}")
        }
        Outcome::Refused(code) => {
            if out.json {
                out.line(
                    json!({"status": "refused", "id": id.to_hex(), "code": code, "to": to_text}),
                    String::new(),
                )?;
            }
            bail!("refused: the relay refused message {id}: {code}")
        }
        Outcome::UnknownCell(c) => {
            bail!("unknown cell {c}: no device of it is registered at relay {relay}")
        }
        Outcome::Failed(e) => bail!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_addresses_parse_and_print_as_written() {
        for text in [
            "127.0.0.1:7100",
            "[::1]:7100",
            "relay.example.org:7100",
            "tls://relay.example.org:443",
            "tls://127.0.0.1:443",
            "tls://[2001:db8::1]:443",
        ] {
            let target: RelayTarget = text.parse().unwrap();
            assert_eq!(target.to_string(), text);
        }
        let t: RelayTarget = "tls://localhost:8443".parse().unwrap();
        assert_eq!(t.scheme, Scheme::Tls);
        assert_eq!((t.host.as_str(), t.port()), ("localhost", 8443));
        for bad in [
            "relay.example.org",
            "https://relay.example.org:443",
            "tls://:443",
            "tls://relay.example.org:99999",
            "tls://relay.example.org:443/path",
            "::1:7100",
            "bad host:1",
        ] {
            assert!(bad.parse::<RelayTarget>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn websocket_urls_parse_print_as_written_and_default_their_ports() {
        for text in [
            "ws://127.0.0.1:7100",
            "ws://relay.example.org",
            "wss://relay.example.org/",
            "wss://relay.example.org:8443/cellmesh?v=1",
            "ws://[::1]:8080/relay",
            "wss://[2001:db8::1]",
        ] {
            let target: RelayTarget = text.parse().unwrap();
            assert_eq!(target.to_string(), text);
        }
        let port = |text: &str| text.parse::<RelayTarget>().unwrap().port();
        assert_eq!(port("ws://relay.example.org/"), 80);
        assert_eq!(port("wss://relay.example.org/"), 443);
        assert_eq!(port("wss://relay.example.org:8443"), 8443);

        let t: RelayTarget = "wss://relay.example.org/cellmesh".parse().unwrap();
        match t.transport(None).unwrap() {
            Transport::WebSocket { request, tls } => {
                assert_eq!(request.authority(), "relay.example.org");
                assert_eq!(request.path(), "/cellmesh");
                let (name, _) = tls.expect("wss runs over TLS");
                assert_eq!(name.to_str(), "relay.example.org");
            }
            other => panic!("{other:?}"),
        }
        let t: RelayTarget = "ws://[::1]:7100".parse().unwrap();
        match t.transport(None).unwrap() {
            Transport::WebSocket { request, tls } => {
                assert_eq!((request.authority(), request.path()), ("[::1]:7100", "/"));
                assert!(tls.is_none());
            }
            other => panic!("{other:?}"),
        }

        for (bad, says) in [
            ("ws://", "bad host"),
            ("ws://:80", "bad host"),
            ("wss:///path", "bad host"),
            ("ws://relay.example.org:99999/", "bad port"),
            ("ws://relay.example.org:/", "bad port"),
            ("ws://bad host/", "bad host"),
            ("ws://[::1/", "bad host"),
            ("ws://[::1]x/", "bad host"),
            ("ws://relay.example.org/a b", "bad path"),
            ("ws://relay.example.org/#frag", "bad path"),
            ("http://relay.example.org/", "unknown scheme"),
        ] {
            let err = bad.parse::<RelayTarget>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn config_files_keep_the_string_form_and_old_ones_still_read() {
        let old: Config =
            serde_json::from_str(r#"{"relay":"127.0.0.1:7100","relay_node":null}"#).unwrap();
        assert_eq!(old.relay, "127.0.0.1:7100".parse().unwrap());
        assert_eq!(old.relay_ca, None);
        let new = Config {
            relay: "tls://relay.example.org:443".parse().unwrap(),
            relay_node: None,
            relay_ca: Some("/etc/cellmesh/ca.pem".into()),
        };
        let json: serde_json::Value = serde_json::to_value(&new).unwrap();
        assert_eq!(json["relay"], "tls://relay.example.org:443");
        assert_eq!(json["relay_ca"], "/etc/cellmesh/ca.pem");
        let ws: Config = serde_json::from_str(
            r#"{"relay":"wss://relay.example.org/cellmesh","relay_node":null}"#,
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&ws).unwrap()["relay"],
            "wss://relay.example.org/cellmesh"
        );
    }
}
