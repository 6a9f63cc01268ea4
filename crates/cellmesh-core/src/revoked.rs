//! Revocations at a relay: which REVOKEs a relay keeps, which it refuses and why, and which
//! revocations it hands out with a cell's directory.
//!
//! ```text
//!  REVOKE(token) ─► rate (per sending cell) ─► CellRevocation::verify (signature, shape)
//!               ─► issuer has a device registered here? subject not another cell's device?
//!               ─► per-cell and total caps ─► Offered::New ─► the store, then REVOKED(ok),
//!                                                            the device refused and dropped
//!  LOOKUP(cell) ─► RelayRevocations::of_cell ─► DIRECTORY … rcount revocation*
//!  JOIN(cell, node) ─► RelayRevocations::is_revoked ─► NACK revoked
//! ```
//!
//! No I/O: the caller passes the time and the relay's [`Registrations`] in, and carries out
//! what an accepted revocation asks (persist it, refuse and disconnect the device, drop its
//! registration and queue). The same checks serve a mailbox that reads revocations out of a
//! DIRECTORY ([`CellRevocation::verify`]), so a relay and a sender agree on what counts.
//!
//! A revocation speaks only for its issuer: a cell revokes its own devices. That is why a
//! relay need not trust the device that carries a REVOKE (any device may carry any cell's
//! revocation, as anyone may import one), and why the limits count what it costs: signature
//! checks by the sending cell, stored tokens by the issuing cell and in all.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::Instant;
use crate::device::{BindError, Revocations};
use crate::id::{CellId, NodeId};
use crate::limits::{Buckets, Rate, Registrations};
use crate::relay::{MAX_REVOCATIONS, RefuseCode};
use crate::token::{Token, TokenKind, VerifiedToken, VerifyError, attr};

/// A cell's revocation of one of its devices, its signature checked. Only
/// [`CellRevocation::verify`] makes one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CellRevocation {
    cell: CellId,
    node: NodeId,
    token: VerifiedToken,
}

/// A token is not a cell's revocation of one of its devices.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum InvalidRevocation {
    /// Its signature does not verify.
    #[error("the revocation does not verify: {0}")]
    Signature(#[from] VerifyError),
    /// Another kind of token, one not issued by its own key, or one that names a cell rather
    /// than a device (a realm's revocation of a member cell, which a relay does not keep).
    #[error("not a cell's revocation of one of its devices")]
    NotACellRevocation,
}

impl CellRevocation {
    /// Checks that `token` is a revocation, self-issued by a cell, naming a device, and
    /// signed by the cell. Its validity period is not checked: a revocation never expires,
    /// and one dated a little ahead of this clock still says what it says.
    pub fn verify(token: &Token) -> Result<Self, InvalidRevocation> {
        let claims = token.claims();
        if claims.kind != TokenKind::Revocation || claims.issuer != claims.key {
            return Err(InvalidRevocation::NotACellRevocation);
        }
        let node = claims
            .key_attribute(attr::NODE)
            .ok_or(InvalidRevocation::NotACellRevocation)?;
        let token = token.verify_signatures()?;
        Ok(Self {
            cell: CellId::from_key(claims.key),
            node: NodeId::from_key(node),
            token,
        })
    }

    /// The issuing cell.
    pub fn cell(&self) -> CellId {
        self.cell
    }

    /// The revoked device.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The verified token (for [`Revocations::insert`] and the like).
    pub fn verified(&self) -> &VerifiedToken {
        &self.token
    }

    /// The token as it travels.
    pub fn token(&self) -> &Token {
        self.token.token()
    }

    /// Records it in a verifier's set.
    pub fn insert_into(&self, set: &mut Revocations) -> Result<(), BindError> {
        set.insert(&self.token).map(|_| ())
    }
}

