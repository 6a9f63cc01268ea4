//! WebSocket around a link, for relays reached through networks that pass only web traffic
//! (HTTP proxies, middleboxes that expect an upgrade on port 80 or 443).
//!
//! Like TLS ([`crate::tls`]), WebSocket is an outer layer only: the link inside is unchanged
//! (Noise XX handshake, signed tokens, end to end between device and relay). A listener with
//! [`NodeConfig::websocket`](crate::node::NodeConfig) set tells each connection apart by its
//! first four bytes (after TLS when TLS is configured): `GET ` is an HTTP upgrade, anything
//! else the link's first frame, so one port serves both. A dialer asks for it with
//! [`Transport::WebSocket`](crate::node::Transport).
//!
//! ```text
//!  link bytes ──write──► WebSocketIo ──one binary message per write (≤ 256 KiB)──► tungstenite
//!  link bytes ◄──read─── WebSocketIo ◄──binary messages, in order, split across reads── tungstenite
//!                        (ping/pong: tungstenite; Close or end of stream: EOF; text: an error)
//! ```
//!
//! Message boundaries carry no meaning: the link finds its frames by their length prefixes,
//! so a frame may span messages and a message hold several frames. tungstenite buffers what it
//! writes, so the driver flushes whenever its backlog empties, as it does for TLS.

use std::fmt;
use std::io;
use std::net::Ipv6Addr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::http::uri::PathAndQuery;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::tls::ServerName;

/// Most bytes one write sends as one WebSocket message; a longer write is partial.
pub const MAX_WRITE_MESSAGE: usize = 256 * 1024;

/// Most bytes of one incoming WebSocket message (and of one frame of it). Our own messages
/// are at most [`MAX_WRITE_MESSAGE`]; this leaves room for a peer that sends each link frame
/// (at most [`MAX_FRAME`](cellmesh_core::wire::MAX_FRAME) plus its length prefix, about
/// 1 MiB) as one message, and no more: a peer cannot make us buffer beyond it.
pub const MAX_INCOMING_MESSAGE: usize = (1 << 20) + (64 << 10);

const _: () = assert!(
    MAX_INCOMING_MESSAGE >= cellmesh_core::wire::MAX_FRAME + cellmesh_core::wire::LEN_PREFIX
);

/// The WebSocket configuration of every link: incoming messages and frames bounded by
/// [`MAX_INCOMING_MESSAGE`], modest buffers (a relay holds many connections).
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(64 * 1024)
        .max_message_size(Some(MAX_INCOMING_MESSAGE))
        .max_frame_size(Some(MAX_INCOMING_MESSAGE))
}

/// A byte stream over a WebSocket: what the link driver reads and writes.
///
/// Each write becomes one binary message of at most [`MAX_WRITE_MESSAGE`] bytes; reads return
/// the bytes of binary messages in order, keeping the rest of a message for the next read.
/// tungstenite answers pings; a Close or the end of the stream reads as EOF; a text message
/// is an [`io::ErrorKind::InvalidData`] error, as is a message over the configured limit.
/// Writes are buffered by tungstenite until flushed (or its buffer fills); shutdown sends a
/// Close, then shuts the stream underneath.
pub struct WebSocketIo<S> {
    ws: WebSocketStream<S>,
    /// The rest of a binary message that a read had no room for.
    pending: Bytes,
    /// A Close or the end of the stream was read: every later read is EOF.
    eof: bool,
    /// Shutdown has sent (or failed to send) the Close; what remains is the inner shutdown.
    closed: bool,
}

impl<S> WebSocketIo<S> {
    /// Wraps a WebSocket whose handshake is done.
    pub fn new(ws: WebSocketStream<S>) -> Self {
        Self {
            ws,
            pending: Bytes::new(),
            eof: false,
            closed: false,
        }
    }
}

