//! The relay's durable store: the directory of registered devices and the queues of envelopes
//! waiting for devices that are offline.
//!
//! A relay answers a FORWARD for an offline device with "queued" only once the envelope is in
//! this store, so a relay that restarts (or crashes) after that answer still delivers it. The
//! store is one [redb] file:
//!
//! ```text
//! table     key                                  value
//! devices   cell:[32] node:[32]                  last_seen:u64 token_len:u16 node_token identity
//! queue     device:[32] seq:u64                  id:[16] from:[32] expires_at:u64 envelope
//! by_id     device:[32] id:[16] from:[32]        seq:u64
//! expiry    expires_at:u64 device:[32] seq:u64   ()
//! revoked   cell:[32] node:[32]                  revocation token (signed by the cell)
//! meta      "format" | "next_seq"                u64
//! ```
//!
//! Integers are big-endian, so keys sort as numbers: a range scan over one device's prefix of
//! `queue` yields its messages oldest first, and a scan of `expiry` up to `now` finds every
//! expired message without reading the others. `seq` comes from one counter for the whole
//! store, kept in `meta` and only ever increased, so insertion order survives restarts.
//! `by_id` makes a retried FORWARD (same device, same id, same sender) a no-op, so that one
//! sender's id never hides another's message, and lets DELIVERED (which names ids only)
//! remove every message with an id by one range scan. `last_seen` (Unix seconds) is when the
//! device last joined, or was seen online by [`Store::touch_devices`].
//!
//! Data flows in three steps: [`Store::enqueue`] writes a batch of FORWARDs, [`Store::pending`]
//! reads what a reconnecting device should be sent, and [`Store::remove`] deletes what it
//! acknowledged; [`Store::expire`], run periodically, deletes what outlived the time to live,
//! and [`Store::forget_devices`] drops registrations that expired, with their queues.
//! [`Store::revoke`] keeps a cell's revocation of a device and drops the device's
//! registration and queue with it, in one durable transaction; [`Store::revocations`] reads
//! them back when the relay starts.
//!
//! # Formats
//!
//! `meta.format` is 3. A format-2 file (no `revoked` table) gets the empty table. A format-1
//! file (index keyed by device and id, devices without `last_seen`) is migrated too, in one
//! transaction: the index is rebuilt from the queue and every device gets `last_seen` = the
//! time of opening. Any other format is refused.
//!
//! # Durability
//!
//! Every method that writes does so in one redb write transaction and commits it before it
//! returns. redb commits with [`redb::Durability::Immediate`] by default: when `commit` returns
//! the data has been flushed to disk (`fsync`), and a crash at any point leaves either the whole
//! transaction or none of it. Queue writes and registrations never lower that (refreshes of
//! a device's `last_seen` do). So when [`Store::enqueue`] returns
//! `Ok(Enqueued::Stored)` for a message, it survives a crash or power loss. Batching many
//! FORWARDs into one call pays for one `fsync` instead of one each, which is where the
//! throughput comes from.
//!
//! A commit that fails ([`StoreError::Db`]) leaves the whole transaction applied or not, but
//! possibly on disk all the same: redb does not promise a rollback. A sender that was refused
//! retries with the same id, which is then either stored or found a [`Enqueued::Duplicate`],
//! so nothing is lost or doubled. After a failed commit redb refuses further writes until the
//! file is reopened: drop the [`Store`] and [`Store::open`] it again, which also recounts the
//! queues from what reached the disk.
//!
//! The file is checked in full (page checksums) every time it is opened, so a damaged file is
//! reported as an error instead of trusted; opening reads the whole queue anyway to rebuild the
//! per-device counters that bound it, so this costs one more pass over the file at start-up.
//!
//! # Bounds
//!
//! Each device's queue is bounded in messages and in envelope bytes ([`StoreLimits`]). The
//! counters that enforce the bounds live in memory, are rebuilt from the file when it is
//! opened, and change only after a commit succeeds, so they always describe what is on disk.
//! Expired messages count against the bounds until [`Store::expire`] deletes them.
//!
//! # Concurrency
//!
//! All methods are blocking and take `&self`; share the store in an `Arc` and call it from
//! `tokio::task::spawn_blocking`. Writers are serialised (as redb serialises write transactions
//! anyway); readers ([`Store::pending`], [`Store::devices`], [`Store::queued`]) never wait for a
//! writer's disk flush.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use cellmesh_core::Timestamp;
use cellmesh_core::id::{CellId, NodeId};
use cellmesh_core::keys::PublicKey;
use cellmesh_core::relay::server::{StoreOp, StoreResult, Stored, StoredEnvelope};
use cellmesh_core::relay::{MsgId, RefuseCode};
use redb::{
    ReadableDatabase as _, ReadableTable as _, ReadableTableMetadata as _, TableDefinition,
};

/// How much a relay keeps for each device, and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    /// Most messages queued for one device. Default 10 000.
    pub max_messages_per_device: usize,
    /// Most envelope bytes queued for one device. Default 64 MiB.
    pub max_bytes_per_device: u64,
    /// How long a queued message is kept before [`Store::expire`] deletes it. Default 7 days;
    /// counted in whole seconds.
    pub ttl: Duration,
    /// Memory the database may use for its page cache and write buffer. Default 32 MiB.
    pub cache_bytes: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_messages_per_device: 10_000,
            max_bytes_per_device: 64 * 1024 * 1024,
            ttl: Duration::from_secs(7 * 24 * 60 * 60),
            cache_bytes: 32 << 20,
        }
    }
}

/// A store operation failed.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The recipient's queue is at its bound in messages or bytes. The sender's fault (or
    /// the recipient's, for staying away); the same message may fit later.
    #[error("the queue of {device} is full")]
    QueueFull {
        /// The device whose queue is full.
        device: NodeId,
    },
    /// A node token too long for a store record (local misuse: tokens are far shorter).
    #[error("node token of {len} bytes is longer than the store allows ({max})", max = u16::MAX)]
    TokenTooLong {
        /// The token's length.
        len: usize,
    },
    /// The store's file or directory could not be created.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The database failed (disk full, I/O error, file locked by another process ...). The
    /// relay's fault, and maybe transient. A failed commit may still have reached the disk
    /// (see the module docs); after one, reopen the store.
    #[error("relay store: cannot {context}: {source}")]
    Db {
        /// What the store was doing.
        context: &'static str,
        /// The database's error.
        #[source]
        source: Arc<redb::Error>,
    },
    /// A stored record does not decode: the file was damaged or written by something else.
    #[error("relay store is corrupt: {0}")]
    Corrupt(&'static str),
}

impl StoreError {
    /// The REFUSED code a relay sends for a FORWARD that failed with this error.
    pub fn refuse_code(&self) -> RefuseCode {
        match self {
            Self::QueueFull { .. } => RefuseCode::QueueFull,
            _ => RefuseCode::Unavailable,
        }
    }
}

/// A message to queue: one FORWARD.
#[derive(Clone, Copy)]
pub struct NewMessage<'a> {
    /// The recipient device.
    pub to: NodeId,
    /// The sender's message id.
    pub id: MsgId,
    /// The sending device.
    pub from: NodeId,
    /// The end-to-end envelope, opaque to the relay.
    pub envelope: &'a [u8],
}

impl fmt::Debug for NewMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewMessage")
            .field("to", &self.to)
            .field("id", &self.id)
            .field("from", &self.from)
            .field("envelope_len", &self.envelope.len())
            .finish()
    }
}

/// What [`Store::enqueue`] did with one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// Written durably.
    Stored,
    /// That id from that sender is already queued for that device, byte for byte (a retried
    /// FORWARD); nothing was written.
    Duplicate,
    /// That id from that sender was queued for that device with another envelope (sealed
    /// again, after the device lost its session): the new one took its place, durably.
    Replaced,
}

/// The relay's durable store; see the [module docs](self) for the layout and guarantees.
pub struct Store {
    db: redb::Database,
    path: PathBuf,
    limits: StoreLimits,
    /// Held for the whole of every write that changes the queues, so that the bounds checked
    /// inside a transaction are those the counters show.
    writer: Mutex<Writer>,
    /// What is queued on disk, per device; changed only after a commit succeeds.
    usage: Mutex<HashMap<DeviceKey, Usage>>,
}

impl Store {
    /// Opens the store at `path`, creating the file (mode 0600) and its parent directories
    /// (mode 0700) if they are missing, and rebuilds the per-device counters from it.
    ///
    /// Fails with [`StoreError::Db`] if another process has the file open.
    pub fn open(path: &Path, limits: StoreLimits) -> Result<Self, StoreError> {
        Self::open_at(path, limits, crate::now())
    }

