//! Helpers shared by the runtime's integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cellmesh::core::e2e::Message;
use cellmesh::core::id::CellId;
use cellmesh::core::id::NodeId;
use cellmesh::core::keystore::{KdfParams, Passphrase};
use cellmesh::core::mnemonic::Mnemonic;
use cellmesh::core::relay::{Record, put_record, records};
use cellmesh::home::{Home, Unlocked};
use cellmesh::mailbox::{Mailbox, MailboxError, MailboxSender, Sent, Ticket};
use cellmesh::node::{Node, NodeEvent};
use cellmesh::relay::RelayEvent;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, oneshot};

/// Throwaway keystores need no real stretching.
pub const FAST: KdfParams = KdfParams {
    memory_kib: 64,
    iterations: 1,
    lanes: 1,
};

/// A device of the cell of `words`, in its own home below `dir`.
pub fn device_of(dir: &Path, name: &str, words: &Mnemonic) -> Unlocked {
    let home = Home::new(dir.join(name));
    let pass = Passphrase::new("pw".into());
    home.create(words, "", &pass, FAST, false).unwrap();
    home.unlock(&pass).unwrap()
}

/// A device of a new cell.
pub fn device(dir: &Path, name: &str) -> Unlocked {
    device_of(dir, name, &cellmesh::new_mnemonic())
}

/// The next message, within 10 s.
pub async fn recv(m: &mut Mailbox) -> cellmesh::core::e2e::Message {
    tokio::time::timeout(Duration::from_secs(10), m.recv())
        .await
        .expect("a message within 10 s")
        .expect("mailbox open")
}

/// The reason of the next `Failed` event.
pub async fn failure(events: &mut broadcast::Receiver<NodeEvent>) -> String {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let NodeEvent::Failed { reason, .. } = events.recv().await.unwrap() {
                return reason;
            }
        }
    })
    .await
    .expect("a Failed event within 5 s")
}

/// The first relay event `want` picks something out of, within 10 s.
pub async fn relay_event<T>(
    events: &mut broadcast::Receiver<RelayEvent>,
    what: &str,
    mut want: impl FnMut(&RelayEvent) -> Option<T>,
) -> T {
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await {
                Ok(e) => {
                    if let Some(t) = want(&e) {
                        return t;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("the relay stopped"),
            }
        }
    });
    found
        .await
        .unwrap_or_else(|_| panic!("no {what} event within 10 s"))
}

/// Waits until the relay has taken `node`'s join (a device's own join returns a moment
/// before): from then on it is online there, and its leaving is an `Offline` event.
pub async fn registered(events: &mut broadcast::Receiver<RelayEvent>, node: NodeId) {
    relay_event(events, "Registered", |e| {
        matches!(e, RelayEvent::Registered { node: n, .. } if *n == node).then_some(())
    })
    .await
}

/// Waits until the relay has handled `node`'s departure (what it sent before leaving, its
/// last DELIVERED above all, was handled first): what is sent to it now is queued.
pub async fn offline(events: &mut broadcast::Receiver<RelayEvent>, node: NodeId) {
    relay_event(events, "Offline", |e| {
        matches!(e, RelayEvent::Offline { node: n } if *n == node).then_some(())
    })
    .await
}

/// `client`, joined to `hub` (node `hub_node`), and `hub` each send the other `n` messages of
/// 1 to `max_len` bytes, all at once; then each reads what it was sent, which must arrive
/// intact and in order, within 10 s a message, and the senders must finish.
pub async fn flood_both_ways(
    hub: &mut Node,
    client: &mut Node,
    hub_node: NodeId,
    n: usize,
    max_len: usize,
) {
    let body = move |i: usize| Bytes::from(vec![(i % 251) as u8; 1 + (i * 7919) % max_len]);
    let to_hub = client.sender(hub_node).unwrap();
    let to_client = hub.sender(client.node_id()).unwrap();
    let senders = [
        tokio::spawn(async move {
            for i in 0..n {
                to_hub.send(body(i)).await.unwrap();
            }
        }),
        tokio::spawn(async move {
            for i in 0..n {
                to_client.send(body(i)).await.unwrap();
            }
        }),
    ];
    for node in [hub, client] {
        for i in 0..n {
            let got = tokio::time::timeout(Duration::from_secs(10), node.recv())
                .await
                .expect("no stall")
                .unwrap();
            assert_eq!(got.data, body(i), "message {i} intact and in order");
        }
    }
    for s in senders {
        s.await.unwrap();
    }
}