impl<S> fmt::Debug for WebSocketIo<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSocketIo")
            .field("pending", &self.pending.len())
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WebSocketIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                // An empty message is skipped: returning nothing would read as EOF.
                Some(Ok(Message::Binary(data))) => this.pending = data,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket message on a binary link",
                    )));
                }
                Some(Ok(Message::Close(_))) | None => this.eof = true,
                // Pings are answered by tungstenite on its next read or write.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WebSocketIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = self.get_mut();
        // Not ready while tungstenite holds a write the socket did not take: this flushes it,
        // so what it buffers stays near its write buffer size plus one message.
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(io_error)?;
        let n = buf.len().min(MAX_WRITE_MESSAGE);
        let message = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
        Pin::new(&mut this.ws)
            .start_send(message)
            .map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(io_error)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closed {
            // A failure here (the peer is gone) must not keep the stream below open.
            let sent = ready!(Pin::new(&mut this.ws).poll_close(cx));
            this.closed = true;
            if let Err(e) = sent {
                tracing::debug!(error = %e, "WebSocket close not sent");
            }
        }
        Pin::new(this.ws.get_mut()).poll_shutdown(cx)
    }
}

/// The target of a WebSocket upgrade request, checked once: the host (and port) its `Host`
/// header names and its path, as in `ws://HOST[:PORT]/PATH`. The scheme, `ws` or `wss`,
/// follows from whether TLS runs under it ([`Transport::WebSocket`](crate::node::Transport)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsRequest {
    /// `host`, `host:port`, `[v6]` or `[v6]:port`.
    authority: String,
    /// Starts with `/`; may hold a query.
    path: String,
}

/// A [`WsRequest`] could not be made.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum WsRequestError {
    /// Not a DNS name or an IP address.
    #[error("bad host {0:?}: not a DNS name or an IP address")]
    Host(String),
    /// Not an absolute HTTP path (`/`, `/relay`, `/relay?x=1`).
    #[error("bad path {0:?}: an HTTP path starting with `/`, without spaces or `#`")]
    Path(String),
}

impl WsRequest {
    /// A request for `path` at `host` (a DNS name or an IP address; IPv6 without brackets),
    /// naming `port` in its `Host` header when given (leave it out for the scheme's default,
    /// 80 or 443, as a browser does).
    pub fn new(host: &str, port: Option<u16>, path: &str) -> Result<Self, WsRequestError> {
        let bad_host = || WsRequestError::Host(host.to_string());
        let host_part = if let Ok(v6) = host.parse::<Ipv6Addr>() {
            format!("[{v6}]")
        } else if host.contains(':') || ServerName::try_from(host).is_err() {
            return Err(bad_host());
        } else {
            host.to_string()
        };
        let authority = match port {
            Some(port) => format!("{host_part}:{port}"),
            None => host_part,
        };
        let bad_path = || WsRequestError::Path(path.to_string());
        if !path.starts_with('/') || path.contains('#') || path.parse::<PathAndQuery>().is_err() {
            return Err(bad_path());
        }
        let request = Self {
            authority,
            path: path.to_string(),
        };
        // What the handshake will send must parse: checked here, so that it cannot fail there.
        request.url(true).parse::<Uri>().map_err(|_| bad_host())?;
        Ok(request)
    }

    /// The `Host` header: the host, with the port when one was given.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The path (and query) requested.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The URL tungstenite's client handshake is given: `wss://` when `tls`, else `ws://`.
    pub(crate) fn url(&self, tls: bool) -> String {
        let scheme = if tls { "wss" } else { "ws" };
        format!("{scheme}://{}{}", self.authority, self.path)
    }
}

/// Why a client's WebSocket handshake failed, in a sentence, and the HTTP status when the
/// server answered with one other than 101 (an upgrade refused).
pub(crate) fn describe_client_failure(e: &WsError) -> (Option<u16>, String) {
    match e {
        WsError::Http(response) => {
            let status = response.status();
            (
                Some(status.as_u16()),
                format!(
                    "upgrade refused with HTTP {} {}",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or("")
                )
                .trim_end()
                .to_string(),
            )
        }
        // A link listener without WebSocket closes on `GET ` (no link frame is that long).
        WsError::Protocol(ProtocolError::HandshakeIncomplete) => (None, HUNG_UP.to_string()),
        WsError::Io(e) if hung_up(e) => (None, HUNG_UP.to_string()),
        // It answered, but not with an upgrade.
        WsError::Protocol(_) | WsError::HttpFormat(_) => {
            (None, format!("the peer does not speak WebSocket: {e}"))
        }
        other => (None, format!("handshake failed: {other}")),
    }
}

const HUNG_UP: &str = "the peer does not speak WebSocket: it hung up on the upgrade request";

