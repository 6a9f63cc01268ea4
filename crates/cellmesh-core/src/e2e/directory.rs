//! Who a sender seals for: the recipient cell's devices as a relay lists them, each checked
//! against the cell id, and this device as sender and recipient.

use thiserror::Error;

use crate::Timestamp;
use crate::device::{BindError, DeviceBinding, Revocations, bind};
use crate::id::{CellId, NodeId};
use crate::keys::{AgreementPublicKey, AgreementSecret};
use crate::relay::DirectoryEntry;
use crate::token::{DEFAULT_SKEW, Token, TokenKind, VerifyError};

/// A device of another cell whose keys were checked against its cell id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteDevice {
    pub(super) binding: DeviceBinding,
    pub(super) agreement: AgreementPublicKey,
}

impl RemoteDevice {
    /// Checks one (node token, identity token) pair: the identity token signed by the cell and
    /// valid now, naming the node; the node token signed by the node (its validity period is
    /// not checked: a device that was offline for a day still owns its key) and carrying an
    /// X25519 key; the device not revoked.
    pub fn verify(
        node_token: &Token,
        identity: &Token,
        now: Timestamp,
        revocations: &Revocations,
    ) -> Result<Self, DirectoryError> {
        // Signatures first: a forged or altered token must fail as such (and fail a whole
        // directory), not pass for a lapsed one (which a directory merely leaves out).
        identity.verify_signatures()?;
        let identity = identity.verify(now, DEFAULT_SKEW)?;
        let node_token = node_token.verify_signatures()?;
        if identity.claims().kind != TokenKind::Identity {
            return Err(DirectoryError::Bind(BindError::WrongKind {
                expected: TokenKind::Identity,
            }));
        }
        let binding = bind(&node_token, &identity, revocations)?;
        let agreement = node_token
            .claims()
            .agreement_key
            .ok_or(DirectoryError::NoAgreementKey)?;
        Ok(Self { binding, agreement })
    }

    /// The device's cell.
    pub fn cell(&self) -> CellId {
        self.binding.cell()
    }

    /// The device.
    pub fn node(&self) -> NodeId {
        self.binding.node()
    }

    /// The tokens that prove it.
    pub fn binding(&self) -> &DeviceBinding {
        &self.binding
    }
}

/// The devices of one cell, each checked against the cell id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Directory {
    /// The cell.
    pub cell: CellId,
    /// Its devices.
    pub devices: Vec<RemoteDevice>,
}

impl Directory {
    /// Checks what a relay claims are `cell`'s devices. Any entry that is not a device of
    /// exactly `cell` fails the whole answer: a relay that lies about one device is not
    /// trusted about the others. Revoked devices, and devices whose identity token is not
    /// valid now (lapsed, or ahead of our clock), are left out.
    pub fn verify(
        cell: CellId,
        entries: &[DirectoryEntry],
        now: Timestamp,
        revocations: &Revocations,
    ) -> Result<Self, DirectoryError> {
        let mut devices = Vec::with_capacity(entries.len());
        for e in entries {
            match RemoteDevice::verify(&e.node_token, &e.identity, now, revocations) {
                Ok(d) if d.cell() == cell => devices.push(d),
                Ok(d) => return Err(DirectoryError::WrongCell(d.cell())),
                // A revoked device, or one whose certificate lapsed (offline for a year) or
                // is not valid yet by our clock, is left out; the others still count.
                Err(DirectoryError::Bind(BindError::Revoked(_)))
                | Err(DirectoryError::Token(
                    VerifyError::Expired { .. } | VerifyError::NotYetValid { .. },
                )) => {}
                Err(e) => return Err(e),
            }
        }
        if devices.is_empty() {
            return Err(DirectoryError::NoDevices(cell));
        }
        Ok(Self { cell, devices })
    }
}

/// A cell's directory could not be trusted or was empty.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DirectoryError {
    /// The relay knows no (unrevoked) device of the cell.
    #[error("no device of cell {0} is registered")]
    NoDevices(CellId),
    /// A token failed verification.
    #[error("a device token does not verify: {0}")]
    Token(#[from] VerifyError),
    /// The tokens do not bind a device to the cell.
    #[error("a device does not belong to the cell: {0}")]
    Bind(#[from] BindError),
    /// An entry belongs to another cell: the relay substituted keys.
    #[error("the relay answered with a device of another cell ({0})")]
    WrongCell(CellId),
    /// The node token carries no X25519 key.
    #[error("a device token carries no agreement key")]
    NoAgreementKey,
    /// A revocation the answer carries is not the cell's signed revocation of a device.
    #[error("a revocation in the answer does not verify: {0}")]
    Revocation(crate::revoked::InvalidRevocation),
}

/// This device, as the sender and recipient of end-to-end messages.
pub struct LocalDevice {
    pub(super) cell: CellId,
    pub(super) node: NodeId,
    pub(super) node_token: Token,
    pub(super) identity: Token,
    pub(super) agreement: AgreementSecret,
}

impl LocalDevice {
    /// This device: its current tokens and its node's X25519 secret (the one its node token
    /// names). Refuses a token that names another key.
    pub fn new(
        node_token: Token,
        identity: Token,
        agreement: AgreementSecret,
    ) -> Result<Self, DirectoryError> {
        if node_token.claims().agreement_key != Some(agreement.public()) {
            return Err(DirectoryError::NoAgreementKey);
        }
        let cell = CellId::from_key(identity.claims().key);
        let node = NodeId::from_key(node_token.claims().key);
        Ok(Self {
            cell,
            node,
            node_token,
            identity,
            agreement,
        })
    }

    /// Replaces the tokens sent in INIT envelopes (after a renewal).
    pub fn renew(&mut self, node_token: Token, identity: Token) {
        self.node_token = node_token;
        self.identity = identity;
    }

    /// The cell.
    pub fn cell(&self) -> CellId {
        self.cell
    }

    /// The device.
    pub fn node(&self) -> NodeId {
        self.node
    }
}

impl std::fmt::Debug for LocalDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDevice")
            .field("cell", &self.cell)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}
