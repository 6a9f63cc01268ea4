//! What a running node presents: fresh tokens minted from the unlocked keystore.

use std::net::SocketAddr;

use cellmesh_core::device;
use cellmesh_core::handshake::{HandshakeError, LocalNode};
use cellmesh_core::id::{CellId, NodeId};
use cellmesh_core::token::{Token, TokenError, attr};
use rand_core::OsRng;
use thiserror::Error;

use cellmesh_core::keystore::DeviceSecrets;

/// A node's identity could not be prepared.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A token could not be made.
    #[error("cannot make a token: {0}")]
    Token(#[from] TokenError),
    /// The node token and the node's keys do not match.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}

/// A device's identity for one run of a node: its node token (valid for a day, naming where it
/// listens) and a fresh identity token by which its cell certifies it.
#[derive(Debug)]
pub struct DeviceIdentity {
    /// The node token and agreement secret, for handshakes.
    pub local: LocalNode,
    /// The cell's identity token naming this node, for JOIN.
    pub identity: Token,
    /// The cell.
    pub cell: CellId,
    /// This device.
    pub node: NodeId,
}

impl DeviceIdentity {
    /// Mints the tokens from a device's secrets. `advertise` is put in the node token's
    /// `hostname` and `port` extensions.
    pub fn mint(s: &DeviceSecrets, advertise: Option<SocketAddr>) -> Result<Self, IdentityError> {
        let now = crate::now();
        let mut claims = device::node_token(&s.node, s.cell.cell_id(), now, &mut OsRng)?;
        if let Some(addr) = advertise {
            claims = claims
                .with_attribute(attr::HOSTNAME, addr.ip().to_string())?
                .with_attribute(attr::PORT, addr.port().to_be_bytes().to_vec())?;
        }
        let node_token = claims.sign(&s.node.signing)?;
        let node = NodeId::from_key(s.node.signing.public());
        let identity = device::identity_token(&s.cell, node, now, &mut OsRng)?;
        Ok(Self {
            local: LocalNode::new(node_token, &s.node.agreement)?,
            identity,
            cell: s.cell.cell_id(),
            node,
        })
    }
}
