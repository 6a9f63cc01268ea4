//! The handshake: Noise XX with node tokens as payloads, as typed states.
//!
//! ```text
//! initiator                                         responder
//! Initiator::start ── hello:    → e ──────────────► Responder::read_hello
//!                  ◄─ response: ← e, ee, s, es ──── (payload: responder's node token)
//! read_response    ── finish:   → s, se ──────────► ResponderSent::read_finish
//!   (payload: initiator's node token)
//! Established                                       Established
//! ```
//!
//! Protocol name `Noise_XX_25519_AESGCM_SHA256`, prologue `"cellmesh handshake v1"`. Each
//! side verifies the other's node token ([`authenticate_peer`]): signature and validity period,
//! that it is a self-issued node token naming a cell, that the X25519 key it names is exactly
//! the static key the peer proved it holds in the Noise exchange, and that neither the device
//! nor (for a realm) the cell has been revoked. Only then does an [`Established`] exist, so a
//! session cannot be built without those checks.
//!
//! What this adds to the seed's handshake: ephemeral keys on both sides (forward secrecy), the
//! whole transcript hashed into the keys, mutual authentication, and no replay: a replayed
//! hello only makes the responder answer with fresh ephemeral keys that the replayer cannot use,
//! and a replayed or reordered response or finish fails authentication.

use rand_core::{CryptoRngCore, SeedableRng as _};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::Timestamp;
use crate::device::Revocations;
use crate::id::{CellId, NodeId};
use crate::keys::{AgreementSecret, KEY_LEN, PublicKey};
use crate::token::{Token, TokenKind, VerifiedToken, VerifyError, attr};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_AESGCM_SHA256";
const PROLOGUE: &[u8] = b"cellmesh handshake v1";
/// Largest Noise message.
const NOISE_MAX: usize = 65535;

/// Why a handshake failed. Every failure ends the handshake; none tells the peer more than
/// that it failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// A handshake message is malformed, or failed authentication (tampered, replayed,
    /// reordered, or from another handshake).
    #[error("handshake message malformed or failed authentication")]
    BadMessage,
    /// The peer's token is not a decodable node token.
    #[error("peer token malformed: {0}")]
    MalformedToken(String),
    /// The peer's token was refused (signature, expiry, not_before).
    #[error("peer token refused: {0}")]
    Token(#[from] VerifyError),
    /// The token is not a self-issued node token naming a cell.
    #[error("peer token is not a node token")]
    NotANodeToken,
    /// The token names another key than the one the peer used in the key exchange.
    #[error("peer token names another key than the one used in the key exchange")]
    KeyMismatch,
    /// The peer's device or cell has been revoked.
    #[error("peer {0} has been revoked")]
    Revoked(NodeId),
    /// The responder is not the node the initiator meant to reach. The initiator stops
    /// before its finish, so that node never learns who was dialing.
    #[error("expected node {expected}, but {found} answered")]
    UnexpectedPeer {
        /// The node the initiator dialed for.
        expected: NodeId,
        /// The node that answered.
        found: NodeId,
    },
    /// Our own configuration is unusable (local misuse).
    #[error("local handshake setup failed: {0}")]
    Local(&'static str),
}

/// What this node presents: its signed node token and the X25519 secret the token names.
pub struct LocalNode {
    token: Token,
    static_secret: Zeroizing<[u8; KEY_LEN]>,
}

impl LocalNode {
    /// Pairs a node token with its agreement secret; refuses a token that names another key.
    pub fn new(token: Token, agreement: &AgreementSecret) -> Result<Self, HandshakeError> {
        if token.claims().agreement_key != Some(agreement.public()) {
            return Err(HandshakeError::Local(
                "node token does not name this agreement key",
            ));
        }
        Ok(Self {
            token,
            static_secret: agreement.dangerous_bytes(),
        })
    }

    /// The node token.
    pub fn token(&self) -> &Token {
        &self.token
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        NodeId::from_key(self.token.claims().key)
    }
}

impl std::fmt::Debug for LocalNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalNode")
            .field("node", &self.node_id())
            .finish_non_exhaustive()
    }
}

/// What a verifier checks a peer's node token against.
#[derive(Clone, Copy, Debug)]
pub struct PeerChecks<'a> {
    /// The verifier's wall-clock time.
    pub now: Timestamp,
    /// Allowed clock skew in seconds (capped by the token module).
    pub skew: u64,
    /// Revocations to honour.
    pub revocations: &'a Revocations,
    /// The issuer of the realm this node belongs to, whose revocations of cells also count.
    pub realm_issuer: Option<PublicKey>,
}

/// Proof that the peer holds the static key its verified node token names. Only
/// [`authenticate_peer`] makes one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthenticatedPeer {
    token: VerifiedToken,
    node: NodeId,
    cell: CellId,
}

