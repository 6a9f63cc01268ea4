//! Helpers shared by the runtime's integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellmesh::core::keystore::{KdfParams, Passphrase};
use cellmesh::core::mnemonic::Mnemonic;
use cellmesh::home::{Home, Unlocked};
use cellmesh::mailbox::Mailbox;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

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
