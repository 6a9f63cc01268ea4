//! A TCP proxy between the devices and the relay that can cut every connection through it,
//! in the middle of a frame.
//!
//! ```text
//!  device ──► accept ──► pump (device→relay) ──► relay
//!  device ◄── pump (relay→device) ◄─────────────  relay
//!                 └─ budget: after N more bytes (any connection, any direction), the
//!                    chunk in hand is cut short and every connection is shut down
//! ```
//!
//! One accepting thread, two pumping threads per connection. The proxy keeps the devices'
//! address fixed while the relay behind it restarts; a connection that arrives while the
//! relay is down is closed at once, as a refused connection would be.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// The proxy; dropping it stops accepting and cuts what is open.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    upstream: SocketAddr,
    stop: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Both ends of every open connection, by connection number.
    open: Vec<(u64, TcpStream)>,
    next: u64,
    /// Bytes still to pass before the cut, if one is armed.
    budget: Option<usize>,
    /// Cuts made since the proxy started.
    cuts: u32,
}

impl Proxy {
    /// A proxy on a free loopback port, to `upstream`.
    pub fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("the proxy binds");
        let addr = listener
            .local_addr()
            .expect("a bound socket has an address");
        let shared = Arc::new(Shared {
            upstream,
            stop: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        });
        let accepting = Arc::clone(&shared);
        thread::spawn(move || accept(listener, accepting));
        Self { addr, shared }
    }

    /// Where the devices connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts every connection after `bytes` more bytes have passed (0: at the next chunk,
    /// before any of it). Replaces a cut that is armed already.
    pub fn arm(&self, bytes: usize) {
        self.shared.lock().budget = Some(bytes);
    }

    /// Disarms a cut that did not happen; true if it had fired (or none was armed).
    pub fn disarm(&self) -> bool {
        self.shared.lock().budget.take().is_none()
    }

    /// Cuts every connection now.
    pub fn cut(&self) {
        self.shared.lock().cut();
    }

    /// Cuts made so far.
    pub fn cuts(&self) -> u32 {
        self.shared.lock().cuts
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.lock().cut();
        // Wakes the accepting thread so that it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn cut(&mut self) {
        for (_, s) in self.open.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.budget = None;
        self.cuts += 1;
    }
}

fn accept(listener: TcpListener, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect(shared.upstream) else {
            // The relay is down: the device sees its connection closed and tries again.
            drop(client);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        ) else {
            continue;
        };
        let conn = {
            let mut state = shared.lock();
            state.next += 1;
            let conn = state.next;
            state.open.extend([(conn, c3), (conn, s3)]);
            conn
        };
        let (a, b) = (Arc::clone(&shared), Arc::clone(&shared));
        thread::spawn(move || pump(conn, client, server, a));
        thread::spawn(move || pump(conn, s2, c2, b));
    }
}

/// Copies `from` to `to` until either ends, or a cut.
fn pump(conn: u64, mut from: TcpStream, mut to: TcpStream, shared: Arc<Shared>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let pass = {
            let mut state = shared.lock();
            match state.budget {
                Some(left) if left < n => {
                    // Part of the chunk, then nothing more on any connection: the frame in
                    // hand is cut short. The part is written under the lock, so that no
                    // other pump writes past the cut.
                    let _ = to.write_all(&buf[..left]);
                    state.cut();
                    None
                }
                Some(left) => {
                    state.budget = Some(left - n);
                    Some(n)
                }
                None => Some(n),
            }
        };
        let Some(n) = pass else { break };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    shared.lock().open.retain(|(c, _)| *c != conn);
}
