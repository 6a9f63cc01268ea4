//! A device's durable state in its home: end-to-end sessions, the duplicate memory and the
//! sends not yet acknowledged by every device, so that a mailbox carries on after a restart.
//!
//! One [redb] file, `state.redb` beside the keystore. redb takes an exclusive lock on it, so
//! one process at a time is the device: a second one is told so ([`StateError::Busy`]).
//!
//! ```text
//! table     key                                    value
//! sessions  mac(session key)[16]                   sealed(session key[49] ‖ record)
//! seen      time:u64 ‖ mac(cell ‖ id)[16]          sealed(cell[32] ‖ id[16])
//! floors    mac(cell)[16]                          sealed(cell[32] ‖ floor:u64)
//! sends     mac(id)[16]                            sealed(record)
//! meta      "format"                               u64
//! owner     "device"                               mac("device")[16]
//! ```
//!
//! # At rest
//!
//! Every value of `sessions`, `seen`, `floors` and `sends` is sealed: XChaCha20-Poly1305
//! under a key derived from the device's node secrets (so only someone who has unlocked the
//! keystore can read or forge it), a random 192-bit nonce per value, and the table name and
//! key as associated data (a value cannot be moved to another place). Random nonces of 192
//! bits never repeat in practice (the chance after 2^48 values is about 2^-96), and unlike a
//! counter they stay unique when the file is restored from a backup or a snapshot. Keys are
//! keyed BLAKE2b hashes, so the file shows neither ids nor cells; in clear are only the
//! times of remembered envelopes (their senders' clocks, first in `seen` keys so that expired
//! entries go by range), the format number and the owner's keyed hash. The sessions hold the
//! keys of live sessions: see SECURITY.md for what that costs forward secrecy, and why the
//! file must never be rolled back (a restored session would repeat its counters).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blake2::Blake2bMac;
use blake2::digest::{Mac as _, consts::U16};
use cellmesh_core::Timestamp;
use cellmesh_core::e2e::{SeenChange, SessionKey};
use cellmesh_core::id::{CellId, NodeId};
use cellmesh_core::keys::PublicKey;
use cellmesh_core::mailbox::{Saved, StoreOp};
use cellmesh_core::relay::MsgId;
use chacha20poly1305::aead::{Aead as _, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand_core::RngCore as _;
use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::home::Unlocked;

/// The state file's name in the home.
pub const STATE_FILE: &str = "state.redb";

const SESSIONS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("sessions");
const SEEN: TableDefinition<&[u8; 24], &[u8]> = TableDefinition::new("seen");
const FLOORS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("floors");
const SENDS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("sends");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// "device" → a keyed hash of the node id the state belongs to.
const OWNER: TableDefinition<&str, &[u8; 16]> = TableDefinition::new("owner");
const FORMAT: u64 = 1;
const OTHER_DEVICE: &str = "it belongs to another device";
const NONCE: usize = 24;

/// The state could not be opened, read or written.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// Another process of this device holds the state (a running `cellmesh listen`, or a
    /// second program on the same home).
    #[error("another process of this device is running ({path} is in use)")]
    Busy {
        /// The state file.
        path: PathBuf,
    },
    /// The file or its directory could not be made or read.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The database failed (disk full, I/O error).
    #[error("device state {path}: cannot {context}: {source}")]
    Db {
        /// The file.
        path: PathBuf,
        /// What was being done.
        context: &'static str,
        /// The database's error.
        #[source]
        source: Arc<redb::Error>,
    },
    /// A value does not open or decode: the file was damaged, or written under other keys.
    #[error("device state {path} is damaged or belongs to another device: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What did not check out.
        what: &'static str,
    },
}

/// A device's durable state (see the module docs). Blocking: call it from
/// `spawn_blocking`, one commit at a time.
pub struct DeviceState {
    db: redb::Database,
    path: PathBuf,
    seal: XChaCha20Poly1305,
    mac_key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceState")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl DeviceState {
    /// Opens (or creates, mode 0600) `state.redb` in `dir` for the unlocked device.
    pub fn open(dir: &Path, unlocked: &Unlocked) -> Result<Self, StateError> {
        Self::open_with(dir, StateKeys::new(unlocked))
    }