    /// [`Store::open`], with `now` the time a migration records as every device's `last_seen`.
    fn open_at(path: &Path, limits: StoreLimits, now: Timestamp) -> Result<Self, StoreError> {
        create_file(path)?;
        let db = redb::Builder::new()
            .set_check_integrity_on_open(true)
            .set_cache_size(limits.cache_bytes)
            .create(path)
            .map_err(db_error("open the database"))?;

        let txn = db.begin_write().map_err(db_error("begin a transaction"))?;
        let (usage, next_seq) = {
            let mut meta = txn.open_table(META).map_err(db_error("open a table"))?;
            let format = meta
                .get(FORMAT_KEY)
                .map_err(db_error("read the format"))?
                .map(|v| v.value());
            match format {
                Some(FORMAT) => {}
                // Format 2 lacked only the `revoked` table, which is created below.
                Some(2) => {
                    meta.insert(FORMAT_KEY, FORMAT)
                        .map_err(db_error("write the format"))?;
                    tracing::info!("relay store migrated from format 2 to {FORMAT}");
                }
                Some(1) => {
                    migrate_from_1(&txn, now)?;
                    meta.insert(FORMAT_KEY, FORMAT)
                        .map_err(db_error("write the format"))?;
                }
                Some(_) => return Err(StoreError::Corrupt("unknown store format")),
                None => {
                    let queue = txn.open_table(QUEUE).map_err(db_error("open a table"))?;
                    if !queue.is_empty().map_err(db_error("read the queue"))? {
                        return Err(StoreError::Corrupt("queue without a format"));
                    }
                    meta.insert(FORMAT_KEY, FORMAT)
                        .map_err(db_error("write the format"))?;
                }
            }
            // Opening a table creates it, so that read transactions later find all of them.
            txn.open_table(DEVICES).map_err(db_error("open a table"))?;
            txn.open_table(INDEX).map_err(db_error("open a table"))?;
            txn.open_table(EXPIRY).map_err(db_error("open a table"))?;
            txn.open_table(REVOKED).map_err(db_error("open a table"))?;
            let queue = txn.open_table(QUEUE).map_err(db_error("open a table"))?;
            let stored_next = meta
                .get(NEXT_SEQ_KEY)
                .map_err(db_error("read the sequence"))?
                .map_or(0, |v| v.value());
            let (usage, seen_next) = scan_queue(&queue)?;
            (usage, stored_next.max(seen_next))
        };
        txn.commit().map_err(db_error("commit"))?;

        tracing::debug!(
            path = %path.display(),
            devices = usage.len(),
            messages = usage.values().map(|u| u.count).sum::<usize>(),
            "relay store opened"
        );
        Ok(Self {
            db,
            path: path.to_owned(),
            limits,
            writer: Mutex::new(Writer { next_seq }),
            usage: Mutex::new(usage),
        })
    }

    /// Every registered (cell, device) pair and when the device was last seen, for a relay to
    /// know its devices after a restart.
    pub fn registered(&self) -> Result<Vec<(CellId, NodeId, Timestamp)>, StoreError> {
        let txn = self
            .db
            .begin_read()
            .map_err(db_error("begin a transaction"))?;
        let devices = txn.open_table(DEVICES).map_err(db_error("open a table"))?;
        let mut out = Vec::new();
        for entry in devices.iter().map_err(db_error("read devices"))? {
            let (key, value) = entry.map_err(db_error("read devices"))?;
            let last_seen = device_last_seen(value.value())?;
            let key = key.value();
            let part = |range: std::ops::Range<usize>| {
                let mut b = [0u8; 32];
                b.copy_from_slice(&key[range]);
                cellmesh_core::keys::PublicKey::from_bytes(&b)
                    .map_err(|_| StoreError::Corrupt("device key"))
            };
            out.push((
                CellId::from_key(part(0..32)?),
                NodeId::from_key(part(32..64)?),
                last_seen,
            ));
        }
        Ok(out)
    }

    /// Registers device `node` of `cell` with its node token and identity token, seen at
    /// `now`, replacing any earlier registration of the same pair, durably: a device that
    /// registered and went offline must still be in the directory after a crash.
    pub fn put_device(
        &self,
        cell: CellId,
        node: NodeId,
        node_token: &[u8],
        identity: &[u8],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.put_devices(&[(cell, node, node_token, identity, now)])
    }

    /// [`Store::put_device`] for many, in one transaction.
    pub fn put_devices(&self, devices: &[NewDevice<'_>]) -> Result<(), StoreError> {
        // Durable, as queue writes are: a device that registered and went offline must
        // still be in the directory after a crash (its senders would find no device).
        let txn = self
            .db
            .begin_write()
            .map_err(db_error("begin a transaction"))?;
        {
            let mut table = txn.open_table(DEVICES).map_err(db_error("open a table"))?;
            for &(cell, node, node_token, identity, now) in devices {
                let len =
                    u16::try_from(node_token.len()).map_err(|_| StoreError::TokenTooLong {
                        len: node_token.len(),
                    })?;
                let mut value = Vec::with_capacity(8 + 2 + node_token.len() + identity.len());
                value.extend_from_slice(&now.0.to_be_bytes());
                value.extend_from_slice(&len.to_be_bytes());
                value.extend_from_slice(node_token);
                value.extend_from_slice(identity);
                table
                    .insert(&device_key(cell, node), value.as_slice())
                    .map_err(db_error("write a device"))?;
            }
        }
        txn.commit().map_err(db_error("commit"))
    }

    /// The `(node_token, identity)` of every device registered in `cell`, ordered by node key.
    pub fn devices(&self, cell: CellId) -> Result<Vec<TokenPair>, StoreError> {
        let txn = self
            .db
            .begin_read()
            .map_err(db_error("begin a transaction"))?;
        let devices = txn.open_table(DEVICES).map_err(db_error("open a table"))?;
        let low = device_key_bytes(cell.key().as_bytes(), &[0; 32]);
        let high = device_key_bytes(cell.key().as_bytes(), &[0xff; 32]);
        let mut out = Vec::new();
        for entry in devices
            .range::<&[u8; DEVICE_KEY_LEN]>(&low..=&high)
            .map_err(db_error("read devices"))?
        {
            let (_, value) = entry.map_err(db_error("read devices"))?;
            out.push(decode_device(value.value())?);
        }
        Ok(out)
    }

    /// Sets `last_seen` of these registered devices to `now` (in one transaction); pairs not
    /// registered are ignored.
    pub fn touch_devices(
        &self,
        devices: &[(CellId, NodeId)],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        if devices.is_empty() {
            return Ok(());
        }
        let txn = self.registration_txn()?;
        {
            let mut table = txn.open_table(DEVICES).map_err(db_error("open a table"))?;
            for &(cell, node) in devices {
                let key = device_key(cell, node);
                let Some(mut value) = table
                    .get(&key)
                    .map_err(db_error("read devices"))?
                    .map(|v| v.value().to_vec())
                else {
                    continue;
                };
                if value.len() < 8 {
                    return Err(StoreError::Corrupt("device record too short"));
                }
                value[..8].copy_from_slice(&now.0.to_be_bytes());
                table
                    .insert(&key, value.as_slice())
                    .map_err(db_error("write a device"))?;
            }
        }
        txn.commit().map_err(db_error("commit"))
    }

    /// Drops these registrations and everything queued for their devices, in one transaction;
    /// returns how many messages went with them.
    pub fn forget_devices(&self, devices: &[(CellId, NodeId)]) -> Result<usize, StoreError> {
        if devices.is_empty() {
            return Ok(0);
        }
        self.forget_with(devices, None)
    }

    /// Keeps `revocation` (a token in its encoding) of `node` by `cell`, and drops the
    /// device's registration and everything queued for it, in one transaction committed
    /// durably before this returns; returns how many messages went. Keeping the same pair
    /// again replaces the token.
    pub fn revoke(
        &self,
        cell: CellId,
        node: NodeId,
        revocation: &[u8],
    ) -> Result<usize, StoreError> {
        self.forget_with(&[(cell, node)], Some(revocation))
    }

    /// Every revocation kept, as tokens in their encoding, ordered by cell and device.
    pub fn revocations(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let txn = self
            .db
            .begin_read()
            .map_err(db_error("begin a transaction"))?;
        let table = txn.open_table(REVOKED).map_err(db_error("open a table"))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_error("read revocations"))? {
            let (_, value) = entry.map_err(db_error("read revocations"))?;
            out.push(value.value().to_vec());
        }
        Ok(out)
    }

