//! A running `cellmesh listen` lends its connection to `cellmesh send` from the same home.
//!
//! A device is one node key, and a relay keeps one connection per device: a `send` that
//! opened a second connection for the device would replace the one `listen` holds (and be
//! replaced back), and the answers to each would reach the other. So `listen` serves a Unix
//! socket, `agent/mailbox.sock` in the home directory, and `send`, once it has unlocked the
//! keystore itself, hands its message to that socket when one answers. One request per
//! connection, one JSON line each way:
//!
//! ```text
//! send   → listen   {"to": CELL_ID, "body": BASE64, "id": HEX, "relay": RELAY | null}
//! listen → send     {"status": "delivered"|"queued", "id": HEX, "devices": N}
//!                 | {"status": "unknown"|"unsent"|"refused", "code": TEXT}
//!                 | {"error": TEXT, "unknown_cell": bool}
//! ```
//!
//! Once the request is written the listen has the message: a `send` that gets no answer
//! (the listen died, or did not answer in 40 s) reports `unknown` with its id, never an
//! error that would invite a retry under another id. The listen itself answers within its
//! mailbox's deadline (10 s from the request, the relay's lookup included), `unsent` when
//! the relay did not list the recipient's devices by then: the message never left.
//!
//! `relay` is the relay the send named itself (`--relay`, `CELLMESH_RELAY`), `null` when it
//! would use the saved one: the device has one connection, so a send that names another
//! relay than the listen's is refused with a clear error, never sent over a second
//! connection that would fight the listen's. Other processes of the same user can send through the socket while `listen`
//! runs, as they can use an ssh-agent. Other users cannot, and cannot pose as a listen, as
//! with ssh's agent: the socket is made inside a directory of mode 0700 (so it is never
//! reachable between its bind and its chmod to 0600), `listen` answers only peers of its own
//! uid (SO_PEERCRED), and `send` refuses a directory or socket file that is not the user's own
//! or a socket served by another uid, before it writes anything.

use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use cellmesh::core::id::CellId;
use cellmesh::core::relay::MsgId;
use cellmesh::mailbox::{MailboxError, MailboxSender, SendError, Sent, Status};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// The socket's directory in the home directory (mode 0700), and its name in it.
const DIR: &str = "agent";
const SOCKET: &str = "mailbox.sock";
/// Longest request line: a body of the largest size in base64, and the rest.
const MAX_REQUEST: u64 = (cellmesh::core::e2e::MAX_BODY as u64).div_ceil(3) * 4 + 1024;

/// How a send ended, through a `listen` or on its own connection.
pub enum Outcome {
    Sent(Sent),
    /// No acknowledgement, and the relay did not say it stored it: it may still arrive.
    Unknown,
    /// Never sealed (the relay did not list the cell's devices in time): it will not arrive.
    NotSent(String),
    /// The relay refused it (the code's name).
    Refused(String),
    UnknownCell(CellId),
    Failed(String),
}

impl From<Result<Sent, MailboxError>> for Outcome {
    fn from(result: Result<Sent, MailboxError>) -> Self {
        match result {
            Ok(sent) => Self::Sent(sent),
            Err(MailboxError::Send(SendError::Unknown(_))) => Self::Unknown,
            Err(MailboxError::Send(e @ SendError::NotSent(_))) => Self::NotSent(e.to_string()),
            Err(MailboxError::Send(SendError::Refused(code))) => {
                Self::Refused(code.name().to_string())
            }
            Err(MailboxError::Send(SendError::UnknownCell(c))) => Self::UnknownCell(c),
            Err(e) => Self::Failed(e.to_string()),
        }
    }
}

impl Outcome {
    /// The answer a listen writes back.
    fn to_json(&self) -> Value {
        match self {
            Self::Sent(sent) => json!({
                "status": sent.status.name(),
                "id": sent.id.to_hex(),
                "devices": sent.devices,
            }),
            Self::Unknown => json!({"status": "unknown"}),
            Self::NotSent(why) => json!({"status": "unsent", "code": why}),
            Self::Refused(code) => json!({"status": "refused", "code": code}),
            Self::UnknownCell(c) => {
                json!({"error": format!("unknown cell {c}"), "unknown_cell": true})
            }
            Self::Failed(e) => json!({"error": e}),
        }
    }
}