    /// [`DeviceState::open`] with the keys already derived (they hold no more than the
    /// state needs, so they can go to a blocking task where the keystore's secrets need not).
    ///
    /// A state file left by another device of this home (its keystore was replaced, by
    /// `create-cell --force` or a new `connect-cell`) is deleted and a new one begun: it
    /// could only be read with that device's node secrets, which went with its keystore.
    pub fn open_with(dir: &Path, keys: StateKeys) -> Result<Self, StateError> {
        let path = dir.join(STATE_FILE);
        match Self::open_file(&path, keys.clone()) {
            Err(StateError::Corrupt {
                what: OTHER_DEVICE, ..
            }) => {
                std::fs::remove_file(&path).map_err(|source| StateError::Io {
                    action: "remove",
                    path: path.clone(),
                    source: Arc::new(source),
                })?;
                tracing::warn!(path = %path.display(), "the device state belonged to an earlier device of this home; begun anew");
                Self::open_file(&path, keys)
            }
            other => other,
        }
    }

    fn open_file(path: &Path, keys: StateKeys) -> Result<Self, StateError> {
        let path = path.to_path_buf();
        create_file(&path)?;
        let db = match redb::Builder::new().create(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StateError::Busy { path });
            }
            Err(e) => return Err(db_error(&path, "open the database")(e)),
        };
        let state = Self {
            db,
            path,
            seal: keys.seal,
            mac_key: keys.mac,
        };
        let txn = state
            .db
            .begin_write()
            .map_err(state.err("begin a transaction"))?;
        {
            let mut meta = txn.open_table(META).map_err(state.err("open a table"))?;
            for t in [SESSIONS, FLOORS, SENDS] {
                txn.open_table(t).map_err(state.err("open a table"))?;
            }
            txn.open_table(SEEN).map_err(state.err("open a table"))?;
            let mut owner = txn.open_table(OWNER).map_err(state.err("open a table"))?;
            let me = state.mac(&[b"device"]);
            let known = owner
                .get("device")
                .map_err(state.err("read the owner"))?
                .map(|v| *v.value());
            match known {
                Some(o) if o == me => {}
                Some(_) => return Err(state.corrupt(OTHER_DEVICE)),
                None => {
                    owner
                        .insert("device", &me)
                        .map_err(state.err("write the owner"))?;
                }
            }
            let format = meta
                .get("format")
                .map_err(state.err("read the format"))?
                .map(|v| v.value());
            match format {
                Some(FORMAT) => {}
                Some(_) => return Err(state.corrupt("unknown format")),
                None => {
                    meta.insert("format", FORMAT)
                        .map_err(state.err("write the format"))?;
                }
            }
        }
        txn.commit().map_err(state.err("commit"))?;
        Ok(state)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything saved, for [`cellmesh_core::mailbox::Mailbox::new`].
    pub fn load(&self) -> Result<Saved, StateError> {
        let txn = self
            .db
            .begin_read()
            .map_err(self.err("begin a transaction"))?;
        let mut saved = Saved::default();
        let sessions = txn.open_table(SESSIONS).map_err(self.err("open a table"))?;
        for entry in sessions.iter().map_err(self.err("read sessions"))? {
            let (k, v) = entry.map_err(self.err("read sessions"))?;
            let plain = self.open_value("sessions", k.value(), v.value())?;
            let key = session_key(&plain[..49.min(plain.len())])
                .ok_or_else(|| self.corrupt("session key"))?;
            saved
                .sessions
                .push((key, Zeroizing::new(plain[49..].to_vec())));
        }
        let seen = txn.open_table(SEEN).map_err(self.err("open a table"))?;
        for entry in seen.iter().map_err(self.err("read the duplicate memory"))? {
            let (k, v) = entry.map_err(self.err("read the duplicate memory"))?;
            let key = k.value();
            let plain = self.open_value("seen", key, v.value())?;
            let (cell, rest) = cell_of(&plain).ok_or_else(|| self.corrupt("seen entry"))?;
            let id: [u8; 16] = rest.try_into().map_err(|_| self.corrupt("seen entry"))?;
            let time = u64::from_be_bytes(key[..8].try_into().unwrap_or_default());
            saved.seen.push((cell, MsgId(id), Timestamp(time)));
        }
        let floors = txn.open_table(FLOORS).map_err(self.err("open a table"))?;
        for entry in floors.iter().map_err(self.err("read floors"))? {
            let (k, v) = entry.map_err(self.err("read floors"))?;
            let plain = self.open_value("floors", k.value(), v.value())?;
            let (cell, rest) = cell_of(&plain).ok_or_else(|| self.corrupt("floor"))?;
            let floor: [u8; 8] = rest.try_into().map_err(|_| self.corrupt("floor"))?;
            saved
                .floors
                .push((cell, Timestamp(u64::from_be_bytes(floor))));
        }
        let sends = txn.open_table(SENDS).map_err(self.err("open a table"))?;
        for entry in sends.iter().map_err(self.err("read sends"))? {
            let (k, v) = entry.map_err(self.err("read sends"))?;
            saved
                .sends
                .push(self.open_value("sends", k.value(), v.value())?);
        }
        Ok(saved)
    }

    /// Writes `ops` in one durable transaction (`fsync` before it returns): all or none.
    pub fn commit(&self, ops: &[StoreOp]) -> Result<(), StateError> {
        let txn = self
            .db
            .begin_write()
            .map_err(self.err("begin a transaction"))?;
        {
            let mut sessions = txn.open_table(SESSIONS).map_err(self.err("open a table"))?;
            let mut seen = txn.open_table(SEEN).map_err(self.err("open a table"))?;
            let mut floors = txn.open_table(FLOORS).map_err(self.err("open a table"))?;
            let mut sends = txn.open_table(SENDS).map_err(self.err("open a table"))?;
            let w = self.err("write");
            for op in ops {
                match op {
                    StoreOp::PutSession(key, record) => {
                        let key = *key;
                        let k = self.mac(&[&key.to_bytes()]);
                        let plain = Zeroizing::new([&key.to_bytes()[..], &record[..]].concat());
                        let v = self.seal_value("sessions", &k, &plain);
                        sessions.insert(&k, &v[..]).map_err(w.clone())?;
                    }
                    StoreOp::DeleteSession(key) => {
                        let key = *key;
                        sessions
                            .remove(&self.mac(&[&key.to_bytes()]))
                            .map_err(w.clone())?;
                    }
                    StoreOp::Seen(SeenChange::Put { cell, id, time }) => {
                        let (cell, id, time) = (*cell, *id, *time);
                        let k = seen_key(time, &self.mac(&[cell.key().as_bytes(), &id.0]));
                        let plain = [&cell.key().as_bytes()[..], &id.0].concat();
                        let v = self.seal_value("seen", &k, &plain);
                        seen.insert(&k, &v[..]).map_err(w.clone())?;
                    }
                    StoreOp::Seen(SeenChange::Forget { cell, id, time }) => {
                        let (cell, id, time) = (*cell, *id, *time);
                        let k = seen_key(time, &self.mac(&[cell.key().as_bytes(), &id.0]));
                        seen.remove(&k).map_err(w.clone())?;
                    }
                    StoreOp::Seen(SeenChange::Floor { cell, floor }) => {
                        let (cell, floor) = (*cell, *floor);
                        let k = self.mac(&[cell.key().as_bytes()]);
                        let plain = [&cell.key().as_bytes()[..], &floor.0.to_be_bytes()].concat();
                        let v = self.seal_value("floors", &k, &plain);
                        floors.insert(&k, &v[..]).map_err(w.clone())?;
                    }
                    StoreOp::Seen(SeenChange::ExpireBefore(t)) => {
                        let end = seen_key(*t, &[0; 16]);
                        seen.retain_in::<&[u8; 24], _>(..&end, |_, _| false)
                            .map_err(w.clone())?;
                    }
                    StoreOp::PutSend(id, record) => {
                        let k = self.mac(&[&id.0]);
                        let v = self.seal_value("sends", &k, record);
                        sends.insert(&k, &v[..]).map_err(w.clone())?;
                    }
                    StoreOp::DeleteSend(id) => {
                        sends.remove(&self.mac(&[&id.0])).map_err(w.clone())?;
                    }
                    _ => {}
                }
            }
        }
        txn.commit().map_err(self.err("commit"))
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 16] {
        let mut mac =
            <Blake2bMac<U16> as blake2::digest::KeyInit>::new_from_slice(&self.mac_key[..])
                .unwrap_or_else(|_| unreachable!("32 bytes is a valid BLAKE2b key"));
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    fn seal_value(&self, table: &str, key: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE];
        rand_core::OsRng.fill_bytes(&mut nonce);
        let aad = [table.as_bytes(), b"\0", key].concat();
        let sealed = self
            .seal
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: &aad,
                },
            )
            .unwrap_or_else(|_| unreachable!("XChaCha20-Poly1305 seals any length we write"));
        [&nonce[..], &sealed].concat()
    }

    fn open_value(
        &self,
        table: &'static str,
        key: &[u8],
        value: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StateError> {
        if value.len() < NONCE {
            return Err(self.corrupt(table));
        }
        let (nonce, sealed) = value.split_at(NONCE);
        let aad = [table.as_bytes(), b"\0", key].concat();
        self.seal
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| self.corrupt(table))
    }

    fn err<E: Into<redb::Error>>(&self, context: &'static str) -> impl Fn(E) -> StateError + Clone {
        let path = self.path.clone();
        move |e| db_error(&path, context)(e)
    }

    fn corrupt(&self, what: &'static str) -> StateError {
        StateError::Corrupt {
            path: self.path.clone(),
            what,
        }
    }
}