fn hung_up(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// What the first bytes of an inbound connection make it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Opening {
    /// An HTTP request: `GET `, the start of a WebSocket upgrade.
    WebSocket,
    /// Anything else: the link's first frame.
    Link,
}

/// Bytes needed to tell an HTTP upgrade from a link.
pub(crate) const OPENING_LEN: usize = 4;

// A link's first frame starts with its big-endian u32 length, at most MAX_FRAME (about 1 MiB):
// "GET " read as that length is about 1.2 GB, so no link ever starts with it.
const _: () = assert!(u32::from_be_bytes(*b"GET ") as usize > cellmesh_core::wire::MAX_FRAME);

/// Tells the connection apart from the first bytes it sent: `None` while they are a proper
/// prefix of `GET ` and more are needed. A connection that ended before four bytes is a link
/// (which then fails as a link does).
pub(crate) fn opening(first: &[u8]) -> Option<Opening> {
    if first.len() >= OPENING_LEN {
        return Some(if first.starts_with(b"GET ") {
            Opening::WebSocket
        } else {
            Opening::Link
        });
    }
    if b"GET ".starts_with(first) {
        None
    } else {
        Some(Opening::Link)
    }
}

/// A stream that replays `prefix` (bytes already read from `inner`) before reading on: what
/// the WebSocket handshake reads after the first bytes were looked at under TLS, which has no
/// peek.
pub(crate) struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub(crate) fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Any stream a WebSocket can run on (TCP, or TLS over TCP), boxed so that every WebSocket
/// link shares one instance of the handshakes and of the driver.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A boxed [`Io`].
pub(crate) type BoxedIo = Box<dyn Io>;

