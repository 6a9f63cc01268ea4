//! A running `cellmesh listen` lends its connection to `cellmesh send` from the same home.
//!
//! A device is one node key, and a relay keeps one connection per device: a `send` that
//! opened a second connection for the device would replace the one `listen` holds (and be
//! replaced back), and the answers to each would reach the other. So `listen` serves a Unix
//! socket in the home directory (mode 0600, like ssh-agent's), and `send`, once it has
//! unlocked the keystore itself, hands its message to that socket when one answers. One
//! request per connection, one JSON line each way:
//!
//! ```text
//! send   → listen   {"to": CELL_ID, "body": BASE64, "relay": RELAY}
//! listen → send     {"status": "delivered"|"queued", "id": HEX, "devices": N}
//!                 | {"error": TEXT, "unknown_cell": bool}
//! ```
//!
//! A request for another relay than the one `listen` uses is refused (`send` then connects
//! itself). Other processes of the same user can send through the socket while `listen`
//! runs, as they can use an ssh-agent: the home directory is private to the user.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use cellmesh::core::id::CellId;
use cellmesh::mailbox::{MailboxError, MailboxSender, Sent, Status};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// The socket's name in the home directory.
const SOCKET: &str = "mailbox.sock";
/// Longest request line: a body of the largest size in base64, and the rest.
const MAX_REQUEST: u64 = (cellmesh::core::e2e::MAX_BODY as u64).div_ceil(3) * 4 + 1024;

/// What `send` gets back from a `listen` that took its message.
pub enum Outcome {
    Sent(Sent),
    UnknownCell(CellId),
    Failed(String),
}

fn socket_path(home: &Path) -> PathBuf {
    home.join(SOCKET)
}

/// Serves `home`'s socket until the returned guard is dropped (which removes the socket).
/// `None` if another `listen` of this home already serves it, or it cannot be made.
pub async fn serve(home: &Path, relay: String, sender: MailboxSender) -> Option<Served> {
    let path = socket_path(home);
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
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream, relay.clone(), sender.clone()));
        }
    });
    Some(Served { path, task })
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
/// `relay`; `None` means `send` should connect itself.
pub async fn send(home: &Path, relay: &str, to: CellId, body: &[u8]) -> Result<Option<Outcome>> {
    let Ok(mut stream) = UnixStream::connect(socket_path(home)).await else {
        return Ok(None);
    };
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