/// A TCP proxy to `upstream` that records what it carries: client to server in `up`, server
/// to client in `down` (pass the same buffer twice for both in one).
pub async fn tap(
    upstream: SocketAddr,
    up: Arc<Mutex<Vec<u8>>>,
    down: Arc<Mutex<Vec<u8>>>,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let server = TcpStream::connect(upstream).await.unwrap();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(copy(cr, sw, Arc::clone(&up)));
            tokio::spawn(copy(sr, cw, Arc::clone(&down)));
        }
    });
    addr
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    seen: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0; 65536];
    while let Ok(n) = from.read(&mut buf).await {
        // Recorded before it is passed on, so that nothing is missing once the peer has it.
        seen.lock().unwrap().extend_from_slice(&buf[..n]);
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            let _ = to.shutdown().await;
            return;
        }
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1, and its key, as PEM files in `dir`.
pub fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let ck = rcgen::generate_simple_self_signed(names).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// A mailbox at the relay at `relay`, reached over `transport`.
pub async fn connect(
    unlocked: &Unlocked,
    relay: SocketAddr,
    transport: cellmesh::node::Transport,
) -> Result<Mailbox, cellmesh::mailbox::MailboxError> {
    let mut config = cellmesh::mailbox::MailboxConfig::new(relay);
    config.transport = transport;
    config.ack_timeout = Duration::from_secs(5);
    Mailbox::connect(unlocked, config).await
}

/// A mailbox whose application takes each message as it comes, on a task of its own (as an
/// application's receive loop does): what it is sent is acknowledged as it arrives.
pub struct Reader {
    cell: CellId,
    node: NodeId,
    sender: MailboxSender,
    rx: mpsc::UnboundedReceiver<Message>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// `mailbox`, read by a task of its own.
pub fn reader(mut mailbox: Mailbox) -> Reader {
    let (tx, rx) = mpsc::unbounded_channel();
    let (stop, mut stopped) = oneshot::channel();
    let (cell, node, sender) = (mailbox.cell(), mailbox.node(), mailbox.sender());
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                _ = &mut stopped => break,
                m = mailbox.recv() => match m {
                    Some(m) => {
                        if tx.send(m).is_err() {
                            break;
                        }
                    }
                    None => break,
                },
            }
        }
        mailbox.close().await;
    });
    Reader {
        cell,
        node,
        sender,
        rx,
        stop: Some(stop),
        task,
    }
}

impl Reader {
    /// The device's cell.
    pub fn cell(&self) -> CellId {
        self.cell
    }

    /// The device.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Sends through the mailbox and waits for the outcome.
    /// Sends these records, batched into payloads of about 60 KB.
    pub async fn send(&self, to: CellId, body: Bytes) -> Result<Sent, MailboxError> {
        self.sender.send(to, body).await
    }

    /// Starts a send.
    pub async fn submit(&self, to: CellId, body: Bytes) -> Result<Ticket, MailboxError> {
        self.sender.submit(to, body).await
    }

    /// The mailbox's sender.
    pub fn sender(&self) -> MailboxSender {
        self.sender.clone()
    }

    /// The next message, within 10 s.
    pub async fn next(&mut self) -> Message {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("a message within 10 s")
            .expect("mailbox open")
    }

    /// Closes the mailbox (what was taken is acknowledged).
    pub async fn close(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// A device speaking the relay protocol itself, through a node joined to the relay.
pub struct RawDevice {
    /// Its node.
    pub node: Node,
    /// The relay it joined.
    pub relay: NodeId,
    pending: std::collections::VecDeque<Record>,
}

impl RawDevice {
    /// Joins the relay at `relay` as the device of `keys`.
    pub async fn join(keys: &Unlocked, relay: SocketAddr) -> Self {
        let node = Node::start(keys, cellmesh::node::NodeConfig::default())
            .await
            .unwrap();
        let peer = node.join(relay).await.unwrap();
        Self {
            node,
            relay: peer.node,
            pending: std::collections::VecDeque::new(),
        }
    }

    /// Sends these records, batched into payloads of about 60 KB.
    pub async fn send(&self, records: &[Record]) {
        let mut buf = Vec::new();
        for r in records {
            if buf.len() + r.encoded_len() + 4 > 60_000 {
                self.node
                    .send(self.relay, Bytes::from(std::mem::take(&mut buf)))
                    .await
                    .unwrap();
            }
            put_record(&mut buf, r);
        }
        if !buf.is_empty() {
            self.node.send(self.relay, Bytes::from(buf)).await.unwrap();
        }
    }

    /// The next record from the relay, within 10 s.
    pub async fn next(&mut self) -> Record {
        while self.pending.is_empty() {
            let m = tokio::time::timeout(Duration::from_secs(10), self.node.recv())
                .await
                .expect("a record within 10 s")
                .expect("node running");
            self.pending.extend(records(m.data).map(Result::unwrap));
        }
        self.pending.pop_front().unwrap()
    }
}
