//! Devices: how a cell certifies the nodes that act for it, and how it revokes one.
//!
//! Each device has its own random node key. Two tokens bind it to its cell, as the seed's
//! join step describes (the identity names the node, the node names the identity):
//!
//! ```text
//! node token      kind=Node      issuer=key=node key   attribute cell = cell key   (self-signed)
//! identity token  kind=Identity  issuer=key=cell key   attribute node = node key   (signed by the cell)
//! revocation      kind=Revocation issuer=key=cell key  attribute node = node key   (signed by the cell)
//! ```
//!
//! The identity token names the node by its *key* (the [`NodeId`]) rather than by the
//! fingerprint of one node token: the key is what the handshake proves possession of, and it
//! stays the same when the node renews its token, so a cell need not re-certify a device for
//! every renewal. [`bind`] checks both directions and the revocation list and returns a
//! [`DeviceBinding`], the proof later stages (join, relay registration) require.

use std::collections::BTreeSet;

use rand_core::CryptoRngCore;
use thiserror::Error;

use crate::Timestamp;
use crate::id::{CellId, NodeId};
use crate::keys::{AgreementPublicKey, KeyPair, PublicKey};
use crate::mnemonic::CellSecrets;
use crate::token::{Claims, Token, TokenError, TokenKind, VerifiedToken, attr};

/// Lifetime of an identity token (a device certificate): one year.
pub const IDENTITY_LIFETIME: u64 = 365 * 24 * 3600;
/// Lifetime of a node token: one day; nodes renew theirs whenever they start.
pub const NODE_LIFETIME: u64 = 24 * 3600;

/// A node token and an identity token do not bind a device to a cell.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BindError {
    /// A token of another kind was offered.
    #[error("expected a {expected:?} token")]
    WrongKind {
        /// The kind that was expected.
        expected: TokenKind,
    },
    /// The token's key is not its issuer (these tokens are self-issued).
    #[error("token is not issued by its own key")]
    NotSelfIssued,
    /// The node token names another cell than the identity token's, or none.
    #[error("the node token does not name this cell")]
    CellMismatch,
    /// The identity token names another node than the node token's, or none.
    #[error("the identity token does not name this node")]
    NodeMismatch,
    /// The cell has revoked this device.
    #[error("device {0} has been revoked by its cell")]
    Revoked(NodeId),
}

/// Proof that a node acts for a cell: both tokens verified and naming each other, the device
/// not revoked. Only [`bind`] makes one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceBinding {
    cell: CellId,
    node: NodeId,
    node_token: VerifiedToken,
    identity: VerifiedToken,
}

impl DeviceBinding {
    /// The cell.
    pub fn cell(&self) -> CellId {
        self.cell
    }

    /// The device.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The node's token.
    pub fn node_token(&self) -> &VerifiedToken {
        &self.node_token
    }

    /// The cell's identity token for this node.
    pub fn identity(&self) -> &VerifiedToken {
        &self.identity
    }

    /// The cell's key-agreement key, if its identity token carries one.
    pub fn cell_agreement_key(&self) -> Option<AgreementPublicKey> {
        self.identity.claims().agreement_key
    }
}

/// Checks that `node_token` and `identity` name each other and that the device is not
/// revoked.
pub fn bind(
    node_token: &VerifiedToken,
    identity: &VerifiedToken,
    revocations: &Revocations,
) -> Result<DeviceBinding, BindError> {
    let (n, i) = (node_token.claims(), identity.claims());
    expect_self_issued(n, TokenKind::Node)?;
    expect_self_issued(i, TokenKind::Identity)?;
    if n.key_attribute(attr::CELL) != Some(i.key) {
        return Err(BindError::CellMismatch);
    }
    if i.key_attribute(attr::NODE) != Some(n.key) {
        return Err(BindError::NodeMismatch);
    }
    let (cell, node) = (CellId::from_key(i.key), NodeId::from_key(n.key));
    if revocations.is_revoked(cell, node) {
        return Err(BindError::Revoked(node));
    }
    Ok(DeviceBinding {
        cell,
        node,
        node_token: node_token.clone(),
        identity: identity.clone(),
    })
}

