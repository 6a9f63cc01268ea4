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
//! send   → listen   {"to": CELL_ID, "body": BASE64, "relay": RELAY}
//! listen → send     {"status": "delivered"|"queued", "id": HEX, "devices": N}
//!                 | {"error": TEXT, "unknown_cell": bool}
//! ```
//!
//! A request for another relay than the one `listen` uses is refused (`send` then connects
//! itself). Other processes of the same user can send through the socket while `listen`
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
use cellmesh::mailbox::{MailboxError, MailboxSender, Sent, Status};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// The socket's directory in the home directory (mode 0700), and its name in it.
const DIR: &str = "agent";
const SOCKET: &str = "mailbox.sock";
/// Longest request line: a body of the largest size in base64, and the rest.
const MAX_REQUEST: u64 = (cellmesh::core::e2e::MAX_BODY as u64).div_ceil(3) * 4 + 1024;

/// What `send` gets back from a `listen` that took its message.
pub enum Outcome {
    Sent(Sent),
    UnknownCell(CellId),
    Failed(String),
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
        Some((to, body, v["relay"].as_str()? == relay))
    })();
    let Some((to, body, same_relay)) = parsed else {
        return json!({"error": "bad request"});
    };
    if !same_relay {
        return json!({"error": format!("this listen uses relay {relay}")});
    }
    match sender.send(to, cellmesh::Bytes::from(body)).await {
        Ok(sent) => json!({
            "status": sent.status.name(),
            "id": sent.id.to_hex(),
            "devices": sent.devices,
        }),
        Err(MailboxError::Send(cellmesh::mailbox::SendError::UnknownCell(c))) => {
            json!({"error": format!("unknown cell {c}"), "unknown_cell": true})
        }
        Err(e) => json!({"error": e.to_string()}),
    }
}

/// Hands the message to a `listen` of this home, if one answers on its socket and uses
/// `relay`; `None` means `send` should connect itself. A socket that is not the user's own,
/// or that another user serves, is an error: nothing is written to it.
pub async fn send(home: &Path, relay: &str, to: CellId, body: &[u8]) -> Result<Option<Outcome>> {
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
        "relay": relay,
    });
    stream
        .write_all(format!("{request}\n").as_bytes())
        .await
        .context("cannot hand the message to the running listen")?;
    let mut line = String::new();
    // The listen's own send waits up to its acknowledgement timeout; this waits a bit more.
    tokio::time::timeout(
        Duration::from_secs(40),
        BufReader::new(stream).read_line(&mut line),
    )
    .await
    .map_err(|_| anyhow!("the running listen did not answer within 40 s"))?
    .context("the running listen did not answer")?;
    let v: Value = serde_json::from_str(&line).context("the running listen answered nonsense")?;
    if let Some(error) = v["error"].as_str() {
        if error.starts_with("this listen uses relay") {
            return Ok(None);
        }
        if v["unknown_cell"].as_bool() == Some(true) {
            return Ok(Some(Outcome::UnknownCell(to)));
        }
        return Ok(Some(Outcome::Failed(error.to_string())));
    }
    let status = match v["status"].as_str() {
        Some("delivered") => Status::Delivered,
        Some("queued") => Status::Queued,
        _ => return Err(anyhow!("the running listen answered nonsense: {line}")),
    };
    let id = v["id"]
        .as_str()
        .and_then(|h| data_encoding::HEXLOWER.decode(h.as_bytes()).ok())
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .ok_or_else(|| anyhow!("the running listen answered nonsense: {line}"))?;
    let devices = v["devices"].as_u64().unwrap_or(0) as usize;
    Ok(Some(Outcome::Sent(Sent {
        id: cellmesh::core::relay::MsgId(id),
        status,
        devices,
    })))
}