/// The keys of a device's state: for sealing values and for the keyed hashes of keys, both
/// derived from the device's node secrets.
#[derive(Clone)]
pub struct StateKeys {
    seal: XChaCha20Poly1305,
    mac: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for StateKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateKeys(..)")
    }
}

impl StateKeys {
    /// Derives them from the unlocked device.
    pub fn new(unlocked: &Unlocked) -> Self {
        let (seal, mac) = keys(unlocked);
        Self { seal, mac }
    }
}

/// The sealing key and the index key, from the device's node secrets.
fn keys(unlocked: &Unlocked) -> (XChaCha20Poly1305, Zeroizing<[u8; 32]>) {
    let node = &unlocked.secrets.node;
    let ikm = Zeroizing::new(
        [
            &node.signing.dangerous_seed()[..],
            &node.agreement.dangerous_bytes()[..],
        ]
        .concat(),
    );
    let hk = Hkdf::<Sha256>::new(Some(b"cellmesh home state v1"), &ikm);
    let mut seal = Zeroizing::new([0u8; 32]);
    let mut mac = Zeroizing::new([0u8; 32]);
    let ok = hk.expand(b"seal", &mut seal[..]).is_ok() && hk.expand(b"index", &mut mac[..]).is_ok();
    debug_assert!(ok, "32 bytes is a valid HKDF-SHA256 length");
    let seal = <XChaCha20Poly1305 as chacha20poly1305::KeyInit>::new_from_slice(&seal[..])
        .unwrap_or_else(|_| unreachable!("32 bytes is an XChaCha20-Poly1305 key"));
    (seal, mac)
}