    /// [`Store::forget_devices`], keeping a revocation of the (single) device in the same
    /// transaction when there is one.
    fn forget_with(
        &self,
        devices: &[(CellId, NodeId)],
        revocation: Option<&[u8]>,
    ) -> Result<usize, StoreError> {
        let _writer = lock(&self.writer);
        let txn = self
            .db
            .begin_write()
            .map_err(db_error("begin a transaction"))?;
        if let (Some(token), [(cell, node)]) = (revocation, devices) {
            let mut revoked = txn.open_table(REVOKED).map_err(db_error("open a table"))?;
            revoked
                .insert(&device_key(*cell, *node), token)
                .map_err(db_error("write a revocation"))?;
        }
        let mut dropped = 0;
        let mut emptied = Vec::new();
        {
            let mut table = txn.open_table(DEVICES).map_err(db_error("open a table"))?;
            let mut tables = WriteTables::open(&txn)?;
            for &(cell, node) in devices {
                table
                    .remove(&device_key(cell, node))
                    .map_err(db_error("remove a device"))?;
                let device = *node.key().as_bytes();
                let low = queue_key(&device, 0);
                let high = queue_key(&device, u64::MAX);
                let seqs = tables
                    .queue
                    .range::<&[u8; QUEUE_KEY_LEN]>(&low..=&high)
                    .map_err(db_error("read the queue"))?
                    .map(|entry| entry.map(|(key, _)| split_queue_key(key.value()).1))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db_error("read the queue"))?;
                for seq in seqs {
                    if let Some(record) = tables.remove_message(&device, seq)? {
                        tables
                            .index
                            .remove(&index_key(&device, record.id, &record.from))
                            .map_err(db_error("remove a message"))?;
                        dropped += 1;
                    }
                }
                emptied.push(device);
            }
        }
        txn.commit().map_err(db_error("commit"))?;
        let mut usage = lock(&self.usage);
        for device in emptied {
            usage.remove(&device);
        }
        Ok(dropped)
    }

    /// Removes the registration of `node` in `cell`; returns whether there was one. Messages
    /// queued for the device stay until they are delivered or expire.
    pub fn remove_device(&self, cell: CellId, node: NodeId) -> Result<bool, StoreError> {
        let txn = self
            .db
            .begin_write()
            .map_err(db_error("begin a transaction"))?;
        let removed = {
            let mut devices = txn.open_table(DEVICES).map_err(db_error("open a table"))?;
            devices
                .remove(&device_key(cell, node))
                .map_err(db_error("remove a device"))?
                .is_some()
        };
        if !removed {
            return Ok(false);
        }
        txn.commit().map_err(db_error("commit"))?;
        Ok(true)
    }

    /// Queues a batch of messages, in one transaction committed durably before this returns,
    /// and says for each what became of it (same order as `batch`).
    ///
    /// A message is kept until `now` plus the time to live. One that would take its device's
    /// queue over a bound gets [`StoreError::QueueFull`] and is not written; the others still
    /// are. An id already queued for the same device (also earlier in the same batch) gets
    /// [`Enqueued::Duplicate`]. If the transaction fails, every message gets the same
    /// [`StoreError::Db`]: refuse them all, and let senders retry (see the module docs on
    /// failed commits).
    pub fn enqueue(
        &self,
        now: Timestamp,
        batch: &[NewMessage<'_>],
    ) -> Vec<Result<Enqueued, StoreError>> {
        if batch.is_empty() {
            return Vec::new();
        }
        let mut writer = lock(&self.writer);
        match self.enqueue_in_transaction(&mut writer, now, batch) {
            Ok(results) => results,
            Err(e) => std::iter::repeat_n(Err(e), batch.len()).collect(),
        }
    }

    /// Up to `limit` messages queued for `device` that have not expired at `now`, oldest
    /// first, and no more once their envelopes reach `max_bytes` (always at least one).
    pub fn pending(
        &self,
        device: NodeId,
        now: Timestamp,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let mut bytes = 0usize;
        let mut senders = HashMap::new();
        let txn = self
            .db
            .begin_read()
            .map_err(db_error("begin a transaction"))?;
        let queue = txn.open_table(QUEUE).map_err(db_error("open a table"))?;
        let device = device.key();
        let low = queue_key(device.as_bytes(), 0);
        let high = queue_key(device.as_bytes(), u64::MAX);
        for entry in queue
            .range::<&[u8; QUEUE_KEY_LEN]>(&low..=&high)
            .map_err(db_error("read the queue"))?
        {
            let (_, value) = entry.map_err(db_error("read the queue"))?;
            let record = Record::decode(value.value())?;
            if is_expired(record.expires_at, now) {
                continue;
            }
            bytes = bytes.saturating_add(record.envelope.len());
            out.push(record.to_queued(&mut senders)?);
            if out.len() == limit || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Deletes the messages with these ids, from any sender, from `device`'s queue, in one
    /// transaction; returns how many were queued. Ids not queued (already removed, never
    /// stored) are ignored.
    pub fn remove(&self, device: NodeId, ids: &[MsgId]) -> Result<usize, StoreError> {
        Ok(self.remove_many(&[(device, Removal::Any(ids))])?[0])
    }

    /// [`Store::remove`] for many devices, in one transaction (one `fsync` for all), each by
    /// ids from any sender or by (id, sender) pairs; returns how many were removed for each.
    pub fn remove_many(&self, batch: &[(NodeId, Removal<'_>)]) -> Result<Vec<usize>, StoreError> {
        let _writer = lock(&self.writer);
        let txn = self
            .db
            .begin_write()
            .map_err(db_error("begin a transaction"))?;
        let mut freed: Vec<(DeviceKey, Usage)> = Vec::with_capacity(batch.len());
        {
            let mut tables = WriteTables::open(&txn)?;
            for (device, removal) in batch {
                let device = *device.key().as_bytes();
                let mut f = Usage::default();
                let keys: Vec<(MsgId, [u8; KEY_LEN], [u8; KEY_LEN])> = match removal {
                    Removal::Any(ids) => ids
                        .iter()
                        .map(|id| (*id, [0; KEY_LEN], [0xff; KEY_LEN]))
                        .collect(),
                    Removal::From(items) => items
                        .iter()
                        .map(|(id, from)| (*id, *from.key().as_bytes(), *from.key().as_bytes()))
                        .collect(),
                };
                for (id, lo, hi) in keys {
                    let low = index_key(&device, id, &lo);
                    let high = index_key(&device, id, &hi);
                    let found = tables
                        .index
                        .range::<&[u8; INDEX_KEY_LEN]>(&low..=&high)
                        .map_err(db_error("read the index"))?
                        .map(|entry| entry.map(|(key, seq)| (*key.value(), seq.value())))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(db_error("read the index"))?;
                    for (key, seq) in found {
                        tables
                            .index
                            .remove(&key)
                            .map_err(db_error("remove a message"))?;
                        if let Some(record) = tables.remove_message(&device, seq)? {
                            f.add(record.envelope_len);
                        }
                    }
                }
                freed.push((device, f));
            }
        }
        let counts: Vec<usize> = freed.iter().map(|(_, f)| f.count).collect();
        if counts.iter().all(|c| *c == 0) {
            return Ok(counts);
        }
        txn.commit().map_err(db_error("commit"))?;
        {
            let mut usage = lock(&self.usage);
            for (device, f) in &freed {
                if f.count > 0 {
                    usage.entry(*device).or_default().subtract(*f);
                }
            }
        }
        let devices: Vec<DeviceKey> = freed.into_iter().map(|(d, _)| d).collect();
        self.forget_empty(&devices);
        Ok(counts)
    }

    /// Deletes every message that has expired at `now`, in one transaction; returns how many.
    pub fn expire(&self, now: Timestamp) -> Result<usize, StoreError> {
        let _writer = lock(&self.writer);
        let txn = self
            .db
            .begin_write()
            .map_err(db_error("begin a transaction"))?;
        let mut freed: HashMap<DeviceKey, Usage> = HashMap::new();
        let mut dangling = false;
        {
            let mut tables = WriteTables::open(&txn)?;
            // Expired means `expires_at <= now`: every key up to `now` followed by all ones.
            let mut high = [0xff; EXPIRY_KEY_LEN];
            high[..8].copy_from_slice(&now.0.to_be_bytes());
            loop {
                let keys = tables
                    .expiry
                    .range::<&[u8; EXPIRY_KEY_LEN]>(..=&high)
                    .map_err(db_error("read expiries"))?
                    .take(EXPIRE_CHUNK)
                    .map(|entry| entry.map(|(key, _)| *key.value()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db_error("read expiries"))?;
                if keys.is_empty() {
                    break;
                }
                for key in keys {
                    let (device, seq) = split_expiry_key(&key);
                    // Removes the expiry entry too.
                    if let Some(record) = tables.remove_message(&device, seq)? {
                        tables
                            .index
                            .remove(&index_key(&device, record.id, &record.from))
                            .map_err(db_error("remove a message"))?;
                        freed.entry(device).or_default().add(record.envelope_len);
                    } else {
                        // An expiry entry whose message is gone: drop it so the loop ends.
                        dangling = true;
                        tables
                            .expiry
                            .remove(&key)
                            .map_err(db_error("remove an expiry"))?;
                    }
                }
            }
        }
        let count = freed.values().map(|u| u.count).sum();
        if count == 0 && !dangling {
            return Ok(0);
        }
        txn.commit().map_err(db_error("commit"))?;
        {
            let mut usage = lock(&self.usage);
            for (device, f) in &freed {
                usage.entry(*device).or_default().subtract(*f);
            }
        }
        self.forget_empty(&freed.into_keys().collect::<Vec<_>>());
        tracing::debug!(count, "expired queued messages");
        Ok(count)
    }

    /// Carries out a relay server's operations in order (see
    /// [`cellmesh_core::relay::server`]) and says what came of each. A run of consecutive
    /// operations of one kind that writes (queueing, deleting what was delivered,
    /// registering) is committed in one transaction: one `fsync` for all of them. Each
    /// read sees every write before it.
    pub fn apply(&self, ops: &[StoreOp]) -> Vec<StoreResult> {
        let mut results = Vec::with_capacity(ops.len());
        let mut i = 0;
        while i < ops.len() {
            let run = ops[i..]
                .iter()
                .take_while(|op| std::mem::discriminant(*op) == std::mem::discriminant(&ops[i]))
                .count();
            let batch = &ops[i..i + run];
            match &ops[i] {
                StoreOp::Enqueue { .. } => self.apply_enqueues(batch, &mut results),
                StoreOp::Remove { .. } => {
                    let list: Vec<(NodeId, &[(MsgId, NodeId)])> = batch
                        .iter()
                        .filter_map(|op| match op {
                            StoreOp::Remove { device, items } => Some((*device, items.as_slice())),
                            _ => None,
                        })
                        .collect();
                    let list: Vec<(NodeId, Removal<'_>)> = list
                        .into_iter()
                        .map(|(d, items)| (d, Removal::From(items)))
                        .collect();
                    match self.remove_many(&list) {
                        Ok(counts) => results.extend(counts.into_iter().map(StoreResult::Removed)),
                        Err(e) => results.extend(batch.iter().map(|_| failed(&e))),
                    }
                }
                StoreOp::PutDevice { .. } => {
                    let list: Vec<NewDevice<'_>> = batch
                        .iter()
                        .filter_map(|op| match op {
                            StoreOp::PutDevice {
                                cell,
                                node,
                                node_token,
                                identity,
                                now,
                            } => Some((*cell, *node, &node_token[..], &identity[..], *now)),
                            _ => None,
                        })
                        .collect();
                    let r = match self.put_devices(&list) {
                        Ok(()) => StoreResult::Done,
                        Err(e) => failed(&e),
                    };
                    results.extend(batch.iter().map(|_| r.clone()));
                }
                StoreOp::Devices { .. }
                | StoreOp::Pending { .. }
                | StoreOp::Expire { .. }
                | StoreOp::Revoke { .. }
                | StoreOp::Sweep { .. } => {
                    results.extend(batch.iter().map(|op| self.apply_one(op)));
                }
            }
            i += run;
        }
        results
    }

    /// Consecutive [`StoreOp::Enqueue`]s, as one batch.
    fn apply_enqueues(&self, batch: &[StoreOp], results: &mut Vec<StoreResult>) {
        let mut messages = Vec::new();
        let mut sizes = Vec::with_capacity(batch.len());
        let mut now = Timestamp(0);
        for op in batch {
            if let StoreOp::Enqueue { now: at, envelopes } = op {
                now = now.max(*at);
                sizes.push(envelopes.len());
                messages.extend(envelopes.iter().map(|e| NewMessage {
                    to: e.to,
                    id: e.id,
                    from: e.from,
                    envelope: &e.envelope,
                }));
            }
        }
        let mut all = self.enqueue(now, &messages).into_iter().map(|r| {
            r.map(|e| match e {
                Enqueued::Stored => Stored::Stored,
                Enqueued::Duplicate => Stored::Duplicate,
                Enqueued::Replaced => Stored::Replaced,
            })
            .map_err(|e| e.refuse_code())
        });
        for n in sizes {
            results.push(StoreResult::Enqueued(all.by_ref().take(n).collect()));
        }
    }

    fn apply_one(&self, op: &StoreOp) -> StoreResult {
        let r = match op {
            StoreOp::Devices { cell } => self.devices(*cell).map(StoreResult::Devices),
            StoreOp::Pending {
                device,
                now,
                limit,
                max_bytes,
            } => self
                .pending(*device, *now, *limit, *max_bytes)
                .map(StoreResult::Pending),
            StoreOp::Expire { now } => self.expire(*now).map(StoreResult::Count),
            StoreOp::Revoke {
                cell,
                node,
                revocation,
            } => self
                .revoke(*cell, *node, revocation)
                .map(StoreResult::Count),
            StoreOp::Sweep { touch, forget, now } => self
                .touch_devices(touch, *now)
                .and_then(|()| self.forget_devices(forget))
                .map(StoreResult::Count),
            // Writes that `apply` batches (it never hands them here).
            StoreOp::Enqueue { .. } | StoreOp::Remove { .. } | StoreOp::PutDevice { .. } => {
                return self
                    .apply(std::slice::from_ref(op))
                    .pop()
                    .unwrap_or(StoreResult::Done);
            }
        };
        r.unwrap_or_else(|e| failed(&e))
    }

    /// Every device with something queued (expired messages included until
    /// [`Store::expire`] deletes them), in key order. Never touches the disk.
    pub fn queued_devices(&self) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = lock(&self.usage)
            .iter()
            .filter(|(_, u)| u.count > 0)
            .filter_map(|(k, _)| PublicKey::from_bytes(k).ok().map(NodeId::from_key))
            .collect();
        out.sort();
        out
    }

    /// How many messages, and how many envelope bytes, are queued for `device` (expired ones
    /// included until [`Store::expire`] deletes them). Never touches the disk.
    pub fn queued(&self, device: NodeId) -> (usize, u64) {
        lock(&self.usage)
            .get(device.key().as_bytes())
            .map_or((0, 0), |u| (u.count, u.bytes))
    }

    /// A write transaction for `last_seen` refreshes, committed without waiting for the disk:
    /// one lost in a crash costs a device at most a sweep's worth of its time to live, and
    /// the next durable commit takes it to disk too. Registrations themselves are durable
    /// ([`Store::put_devices`]): a relay that forgot one after a crash listed no device of a
    /// cell whose devices were away, so its senders were told the cell was unknown.
    fn registration_txn(&self) -> Result<redb::WriteTransaction, StoreError> {
        let mut txn = self
            .db
            .begin_write()
            .map_err(db_error("begin a transaction"))?;
        txn.set_durability(redb::Durability::None)
            .map_err(db_error("set the durability"))?;
        Ok(txn)
    }

    /// The body of [`Store::enqueue`]: any error aborts the whole batch.
    fn enqueue_in_transaction(
        &self,
        writer: &mut Writer,
        now: Timestamp,
        batch: &[NewMessage<'_>],
    ) -> Result<Vec<Result<Enqueued, StoreError>>, StoreError> {
        let expires_at = now.plus(self.limits.ttl.as_secs());
        let txn = self
            .db
            .begin_write()
            .map_err(db_error("begin a transaction"))?;
        let mut results = Vec::with_capacity(batch.len());
        // What each device touched by the batch will have queued once it commits.
        let mut after: HashMap<DeviceKey, Usage> = HashMap::new();
        let mut next_seq = writer.next_seq;
        let mut wrote = false;
        {
            let mut tables = WriteTables::open(&txn)?;
            let mut value = Vec::new();
            for msg in batch {
                let device = *msg.to.key().as_bytes();
                let index_key = index_key(&device, msg.id, msg.from.key().as_bytes());
                let usage = after
                    .entry(device)
                    .or_insert_with(|| lock(&self.usage).get(&device).copied().unwrap_or_default());
                let len = msg.envelope.len() as u64;
                let known = tables
                    .index
                    .get(&index_key)
                    .map_err(db_error("read the index"))?
                    .map(|v| v.value());
                if let Some(seq) = known {
                    // The same envelope again is a retry; another one (sealed again for a
                    // device that lost its session) takes the old one's place, keeping its
                    // position and its expiry: the old one could never be opened.
                    let key = queue_key(&device, seq);
                    let (same, old_len, expires) = {
                        let old = tables
                            .queue
                            .get(&key)
                            .map_err(db_error("read a message"))?
                            .ok_or(StoreError::Corrupt("index without its message"))?;
                        let old = Record::decode(old.value())?;
                        (
                            old.envelope == msg.envelope,
                            old.envelope.len() as u64,
                            old.expires_at,
                        )
                    };
                    if same {
                        results.push(Ok(Enqueued::Duplicate));
                        continue;
                    }
                    if usage.bytes.saturating_sub(old_len).saturating_add(len)
                        > self.limits.max_bytes_per_device
                    {
                        results.push(Err(StoreError::QueueFull { device: msg.to }));
                        continue;
                    }
                    Record::encode(&mut value, msg.id, msg.from, expires, msg.envelope);
                    tables
                        .queue
                        .insert(&key, value.as_slice())
                        .map_err(db_error("write a message"))?;
                    usage.bytes = usage.bytes - old_len + len;
                    wrote = true;
                    results.push(Ok(Enqueued::Replaced));
                    continue;
                }
                if usage.count >= self.limits.max_messages_per_device
                    || usage.bytes.saturating_add(len) > self.limits.max_bytes_per_device
                {
                    results.push(Err(StoreError::QueueFull { device: msg.to }));
                    continue;
                }

                let seq = next_seq;
                next_seq = seq
                    .checked_add(1)
                    .ok_or(StoreError::Corrupt("message sequence exhausted"))?;
                Record::encode(&mut value, msg.id, msg.from, expires_at, msg.envelope);
                tables
                    .queue
                    .insert(&queue_key(&device, seq), value.as_slice())
                    .map_err(db_error("write a message"))?;
                tables
                    .index
                    .insert(&index_key, seq)
                    .map_err(db_error("write the index"))?;
                tables
                    .expiry
                    .insert(&expiry_key(expires_at, &device, seq), ())
                    .map_err(db_error("write an expiry"))?;
                usage.add(len);
                results.push(Ok(Enqueued::Stored));
            }
            if next_seq == writer.next_seq && !wrote {
                // Nothing to write: skip the commit and its flush.
                return Ok(results);
            }
            tables
                .meta
                .insert(NEXT_SEQ_KEY, next_seq)
                .map_err(db_error("write the sequence"))?;
        }
        txn.commit().map_err(db_error("commit"))?;
        writer.next_seq = next_seq;
        // A device whose every message was refused may have an empty entry: leave it out.
        lock(&self.usage).extend(after.into_iter().filter(|(_, u)| u.count > 0));
        Ok(results)
    }

    /// Drops the counters of these devices if their queues are empty, so the map does not grow
    /// with every device ever seen.
    fn forget_empty(&self, devices: &[DeviceKey]) {
        let mut usage = lock(&self.usage);
        for device in devices {
            if usage.get(device).is_some_and(|u| u.count == 0) {
                usage.remove(device);
            }
        }
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (devices, messages) = {
            let usage = lock(&self.usage);
            (usage.len(), usage.values().map(|u| u.count).sum::<usize>())
        };
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("limits", &self.limits)
            .field("devices_with_queue", &devices)
            .field("messages_queued", &messages)
            .finish_non_exhaustive()
    }
}

// ---- layout ----

const DEVICES: TableDefinition<&[u8; DEVICE_KEY_LEN], &[u8]> = TableDefinition::new("devices");
const QUEUE: TableDefinition<&[u8; QUEUE_KEY_LEN], &[u8]> = TableDefinition::new("queue");
const INDEX: TableDefinition<&[u8; INDEX_KEY_LEN], u64> = TableDefinition::new("by_id");
/// Format 1's index, keyed by device and id only; deleted by the migration.
const INDEX_1: TableDefinition<&[u8; KEY_LEN + ID_LEN], u64> = TableDefinition::new("index");
const EXPIRY: TableDefinition<&[u8; EXPIRY_KEY_LEN], ()> = TableDefinition::new("expiry");
const REVOKED: TableDefinition<&[u8; DEVICE_KEY_LEN], &[u8]> = TableDefinition::new("revoked");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const FORMAT_KEY: &str = "format";
const NEXT_SEQ_KEY: &str = "next_seq";
/// The layout above; formats 1 and 2 are migrated, any other refused.
const FORMAT: u64 = 3;

const KEY_LEN: usize = 32;
const ID_LEN: usize = 16;
const DEVICE_KEY_LEN: usize = 2 * KEY_LEN;
const QUEUE_KEY_LEN: usize = KEY_LEN + 8;
const INDEX_KEY_LEN: usize = KEY_LEN + ID_LEN + KEY_LEN;
const EXPIRY_KEY_LEN: usize = 8 + KEY_LEN + 8;
/// `id ‖ from ‖ expires_at` before the envelope in a queue value.
const RECORD_HEADER_LEN: usize = ID_LEN + KEY_LEN + 8;

/// How many expired messages [`Store::expire`] collects before deleting them.
const EXPIRE_CHUNK: usize = 4096;

/// A device's public key bytes: the counters and keys are indexed by these, so that opening
/// a store does not decompress a curve point per message.
type DeviceKey = [u8; KEY_LEN];

/// A registered device's `(node_token, identity)`.
type TokenPair = (Vec<u8>, Vec<u8>);

/// What [`Store::remove_many`] deletes from one device's queue.
#[derive(Clone, Copy, Debug)]
pub enum Removal<'a> {
    /// Every message with one of these ids, from any sender.
    Any(&'a [MsgId]),
    /// Exactly these messages, each by its id and its sender.
    From(&'a [(MsgId, NodeId)]),
}

/// A store error as a relay server's operation reports it.
fn failed(e: &StoreError) -> StoreResult {
    StoreResult::Failed(e.to_string())
}

/// A registration to write: cell, device, node token, identity token, seen at.
pub type NewDevice<'a> = (CellId, NodeId, &'a [u8], &'a [u8], Timestamp);

/// State only writers touch, under the writer lock.
struct Writer {
    /// The `seq` the next queued message gets.
    next_seq: u64,
}

/// What one device has queued.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Usage {
    count: usize,
    bytes: u64,
}

impl Usage {
    fn add(&mut self, envelope_len: u64) {
        self.count = self.count.saturating_add(1);
        self.bytes = self.bytes.saturating_add(envelope_len);
    }

    fn subtract(&mut self, other: Usage) {
        self.count = self.count.saturating_sub(other.count);
        self.bytes = self.bytes.saturating_sub(other.bytes);
    }
}

/// The tables a queue write touches, open in one write transaction.
struct WriteTables<'txn> {
    queue: redb::Table<'txn, &'static [u8; QUEUE_KEY_LEN], &'static [u8]>,
    index: redb::Table<'txn, &'static [u8; INDEX_KEY_LEN], u64>,
    expiry: redb::Table<'txn, &'static [u8; EXPIRY_KEY_LEN], ()>,
    meta: redb::Table<'txn, &'static str, u64>,
}

impl<'txn> WriteTables<'txn> {
    fn open(txn: &'txn redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            queue: txn.open_table(QUEUE).map_err(db_error("open a table"))?,
            index: txn.open_table(INDEX).map_err(db_error("open a table"))?,
            expiry: txn.open_table(EXPIRY).map_err(db_error("open a table"))?,
            meta: txn.open_table(META).map_err(db_error("open a table"))?,
        })
    }

    /// Removes message `seq` of `device` from `queue` and `expiry` (the caller handles
    /// `index`); returns what it held, or `None` if it was not there.
    fn remove_message(
        &mut self,
        device: &DeviceKey,
        seq: u64,
    ) -> Result<Option<RecordHeader>, StoreError> {
        let header = match self
            .queue
            .remove(&queue_key(device, seq))
            .map_err(db_error("remove a message"))?
        {
            Some(value) => RecordHeader::decode(value.value())?,
            None => return Ok(None),
        };
        self.expiry
            .remove(&expiry_key(header.expires_at, device, seq))
            .map_err(db_error("remove an expiry"))?;
        Ok(Some(header))
    }
}

/// A queue value, borrowed from the database.
struct Record<'a> {
    id: MsgId,
    from: &'a [u8; KEY_LEN],
    expires_at: Timestamp,
    envelope: &'a [u8],
}

impl<'a> Record<'a> {
    /// Writes `id ‖ from ‖ expires_at ‖ envelope` into `out`, replacing what it held.
    fn encode(out: &mut Vec<u8>, id: MsgId, from: NodeId, expires_at: Timestamp, envelope: &[u8]) {
        out.clear();
        out.reserve(RECORD_HEADER_LEN + envelope.len());
        out.extend_from_slice(&id.0);
        out.extend_from_slice(from.key().as_bytes());
        out.extend_from_slice(&expires_at.0.to_be_bytes());
        out.extend_from_slice(envelope);
    }

    fn decode(value: &'a [u8]) -> Result<Self, StoreError> {
        const SHORT: StoreError = StoreError::Corrupt("queued message too short");
        let (id, rest) = value.split_first_chunk::<ID_LEN>().ok_or(SHORT)?;
        let (from, rest) = rest.split_first_chunk::<KEY_LEN>().ok_or(SHORT)?;
        let (expires_at, envelope) = rest.split_first_chunk::<8>().ok_or(SHORT)?;
        Ok(Self {
            id: MsgId(*id),
            from,
            expires_at: Timestamp(u64::from_be_bytes(*expires_at)),
            envelope,
        })
    }

    /// The record as the relay server reads it. `senders` caches parsed sender keys: parsing checks a curve
    /// point, which costs more than the rest of reading a message, and a queue usually holds
    /// many messages from few senders.
    fn to_queued(
        &self,
        senders: &mut HashMap<DeviceKey, NodeId>,
    ) -> Result<StoredEnvelope, StoreError> {
        let from = match senders.get(self.from) {
            Some(from) => *from,
            None => {
                let key = PublicKey::from_bytes(self.from)
                    .map_err(|_| StoreError::Corrupt("queued message has an invalid sender key"))?;
                let from = NodeId::from_key(key);
                senders.insert(*self.from, from);
                from
            }
        };
        Ok(StoredEnvelope {
            id: self.id,
            from,
            envelope: Bytes::copy_from_slice(self.envelope),
        })
    }
}

/// What a removal needs of a queue value: no copy of the envelope.
struct RecordHeader {
    id: MsgId,
    from: DeviceKey,
    expires_at: Timestamp,
    envelope_len: u64,
}

impl RecordHeader {
    fn decode(value: &[u8]) -> Result<Self, StoreError> {
        let record = Record::decode(value)?;
        Ok(Self {
            id: record.id,
            from: *record.from,
            expires_at: record.expires_at,
            envelope_len: record.envelope.len() as u64,
        })
    }
}

/// Turns a format-1 file into this format within `txn`: the index rebuilt from the queue
/// with senders in its keys, and `last_seen` = `now` put before every device's tokens.
fn migrate_from_1(txn: &redb::WriteTransaction, now: Timestamp) -> Result<(), StoreError> {
    txn.delete_table(INDEX_1)
        .map_err(db_error("delete the old index"))?;
    let mut index = txn.open_table(INDEX).map_err(db_error("open a table"))?;
    let queue = txn.open_table(QUEUE).map_err(db_error("open a table"))?;
    for entry in queue.iter().map_err(db_error("read the queue"))? {
        let (key, value) = entry.map_err(db_error("read the queue"))?;
        let (device, seq) = split_queue_key(key.value());
        let record = RecordHeader::decode(value.value())?;
        index
            .insert(&index_key(&device, record.id, &record.from), seq)
            .map_err(db_error("write the index"))?;
    }
    let mut devices = txn.open_table(DEVICES).map_err(db_error("open a table"))?;
    let old = devices
        .iter()
        .map_err(db_error("read devices"))?
        .map(|entry| entry.map(|(k, v)| (*k.value(), v.value().to_vec())))
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_error("read devices"))?;
    for (key, value) in old {
        let mut v = Vec::with_capacity(8 + value.len());
        v.extend_from_slice(&now.0.to_be_bytes());
        v.extend_from_slice(&value);
        devices
            .insert(&key, v.as_slice())
            .map_err(db_error("write a device"))?;
    }
    tracing::info!("relay store migrated from format 1 to {FORMAT}");
    Ok(())
}

/// Reads the whole queue: what each device has queued, and the first `seq` above all in use.
fn scan_queue(
    queue: &impl redb::ReadableTable<&'static [u8; QUEUE_KEY_LEN], &'static [u8]>,
) -> Result<(HashMap<DeviceKey, Usage>, u64), StoreError> {
    let mut usage: HashMap<DeviceKey, Usage> = HashMap::new();
    let mut next_seq = 0u64;
    for entry in queue.iter().map_err(db_error("read the queue"))? {
        let (key, value) = entry.map_err(db_error("read the queue"))?;
        let (device, seq) = split_queue_key(key.value());
        let value = value.value();
        if value.len() < RECORD_HEADER_LEN {
            return Err(StoreError::Corrupt("queued message too short"));
        }
        usage
            .entry(device)
            .or_default()
            .add((value.len() - RECORD_HEADER_LEN) as u64);
        next_seq = next_seq.max(seq.saturating_add(1));
    }
    Ok((usage, next_seq))
}

fn is_expired(expires_at: Timestamp, now: Timestamp) -> bool {
    expires_at <= now
}

fn device_key(cell: CellId, node: NodeId) -> [u8; DEVICE_KEY_LEN] {
    device_key_bytes(cell.key().as_bytes(), node.key().as_bytes())
}

fn device_key_bytes(cell: &[u8; KEY_LEN], node: &[u8; KEY_LEN]) -> [u8; DEVICE_KEY_LEN] {
    let mut key = [0; DEVICE_KEY_LEN];
    key[..KEY_LEN].copy_from_slice(cell);
    key[KEY_LEN..].copy_from_slice(node);
    key
}

fn queue_key(device: &DeviceKey, seq: u64) -> [u8; QUEUE_KEY_LEN] {
    let mut key = [0; QUEUE_KEY_LEN];
    key[..KEY_LEN].copy_from_slice(device);
    key[KEY_LEN..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn split_queue_key(key: &[u8; QUEUE_KEY_LEN]) -> (DeviceKey, u64) {
    let (device, seq) = key.split_at(KEY_LEN);
    (to_array(device), u64::from_be_bytes(to_array(seq)))
}

fn index_key(device: &DeviceKey, id: MsgId, from: &DeviceKey) -> [u8; INDEX_KEY_LEN] {
    let mut key = [0; INDEX_KEY_LEN];
    key[..KEY_LEN].copy_from_slice(device);
    key[KEY_LEN..KEY_LEN + ID_LEN].copy_from_slice(&id.0);
    key[KEY_LEN + ID_LEN..].copy_from_slice(from);
    key
}

fn expiry_key(expires_at: Timestamp, device: &DeviceKey, seq: u64) -> [u8; EXPIRY_KEY_LEN] {
    let mut key = [0; EXPIRY_KEY_LEN];
    key[..8].copy_from_slice(&expires_at.0.to_be_bytes());
    key[8..8 + KEY_LEN].copy_from_slice(device);
    key[8 + KEY_LEN..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn split_expiry_key(key: &[u8; EXPIRY_KEY_LEN]) -> (DeviceKey, u64) {
    let (device, seq) = key[8..].split_at(KEY_LEN);
    (to_array(device), u64::from_be_bytes(to_array(seq)))
}

/// Copies a slice whose length the caller's arithmetic fixes; a mismatch would be a bug here,
/// and gives zeros rather than a panic.
fn to_array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    if bytes.len() == N {
        out.copy_from_slice(bytes);
    }
    out
}

/// The `last_seen` of a `devices` value.
fn device_last_seen(value: &[u8]) -> Result<Timestamp, StoreError> {
    let (seen, _) = value
        .split_first_chunk::<8>()
        .ok_or(StoreError::Corrupt("device record too short"))?;
    Ok(Timestamp(u64::from_be_bytes(*seen)))
}

/// Splits a `devices` value into `(node_token, identity)`.
fn decode_device(value: &[u8]) -> Result<TokenPair, StoreError> {
    const SHORT: StoreError = StoreError::Corrupt("device record too short");
    let (_, value) = value.split_first_chunk::<8>().ok_or(SHORT)?;
    let (len, rest) = value.split_first_chunk::<2>().ok_or(SHORT)?;
    let len = usize::from(u16::from_be_bytes(*len));
    if rest.len() < len {
        return Err(SHORT);
    }
    let (token, identity) = rest.split_at(len);
    Ok((token.to_vec(), identity.to_vec()))
}

/// Creates `path` with mode 0600 (and its missing parents with 0700) if it does not exist, so
/// that the database is never readable by others, not even for a moment.
fn create_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};

    let io_error = |action, path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io {
            action,
            path,
            source: Arc::new(source),
        }
    };
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_error("create directory", parent))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io_error("create", path))?;
    Ok(())
}