/// Bounds on what a relay keeps of revocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevocationLimits {
    /// REVOKEs each sending cell may make (each costs a signature check). Default 10 a
    /// second, bursts of 100.
    pub rate: Rate,
    /// Revocations kept per issuing cell: as many as a DIRECTORY carries. Default 64.
    pub per_cell: usize,
    /// Revocations kept in all. Default 100,000.
    pub total: usize,
}

impl Default for RevocationLimits {
    fn default() -> Self {
        Self {
            rate: Rate::new(10, 100),
            per_cell: MAX_REVOCATIONS,
            total: 100_000,
        }
    }
}

/// Why a relay refused a REVOKE. Each maps to a REVOKED code ([`RevokeRefused::code`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RevokeRefused {
    /// The sending cell is over its rate; retry later.
    #[error("too many revocations from this cell; retry later")]
    RateLimited,
    /// The token is not a cell's signed revocation of a device.
    #[error(transparent)]
    Invalid(#[from] InvalidRevocation),
    /// No device of the issuing cell is registered at this relay: it keeps revocations only
    /// for cells it serves.
    #[error("no device of cell {0} is registered at this relay")]
    UnknownCell(CellId),
    /// The revoked device is registered here under another cell: a cell cannot revoke it.
    #[error("device {node} belongs to another cell here, not to {cell}")]
    ForeignDevice {
        /// The issuing cell.
        cell: CellId,
        /// The device it named.
        node: NodeId,
    },
    /// The issuing cell has as many revocations kept as the relay keeps for one cell.
    #[error("this relay keeps no more revocations for cell {0}")]
    CellFull(CellId),
    /// The relay keeps as many revocations as it holds.
    #[error("this relay keeps no more revocations")]
    RelayFull,
}

impl RevokeRefused {
    /// The code REVOKED carries.
    pub fn code(&self) -> RefuseCode {
        match self {
            Self::RateLimited => RefuseCode::RateLimited,
            Self::Invalid(_) => RefuseCode::Invalid,
            Self::UnknownCell(_) | Self::ForeignDevice { .. } => RefuseCode::NotAllowed,
            Self::CellFull(_) | Self::RelayFull => RefuseCode::TooMany,
        }
    }
}

/// What became of a REVOKE the relay accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Offered {
    /// New here: the caller persists it, then answers REVOKED(ok), refuses the device from
    /// now on, disconnects it and drops its registration and queue. If persisting fails,
    /// [`RelayRevocations::remove`] it and answer `unavailable`.
    New(Box<CellRevocation>),
    /// Kept already: answer REVOKED(ok); nothing else to do.
    Known,
}

/// The revocations a relay keeps, by issuing cell, within [`RevocationLimits`].
#[derive(Clone, Debug)]
pub struct RelayRevocations {
    limits: RevocationLimits,
    rates: Buckets<CellId>,
    by_cell: BTreeMap<CellId, BTreeMap<NodeId, Token>>,
    total: usize,
}

impl RelayRevocations {
    /// None kept yet. `senders` bounds how many sending cells' rates are remembered at once
    /// (the relay's registration total is a fit).
    pub fn new(limits: RevocationLimits, senders: usize) -> Self {
        Self {
            limits,
            rates: Buckets::new(limits.rate, senders.max(1024)),
            by_cell: BTreeMap::new(),
            total: 0,
        }
    }

    /// The limits.
    pub fn limits(&self) -> RevocationLimits {
        self.limits
    }

    /// Keeps a revocation the store held (at start), whatever the limits: lowering them does
    /// not forget any, it stops new ones. A token that does not verify is refused (the store
    /// was damaged, or written by something else).
    pub fn load(&mut self, token: &Token) -> Result<CellRevocation, InvalidRevocation> {
        let r = CellRevocation::verify(token)?;
        self.insert(&r);
        Ok(r)
    }