fn seen_key(time: Timestamp, mac: &[u8; 16]) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&time.0.to_be_bytes());
    k[8..].copy_from_slice(mac);
    k
}

fn cell_of(plain: &[u8]) -> Option<(CellId, &[u8])> {
    let (cell, rest) = plain.split_at_checked(32)?;
    let cell: [u8; 32] = cell.try_into().ok()?;
    Some((
        CellId::from_key(PublicKey::from_bytes_unchecked(&cell)),
        rest,
    ))
}

fn session_key(b: &[u8]) -> Option<SessionKey> {
    let kind = *b.first()?;
    let node: [u8; 32] = b.get(1..33)?.try_into().ok()?;
    let session: [u8; 16] = b.get(33..49)?.try_into().ok()?;
    let node = NodeId::from_key(PublicKey::from_bytes_unchecked(&node));
    let session = cellmesh_core::e2e::SessionId(session);
    match kind {
        1 => Some(SessionKey::Outbound(node)),
        2 => Some(SessionKey::Inbound(node, session)),
        3 => Some(SessionKey::Retired(node, session)),
        _ => None,
    }
}

fn create_file(path: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let io = |action, path: &Path| {
        let path = path.to_owned();
        move |source| StateError::Io {
            action,
            path,
            source: Arc::new(source),
        }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("create directory", dir))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(io("create", path))
}

fn db_error<E: Into<redb::Error>>(
    path: &Path,
    context: &'static str,
) -> impl FnOnce(E) -> StateError {
    let path = path.to_owned();
    move |e| StateError::Db {
        path,
        context,
        source: Arc::new(e.into()),
    }
}

#[cfg(test)]
mod tests {
    //! The claims SECURITY.md makes of `state.redb` ("What the device keeps on disk").

    use super::*;

    fn keys(n: u8) -> StateKeys {
        StateKeys {
            seal: <XChaCha20Poly1305 as chacha20poly1305::KeyInit>::new_from_slice(&[n; 32])
                .unwrap(),
            mac: Zeroizing::new([n ^ 0x55; 32]),
        }
    }

    const BODY: &[u8] = b"a body that must never rest in clear";
    const SESSION_SECRET: &[u8] = b"session keys that must never rest in clear";

    fn cell() -> CellId {
        CellId::from_key(PublicKey::from_bytes_unchecked(&[0xc1; 32]))
    }