/// Wraps a redb error with what the store was doing.
fn db_error<E: Into<redb::Error>>(context: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Db {
        context,
        source: Arc::new(e.into()),
    }
}

/// Locks `mutex`, also after a panic elsewhere: every value these mutexes guard is replaced
/// whole, never left half-updated.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellmesh_core::keys::SigningSecret;

    fn node(n: u8) -> NodeId {
        NodeId::from_key(SigningSecret::from_seed(&[n; 32]).public())
    }

    fn cell(n: u8) -> CellId {
        CellId::from_key(SigningSecret::from_seed(&[n; 32]).public())
    }

    fn id(n: u16) -> MsgId {
        let mut id = [0xa5; 16];
        id[..2].copy_from_slice(&n.to_be_bytes());
        MsgId(id)
    }

    fn msg(to: NodeId, id: MsgId, envelope: &[u8]) -> NewMessage<'_> {
        NewMessage {
            to,
            id,
            from: node(200),
            envelope,
        }
    }

    fn open(dir: &tempfile::TempDir, limits: StoreLimits) -> Store {
        match Store::open(&dir.path().join("relay").join("store.redb"), limits) {
            Ok(store) => store,
            Err(e) => panic!("open: {e}"),
        }
    }

    fn ids(queued: &[StoredEnvelope]) -> Vec<MsgId> {
        queued.iter().map(|q| q.id).collect()
    }

    const T0: Timestamp = Timestamp(1_000_000);

    #[test]
    fn queued_messages_survive_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (node(1), node(2));
        {
            let store = open(&dir, StoreLimits::default());
            let first = store.enqueue(
                T0,
                &[
                    msg(a, id(1), b"one"),
                    msg(b, id(9), b"other"),
                    msg(a, id(2), b"two"),
                ],
            );
            assert!(first.iter().all(|r| matches!(r, Ok(Enqueued::Stored))));
            let second = store.enqueue(T0.plus(1), &[msg(a, id(3), b"three")]);
            assert!(matches!(second[..], [Ok(Enqueued::Stored)]));
        }

        let store = open(&dir, StoreLimits::default());
        let pending = store.pending(a, T0.plus(2), 100, usize::MAX).unwrap();
        assert_eq!(ids(&pending), [id(1), id(2), id(3)]);
        assert_eq!(pending[0].envelope, Bytes::from_static(b"one"));
        assert_eq!(pending[2].envelope, Bytes::from_static(b"three"));
        assert_eq!(pending[0].from, node(200));
        let ttl = StoreLimits::default().ttl.as_secs();
        // Each is kept for the time to live from when it was queued.
        let at_ttl = store.pending(a, T0.plus(ttl), 100, usize::MAX).unwrap();
        assert_eq!(ids(&at_ttl), [id(3)]);
        assert_eq!(store.queued(a), (3, 11));
        assert_eq!(store.queued(b), (1, 5));

        // The sequence carries on after a reopen: a new message neither overwrites an old one
        // nor sorts before it.
        let r = store.enqueue(T0.plus(3), &[msg(a, id(4), b"four")]);
        assert!(matches!(r[..], [Ok(Enqueued::Stored)]));
        let pending = store.pending(a, T0.plus(3), 100, usize::MAX).unwrap();
        assert_eq!(ids(&pending), [id(1), id(2), id(3), id(4)]);
        assert_eq!(
            ids(&store.pending(a, T0.plus(3), 2, usize::MAX).unwrap()),
            [id(1), id(2)]
        );
        assert!(store.pending(a, T0, 0, usize::MAX).unwrap().is_empty());
        assert!(
            store
                .pending(node(3), T0, 10, usize::MAX)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn duplicates_are_not_stored_twice() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, StoreLimits::default());
        let (a, b) = (node(1), node(2));
        let r = store.enqueue(
            T0,
            &[
                msg(a, id(1), b"first"),
                msg(a, id(1), b"first"),
                msg(b, id(1), b"same id, other device"),
            ],
        );
        assert!(matches!(
            r[..],
            [
                Ok(Enqueued::Stored),
                Ok(Enqueued::Duplicate),
                Ok(Enqueued::Stored)
            ]
        ));
        let r = store.enqueue(T0, &[msg(a, id(1), b"first")]);
        assert!(matches!(r[..], [Ok(Enqueued::Duplicate)]));

        let pending = store.pending(a, T0, 10, usize::MAX).unwrap();
        assert_eq!(ids(&pending), [id(1)]);
        assert_eq!(pending[0].envelope, Bytes::from_static(b"first"));
        assert_eq!(store.queued(a), (1, 5));
        assert_eq!(store.pending(b, T0, 10, usize::MAX).unwrap().len(), 1);
    }

    /// An envelope sealed again under its id (its device lost the session the first was
    /// sealed in) takes the first one's place: otherwise the device would get only the copy
    /// it cannot open, and tell the relay it took it.
    #[test]
    fn an_envelope_sealed_again_replaces_the_queued_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, StoreLimits::default());
        let a = node(1);
        store.enqueue(T0, &[msg(a, id(1), b"old session"), msg(a, id(2), b"next")]);
        let r = store.enqueue(T0.plus(5), &[msg(a, id(1), b"new session!")]);
        assert!(matches!(r[..], [Ok(Enqueued::Replaced)]), "{r:?}");
        let pending = store.pending(a, T0, 10, usize::MAX).unwrap();
        assert_eq!(ids(&pending), [id(1), id(2)], "in its place");
        assert_eq!(pending[0].envelope, Bytes::from_static(b"new session!"));
        assert_eq!(store.queued(a), (2, 12 + 4));
        // Durable, as anything answered queued.
        drop(store);
        let store = open(&dir, StoreLimits::default());
        let pending = store.pending(a, T0, 10, usize::MAX).unwrap();
        assert_eq!(pending[0].envelope, Bytes::from_static(b"new session!"));
        assert_eq!(store.queued(a), (2, 16));
    }

    /// Issue 10, finding 12: the duplicate index was keyed by (recipient, id), so a sender that
    /// learned or guessed another's id could have that sender's message answered `queued`
    /// and never stored.
    #[test]
    fn the_same_id_from_two_senders_is_two_messages() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, StoreLimits::default());
        let a = node(1);
        let from = |sender: u8, envelope: &'static [u8]| NewMessage {
            to: a,
            id: id(1),
            from: node(sender),
            envelope,
        };
        let r = store.enqueue(T0, &[from(200, b"first"), from(201, b"second")]);
        assert!(matches!(
            r[..],
            [Ok(Enqueued::Stored), Ok(Enqueued::Stored)]
        ));
        let r = store.enqueue(T0, &[from(201, b"second")]);
        assert!(matches!(r[..], [Ok(Enqueued::Duplicate)]));
        let pending = store.pending(a, T0, 10, usize::MAX).unwrap();
        let got: Vec<_> = pending.iter().map(|q| (q.from, &q.envelope[..])).collect();
        assert_eq!(
            got,
            [(node(200), &b"first"[..]), (node(201), &b"second"[..])]
        );
        assert_eq!(store.queued(a), (2, 11));
        // DELIVERED names ids only: it takes every message with that id.
        assert_eq!(store.remove(a, &[id(1)]).unwrap(), 2);
        assert_eq!(store.queued(a), (0, 0));
    }

    #[test]
    fn count_bound_refuses_without_affecting_other_devices() {
        let dir = tempfile::tempdir().unwrap();
        let limits = StoreLimits {
            max_messages_per_device: 2,
            ..StoreLimits::default()
        };
        let store = open(&dir, limits);
        let (a, b) = (node(1), node(2));
        let r = store.enqueue(
            T0,
            &[
                msg(a, id(1), b"x"),
                msg(a, id(2), b"x"),
                msg(a, id(3), b"x"),
                msg(b, id(4), b"x"),
            ],
        );
        assert!(matches!(r[0], Ok(Enqueued::Stored)));
        assert!(matches!(r[1], Ok(Enqueued::Stored)));
        assert!(matches!(&r[2], Err(StoreError::QueueFull { device }) if *device == a));
        assert!(matches!(r[3], Ok(Enqueued::Stored)));
        assert_eq!(
            ids(&store.pending(a, T0, 10, usize::MAX).unwrap()),
            [id(1), id(2)]
        );
        assert_eq!(store.queued(a), (2, 2));
        assert_eq!(store.queued(b), (1, 1));

        // A retry of a queued message is still a duplicate, not a refusal.
        let r = store.enqueue(T0, &[msg(a, id(1), b"x")]);
        assert!(matches!(r[..], [Ok(Enqueued::Duplicate)]));
        // Room again once one is delivered.
        assert_eq!(store.remove(a, &[id(1)]).unwrap(), 1);
        let r = store.enqueue(T0, &[msg(a, id(3), b"x")]);
        assert!(matches!(r[..], [Ok(Enqueued::Stored)]));
        assert_eq!(
            ids(&store.pending(a, T0, 10, usize::MAX).unwrap()),
            [id(2), id(3)]
        );
    }

    #[test]
    fn byte_bound_refuses_without_affecting_other_devices() {
        let dir = tempfile::tempdir().unwrap();
        let limits = StoreLimits {
            max_bytes_per_device: 100,
            ..StoreLimits::default()
        };
        let store = open(&dir, limits);
        let (a, b) = (node(1), node(2));
        let r = store.enqueue(
            T0,
            &[
                msg(a, id(1), &[1; 60]),
                msg(a, id(2), &[2; 60]),
                msg(a, id(3), &[3; 40]),
                msg(b, id(4), &[4; 100]),
                msg(b, id(5), &[5; 101]),
            ],
        );
        assert!(matches!(r[0], Ok(Enqueued::Stored)));
        assert!(matches!(&r[1], Err(StoreError::QueueFull { device }) if *device == a));
        assert!(matches!(r[2], Ok(Enqueued::Stored)));
        assert!(matches!(r[3], Ok(Enqueued::Stored)));
        assert!(matches!(&r[4], Err(StoreError::QueueFull { device }) if *device == b));
        assert_eq!(
            r[1].as_ref().map_err(StoreError::refuse_code),
            Err(RefuseCode::QueueFull)
        );
        assert_eq!(store.queued(a), (2, 100));
        assert_eq!(store.queued(b), (1, 100));
        assert_eq!(
            ids(&store.pending(a, T0, 10, usize::MAX).unwrap()),
            [id(1), id(3)]
        );
        assert_eq!(ids(&store.pending(b, T0, 10, usize::MAX).unwrap()), [id(4)]);
    }

    #[test]
    fn expired_messages_are_skipped_then_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let limits = StoreLimits {
            ttl: Duration::from_secs(10),
            ..StoreLimits::default()
        };
        let (a, b) = (node(1), node(2));
        {
            let store = open(&dir, limits.clone());
            store.enqueue(T0, &[msg(a, id(1), b"old"), msg(b, id(3), b"old too")]);
            store.enqueue(T0.plus(5), &[msg(a, id(2), b"new")]);

            assert_eq!(
                ids(&store.pending(a, T0.plus(9), 10, usize::MAX).unwrap()),
                [id(1), id(2)]
            );
            assert_eq!(
                ids(&store.pending(a, T0.plus(10), 10, usize::MAX).unwrap()),
                [id(2)]
            );
            assert!(
                store
                    .pending(a, T0.plus(15), 10, usize::MAX)
                    .unwrap()
                    .is_empty()
            );
            // Skipped, not deleted: still counted until expire runs.
            assert_eq!(store.queued(a), (2, 6));

            assert_eq!(store.expire(T0.plus(9)).unwrap(), 0);
            assert_eq!(store.expire(T0.plus(10)).unwrap(), 2);
            assert_eq!(store.expire(T0.plus(10)).unwrap(), 0);
            assert_eq!(store.queued(a), (1, 3));
            assert_eq!(store.queued(b), (0, 0));
            assert_eq!(
                ids(&store.pending(a, T0.plus(10), 10, usize::MAX).unwrap()),
                [id(2)]
            );
        }
        let store = open(&dir, limits);
        assert_eq!(store.queued(a), (1, 3));
        assert_eq!(store.queued(b), (0, 0));
        assert_eq!(
            ids(&store.pending(a, T0.plus(10), 10, usize::MAX).unwrap()),
            [id(2)]
        );
        // The expired id left the index too: the same id can be queued again.
        let r = store.enqueue(T0.plus(20), &[msg(a, id(1), b"resent")]);
        assert!(matches!(r[..], [Ok(Enqueued::Stored)]));
        assert_eq!(store.expire(T0.plus(15)).unwrap(), 1);
        assert_eq!(
            ids(&store.pending(a, T0.plus(20), 10, usize::MAX).unwrap()),
            [id(1)]
        );
    }

    #[test]
    fn remove_deletes_and_updates_counters() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (node(1), node(2));
        {
            let store = open(&dir, StoreLimits::default());
            store.enqueue(
                T0,
                &[
                    msg(a, id(1), b"1"),
                    msg(a, id(2), b"22"),
                    msg(a, id(3), b"333"),
                    msg(b, id(1), b"b"),
                ],
            );
            assert_eq!(store.remove(a, &[id(1), id(99), id(3), id(3)]).unwrap(), 2);
            assert_eq!(store.remove(a, &[id(1)]).unwrap(), 0);
            assert_eq!(store.remove(a, &[]).unwrap(), 0);
            assert_eq!(store.queued(a), (1, 2));
            assert_eq!(store.queued(b), (1, 1));
            assert_eq!(ids(&store.pending(a, T0, 10, usize::MAX).unwrap()), [id(2)]);
        }
        let store = open(&dir, StoreLimits::default());
        assert_eq!(store.queued(a), (1, 2));
        assert_eq!(store.queued(b), (1, 1));
        assert_eq!(ids(&store.pending(a, T0, 10, usize::MAX).unwrap()), [id(2)]);
        assert_eq!(ids(&store.pending(b, T0, 10, usize::MAX).unwrap()), [id(1)]);
        // A removed id is no longer a duplicate; expire finds nothing left of the removed ones.
        let r = store.enqueue(T0, &[msg(a, id(1), b"again")]);
        assert!(matches!(r[..], [Ok(Enqueued::Stored)]));
        assert_eq!(store.remove(a, &[id(2), id(1)]).unwrap(), 2);
        assert_eq!(store.queued(a), (0, 0));
        let ttl = StoreLimits::default().ttl.as_secs();
        assert_eq!(store.expire(T0.plus(ttl)).unwrap(), 1);
        assert_eq!(store.queued(b), (0, 0));
    }

    #[test]
    fn devices_upsert_and_list() {
        let dir = tempfile::tempdir().unwrap();
        let (c, other) = (cell(10), cell(11));
        {
            let store = open(&dir, StoreLimits::default());
            store
                .put_device(c, node(2), b"token2", b"identity2", T0)
                .unwrap();
            store
                .put_device(c, node(1), b"token1", b"identity1", T0)
                .unwrap();
            store
                .put_device(other, node(3), b"token3", b"identity3", T0)
                .unwrap();
            store
                .put_device(c, node(2), b"token2b", b"identity2b", T0)
                .unwrap();
            store.put_device(c, node(4), b"", b"", T0).unwrap();
        }
        let store = open(&dir, StoreLimits::default());
        let mut expected = vec![
            (node(1), b"token1".to_vec(), b"identity1".to_vec()),
            (node(2), b"token2b".to_vec(), b"identity2b".to_vec()),
            (node(4), Vec::new(), Vec::new()),
        ];
        expected.sort_by_key(|(n, _, _)| *n.key().as_bytes());
        let expected: Vec<_> = expected.into_iter().map(|(_, t, i)| (t, i)).collect();
        assert_eq!(store.devices(c).unwrap(), expected);
        assert_eq!(
            store.devices(other).unwrap(),
            [(b"token3".to_vec(), b"identity3".to_vec())]
        );
        assert!(store.devices(cell(12)).unwrap().is_empty());
        let mut pairs = [(c, node(1)), (c, node(2)), (c, node(4)), (other, node(3))];
        pairs.sort_by_key(|(c, n)| (*c.key().as_bytes(), *n.key().as_bytes()));
        let with_time: Vec<_> = pairs.iter().map(|&(c, n)| (c, n, T0)).collect();
        assert_eq!(store.registered().unwrap(), with_time);

        assert!(store.remove_device(c, node(2)).unwrap());
        assert!(!store.remove_device(c, node(2)).unwrap());
        assert!(!store.remove_device(other, node(1)).unwrap());
        let left: Vec<_> = store
            .devices(c)
            .unwrap()
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(left.len(), 2);
        assert!(!left.contains(&b"token2b".to_vec()));
        assert!(!store.registered().unwrap().contains(&(c, node(2), T0)));

        let long = vec![0; usize::from(u16::MAX) + 1];
        assert!(matches!(
            store.put_device(c, node(5), &long, b"", T0),
            Err(StoreError::TokenTooLong { len }) if len == long.len()
        ));
    }

    #[test]
    fn batch_of_a_thousand_in_one_call() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, StoreLimits::default());
        let (a, b) = (node(1), node(2));
        let envelope = [7u8; 64];
        let batch: Vec<_> = (0..1000u16)
            .map(|n| msg(if n % 4 == 0 { b } else { a }, id(n), &envelope))
            .collect();
        let r = store.enqueue(T0, &batch);
        assert_eq!(r.len(), 1000);
        assert!(r.iter().all(|r| matches!(r, Ok(Enqueued::Stored))));
        assert_eq!(store.queued(a), (750, 750 * 64));
        assert_eq!(store.queued(b), (250, 250 * 64));
        let pending = store.pending(a, T0, 2000, usize::MAX).unwrap();
        let expected: Vec<_> = (0..1000u16).filter(|n| n % 4 != 0).map(id).collect();
        assert_eq!(ids(&pending), expected);
        assert!(pending.iter().all(|q| q.envelope[..] == envelope));
    }

    #[test]
    fn file_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, StoreLimits::default());
        let mode = std::fs::metadata(&store.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // The data directory it made: 0700 (SECURITY.md, "What the relay keeps on disk").
        let made = std::fs::metadata(dir.path().join("relay")).unwrap();
        assert_eq!(made.permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn corrupt_records_are_errors() {
        let mut value = Vec::new();
        Record::encode(&mut value, id(1), node(1), T0, b"envelope");
        let record = Record::decode(&value).unwrap();
        assert_eq!(record.id, id(1));
        assert_eq!(record.expires_at, T0);
        assert_eq!(record.envelope, b"envelope");
        assert_eq!(record.to_queued(&mut HashMap::new()).unwrap().from, node(1));
        for len in 0..RECORD_HEADER_LEN {
            assert!(matches!(
                Record::decode(&value[..len]),
                Err(StoreError::Corrupt(_))
            ));
        }
        // A sender key of small order, which no key check accepts.
        value[ID_LEN..ID_LEN + KEY_LEN].fill(0);
        assert!(matches!(
            Record::decode(&value)
                .unwrap()
                .to_queued(&mut HashMap::new()),
            Err(StoreError::Corrupt(_))
        ));

        let seen = [0, 0, 0, 0, 0, 0, 0, 7];
        let device = |rest: &[u8]| [&seen[..], rest].concat();
        assert!(matches!(decode_device(&[]), Err(StoreError::Corrupt(_))));
        assert!(matches!(
            decode_device(&seen[..7]),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            device_last_seen(&seen[..7]),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            decode_device(&device(&[0])),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            decode_device(&device(&[0, 3, 1, 2])),
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(
            decode_device(&device(&[0, 2, 1, 2, 9])).unwrap(),
            (vec![1, 2], vec![9])
        );
        assert_eq!(device_last_seen(&seen).unwrap(), Timestamp(7));
    }

    #[test]
    fn pending_stops_at_its_byte_bound_but_gives_at_least_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, StoreLimits::default());
        let a = node(1);
        let batch: Vec<_> = (0..10u16).map(|n| msg(a, id(n), &[0; 100])).collect();
        store.enqueue(T0, &batch);
        assert_eq!(store.pending(a, T0, 100, 250).unwrap().len(), 3);
        assert_eq!(store.pending(a, T0, 100, 300).unwrap().len(), 3);
        assert_eq!(store.pending(a, T0, 100, 1).unwrap().len(), 1);
        assert_eq!(store.pending(a, T0, 2, usize::MAX).unwrap().len(), 2);
    }

    #[test]
    fn forgotten_devices_leave_the_directory_with_their_queues() {
        let dir = tempfile::tempdir().unwrap();
        let (c, a, b) = (cell(10), node(1), node(2));
        {
            let store = open(&dir, StoreLimits::default());
            store.put_device(c, a, b"ta", b"ia", T0).unwrap();
            store.put_device(c, b, b"tb", b"ib", T0).unwrap();
            store.enqueue(
                T0,
                &[
                    msg(a, id(1), b"one"),
                    msg(a, id(2), b"two"),
                    msg(b, id(1), b"b"),
                ],
            );
            store
                .touch_devices(&[(c, b), (cell(11), a)], T0.plus(60))
                .unwrap();
            assert_eq!(store.forget_devices(&[(c, a)]).unwrap(), 2);
            assert_eq!(store.forget_devices(&[(c, a)]).unwrap(), 0);
            assert_eq!(store.queued(a), (0, 0));
            assert!(store.pending(a, T0, 10, usize::MAX).unwrap().is_empty());
        }
        let store = open(&dir, StoreLimits::default());
        assert_eq!(store.registered().unwrap(), [(c, b, T0.plus(60))]);
        assert_eq!(
            store.devices(c).unwrap(),
            [(b"tb".to_vec(), b"ib".to_vec())]
        );
        assert_eq!(store.queued(a), (0, 0));
        assert_eq!(store.queued(b), (1, 1));
        // Nothing of a's is left behind: its ids are free, and expiry finds only b's.
        let r = store.enqueue(T0, &[msg(a, id(1), b"again")]);
        assert!(matches!(r[..], [Ok(Enqueued::Stored)]));
        let ttl = StoreLimits::default().ttl.as_secs();
        assert_eq!(store.expire(T0.plus(ttl)).unwrap(), 2);
    }

    /// Writes a store as format 1 laid it out: index keyed by (device, id), devices without
    /// `last_seen`.
    fn write_format_1(
        path: &Path,
        messages: &[(NodeId, MsgId, NodeId, &[u8])],
        devices: &[(CellId, NodeId, &[u8], &[u8])],
    ) {
        create_file(path).unwrap();
        let db = redb::Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            meta.insert(FORMAT_KEY, 1).unwrap();
            meta.insert(NEXT_SEQ_KEY, messages.len() as u64).unwrap();
            let mut queue = txn.open_table(QUEUE).unwrap();
            let mut index = txn.open_table(INDEX_1).unwrap();
            let mut expiry = txn.open_table(EXPIRY).unwrap();
            let mut value = Vec::new();
            let expires = T0.plus(100);
            for (seq, &(to, id, from, envelope)) in messages.iter().enumerate() {
                let device = *to.key().as_bytes();
                Record::encode(&mut value, id, from, expires, envelope);
                queue
                    .insert(&queue_key(&device, seq as u64), value.as_slice())
                    .unwrap();
                let mut key = [0; KEY_LEN + ID_LEN];
                key[..KEY_LEN].copy_from_slice(&device);
                key[KEY_LEN..].copy_from_slice(&id.0);
                index.insert(&key, seq as u64).unwrap();
                expiry
                    .insert(&expiry_key(expires, &device, seq as u64), ())
                    .unwrap();
            }
            let mut table = txn.open_table(DEVICES).unwrap();
            for &(c, n, token, identity) in devices {
                let value = [&(token.len() as u16).to_be_bytes()[..], token, identity].concat();
                table.insert(&device_key(c, n), value.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }

    #[test]
    fn a_format_1_store_is_migrated_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.redb");
        let (a, c) = (node(1), cell(10));
        write_format_1(
            &path,
            &[(a, id(1), node(200), b"one"), (a, id(2), node(201), b"two")],
            &[(c, a, b"token", b"identity")],
        );
        let now = T0.plus(5);
        {
            let store = Store::open_at(&path, StoreLimits::default(), now).unwrap();
            assert_eq!(store.queued(a), (2, 6));
            assert_eq!(store.registered().unwrap(), [(c, a, now)]);
            assert_eq!(
                store.devices(c).unwrap(),
                [(b"token".to_vec(), b"identity".to_vec())]
            );
            // The rebuilt index knows each message's sender: a retry is a duplicate, the same
            // id from someone else is not.
            let r = store.enqueue(
                T0,
                &[
                    NewMessage {
                        to: a,
                        id: id(1),
                        from: node(200),
                        envelope: b"one",
                    },
                    NewMessage {
                        to: a,
                        id: id(1),
                        from: node(202),
                        envelope: b"other",
                    },
                ],
            );
            assert!(matches!(
                r[..],
                [Ok(Enqueued::Duplicate), Ok(Enqueued::Stored)]
            ));
            assert_eq!(store.remove(a, &[id(2)]).unwrap(), 1);
        }
        // Opened again, it is this format already.
        let store = Store::open_at(&path, StoreLimits::default(), T0.plus(99)).unwrap();
        assert_eq!(store.registered().unwrap(), [(c, a, now)]);
        let pending = store.pending(a, T0, 10, usize::MAX).unwrap();
        assert_eq!(ids(&pending), [id(1), id(1)]);
        assert_eq!(store.expire(T0.plus(100)).unwrap(), 1);
    }

    #[test]
    fn a_store_of_an_unknown_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.redb");
        create_file(&path).unwrap();
        {
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert(FORMAT_KEY, 4).unwrap();
            txn.commit().unwrap();
        }
        assert!(matches!(
            Store::open(&path, StoreLimits::default()),
            Err(StoreError::Corrupt("unknown store format"))
        ));
    }

    #[test]
    fn a_revocation_is_kept_across_reopen_and_drops_the_device_and_its_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay").join("store.redb");
        let (c, a, b) = (cell(10), node(1), node(2));
        {
            let store = open(&dir, StoreLimits::default());
            store.put_device(c, a, b"ta", b"ia", T0).unwrap();
            store.put_device(c, b, b"tb", b"ib", T0).unwrap();
            let r = store.enqueue(T0, &[msg(a, id(1), b"for a"), msg(b, id(2), b"for b")]);
            assert!(r.iter().all(Result::is_ok));
            assert_eq!(store.revoke(c, a, b"revocation of a").unwrap(), 1);
            assert_eq!(store.queued(a), (0, 0));
            assert_eq!(
                store.devices(c).unwrap(),
                [(b"tb".to_vec(), b"ib".to_vec())]
            );
            // Again: replaced, nothing more dropped.
            assert_eq!(store.revoke(c, a, b"revocation of a").unwrap(), 0);
        }
        let store = Store::open(&path, StoreLimits::default()).unwrap();
        assert_eq!(store.revocations().unwrap(), [b"revocation of a".to_vec()]);
        assert_eq!(store.registered().unwrap().len(), 1);
        assert_eq!(store.queued(b), (1, 5));
    }

    #[test]
    fn a_format_2_store_is_migrated_with_an_empty_revoked_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay").join("store.redb");
        let (c, a) = (cell(10), node(1));
        {
            let store = open(&dir, StoreLimits::default());
            store.put_device(c, a, b"t", b"i", T0).unwrap();
            assert!(store.enqueue(T0, &[msg(a, id(1), b"kept")])[0].is_ok());
        }
        // Make it what format 2 wrote: no `revoked` table, format 2.
        {
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            assert!(txn.delete_table(REVOKED).unwrap());
            txn.open_table(META).unwrap().insert(FORMAT_KEY, 2).unwrap();
            txn.commit().unwrap();
        }
        let store = Store::open(&path, StoreLimits::default()).unwrap();
        assert!(store.revocations().unwrap().is_empty());
        assert_eq!(store.queued(a), (1, 4));
        assert_eq!(store.registered().unwrap().len(), 1);
        assert_eq!(store.revoke(c, a, b"r").unwrap(), 1);
        drop(store);
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let format = txn
            .open_table(META)
            .unwrap()
            .get(FORMAT_KEY)
            .unwrap()
            .unwrap()
            .value();
        assert_eq!(format, FORMAT);
        assert_eq!(FORMAT, 3);
    }
}