impl AuthenticatedPeer {
    /// The peer's node.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The cell its node token names (not yet proven: JOIN proves it).
    pub fn claimed_cell(&self) -> CellId {
        self.cell
    }

    /// Its verified node token.
    pub fn token(&self) -> &VerifiedToken {
        &self.token
    }
}

/// Per-direction session keys from the handshake. Zeroized on drop; the bytes are reachable
/// only through `dangerous_*` methods.
pub struct SessionKeys {
    send: Zeroizing<[u8; KEY_LEN]>,
    recv: Zeroizing<[u8; KEY_LEN]>,
}

impl SessionKeys {
    /// Keys from raw bytes: for tests, benchmarks and known-answer vectors only. Real keys
    /// come out of a handshake.
    pub fn dangerous_from_bytes(send: [u8; KEY_LEN], recv: [u8; KEY_LEN]) -> Self {
        Self {
            send: Zeroizing::new(send),
            recv: Zeroizing::new(recv),
        }
    }

    /// Splits into (send, recv) key bytes, for the session layer.
    pub(crate) fn into_parts(self) -> (Zeroizing<[u8; KEY_LEN]>, Zeroizing<[u8; KEY_LEN]>) {
        (self.send, self.recv)
    }
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

/// A completed handshake: the authenticated peer, the session keys and the transcript hash.
#[derive(Debug)]
pub struct Established {
    /// Who is on the other end.
    pub peer: AuthenticatedPeer,
    /// The session keys.
    pub keys: SessionKeys,
    /// Hash of the whole handshake transcript (a channel binding).
    pub handshake_hash: [u8; 32],
}

/// The initiator after sending hello, waiting for the response.
pub struct Initiator {
    noise: snow::HandshakeState,
    expected: Option<NodeId>,
}

impl Initiator {
    /// Starts a handshake with whoever answers; returns the state and the hello to send.
    pub fn start(
        local: &LocalNode,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(Self, Vec<u8>), HandshakeError> {
        Self::start_expecting(local, None, rng)
    }

    /// Starts a handshake that only completes with node `expected` (when given): any other
    /// responder, however valid its token, is refused before this node's token is sent, so
    /// the initiator's identity stays hidden from active attackers too.
    pub fn start_expecting(
        local: &LocalNode,
        expected: Option<NodeId>,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(Self, Vec<u8>), HandshakeError> {
        let mut noise = builder(local, rng)?
            .build_initiator()
            .map_err(|_| HandshakeError::Local("noise initiator"))?;
        let hello = write(&mut noise, &[])?;
        Ok((Self { noise, expected }, hello))
    }

    /// Reads the response, authenticates the responder, and returns the established
    /// handshake and the finish message to send.
    pub fn read_response(
        mut self,
        response: &[u8],
        local: &LocalNode,
        checks: &PeerChecks<'_>,
    ) -> Result<(Established, Vec<u8>), HandshakeError> {
        let payload = read(&mut self.noise, response)?;
        let peer = authenticate_peer(&payload, remote_static(&self.noise)?, checks)?;
        if let Some(expected) = self.expected
            && expected != peer.node()
        {
            return Err(HandshakeError::UnexpectedPeer {
                expected,
                found: peer.node(),
            });
        }
        let finish = write(&mut self.noise, &local.token.to_bytes())?;
        Ok((established(self.noise, peer, true)?, finish))
    }
}

/// The responder before the hello.
pub struct Responder;

impl Responder {
    /// Reads a hello and returns the state and the response message to send.
    pub fn read_hello(
        hello: &[u8],
        local: &LocalNode,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(ResponderSent, Vec<u8>), HandshakeError> {
        let mut noise = builder(local, rng)?
            .build_responder()
            .map_err(|_| HandshakeError::Local("noise responder"))?;
        let payload = read(&mut noise, hello)?;
        if !payload.is_empty() {
            return Err(HandshakeError::BadMessage);
        }
        let response = write(&mut noise, &local.token.to_bytes())?;
        Ok((ResponderSent { noise }, response))
    }
}

/// The responder after sending its response, waiting for finish.
pub struct ResponderSent {
    noise: snow::HandshakeState,
}

impl ResponderSent {
    /// Reads finish and authenticates the initiator.
    pub fn read_finish(
        mut self,
        finish: &[u8],
        checks: &PeerChecks<'_>,
    ) -> Result<Established, HandshakeError> {
        let payload = read(&mut self.noise, finish)?;
        let peer = authenticate_peer(&payload, remote_static(&self.noise)?, checks)?;
        established(self.noise, peer, false)
    }
}

/// Checks a peer's node token against the static key it proved it holds.
pub fn authenticate_peer(
    token_bytes: &[u8],
    remote_static: [u8; KEY_LEN],
    checks: &PeerChecks<'_>,
) -> Result<AuthenticatedPeer, HandshakeError> {
    let token =
        Token::decode(token_bytes).map_err(|e| HandshakeError::MalformedToken(e.to_string()))?;
    let verified = token.verify(checks.now, checks.skew)?;
    let claims = verified.claims();
    if claims.kind != TokenKind::Node || claims.issuer != claims.key {
        return Err(HandshakeError::NotANodeToken);
    }
    let cell = claims
        .key_attribute(attr::CELL)
        .ok_or(HandshakeError::NotANodeToken)?;
    if claims.agreement_key.map(|k| *k.as_bytes()) != Some(remote_static) {
        return Err(HandshakeError::KeyMismatch);
    }
    let node = NodeId::from_key(claims.key);
    let revoked = checks.revocations.is_revoked_by(cell, claims.key)
        || checks.realm_issuer.is_some_and(|realm| {
            checks.revocations.is_revoked_by(realm, cell)
                || checks.revocations.is_revoked_by(realm, claims.key)
        });
    if revoked {
        return Err(HandshakeError::Revoked(node));
    }
    Ok(AuthenticatedPeer {
        token: verified,
        node,
        cell: CellId::from_key(cell),
    })
}

fn builder<'a>(
    local: &'a LocalNode,
    rng: &mut impl CryptoRngCore,
) -> Result<snow::Builder<'a>, HandshakeError> {
    let params = NOISE_PARAMS
        .parse()
        .map_err(|_| HandshakeError::Local("noise parameters"))?;
    let mut seed = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(seed.as_mut());
    snow::Builder::with_resolver(params, Box::new(Resolver { seed }))
        .prologue(PROLOGUE)
        .and_then(|b| b.local_private_key(local.static_secret.as_ref()))
        .map_err(|_| HandshakeError::Local("noise builder"))
}

fn write(noise: &mut snow::HandshakeState, payload: &[u8]) -> Result<Vec<u8>, HandshakeError> {
    let mut out = vec![0u8; NOISE_MAX];
    let n = noise
        .write_message(payload, &mut out)
        .map_err(|_| HandshakeError::Local("noise write"))?;
    out.truncate(n);
    Ok(out)
}

fn read(noise: &mut snow::HandshakeState, message: &[u8]) -> Result<Vec<u8>, HandshakeError> {
    if message.len() > NOISE_MAX {
        return Err(HandshakeError::BadMessage);
    }
    let mut payload = vec![0u8; message.len()];
    let n = noise
        .read_message(message, &mut payload)
        .map_err(|_| HandshakeError::BadMessage)?;
    payload.truncate(n);
    Ok(payload)
}

fn remote_static(noise: &snow::HandshakeState) -> Result<[u8; KEY_LEN], HandshakeError> {
    noise
        .get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or(HandshakeError::BadMessage)
}

fn established(
    mut noise: snow::HandshakeState,
    peer: AuthenticatedPeer,
    initiator: bool,
) -> Result<Established, HandshakeError> {
    if !noise.is_handshake_finished() {
        return Err(HandshakeError::Local("handshake not finished"));
    }
    let mut handshake_hash = [0u8; 32];
    handshake_hash.copy_from_slice(noise.get_handshake_hash().get(..32).unwrap_or(&[0; 32]));
    let (i_to_r, r_to_i) = noise.dangerously_get_raw_split();
    let (i_to_r, r_to_i) = (Zeroizing::new(i_to_r), Zeroizing::new(r_to_i));
    let keys = if initiator {
        SessionKeys {
            send: i_to_r,
            recv: r_to_i,
        }
    } else {
        SessionKeys {
            send: r_to_i,
            recv: i_to_r,
        }
    };
    Ok(Established {
        peer,
        keys,
        handshake_hash,
    })
}

/// Gives snow ring's AES-GCM and SHA-256, curve25519-dalek's X25519, and a ChaCha20 RNG
/// seeded from the caller's RNG, so the core never reads OS randomness.
struct Resolver {
    seed: Zeroizing<[u8; 32]>,
}

impl snow::resolvers::CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
        Some(Box::new(SeededRandom(rand_chacha::ChaCha20Rng::from_seed(
            *self.seed,
        ))))
    }

    fn resolve_dh(&self, choice: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
        snow::resolvers::DefaultResolver.resolve_dh(choice)
    }

    fn resolve_hash(
        &self,
        choice: &snow::params::HashChoice,
    ) -> Option<Box<dyn snow::types::Hash>> {
        snow::resolvers::RingResolver.resolve_hash(choice)
    }

    fn resolve_cipher(
        &self,
        choice: &snow::params::CipherChoice,
    ) -> Option<Box<dyn snow::types::Cipher>> {
        snow::resolvers::RingResolver.resolve_cipher(choice)
    }
}

struct SeededRandom(rand_chacha::ChaCha20Rng);

impl snow::types::Random for SeededRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        rand_core::RngCore::fill_bytes(&mut self.0, dest);
        Ok(())
    }
}