/// Serves `home`'s socket until the returned guard is dropped (which removes the socket).
/// `None` if another `listen` of this home already serves it, or it cannot be made safely.
pub async fn serve(home: &Path, relay: String, sender: MailboxSender) -> Option<Served> {
    let dir = home.join(DIR);
    if let Err(e) = private_dir(&dir) {
        tracing::warn!(error = %format!("{e:#}"), "cannot serve sends from this home");
        return None;
    }
    let path = dir.join(SOCKET);
    if UnixStream::connect(&path).await.is_ok() {
        tracing::warn!(path = %path.display(), "another listen serves this home's socket");
        return None;
    }
    // Left by a listen that did not stop cleanly.
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot serve sends from this home");
            return None;
        }
    };
    if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!(path = %path.display(), error = %e, "cannot serve sends from this home");
        let _ = std::fs::remove_file(&path);
        return None;
    }
    let me = crate::private::uid();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // The directory keeps other users out; this holds should it be opened up.
            match stream.peer_cred() {
                Ok(peer) if peer.uid() == me => {
                    tokio::spawn(answer(stream, relay.clone(), sender.clone()));
                }
                Ok(peer) => tracing::warn!(uid = peer.uid(), "refused a send from another user"),
                Err(e) => tracing::warn!(error = %e, "refused a send whose sender is unknown"),
            }
        }
    });
    Some(Served { path, task })
}

/// Makes `dir` with mode 0700, or checks that the one there is as private.
fn private_dir(dir: &Path) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    let meta =
        std::fs::symlink_metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    crate::private::check_private_dir(dir, &meta)
}