fn io_error(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        // The driver's word for a peer gone without saying so, as with TLS.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed the connection without a WebSocket Close",
        ),
        WsError::Capacity(e) => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("WebSocket message over the limit: {e}"),
        ),
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::NotConnected, "WebSocket closed")
        }
        other => io::Error::new(io::ErrorKind::InvalidData, format!("WebSocket: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// Our adapter as the server, and a raw tungstenite client as the peer.
    async fn pair() -> (WebSocketIo<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let ours = WebSocketStream::from_raw_socket(a, Role::Server, Some(config())).await;
        let peer = WebSocketStream::from_raw_socket(b, Role::Client, Some(config())).await;
        (WebSocketIo::new(ours), peer)
    }

    #[tokio::test]
    async fn writes_become_binary_messages_of_at_most_256_kib() {
        let (mut ours, mut peer) = pair().await;
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 253) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut sizes = Vec::new();
            let mut got = Vec::new();
            while got.len() < 600_000 {
                match peer.next().await.unwrap().unwrap() {
                    Message::Binary(b) => {
                        sizes.push(b.len());
                        got.extend_from_slice(&b);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            (sizes, got)
        });
        // One write takes one message's worth; write_all loops.
        assert_eq!(ours.write(&data).await.unwrap(), MAX_WRITE_MESSAGE);
        ours.write_all(&data[MAX_WRITE_MESSAGE..]).await.unwrap();
        ours.flush().await.unwrap();
        let (sizes, got) = reader.await.unwrap();
        assert_eq!(
            sizes,
            [
                MAX_WRITE_MESSAGE,
                MAX_WRITE_MESSAGE,
                600_000 - 2 * MAX_WRITE_MESSAGE
            ]
        );
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn reads_return_messages_in_order_across_small_buffers_and_skip_pings() {
        let (mut ours, mut peer) = pair().await;
        peer.send(Message::binary(b"hello ".to_vec()))
            .await
            .unwrap();
        peer.send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .unwrap();
        peer.send(Message::binary(Vec::new())).await.unwrap();
        peer.send(Message::binary(b"world".to_vec())).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4];
        while got.len() < 11 {
            let n = ours.read(&mut buf).await.unwrap();
            assert!(n > 0, "no EOF before the end");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"hello world");
        // The ping was answered (tungstenite sends the pong on our next read or write).
        ours.write_all(b"x").await.unwrap();
        ours.flush().await.unwrap();
        assert_eq!(
            peer.next().await.unwrap().unwrap(),
            Message::Pong(Bytes::from_static(b"p"))
        );
        assert_eq!(
            peer.next().await.unwrap().unwrap(),
            Message::binary(b"x".to_vec())
        );
    }

    #[tokio::test]
    async fn a_close_is_eof_and_shutdown_sends_one() {
        let (mut ours, mut peer) = pair().await;
        peer.send(Message::binary(b"last".to_vec())).await.unwrap();
        peer.close(None).await.unwrap();
        let mut all = Vec::new();
        ours.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"last");
        assert_eq!(ours.read(&mut [0u8; 8]).await.unwrap(), 0, "EOF stays EOF");

        let (mut ours, mut peer) = pair().await;
        ours.shutdown().await.unwrap();
        assert!(matches!(
            peer.next().await.unwrap().unwrap(),
            Message::Close(_)
        ));
    }

    #[tokio::test]
    async fn text_messages_and_oversized_messages_are_errors() {
        let (mut ours, mut peer) = pair().await;
        peer.send(Message::text("hi")).await.unwrap();
        let err = ours.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("text"), "{err}");

        // The peer's own limit would refuse to send it: give it a larger one.
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut ours = WebSocketIo::new(
            WebSocketStream::from_raw_socket(a, Role::Server, Some(config())).await,
        );
        let big = WebSocketConfig::default();
        let mut peer = WebSocketStream::from_raw_socket(b, Role::Client, Some(big)).await;
        let sender = tokio::spawn(async move {
            let _ = peer
                .send(Message::binary(vec![7u8; MAX_INCOMING_MESSAGE + 1]))
                .await;
            peer
        });
        let err = ours.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("over the limit"), "{err}");
        drop(ours);
        drop(sender.await.unwrap());
    }

    #[tokio::test]
    async fn a_peer_gone_without_a_close_reads_as_unexpected_eof() {
        let (mut ours, peer) = pair().await;
        drop(peer);
        match ours.read(&mut [0u8; 8]).await {
            Ok(0) => {}
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}"),
            Ok(n) => panic!("read {n} bytes from nothing"),
        }
    }

    #[tokio::test]
    async fn rewind_replays_its_prefix_then_reads_on() {
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(b" rest").await.unwrap();
        drop(a);
        let mut r = Rewind::new(Bytes::from_static(b"GET"), b);
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET rest");
    }

    #[test]
    fn openings_are_told_apart_by_four_bytes() {
        assert_eq!(opening(b"GET / HTTP/1.1"), Some(Opening::WebSocket));
        assert_eq!(opening(b"GET "), Some(Opening::WebSocket));
        for partial in [&b""[..], b"G", b"GE", b"GET"] {
            assert_eq!(opening(partial), None, "{partial:?}");
        }
        assert_eq!(opening(b"GETX"), Some(Opening::Link));
        assert_eq!(opening(b"POST"), Some(Opening::Link));
        assert_eq!(opening(b"\0"), Some(Opening::Link));
        // A real link opening: the Noise hello frame.
        let mut hello = Vec::new();
        cellmesh_core::wire::put_frame_header(
            &mut hello,
            cellmesh_core::wire::FrameType::Hello,
            32,
        );
        assert_eq!(opening(&hello), Some(Opening::Link));
        assert_eq!(opening(&hello[..1]), Some(Opening::Link));
    }

    #[test]
    fn requests_are_checked_once() {
        let r = WsRequest::new("relay.example.org", None, "/").unwrap();
        assert_eq!(r.authority(), "relay.example.org");
        assert_eq!(r.url(true), "wss://relay.example.org/");
        let r = WsRequest::new("::1", Some(8080), "/cellmesh?v=1").unwrap();
        assert_eq!(r.authority(), "[::1]:8080");
        assert_eq!(r.url(false), "ws://[::1]:8080/cellmesh?v=1");
        let r = WsRequest::new("127.0.0.1", Some(80), "/a/b").unwrap();
        assert_eq!((r.authority(), r.path()), ("127.0.0.1:80", "/a/b"));
        for host in ["", "bad host", "a:b", "[::1]", "relay.example.org/x"] {
            assert_eq!(
                WsRequest::new(host, None, "/"),
                Err(WsRequestError::Host(host.to_string())),
                "{host}"
            );
        }
        for path in ["", "relay", "/a b", "/a#frag", "/\n"] {
            assert_eq!(
                WsRequest::new("localhost", None, path),
                Err(WsRequestError::Path(path.to_string())),
                "{path:?}"
            );
        }
    }
}