fn expect_self_issued(claims: &Claims, expected: TokenKind) -> Result<(), BindError> {
    if claims.kind != expected {
        return Err(BindError::WrongKind { expected });
    }
    if claims.issuer != claims.key {
        return Err(BindError::NotSelfIssued);
    }
    Ok(())
}

/// The node token a device presents: self-signed by its node key, naming its cell.
pub fn node_token(
    node: &KeyPair,
    cell: CellId,
    now: Timestamp,
    rng: &mut impl CryptoRngCore,
) -> Result<Claims, TokenError> {
    let key = node.signing.public();
    let mut claims = Claims::new(TokenKind::Node, key, key, now, NODE_LIFETIME, rng)
        .with_attribute(attr::CELL, cell.key().as_bytes().to_vec())?;
    claims.subject = "cellmesh node".into();
    claims.agreement_key = Some(node.agreement.public());
    Ok(claims)
}

/// The identity token by which `cell` certifies `node`.
pub fn identity_token(
    cell: &CellSecrets,
    node: NodeId,
    now: Timestamp,
    rng: &mut impl CryptoRngCore,
) -> Result<Token, TokenError> {
    let key = cell.signing().public();
    let mut claims = Claims::new(TokenKind::Identity, key, key, now, IDENTITY_LIFETIME, rng)
        .with_attribute(attr::NODE, node.key().as_bytes().to_vec())?;
    claims.subject = "cellmesh cell".into();
    claims.agreement_key = Some(cell.agreement().public());
    claims.sign(cell.signing())
}

/// A revocation of `node` by `cell`. It never expires.
pub fn revocation(
    cell: &CellSecrets,
    node: NodeId,
    now: Timestamp,
    rng: &mut impl CryptoRngCore,
) -> Result<Token, TokenError> {
    let key = cell.signing().public();
    let mut claims = Claims::new(TokenKind::Revocation, key, key, now, u64::MAX, rng)
        .with_attribute(attr::NODE, node.key().as_bytes().to_vec())?;
    claims.subject = "cellmesh revocation".into();
    claims.sign(cell.signing())
}

/// The revocations a verifier honours: pairs of (issuer, revoked key). A cell revokes its
/// nodes (attribute `node`); a realm's issuer revokes member cells or nodes (attribute `cell`
/// or `node`). A revocation only ever speaks for its own issuer.
#[derive(Clone, Debug, Default)]
pub struct Revocations {
    revoked: BTreeSet<(PublicKey, PublicKey)>,
}

impl Revocations {
    /// No revocations.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a verified revocation, returning (issuer, revoked key).
    pub fn insert(
        &mut self,
        revocation: &VerifiedToken,
    ) -> Result<(PublicKey, PublicKey), BindError> {
        let claims = revocation.claims();
        expect_self_issued(claims, TokenKind::Revocation)?;
        let subject = claims
            .key_attribute(attr::NODE)
            .or_else(|| claims.key_attribute(attr::CELL))
            .ok_or(BindError::NodeMismatch)?;
        let entry = (claims.issuer, subject);
        self.revoked.insert(entry);
        Ok(entry)
    }

    /// Whether `cell` has revoked `node`.
    pub fn is_revoked(&self, cell: CellId, node: NodeId) -> bool {
        self.is_revoked_by(cell.key(), node.key())
    }

    /// Whether `issuer` has revoked `subject`.
    pub fn is_revoked_by(&self, issuer: PublicKey, subject: PublicKey) -> bool {
        self.revoked.contains(&(issuer, subject))
    }

    /// Every (issuer, revoked key) pair.
    pub fn iter(&self) -> impl Iterator<Item = (PublicKey, PublicKey)> + '_ {
        self.revoked.iter().copied()
    }

    /// How many revocations are recorded.
    pub fn len(&self) -> usize {
        self.revoked.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.revoked.is_empty()
    }
}