/// The socket, served while this lives.
pub struct Served {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn answer(stream: UnixStream, relay: String, sender: MailboxSender) {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let reply = match BufReader::new(rd.take(MAX_REQUEST))
        .read_line(&mut line)
        .await
    {
        Ok(_) => request(&line, &relay, &sender).await,
        Err(e) => json!({"error": format!("bad request: {e}")}),
    };
    let _ = wr.write_all(format!("{reply}\n").as_bytes()).await;
}

async fn request(line: &str, relay: &str, sender: &MailboxSender) -> Value {
    let parsed = (|| {
        let v: Value = serde_json::from_str(line).ok()?;
        let to: CellId = v["to"].as_str()?.parse().ok()?;
        let body = data_encoding::BASE64
            .decode(v["body"].as_str()?.as_bytes())
            .ok()?;
        let id = parse_id(v["id"].as_str()?)?;
        let named = match &v["relay"] {
            Value::Null => None,
            other => Some(other.as_str()?.to_string()),
        };
        Some((to, body, id, named))
    })();
    let Some((to, body, id, named)) = parsed else {
        return json!({"error": "bad request"});
    };
    if let Some(named) = named
        && !same_relay(&named, relay).await
    {
        return json!({"error": format!(
            "this device is connected to relay {relay} through a running `cellmesh listen`: stop it to send through {named}"
        )});
    }
    let sent = match sender
        .submit_as(to, cellmesh::Bytes::from(body), Some(id))
        .await
    {
        Ok(ticket) => ticket.await,
        Err(e) => Err(e),
    };
    Outcome::from(sent).to_json()
}

/// Whether two relay addresses, as users wrote them, name the same relay: the same way of
/// reaching it (TCP, TLS, WebSocket) at an address they share.
async fn same_relay(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    let (Ok(a), Ok(b)) = (
        a.parse::<crate::mail::RelayTarget>(),
        b.parse::<crate::mail::RelayTarget>(),
    ) else {
        return false;
    };
    if !a.same_kind(&b) {
        return false;
    }
    match (a.resolve().await, b.resolve().await) {
        (Ok(x), Ok(y)) => x.iter().any(|addr| y.contains(addr)),
        _ => false,
    }
}

fn parse_id(hex: &str) -> Option<MsgId> {
    let bytes = data_encoding::HEXLOWER.decode(hex.as_bytes()).ok()?;
    Some(MsgId(bytes.try_into().ok()?))
}

/// Whether a `listen` of this home answers on its socket.
pub async fn running(home: &Path) -> bool {
    UnixStream::connect(home.join(DIR).join(SOCKET))
        .await
        .is_ok()
}

/// Hands the message to a `listen` of this home, if one answers on its socket and uses
/// `relay`; `None` means `send` should connect itself. A socket that is not the user's own,
/// or that another user serves, is an error: nothing is written to it.
pub async fn send(
    home: &Path,
    relay: Option<&str>,
    to: CellId,
    body: &[u8],
    id: MsgId,
) -> Result<Option<Outcome>> {
    let refusing = "refusing the socket of a running listen";
    let dir = home.join(DIR);
    match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
        Ok(meta) => crate::private::check_private_dir(&dir, &meta).context(refusing)?,
    }
    let path = dir.join(SOCKET);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        Ok(meta) if !meta.file_type().is_socket() => {
            bail!("{refusing}: {} is not a socket (remove it)", path.display())
        }
        Ok(meta) => crate::private::check_owner(&path, &meta).context(refusing)?,
    }
    let Ok(mut stream) = UnixStream::connect(&path).await else {
        return Ok(None);
    };
    // Whoever bound the file, the process answering must be this user's, as ssh checks its
    // agent: another would take the body and could answer "delivered".
    let peer = stream
        .peer_cred()
        .with_context(|| format!("cannot tell who serves {}", path.display()))?
        .uid();
    let me = crate::private::uid();
    if peer != me {
        bail!(
            "{refusing}: {} is served by uid {peer}, not by you (uid {me})",
            path.display()
        );
    }
    let request = json!({
        "to": to.to_string(),
        "body": data_encoding::BASE64.encode(body),
        "id": id.to_hex(),
        "relay": relay,
    });
    stream
        .write_all(format!("{request}\n").as_bytes())
        .await
        .context("cannot hand the message to the running listen")?;
    let mut line = String::new();
    // The listen answers by its mailbox's deadline (10 s, the lookup included); this waits
    // well past it, for a listen that is stuck.
    // From here on the listen has the message and may still deliver it (a send waiting for
    // a relay that is down is kept, and goes once it is back): no answer, or a listen gone
    // before it answered, is `unknown`, so that a retry goes under the same id.
    let answered = tokio::time::timeout(
        Duration::from_secs(40),
        BufReader::new(stream).read_line(&mut line),
    )
    .await;
    match answered {
        Ok(Ok(1..)) => {}
        Err(_) => {
            tracing::warn!("the running listen did not answer within 40 s");
            return Ok(Some(Outcome::Unknown));
        }
        Ok(Ok(0)) => {
            tracing::warn!("the running listen closed the socket before it answered");
            return Ok(Some(Outcome::Unknown));
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the running listen did not answer");
            return Ok(Some(Outcome::Unknown));
        }
    }
    let v: Value = serde_json::from_str(&line).context("the running listen answered nonsense")?;
    if let Some(error) = v["error"].as_str() {
        if v["unknown_cell"].as_bool() == Some(true) {
            return Ok(Some(Outcome::UnknownCell(to)));
        }
        return Ok(Some(Outcome::Failed(error.to_string())));
    }
    let status = match v["status"].as_str() {
        Some("delivered") => Status::Delivered,
        Some("queued") => Status::Queued,
        Some("unknown") => return Ok(Some(Outcome::Unknown)),
        Some("unsent") => {
            let why = v["code"].as_str().unwrap_or("not sent").to_string();
            return Ok(Some(Outcome::NotSent(why)));
        }
        Some("refused") => {
            let code = v["code"].as_str().unwrap_or("other").to_string();
            return Ok(Some(Outcome::Refused(code)));
        }
        _ => return Err(anyhow!("the running listen answered nonsense: {line}")),
    };
    let id = v["id"]
        .as_str()
        .and_then(parse_id)
        .ok_or_else(|| anyhow!("the running listen answered nonsense: {line}"))?;
    let devices = v["devices"].as_u64().unwrap_or(0) as usize;
    Ok(Some(Outcome::Sent(Sent {
        id,
        status,
        devices,
    })))
}