    /// A REVOKE from a device of `from_cell` at `now`, checked against the relay's
    /// `registrations`. See [`Offered`] for what the caller does next.
    pub fn offer(
        &mut self,
        from_cell: CellId,
        token: &Token,
        registrations: &Registrations,
        now: Instant,
    ) -> Result<Offered, RevokeRefused> {
        // Before the signature check, which is what the rate protects.
        if !self.rates.take(from_cell, now) {
            return Err(RevokeRefused::RateLimited);
        }
        let r = CellRevocation::verify(token)?;
        let (cell, node) = (r.cell(), r.node());
        if self.is_revoked(cell, node) {
            return Ok(Offered::Known);
        }
        if registrations.in_cell(cell) == 0 {
            return Err(RevokeRefused::UnknownCell(cell));
        }
        // A device registered here under another cell is not this cell's to revoke (a
        // revocation would speak only for its issuer anyway; keeping it would be noise). One
        // not registered here at all may still come: it is kept, and refused when it does.
        if let Some(reg) = registrations.get(node)
            && reg.cell != cell
        {
            return Err(RevokeRefused::ForeignDevice { cell, node });
        }
        if self.in_cell(cell) >= self.limits.per_cell {
            return Err(RevokeRefused::CellFull(cell));
        }
        if self.total >= self.limits.total {
            return Err(RevokeRefused::RelayFull);
        }
        self.insert(&r);
        Ok(Offered::New(Box::new(r)))
    }

    /// Forgets the revocation of `node` by `cell` (one that could not be persisted).
    pub fn remove(&mut self, cell: CellId, node: NodeId) -> bool {
        let Some(nodes) = self.by_cell.get_mut(&cell) else {
            return false;
        };
        let removed = nodes.remove(&node).is_some();
        if nodes.is_empty() {
            self.by_cell.remove(&cell);
        }
        if removed {
            self.total -= 1;
        }
        removed
    }

    /// Whether `cell` has revoked `node` here.
    pub fn is_revoked(&self, cell: CellId, node: NodeId) -> bool {
        self.by_cell
            .get(&cell)
            .is_some_and(|nodes| nodes.contains_key(&node))
    }

    /// The revocations of `cell`, ordered by device, at most [`MAX_REVOCATIONS`]: what a
    /// DIRECTORY for the cell carries.
    pub fn of_cell(&self, cell: CellId) -> Vec<Token> {
        self.by_cell
            .get(&cell)
            .map(|nodes| nodes.values().take(MAX_REVOCATIONS).cloned().collect())
            .unwrap_or_default()
    }

    /// Revocations kept for `cell`.
    pub fn in_cell(&self, cell: CellId) -> usize {
        self.by_cell.get(&cell).map_or(0, BTreeMap::len)
    }