/// A revocation by a realm's issuer of a member `cell`. It never expires.
pub fn realm_revocation(
    realm_issuer: &crate::keys::SigningSecret,
    cell: CellId,
    now: Timestamp,
    rng: &mut impl CryptoRngCore,
) -> Result<Token, TokenError> {
    let key = realm_issuer.public();
    let mut claims = Claims::new(TokenKind::Revocation, key, key, now, u64::MAX, rng)
        .with_attribute(attr::CELL, cell.key().as_bytes().to_vec())?;
    claims.subject = "cellmesh revocation".into();
    claims.sign(realm_issuer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mnemonic::Mnemonic;
    use crate::token::DEFAULT_SKEW;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    const NOW: Timestamp = Timestamp(1_800_000_000);

    struct Fixture {
        cell: CellSecrets,
        node: KeyPair,
        rng: ChaCha20Rng,
    }

    impl Fixture {
        fn new(seed: u8) -> Self {
            let mut rng = ChaCha20Rng::from_seed([seed; 32]);
            Self {
                cell: Mnemonic::generate(&mut rng).derive(""),
                node: KeyPair::generate(&mut rng),
                rng,
            }
        }

        fn node_id(&self) -> NodeId {
            NodeId::from_key(self.node.signing.public())
        }

        fn tokens(&mut self) -> (VerifiedToken, VerifiedToken) {
            let n = node_token(&self.node, self.cell.cell_id(), NOW, &mut self.rng)
                .unwrap()
                .sign(&self.node.signing)
                .unwrap();
            let i = identity_token(&self.cell, self.node_id(), NOW, &mut self.rng).unwrap();
            (
                n.verify(NOW, DEFAULT_SKEW).unwrap(),
                i.verify(NOW, DEFAULT_SKEW).unwrap(),
            )
        }
    }

    #[test]
    fn a_cell_binds_its_devices() {
        let mut f = Fixture::new(1);
        let (n, i) = f.tokens();
        let b = bind(&n, &i, &Revocations::new()).unwrap();
        assert_eq!(b.cell(), f.cell.cell_id());
        assert_eq!(b.node(), f.node_id());
        assert_eq!(b.cell_agreement_key(), Some(f.cell.agreement().public()));
    }

    #[test]
    fn tokens_of_other_cells_or_nodes_do_not_bind() {
        let (mut a, mut b) = (Fixture::new(1), Fixture::new(2));
        let (an, ai) = a.tokens();
        let (bn, bi) = b.tokens();
        let none = Revocations::new();
        assert_eq!(bind(&an, &bi, &none), Err(BindError::CellMismatch));
        assert_eq!(bind(&bn, &ai, &none), Err(BindError::CellMismatch));
        assert_eq!(
            bind(&ai, &an, &none),
            Err(BindError::WrongKind {
                expected: TokenKind::Node
            })
        );
        // Same cell, another device: the identity token names the other node.
        let other = KeyPair::generate(&mut a.rng);
        let other_n = node_token(&other, a.cell.cell_id(), NOW, &mut a.rng)
            .unwrap()
            .sign(&other.signing)
            .unwrap()
            .verify(NOW, DEFAULT_SKEW)
            .unwrap();
        assert_eq!(bind(&other_n, &ai, &none), Err(BindError::NodeMismatch));
    }

    #[test]
    fn revoked_devices_are_refused_and_only_their_cell_can_revoke() {
        let (mut a, mut b) = (Fixture::new(1), Fixture::new(2));
        let (an, ai) = a.tokens();
        let mut revocations = Revocations::new();
        // Cell B "revoking" A's node records (B, node), which does not touch A's binding.
        let forged = revocation(&b.cell, a.node_id(), NOW, &mut b.rng).unwrap();
        revocations
            .insert(&forged.verify(NOW, DEFAULT_SKEW).unwrap())
            .unwrap();
        assert!(bind(&an, &ai, &revocations).is_ok());
        let real = revocation(&a.cell, a.node_id(), NOW, &mut a.rng).unwrap();
        let far_future = Timestamp(u64::MAX - 1);
        revocations
            .insert(&real.verify(far_future, DEFAULT_SKEW).unwrap())
            .unwrap();
        assert_eq!(
            bind(&an, &ai, &revocations),
            Err(BindError::Revoked(a.node_id()))
        );
        assert_eq!(
            revocations.insert(&an),
            Err(BindError::WrongKind {
                expected: TokenKind::Revocation
            })
        );
    }
}