    fn ops() -> Vec<StoreOp> {
        let node = NodeId::from_key(PublicKey::from_bytes_unchecked(&[0xd2; 32]));
        vec![
            StoreOp::PutSession(
                SessionKey::Outbound(node),
                Zeroizing::new(SESSION_SECRET.to_vec()),
            ),
            StoreOp::Seen(SeenChange::Put {
                cell: cell(),
                id: MsgId([0xe3; 16]),
                time: Timestamp(1_800_000_000),
            }),
            StoreOp::PutSend(MsgId([0xf4; 16]), Zeroizing::new(BODY.to_vec())),
        ]
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn the_file_is_private_and_shows_no_body_session_id_or_cell() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let state = DeviceState::open_with(dir.path(), keys(1)).unwrap();
        state.commit(&ops()).unwrap();
        let saved = state.load().unwrap();
        assert_eq!(&saved.sends[0][..], BODY);
        assert_eq!(
            saved.seen,
            vec![(cell(), MsgId([0xe3; 16]), Timestamp(1_800_000_000))]
        );
        drop(state);
        let path = dir.path().join(STATE_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let file = std::fs::read(&path).unwrap();
        for (what, needle) in [
            ("a body", BODY),
            ("a session record", SESSION_SECRET),
            ("a message id", &[0xe3; 16][..]),
            ("a send's id", &[0xf4; 16][..]),
            ("a cell", &[0xc1; 32][..]),
            ("a node", &[0xd2; 32][..]),
        ] {
            assert!(!contains(&file, needle), "{what} in clear in the file");
        }
    }

    /// SECURITY.md, "Nonces": a fresh random 192-bit nonce for every value written, so the
    /// same value written twice at the same place is sealed under two nonces.
    #[test]
    fn every_value_is_sealed_under_a_nonce_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let state = DeviceState::open_with(dir.path(), keys(1)).unwrap();
        let sealed: Vec<Vec<u8>> = (0..64)
            .map(|_| state.seal_value("sends", &[7; 16], BODY))
            .collect();
        let nonces: std::collections::BTreeSet<&[u8]> =
            sealed.iter().map(|v| &v[..NONCE]).collect();
        assert_eq!(nonces.len(), sealed.len());
        for v in &sealed {
            assert_eq!(&state.open_value("sends", &[7; 16], v).unwrap()[..], BODY);
        }
    }

    #[test]
    fn a_value_moved_or_altered_does_not_open_and_the_error_names_the_file() {
        for tamper in ["move to another key", "move to another table", "flip a bit"] {
            let dir = tempfile::tempdir().unwrap();
            let state = DeviceState::open_with(dir.path(), keys(1)).unwrap();
            state.commit(&ops()).unwrap();
            let other = MsgId([0x77; 16]);
            state
                .commit(&[StoreOp::PutSend(other, Zeroizing::new(b"x".to_vec()))])
                .unwrap();
            let (k1, k2) = (state.mac(&[&[0xf4; 16]]), state.mac(&[&other.0]));
            let txn = state.db.begin_write().unwrap();
            {
                let mut sends = txn.open_table(SENDS).unwrap();
                let v = sends.get(&k1).unwrap().unwrap().value().to_vec();
                match tamper {
                    "move to another key" => {
                        sends.insert(&k2, &v[..]).unwrap();
                    }
                    "move to another table" => {
                        let mut floors = txn.open_table(FLOORS).unwrap();
                        floors.insert(&k1, &v[..]).unwrap();
                    }
                    _ => {
                        let mut bad = v.clone();
                        bad[NONCE + 3] ^= 1;
                        sends.insert(&k1, &bad[..]).unwrap();
                    }
                }
            }
            txn.commit().unwrap();
            let Err(err) = state.load() else {
                panic!("{tamper}: the state still loads");
            };
            assert!(matches!(err, StateError::Corrupt { .. }), "{tamper}: {err}");
            let path = dir.path().join(STATE_FILE);
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{tamper}: {err}"
            );
        }
    }

    #[test]
    fn one_process_at_a_time_and_a_state_of_another_device_is_begun_anew() {
        let dir = tempfile::tempdir().unwrap();
        let state = DeviceState::open_with(dir.path(), keys(1)).unwrap();
        state.commit(&ops()).unwrap();
        assert!(matches!(
            DeviceState::open_with(dir.path(), keys(1)),
            Err(StateError::Busy { .. })
        ));
        drop(state);
        // The home's keystore was replaced: what the file holds could only be read with the
        // old device's secrets. It is deleted, not misread.
        let state = DeviceState::open_with(dir.path(), keys(2)).unwrap();
        let saved = state.load().unwrap();
        assert!(saved.sessions.is_empty() && saved.seen.is_empty() && saved.sends.is_empty());
    }
}