    /// Revocations kept in all.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    fn insert(&mut self, r: &CellRevocation) {
        let nodes = self.by_cell.entry(r.cell()).or_default();
        if nodes.insert(r.node(), r.token().clone()).is_none() {
            self.total += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Timestamp;
    use crate::device::{self, realm_revocation};
    use crate::limits::RegistrationLimits;
    use crate::testing::TestNode;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    const NOW: Timestamp = Timestamp(1_800_000_000);
    const T: Instant = Instant(1_000_000);

    fn registrations(nodes: &[&TestNode]) -> Registrations {
        let mut r = Registrations::new(RegistrationLimits {
            per_cell: 64,
            total: 1000,
            ttl_secs: 3600,
        });
        for n in nodes {
            r.join(n.cell_id(), n.node_id(), NOW).unwrap();
        }
        r
    }

    fn revoke(by: &TestNode, node: NodeId, rng: &mut ChaCha20Rng) -> Token {
        device::revocation(&by.cell, node, NOW, rng).unwrap()
    }

    fn fresh_node(rng: &mut ChaCha20Rng) -> NodeId {
        NodeId::from_key(crate::keys::KeyPair::generate(rng).signing.public())
    }

    #[test]
    fn a_registered_cell_revokes_its_device_once_and_it_is_handed_out() {
        let mut rng = ChaCha20Rng::from_seed([1; 32]);
        let (a, b) = (TestNode::new(1, NOW), TestNode::new(2, NOW));
        let regs = registrations(&[&a, &b]);
        let mut kept = RelayRevocations::new(RevocationLimits::default(), 0);
        let token = revoke(&a, a.node_id(), &mut rng);
        let Ok(Offered::New(r)) = kept.offer(b.cell_id(), &token, &regs, T) else {
            panic!("not accepted")
        };
        assert_eq!((r.cell(), r.node()), (a.cell_id(), a.node_id()));
        assert!(kept.is_revoked(a.cell_id(), a.node_id()));
        assert!(!kept.is_revoked(b.cell_id(), a.node_id()));
        assert_eq!(kept.of_cell(a.cell_id()), vec![token.clone()]);
        assert!(kept.of_cell(b.cell_id()).is_empty());
        // The same again (a retry, or another device carrying it): known, not kept twice.
        assert_eq!(
            kept.offer(a.cell_id(), &token, &regs, T),
            Ok(Offered::Known)
        );
        assert_eq!(kept.len(), 1);
        // A device of the cell never registered here may be revoked before it comes.
        let absent = fresh_node(&mut rng);
        let later = revoke(&a, absent, &mut rng);
        assert!(matches!(
            kept.offer(a.cell_id(), &later, &regs, T),
            Ok(Offered::New(_))
        ));
        assert_eq!(kept.in_cell(a.cell_id()), 2);
        assert!(kept.remove(a.cell_id(), absent));
        assert!(!kept.remove(a.cell_id(), absent));
        assert_eq!(kept.len(), 1);
    }

    #[test]
    fn forged_altered_and_wrong_kinds_are_invalid() {
        let mut rng = ChaCha20Rng::from_seed([2; 32]);
        let a = TestNode::new(1, NOW);
        let regs = registrations(&[&a]);
        let mut kept = RelayRevocations::new(RevocationLimits::default(), 0);
        let invalid = |r: Result<Offered, RevokeRefused>| matches!(r, Err(ref e @ RevokeRefused::Invalid(_)) if e.code() == RefuseCode::Invalid);
        // An identity token is no revocation.
        assert!(invalid(kept.offer(a.cell_id(), &a.identity, &regs, T)));
        // A realm's revocation of a cell names no device.
        let realm = realm_revocation(a.cell.signing(), a.cell_id(), NOW, &mut rng).unwrap();
        assert!(invalid(kept.offer(a.cell_id(), &realm, &regs, T)));
        // A bit flipped in the signature (the token ends signature:[64] co-signed:u8).
        let mut bytes = revoke(&a, a.node_id(), &mut rng).to_bytes();
        let at = bytes.len() - 2;
        bytes[at] ^= 1;
        let altered = Token::decode(&bytes).unwrap();
        assert!(invalid(kept.offer(a.cell_id(), &altered, &regs, T)));
        assert!(kept.is_empty());
    }

    #[test]
    fn only_cells_served_here_and_only_their_own_devices() {
        let mut rng = ChaCha20Rng::from_seed([3; 32]);
        let (a, b, stranger) = (
            TestNode::new(1, NOW),
            TestNode::new(2, NOW),
            TestNode::new(3, NOW),
        );
        let regs = registrations(&[&a, &b]);
        let mut kept = RelayRevocations::new(RevocationLimits::default(), 0);
        // A cell with no device here.
        let t = revoke(&stranger, stranger.node_id(), &mut rng);
        let refused = kept.offer(a.cell_id(), &t, &regs, T).unwrap_err();
        assert_eq!(refused, RevokeRefused::UnknownCell(stranger.cell_id()));
        assert_eq!(refused.code(), RefuseCode::NotAllowed);
        // A cell naming a device registered under another cell.
        let t = revoke(&a, b.node_id(), &mut rng);
        let refused = kept.offer(a.cell_id(), &t, &regs, T).unwrap_err();
        assert_eq!(
            refused,
            RevokeRefused::ForeignDevice {
                cell: a.cell_id(),
                node: b.node_id()
            }
        );
        assert_eq!(refused.code(), RefuseCode::NotAllowed);
        assert!(kept.is_empty());
    }

    #[test]
    fn a_sending_cell_gets_a_burst_of_100_then_10_a_second() {
        let mut rng = ChaCha20Rng::from_seed([4; 32]);
        let (a, b) = (TestNode::new(1, NOW), TestNode::new(2, NOW));
        let regs = registrations(&[&a, &b]);
        let limits = RevocationLimits {
            per_cell: 1000,
            ..RevocationLimits::default()
        };
        let mut kept = RelayRevocations::new(limits, 0);
        let token = revoke(&a, a.node_id(), &mut rng);
        for i in 0..100 {
            assert!(kept.offer(a.cell_id(), &token, &regs, T).is_ok(), "{i}");
        }
        let refused = kept.offer(a.cell_id(), &token, &regs, T).unwrap_err();
        assert_eq!(refused, RevokeRefused::RateLimited);
        assert_eq!(refused.code(), RefuseCode::RateLimited);
        // Another sending cell has its own bucket.
        assert!(kept.offer(b.cell_id(), &token, &regs, T).is_ok());
        // A tenth of a second later, one more; ten in a second.
        assert!(
            kept.offer(a.cell_id(), &token, &regs, T.plus_millis(100))
                .is_ok()
        );
        assert!(
            kept.offer(a.cell_id(), &token, &regs, T.plus_millis(100))
                .is_err()
        );
        let second = T.plus_millis(1100);
        for _ in 0..10 {
            assert!(kept.offer(a.cell_id(), &token, &regs, second).is_ok());
        }
        assert!(kept.offer(a.cell_id(), &token, &regs, second).is_err());
    }

    #[test]
    fn at_most_per_cell_and_in_all() {
        let mut rng = ChaCha20Rng::from_seed([5; 32]);
        let (a, b) = (TestNode::new(1, NOW), TestNode::new(2, NOW));
        let regs = registrations(&[&a, &b]);
        let mut kept = RelayRevocations::new(RevocationLimits::default(), 0);
        let mut at = T;
        let mut offer = |kept: &mut RelayRevocations, by: &TestNode, rng: &mut ChaCha20Rng| {
            // Spaced out so the rate never bites.
            at = at.plus_millis(1000);
            let token = revoke(by, fresh_node(rng), rng);
            kept.offer(by.cell_id(), &token, &regs, at)
        };
        for _ in 0..64 {
            assert!(matches!(
                offer(&mut kept, &a, &mut rng),
                Ok(Offered::New(_))
            ));
        }
        let refused = offer(&mut kept, &a, &mut rng).unwrap_err();
        assert_eq!(refused, RevokeRefused::CellFull(a.cell_id()));
        assert_eq!(refused.code(), RefuseCode::TooMany);
        assert_eq!(kept.of_cell(a.cell_id()).len(), MAX_REVOCATIONS);
        // The relay's total, with a small bound.
        let mut small = RelayRevocations::new(
            RevocationLimits {
                total: 3,
                ..RevocationLimits::default()
            },
            0,
        );
        for _ in 0..3 {
            assert!(offer(&mut small, &b, &mut rng).is_ok());
        }
        let refused = offer(&mut small, &a, &mut rng).unwrap_err();
        assert_eq!(refused, RevokeRefused::RelayFull);
        assert_eq!(refused.code(), RefuseCode::TooMany);
        // What the store held is loaded past the bounds, and counts.
        let extra = revoke(&a, fresh_node(&mut rng), &mut rng);
        small.load(&extra).unwrap();
        assert_eq!(small.len(), 4);
        assert!(small.load(&a.identity).is_err());
    }
}
