//! A device's mailbox at a relay, as a state machine: sends to cells with their outcomes,
//! messages from cells handed to the application and acknowledged once it has them, and
//! what must be on disk so that nothing acknowledged or promised is lost across restarts.
//!
//! ```text
//!  submit(cell, body) ─► directory (LOOKUP, checked) ─► seal per device ─► FORWARD ──► relay
//!  Event::Sent ◄── outcome ◄── ACCEPTED/REFUSED, REPLY (acknowledgement) ◄────────────┘
//!  Event::Messages ◄── open ◄── DELIVER ◄── relay
//!  Event::Revocations ◄── checked ◄── DIRECTORY's revocations (never sealed for again)
//!  revoke(token) ──► REVOKE ──► relay ──► REVOKED ──► Event::RevokeAnswered
//!  handle_taken(n) ──► ACK (end to end) now ──► DELIVERED once the duplicate memory is on disk
//!  poll_commit ──► the store (sessions, duplicate memory, sends) ──► handle_committed
//! ```
//!
//! No I/O: the caller passes the relay's payloads, the application's calls, the store's
//! completions and the time in, and takes out what to write to the relay
//! ([`Mailbox::poll_transmit`]), to the store ([`Mailbox::poll_commit`]) and to the
//! application ([`Mailbox::poll_event`]), and when to call again ([`Mailbox::poll_timeout`]).
//!
//! # In which order to call it
//!
//! After anything `handle_*`, `submit`, `lookup` or `close`: first [`Mailbox::poll_commit`]
//! until it returns `None` (hand each commit to the store, and [`Mailbox::handle_committed`]
//! once it is durable), then [`Mailbox::poll_transmit`] until `None` (write each payload to
//! the relay link in order), then [`Mailbox::poll_event`] until `None`, then
//! [`Mailbox::poll_timeout`]. What is submitted between two such rounds is sealed together,
//! in bundles. Read the relay link only while [`Mailbox::wants_input`].
//!
//! # What is durable before what
//!
//! - An envelope sealed under a counter lease that grew (see `e2e`) leaves only after the
//!   commit that holds the lease: a restart never reuses a nonce.
//! - A send is reported *queued*, or *delivered* while some device of the cell has not
//!   acknowledged it, only after the commit that saves it: the mailbox of the next run
//!   finishes it (seals it again after a RESET, sends it to devices that come back).
//! - A received envelope is acknowledged end to end once the application has taken all its
//!   messages ([`Mailbox::handle_taken`]), and the relay is told DELIVERED only after the
//!   commit that remembers it in the duplicate memory: the relay hands it again until then,
//!   and a redelivery after a restart is recognised.

mod sends;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use rand_core::CryptoRngCore;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::codec::DecodeError;
use crate::device::Revocations;
use crate::e2e::{
    AckHandle, Directory, DirectoryError, Endpoint, LocalDevice, MAX_BODY, Message, OpenError,
    Opened, Padding, Received, RemoteDevice, SealError, Seen, SeenChange, SessionKey, Verdict,
};
use crate::id::{CellId, NodeId};
use crate::relay::{Accepted, DirectoryEntry, MAX_IDS, MsgId, Record, RefuseCode, put_record};
use crate::revoked::CellRevocation;
use crate::{Instant, Timestamp};

use sends::{DevState, DeviceSend, PendingSend, Sends, Told};

/// The caller's name for a send or a lookup, echoed in its [`Event`].
pub type Token = u64;

/// How long a directory answer is reused. Milliseconds.
pub const DIRECTORY_TTL_MS: u64 = 30_000;
/// How long a send is kept for devices that have not acknowledged it: the relay's time to
/// live. Seconds.
pub const RETAIN: u64 = 7 * 24 * 3600;
/// Most envelopes kept in memory for devices that have not acknowledged them; beyond it the
/// oldest already reported are dropped from memory (a saved one comes back at the next start).
pub const MAX_RETAINED: usize = 65_536;
/// After a transient refusal, an envelope is forwarded again this much later. Milliseconds.
pub const RETRY_AFTER_MS: u64 = 100;
/// Most bytes of bodies in one bundle.
pub const BUNDLE_BYTES: usize = 64 * 1024;
/// Most messages in one bundle.
pub const BUNDLE_MESSAGES: usize = 256;
/// Most messages in one [`Event::Messages`].
pub const HAND_OVER: usize = 256;
pub use crate::relay::MAX_BATCH;
/// How often sessions and the duplicate memory are swept of what has expired. Milliseconds.
const SWEEP_MS: u64 = 3600 * 1000;
/// How long an envelope answered with RESET is left with the relay (not told DELIVERED) for
/// its sender's copy sealed anew to take its place. Milliseconds.
pub const RESET_HOLD_MS: u64 = 10 * 60 * 1000;
/// Most envelopes held so at once; past it they are told DELIVERED at once.
const MAX_RESET_HOLDS: usize = 65_536;

/// How a mailbox behaves.
#[derive(Clone, Debug)]
pub struct Config {
    /// Pad bodies to hide their size.
    pub padding: Padding,
    /// How long after it is submitted a send's outcome is due, lookup of the recipient's
    /// devices included: by then it is reported as queued if the relay stored it, as
    /// [`SendError::Unknown`] if it was sealed and not answered, and as
    /// [`SendError::NotSent`] if it still waited for its lookup. Milliseconds.
    pub ack_timeout_ms: u64,
    /// Messages handed to the application and not yet taken before the mailbox stops
    /// reading the relay ([`Mailbox::wants_input`]).
    pub inbox_capacity: u64,
    /// Whether this mailbox takes messages at all. A mailbox that only sends (a one-shot
    /// `send`) leaves every message for the device to the relay, unopened.
    pub receive: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            padding: Padding::None,
            ack_timeout_ms: 10_000,
            inbox_capacity: 8192,
            receive: true,
        }
    }
}

/// How a send ended well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// A device of the recipient cell acknowledged it end to end.
    Delivered,
    /// The relay stored it for every device that did not acknowledge it yet.
    Queued,
}

impl Status {
    /// `delivered` or `queued`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Queued => "queued",
        }
    }
}

/// A send that ended well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The message id.
    pub id: MsgId,
    /// Delivered or queued.
    pub status: Status,
    /// How many devices of the recipient cell it was sealed for.
    pub devices: usize,
}

/// A send or a lookup failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SendError {
    /// The relay knows no device of that cell.
    #[error("unknown cell {0}: no device of it is registered at this relay")]
    UnknownCell(CellId),
    /// The relay's directory for the cell does not check out: it may be substituting keys.
    #[error("the relay's directory for {cell} is not trustworthy: {error}")]
    Directory {
        /// The cell.
        cell: CellId,
        /// What failed.
        error: DirectoryError,
    },
    /// The message could not be sealed.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The relay refused the message for every device.
    #[error("the relay refused the message: {}", .0.name())]
    Refused(RefuseCode),
    /// No device acknowledged it and the relay did not say it stored it, in time. It may
    /// still be delivered: the mailbox keeps trying while it runs, and sending it again
    /// under the same id delivers it at most once.
    #[error(
        "outcome unknown: no device acknowledged the message in time (it may still arrive; send it again with the same id to be sure)"
    )]
    Unknown(MsgId),
    /// The relay did not list the cell's devices in time (it is unreachable, or slow), so
    /// the message was never sealed: nothing left this device, and nothing will. Sending it
    /// again, under any id, cannot deliver it twice.
    #[error(
        "not sent: the relay did not list the devices of {0} in time (is it reachable?); nothing left this device, and sending it again is safe"
    )]
    NotSent(CellId),
    /// The relay answered a LOOKUP in a shape this version no longer reads (a DIRECTORY
    /// without the cell's revocations): it is older than this device.
    #[error("the relay is too old: its directory answers carry no revocations (upgrade the relay)")]
    IncompatibleRelay,
    /// The mailbox closed first.
    #[error("mailbox closed")]
    Closed,
}

/// Something for the application.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A send ended.
    Sent {
        /// The token it was submitted with.
        token: Token,
        /// Its outcome.
        result: Result<Sent, SendError>,
    },
    /// A lookup ended.
    Looked {
        /// The token it was asked with.
        token: Token,
        /// The directory, checked.
        result: Result<Directory, SendError>,
    },
    /// Messages from other cells, in order. Tell the mailbox when the application has them
    /// ([`Mailbox::handle_taken`]): only then are they acknowledged.
    Messages(Vec<Message>),
    /// Revocations this mailbox had not honoured, found in a DIRECTORY and checked: each a
    /// cell's signed revocation of one of its devices. Honoured from now on; keep them (the
    /// home's keystore) so that the next run honours them too.
    Revocations(Vec<crate::token::Token>),
    /// The relay answered a [`Mailbox::revoke`].
    RevokeAnswered {
        /// The token it was asked with.
        token: Token,
        /// Kept by the relay (or kept already), or refused ([`SendError::Refused`]).
        result: Result<(), SendError>,
    },
}

/// What an earlier run saved, handed back to [`Mailbox::new`].
#[derive(Default)]
pub struct Saved {
    /// End-to-end sessions.
    pub sessions: Vec<(SessionKey, Zeroizing<Vec<u8>>)>,
    /// The duplicate memory: delivered envelopes.
    pub seen: Vec<(CellId, MsgId, Timestamp)>,
    /// The duplicate memory: floors of cells it forgot envelopes of.
    pub floors: Vec<(CellId, Timestamp)>,
    /// Sends not yet acknowledged by every device.
    pub sends: Vec<Zeroizing<Vec<u8>>>,
}

/// One change for the store.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreOp {
    /// Save a session (secret: encrypt at rest).
    PutSession(SessionKey, Zeroizing<Vec<u8>>),
    /// Delete a session.
    DeleteSession(SessionKey),
    /// A change to the duplicate memory.
    Seen(SeenChange),
    /// Save a send (it holds message bodies: encrypt at rest).
    PutSend(MsgId, Zeroizing<Vec<u8>>),
    /// Delete a send.
    DeleteSend(MsgId),
}

/// Changes to make durable together, in order, then report with
/// [`Mailbox::handle_committed`].
#[derive(Debug)]
pub struct Commit {
    /// Its number (commits are numbered from 1, one at a time).
    pub id: u64,
    /// What to write.
    pub ops: Vec<StoreOp>,
}

/// A submitted message whose directory is known, sealed at the end of the round.
struct Fresh {
    cell: CellId,
    body: Bytes,
    /// An id the application chose (such a message travels alone, so that sending it again
    /// makes the same envelope, which the recipient recognises).
    id: Option<MsgId>,
    token: Token,
    /// When its outcome is due: [`Config::ack_timeout_ms`] after it was submitted, whether
    /// it still waits for its lookup then (not sent) or for an acknowledgement (unknown).
    due: Instant,
}

enum Waiting {
    Send(Fresh),
    Lookup(Token),
    /// Saved sends to this cell wait for its devices to seal them again.
    Restored,
}

/// A checked directory (its devices shared by every send to the cell), and when it came.
struct Cached {
    devices: Arc<[Arc<RemoteDevice>]>,
    at: Instant,
}

/// A received envelope in this run, until the duplicate memory holds it on disk.
enum Held {
    /// Its messages were handed over (numbers `first..end`); not all taken yet.
    Handed {
        ack: AckHandle,
        time: Timestamp,
        first: u64,
        ids: Vec<MsgId>,
    },
    /// Taken and acknowledged; remembered in the commit numbered `needs`.
    Taken { needs: u64 },
}

/// A device's mailbox. See the module docs for the order of calls.
pub struct Mailbox {
    endpoint: Endpoint,
    seen: Seen,
    relay: NodeId,
    config: Config,
    revocations: Revocations,
    connected: bool,
    closed: bool,
    // Sending.
    sends: Sends,
    fresh: Vec<Fresh>,
    directories: BTreeMap<CellId, Cached>,
    lookups: BTreeMap<u32, (CellId, Vec<Waiting>)>,
    /// REVOKEs the relay has not answered, by request number.
    revokes: BTreeMap<u32, (Token, crate::token::Token)>,
    /// The relay answered a LOOKUP in a retired shape (until the link is up again).
    incompatible: bool,
    next_request: u32,
    /// When sends submitted while their cell was looked up are due, in the order they were
    /// submitted (some may have been sealed since: then nothing is due at that time).
    lookup_deadlines: VecDeque<Instant>,
    /// Sealed sends by when their outcome is due (in order of time), and by when they are
    /// forgotten (in the order they were made, since every send is kept as long).
    deadlines: VecDeque<(Instant, MsgId)>,
    expiries: VecDeque<(Timestamp, MsgId)>,
    retries: Vec<(Instant, MsgId, NodeId)>,
    /// Kept sends with devices to seal (again) in the next round.
    to_seal: Vec<MsgId>,
    // Receiving.
    held: BTreeMap<(CellId, MsgId), Held>,
    handed_order: VecDeque<(u64, (CellId, MsgId))>,
    taken_order: VecDeque<(u64, (CellId, MsgId))>,
    handed: u64,
    taken: u64,
    to_app: Vec<Message>,
    /// Envelopes answered with RESET, left with the relay until their sender's copy sealed
    /// anew replaces them there (or the hold ends): telling DELIVERED for the copy that
    /// cannot be opened would delete the new one with it.
    reset_holds: BTreeMap<MsgId, Instant>,
    // Output.
    out: Vec<Record>,
    /// Records that leave only once the commit numbered `.0` is durable.
    held_out: VecDeque<(u64, Record)>,
    delivered_wait: VecDeque<(u64, MsgId)>,
    reports: VecDeque<(u64, Event)>,
    events: VecDeque<Event>,
    ops: Vec<StoreOp>,
    /// Something waits for the next commit even if it has no op.
    want_commit: bool,
    in_flight: Option<u64>,
    next_commit: u64,
    committed: u64,
    next_sweep: Instant,
}

impl Mailbox {
    /// A mailbox for `local` at the relay `relay`, carrying on from `saved` (empty for a new
    /// device, or one that keeps nothing). `rng` draws the key of its envelope ids.
    pub fn new(
        local: LocalDevice,
        relay: NodeId,
        config: Config,
        saved: Saved,
        revocations: Revocations,
        now: Instant,
        rng: &mut impl CryptoRngCore,
    ) -> Self {
        let endpoint = Endpoint::restore(
            local,
            config.padding,
            saved.sessions.iter().map(|(k, v)| (*k, &v[..])),
            now,
            &revocations,
        );
        let mut seen = Seen::restore(saved.seen, saved.floors);
        seen.expire(now.timestamp());
        let mut key = Zeroizing::new([0u8; 16]);
        rng.fill_bytes(&mut key[..]);
        let mut mailbox = Self {
            endpoint,
            seen,
            relay,
            config,
            revocations,
            connected: false,
            closed: false,
            sends: Sends::new(&key),
            fresh: Vec::new(),
            directories: BTreeMap::new(),
            lookups: BTreeMap::new(),
            revokes: BTreeMap::new(),
            incompatible: false,
            next_request: 1,
            lookup_deadlines: VecDeque::new(),
            deadlines: VecDeque::new(),
            expiries: VecDeque::new(),
            retries: Vec::new(),
            to_seal: Vec::new(),
            held: BTreeMap::new(),
            handed_order: VecDeque::new(),
            taken_order: VecDeque::new(),
            handed: 0,
            taken: 0,
            to_app: Vec::new(),
            reset_holds: BTreeMap::new(),
            out: Vec::new(),
            held_out: VecDeque::new(),
            delivered_wait: VecDeque::new(),
            reports: VecDeque::new(),
            events: VecDeque::new(),
            ops: Vec::new(),
            want_commit: false,
            in_flight: None,
            next_commit: 1,
            committed: 0,
            next_sweep: now.plus_millis(SWEEP_MS),
        };
        let mut restored: Vec<PendingSend> = saved
            .sends
            .iter()
            .filter_map(|r| PendingSend::load(r).ok())
            .filter(|s| now.timestamp().0 < s.created.0.saturating_add(RETAIN))
            .collect();
        restored.sort_by_key(|s| (s.created, s.id));
        for send in restored {
            mailbox
                .expiries
                .push_back((send.created.plus(RETAIN), send.id));
            mailbox.sends.insert(send);
        }
        mailbox
    }

    /// This device.
    pub fn local(&self) -> &LocalDevice {
        self.endpoint.local()
    }

    /// The relay's node id.
    pub fn relay(&self) -> NodeId {
        self.relay
    }

    /// Whether the relay link should be read: false while the application has
    /// [`Config::inbox_capacity`] messages handed over and not taken.
    pub fn wants_input(&self) -> bool {
        self.handed - self.taken < self.config.inbox_capacity
    }

    /// Sends not yet answered by every device, in memory.
    pub fn sends_kept(&self) -> usize {
        self.sends.len()
    }

    /// The link to the relay is up (first or again): sends everything the relay has not
    /// answered again, every lookup again, and seals saved sends again.
    pub fn handle_connected(&mut self) {
        self.connected = true;
        self.incompatible = false;
        let sends = &self.sends;
        self.out.retain(|r| match r {
            Record::Forward { id, .. } => !sends.contains(id),
            Record::Lookup { .. } | Record::Receive | Record::Revoke { .. } => false,
            _ => true,
        });
        for (request, (_, revocation)) in &self.revokes {
            self.out.push(Record::Revoke {
                request: *request,
                revocation: Box::new(revocation.clone()),
            });
        }
        // A link takes messages only once it says so: one that only sends never does.
        if self.config.receive {
            self.out.insert(0, Record::Receive);
        }
        let mut cells = Vec::new();
        for send in self.sends.iter_mut() {
            for dev in &mut send.devices {
                match dev.state {
                    DevState::Sent | DevState::Pushed if !dev.envelope.is_empty() => {
                        dev.state = DevState::Sent;
                        self.out.push(Record::Forward {
                            to: dev.node,
                            id: send.id,
                            envelope: dev.envelope.clone(),
                        });
                    }
                    DevState::Unsealed => cells.push(send.cell),
                    _ => {}
                }
            }
        }
        for (request, (cell, _)) in &self.lookups {
            self.out.push(Record::Lookup {
                request: *request,
                cell: *cell,
            });
        }
        cells.sort();
        cells.dedup();
        for cell in cells {
            self.lookup_for(cell, Waiting::Restored);
        }
    }

    /// The link to the relay went down. What was written to it may be lost; it is sent
    /// again by [`Mailbox::handle_connected`].
    pub fn handle_disconnected(&mut self) {
        self.connected = false;
    }

    /// Sends `body` to every device of `to`. The outcome comes as [`Event::Sent`] with
    /// `token`. With `id`, the message gets that id and travels alone: a message sent again
    /// under the id of one sent before is delivered at most once.
    pub fn submit(
        &mut self,
        to: CellId,
        body: Bytes,
        id: Option<MsgId>,
        token: Token,
        now: Instant,
    ) {
        if self.closed {
            return self.report(token, Err(SendError::Closed));
        }
        if body.len() > MAX_BODY {
            return self.report(token, Err(SealError::TooLarge(body.len()).into()));
        }
        if let Some(id) = id
            && let Some(envelope) = self.sends.envelope_of(&id)
            && let Some(send) = self.sends.get_mut(&envelope)
        {
            // Sent before (in a bundle perhaps) and still kept: its outcome is this one's.
            let devices = send.devices.len();
            let settled = send.devices.iter().all(|d| d.state.settled());
            let status = match send.told {
                Told::Delivered => Some(Status::Delivered),
                Told::Queued => Some(Status::Queued),
                Told::Nothing | Told::Unknown => None,
            };
            match status {
                Some(status) => self.report(
                    token,
                    Ok(Sent {
                        id,
                        status,
                        devices,
                    }),
                ),
                None if settled => {
                    self.report(token, Err(SendError::Refused(RefuseCode::Other(0))))
                }
                None => {
                    // It waits for the same answers as the first send, and by a deadline of
                    // its own: a relay that is down does not keep it waiting longer.
                    send.tokens.push((token, id));
                    let due = now.plus_millis(self.config.ack_timeout_ms);
                    self.arm_deadline(due, envelope);
                }
            }
            return;
        }
        let due = now.plus_millis(self.config.ack_timeout_ms);
        let fresh = Fresh {
            cell: to,
            body,
            id,
            token,
            due,
        };
        match self.directories.get(&to) {
            Some(c) if now.millis_since(c.at) < DIRECTORY_TTL_MS => self.fresh.push(fresh),
            _ => {
                self.lookup_deadlines.push_back(due);
                self.lookup_for(to, Waiting::Send(fresh));
            }
        }
    }

    /// The devices of `cell`, as the relay lists them and checked against the id: an
    /// [`Event::Looked`] with `token`.
    pub fn lookup(&mut self, cell: CellId, token: Token) {
        if self.closed {
            return self.events.push_back(Event::Looked {
                token,
                result: Err(SendError::Closed),
            });
        }
        self.lookup_for(cell, Waiting::Lookup(token));
    }

    /// Hands the relay a revocation to keep: it then refuses the revoked device and gives the
    /// revocation to everyone who looks the cell up. The answer comes as
    /// [`Event::RevokeAnswered`] with `token` (sent again after a reconnection until it
    /// comes). This mailbox honours the revocation from now on, whatever the relay says.
    pub fn revoke(&mut self, revocation: crate::token::Token, token: Token) {
        if self.closed {
            return self.events.push_back(Event::RevokeAnswered {
                token,
                result: Err(SendError::Closed),
            });
        }
        let checked = match CellRevocation::verify(&revocation) {
            Ok(r) => r,
            Err(_) => {
                return self.events.push_back(Event::RevokeAnswered {
                    token,
                    result: Err(SendError::Refused(RefuseCode::Invalid)),
                });
            }
        };
        let _ = checked.insert_into(&mut self.revocations);
        self.directories.remove(&checked.cell());
        self.drop_revoked(checked.cell(), checked.node());
        let request = self.next_request();
        self.revokes.insert(request, (token, revocation.clone()));
        self.out.push(Record::Revoke {
            request,
            revocation: Box::new(revocation),
        });
    }

    /// The application has taken the first `count` messages ever handed over: what they
    /// came in is acknowledged end to end, and told DELIVERED once remembered on disk.
    pub fn handle_taken(&mut self, count: u64) {
        let count = count.min(self.handed);
        if count <= self.taken {
            return;
        }
        self.taken = count;
        while let Some(&(end, key)) = self.handed_order.front() {
            if end > count {
                break;
            }
            self.handed_order.pop_front();
            if let Some(Held::Handed { ack, time, .. }) = self.held.get(&key) {
                let (ack, time) = (*ack, *time);
                self.take_envelope(key, ack, time);
            }
        }
    }

    /// An envelope whose messages the application has: acknowledged now, remembered in the
    /// next commit, told DELIVERED after it.
    fn take_envelope(&mut self, key: (CellId, MsgId), ack: AckHandle, time: Timestamp) {
        // Its DELIVERED (after the commit) also tells the relay of a copy answered RESET.
        self.reset_holds.remove(&key.1);
        self.endpoint.ack(ack);
        self.seen.insert(key.0, key.1, time);
        let needs = self.needs_next_commit();
        self.held.insert(key, Held::Taken { needs });
        self.taken_order.push_back((needs, key));
        self.delivered_wait.push_back((needs, key.1));
    }

    /// The number of the commit that will hold what changes now (one is made even if
    /// nothing does).
    fn needs_next_commit(&mut self) -> u64 {
        self.want_commit = true;
        self.next_commit
    }

    /// The payload of one link DATA from the relay: a batch of records.
    pub fn handle_payload(&mut self, payload: Bytes, now: Instant, rng: &mut impl CryptoRngCore) {
        let mut delivered = Vec::new();
        for record in crate::relay::records(payload) {
            let record = match record {
                Ok(record) => record,
                // A DIRECTORY of the retired shape: the relay is older than this device, and
                // every lookup through it would get one.
                Err(DecodeError::UnsupportedVersion(_)) => {
                    self.incompatible_relay();
                    break;
                }
                // The records before it stand; nothing after it can be trusted to be framed.
                Err(_) => break,
            };
            match record {
                Record::Directory {
                    request,
                    cell,
                    devices,
                    revocations,
                } => self.directory(request, cell, &devices, &revocations, now),
                Record::Revoked { request, result } => {
                    if let Some((token, _)) = self.revokes.remove(&request) {
                        self.events.push_back(Event::RevokeAnswered {
                            token,
                            result: result.map_err(SendError::Refused),
                        });
                    }
                }
                Record::Accepted { to, id, status } => self.relay_answer(to, id, Ok(status), now),
                Record::Refused { to, id, code } => self.relay_answer(to, id, Err(code), now),
                Record::Deliver { from, id, envelope } => {
                    if let Some(id) = self.deliver(from, id, &envelope, now, rng) {
                        delivered.push(id);
                    }
                }
                // Device → relay records the relay sent back: not ours to act on.
                _ => {}
            }
        }
        self.push_delivered(delivered);
        self.hand_over();
    }

    /// A commit handed out by [`Mailbox::poll_commit`] is durable.
    pub fn handle_committed(&mut self, id: u64) {
        if self.in_flight == Some(id) {
            self.in_flight = None;
        }
        self.committed = self.committed.max(id);
        let done = self.committed;
        while let Some((needs, _)) = self.held_out.front() {
            if *needs > done {
                break;
            }
            if let Some((_, r)) = self.held_out.pop_front() {
                self.out.push(r);
            }
        }
        let mut ids = Vec::new();
        while let Some(&(needs, id)) = self.delivered_wait.front() {
            if needs > done {
                break;
            }
            self.delivered_wait.pop_front();
            ids.push(id);
        }
        self.push_delivered(ids);
        while let Some(&(needs, key)) = self.taken_order.front() {
            if needs > done {
                break;
            }
            self.taken_order.pop_front();
            if matches!(self.held.get(&key), Some(Held::Taken { .. })) {
                self.held.remove(&key);
            }
        }
        while let Some((needs, _)) = self.reports.front() {
            if *needs > done {
                break;
            }
            if let Some((_, ev)) = self.reports.pop_front() {
                self.events.push_back(ev);
            }
        }
    }

    /// Timers: retries after transient refusals, outcomes due, sends past their time, sweeps.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<(Instant, MsgId, NodeId)> = {
            let (due, later) = std::mem::take(&mut self.retries)
                .into_iter()
                .partition(|(at, ..)| *at <= now);
            self.retries = later;
            due
        };
        for (_, id, node) in due {
            if let Some(send) = self.sends.get_mut(&id)
                && let Some(dev) = send.devices.iter_mut().find(|d| d.node == node)
                && matches!(dev.state, DevState::Retry(_))
            {
                dev.state = DevState::Sent;
                self.out.push(Record::Forward {
                    to: node,
                    id,
                    envelope: dev.envelope.clone(),
                });
            }
        }
        while let Some(&(at, id)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            self.outcome_due(id);
        }
        self.lookups_due(now);
        let ended: Vec<MsgId> = self
            .reset_holds
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &ended {
            self.reset_holds.remove(id);
        }
        // No copy sealed anew came: the relay may forget the one that cannot be opened.
        self.push_delivered(ended);
        let time = now.timestamp();
        while let Some(&(at, id)) = self.expiries.front() {
            if at > time && self.sends.contains(&id) {
                break;
            }
            self.expiries.pop_front();
            if at <= time
                && let Some(mut send) = self.sends.remove(&id)
            {
                // Kept as long as the relay would keep it: no device answered in time.
                let events = resolve(&mut send, Err(SendError::Unknown(id)));
                self.events.extend(events);
                if send.saved {
                    self.ops.push(StoreOp::DeleteSend(id));
                }
            }
        }
        if now >= self.next_sweep {
            self.next_sweep = now.plus_millis(SWEEP_MS);
            self.endpoint.expire(now);
            self.seen.expire(time);
            let directories = std::mem::take(&mut self.directories);
            self.directories = directories
                .into_iter()
                .filter(|(_, c)| now.millis_since(c.at) < DIRECTORY_TTL_MS)
                .collect();
        }
    }

    /// Stops: what the application has taken (`taken` messages in all) is acknowledged, and
    /// nothing else; sends and lookups still waiting end with [`SendError::Closed`] (saved
    /// sends carry on in the next run). Messages of an envelope the application took only
    /// part of are remembered, so that its next delivery hands over only the rest. Then
    /// drain the last commit and payloads as usual.
    pub fn close(&mut self, taken: u64) {
        self.handle_taken(taken);
        if let Some(&(_, key)) = self.handed_order.front()
            && let Some(Held::Handed {
                time, first, ids, ..
            }) = self.held.get(&key)
            && *first < self.taken
        {
            let part = usize::try_from(self.taken - *first).unwrap_or(usize::MAX);
            for id in ids.iter().take(part) {
                self.seen.insert(key.0, *id, *time);
            }
        }
        self.closed = true;
        for fresh in std::mem::take(&mut self.fresh) {
            self.report(fresh.token, Err(SendError::Closed));
        }
        for (_, (_, waiters)) in std::mem::take(&mut self.lookups) {
            for w in waiters {
                match w {
                    Waiting::Send(f) => self.report(f.token, Err(SendError::Closed)),
                    Waiting::Lookup(token) => self.events.push_back(Event::Looked {
                        token,
                        result: Err(SendError::Closed),
                    }),
                    Waiting::Restored => {}
                }
            }
        }
        for (_, (token, _)) in std::mem::take(&mut self.revokes) {
            self.events.push_back(Event::RevokeAnswered {
                token,
                result: Err(SendError::Closed),
            });
        }
        let mut tokens = Vec::new();
        for send in self.sends.iter_mut() {
            tokens.extend(send.tokens.drain(..).map(|(t, _)| t));
        }
        for token in tokens {
            self.report(token, Err(SendError::Closed));
        }
        // Outcomes that waited for a commit that will come: still reported after it.
    }

    /// Whether the mailbox has nothing more to write: no commit to make or in flight, no
    /// payload waiting (for the end of [`Mailbox::close`]).
    pub fn is_idle(&self) -> bool {
        self.ops.is_empty()
            && self.in_flight.is_none()
            && self.out.is_empty()
            && self.held_out.is_empty()
            && self.delivered_wait.is_empty()
            && self.fresh.is_empty()
    }

    /// The next batch of changes to make durable, if any and none is in flight.
    pub fn poll_commit(&mut self, now: Instant, rng: &mut impl CryptoRngCore) -> Option<Commit> {
        self.advance(now, rng);
        if self.in_flight.is_some() || (self.ops.is_empty() && !self.want_commit) {
            return None;
        }
        let id = self.next_commit;
        self.next_commit += 1;
        self.want_commit = false;
        self.in_flight = Some(id);
        Some(Commit {
            id,
            ops: std::mem::take(&mut self.ops),
        })
    }

    /// The next payload for the relay link, if any (and the link is up).
    pub fn poll_transmit(&mut self, now: Instant, rng: &mut impl CryptoRngCore) -> Option<Bytes> {
        self.advance(now, rng);
        if !self.connected || self.out.is_empty() {
            return None;
        }
        let mut buf = Vec::new();
        let mut taken = 0;
        for r in &self.out {
            if !buf.is_empty() && buf.len() + 4 + r.encoded_len() > MAX_BATCH {
                break;
            }
            put_record(&mut buf, r);
            taken += 1;
        }
        self.out.drain(..taken);
        Some(Bytes::from(buf))
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call [`Mailbox::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let retry = self.retries.iter().map(|(at, ..)| *at).min();
        let deadline = [
            self.deadlines.front().map(|(at, _)| *at),
            self.lookup_deadlines.front().copied(),
        ]
        .into_iter()
        .flatten()
        .min();
        let expiry = self
            .expiries
            .front()
            .map(|(at, _)| Instant(at.0.saturating_mul(1000)));
        let hold = self.reset_holds.values().min().copied();
        [retry, deadline, expiry, hold, Some(self.next_sweep)]
            .into_iter()
            .flatten()
            .min()
    }

    // ---------------------------------------------------------------------------------------

    fn report(&mut self, token: Token, result: Result<Sent, SendError>) {
        self.events.push_back(Event::Sent { token, result });
    }

    /// Seals this round's sends, seals acknowledgements, and gathers what changed for the
    /// store; holds back what was sealed under a lease that must be durable first.
    fn advance(&mut self, now: Instant, rng: &mut impl CryptoRngCore) {
        let before = self.out.len();
        self.seal_fresh(now, rng);
        for id in std::mem::take(&mut self.to_seal) {
            self.seal_kept(id, now, rng);
        }
        for reply in self.endpoint.poll_acks(rng) {
            self.out.push(Record::Forward {
                to: reply.to,
                id: reply.id,
                envelope: reply.envelope,
            });
        }
        let changes = self.endpoint.take_changes();
        if changes.critical || !self.held_out.is_empty() {
            // Everything from the first record that needs the commit on waits for it, in order.
            let needs = if changes.critical {
                self.needs_next_commit()
            } else {
                self.held_out.back().map_or(self.next_commit, |(n, _)| *n)
            };
            let from = if self.held_out.is_empty() { before } else { 0 };
            for r in self.out.drain(from.min(self.out.len())..) {
                self.held_out.push_back((needs, r));
            }
        }
        for (key, record) in changes.put {
            self.ops.push(StoreOp::PutSession(key, record));
        }
        for key in changes.delete {
            self.ops.push(StoreOp::DeleteSession(key));
        }
        for change in self.seen.take_changes() {
            self.ops.push(StoreOp::Seen(change));
        }
    }

    /// Ends the sends still waiting for their lookup at their deadline: never sealed, so
    /// not sent (and never later: a late answer finds no one waiting).
    fn lookups_due(&mut self, now: Instant) {
        let mut due = false;
        while self.lookup_deadlines.front().is_some_and(|at| *at <= now) {
            self.lookup_deadlines.pop_front();
            due = true;
        }
        if !due {
            return;
        }
        let mut ended = Vec::new();
        for (cell, waiters) in self.lookups.values_mut() {
            waiters.retain(|w| match w {
                Waiting::Send(f) if f.due <= now => {
                    ended.push((f.token, *cell));
                    false
                }
                _ => true,
            });
        }
        // A lookup no one waits for any more is not asked again on the next connection.
        self.lookups.retain(|_, (_, waiters)| !waiters.is_empty());
        for (token, cell) in ended {
            self.report(token, Err(SendError::NotSent(cell)));
        }
    }

    /// The outcome of the kept send `id` is due at `at`.
    fn arm_deadline(&mut self, at: Instant, id: MsgId) {
        let i = self.deadlines.partition_point(|(t, _)| *t <= at);
        self.deadlines.insert(i, (at, id));
    }

    fn lookup_for(&mut self, cell: CellId, waiting: Waiting) {
        if self.incompatible {
            return self.fail_waiter(waiting, &SendError::IncompatibleRelay);
        }
        if let Some((_, waiters)) = self.lookups.values_mut().find(|(c, _)| *c == cell) {
            waiters.push(waiting);
            return;
        }
        let request = self.next_request();
        self.lookups.insert(request, (cell, vec![waiting]));
        self.out.push(Record::Lookup { request, cell });
    }

    /// The next number for a LOOKUP or a REVOKE (never 0).
    fn next_request(&mut self) -> u32 {
        let request = self.next_request;
        self.next_request = self.next_request.wrapping_add(1).max(1);
        request
    }

    fn fail_waiter(&mut self, waiting: Waiting, error: &SendError) {
        match waiting {
            Waiting::Send(f) => self.report(f.token, Err(error.clone())),
            Waiting::Lookup(token) => self.events.push_back(Event::Looked {
                token,
                result: Err(error.clone()),
            }),
            Waiting::Restored => {}
        }
    }

    /// Every lookup waiting fails with [`SendError::IncompatibleRelay`], and every lookup
    /// until the link is up again.
    fn incompatible_relay(&mut self) {
        self.incompatible = true;
        for (_, (_, waiters)) in std::mem::take(&mut self.lookups) {
            for w in waiters {
                self.fail_waiter(w, &SendError::IncompatibleRelay);
            }
        }
    }

    /// A revocation of `node` by `cell` is honoured from now on: kept sends stop waiting for
    /// the device (refused, `not_allowed`), so that nothing, a RESET least of all (anyone can
    /// forge one), seals them for it again.
    fn drop_revoked(&mut self, cell: CellId, node: NodeId) {
        let mut ids = Vec::new();
        for send in self.sends.iter_mut().filter(|s| s.cell == cell) {
            for dev in send.devices.iter_mut().filter(|d| d.node == node) {
                if !dev.state.settled() {
                    dev.state = DevState::Refused(RefuseCode::NotAllowed);
                    dev.device = None;
                    ids.push(send.id);
                }
            }
        }
        for id in ids {
            self.settle(id);
        }
    }

    /// Checks the revocations a DIRECTORY for `cell` carries and honours the new ones (the
    /// application is told, to keep them). A signed revocation counts even if the answer
    /// around it does not check out; one that does not verify, or that another cell issued,
    /// makes the answer untrusted, as a lie about a device does.
    fn learn_revocations(
        &mut self,
        cell: CellId,
        tokens: &[crate::token::Token],
    ) -> Result<(), DirectoryError> {
        let mut learned = Vec::new();
        let mut bad = None;
        for t in tokens {
            match CellRevocation::verify(t) {
                Ok(r) if r.cell() == cell => {
                    if !self.revocations.is_revoked(cell, r.node())
                        && r.insert_into(&mut self.revocations).is_ok()
                    {
                        self.drop_revoked(cell, r.node());
                        learned.push(t.clone());
                    }
                }
                Ok(r) => bad = Some(DirectoryError::WrongCell(r.cell())),
                Err(e) => bad = Some(DirectoryError::Revocation(e)),
            }
        }
        if !learned.is_empty() {
            self.events.push_back(Event::Revocations(learned));
        }
        bad.map_or(Ok(()), Err)
    }

    fn directory(
        &mut self,
        request: u32,
        cell: CellId,
        entries: &[DirectoryEntry],
        revocations: &[crate::token::Token],
        now: Instant,
    ) {
        let Some((asked, waiters)) = self.lookups.remove(&request) else {
            return;
        };
        let result = if asked != cell {
            Err(SendError::Directory {
                cell: asked,
                error: DirectoryError::WrongCell(cell),
            })
        } else if let Err(error) = self.learn_revocations(cell, revocations) {
            Err(SendError::Directory { cell, error })
        } else {
            // With what was just learned: a device the cell revoked is never sealed for.
            match Directory::verify(cell, entries, now.timestamp(), &self.revocations) {
                Ok(dir) => Ok(dir),
                Err(DirectoryError::NoDevices(c)) => Err(SendError::UnknownCell(c)),
                Err(error) => Err(SendError::Directory { cell, error }),
            }
        };
        if let Ok(dir) = &result {
            let devices: Arc<[Arc<RemoteDevice>]> =
                dir.devices.iter().cloned().map(Arc::new).collect();
            self.directories.insert(cell, Cached { devices, at: now });
        }
        for w in waiters {
            match (w, &result) {
                (Waiting::Lookup(token), r) => self.events.push_back(Event::Looked {
                    token,
                    result: r.clone(),
                }),
                (Waiting::Send(fresh), Ok(_)) => self.fresh.push(fresh),
                (Waiting::Send(fresh), Err(e)) => self.report(fresh.token, Err(e.clone())),
                (Waiting::Restored, _) => self.reseal_restored(cell),
            }
        }
    }

    /// Seals again, for the devices now listed, the saved sends to `cell` that wait for it.
    /// A device no longer listed will not get them from this relay.
    fn reseal_restored(&mut self, cell: CellId) {
        let devices = self.directories.get(&cell).map(|c| Arc::clone(&c.devices));
        let ids: Vec<MsgId> = self
            .sends
            .iter()
            .filter(|s| s.cell == cell && s.devices.iter().any(|d| d.state == DevState::Unsealed))
            .map(|s| s.id)
            .collect();
        for id in ids {
            let Some(send) = self.sends.get_mut(&id) else {
                continue;
            };
            for dev in &mut send.devices {
                if dev.state != DevState::Unsealed {
                    continue;
                }
                let found = devices
                    .as_ref()
                    .and_then(|d| d.iter().find(|r| r.node() == dev.node).cloned());
                match found {
                    Some(remote) => dev.device = Some(remote),
                    None => dev.state = DevState::Refused(RefuseCode::UnknownDevice),
                }
            }
            self.to_seal.push(id);
        }
    }

    /// Seals this round's sends: those to one cell in bundles of up to [`BUNDLE_MESSAGES`]
    /// messages and [`BUNDLE_BYTES`] of bodies, in the order they were submitted; one with
    /// an id of the application's alone.
    fn seal_fresh(&mut self, now: Instant, rng: &mut impl CryptoRngCore) {
        if self.fresh.is_empty() {
            return;
        }
        let mut fresh = std::mem::take(&mut self.fresh);
        // Stable: each cell's messages keep their order.
        fresh.sort_by_key(|f| f.cell);
        let mut fresh = fresh.into_iter().peekable();
        while let Some(first) = fresh.next() {
            let cell = first.cell;
            let Some(devices) = self.directories.get(&cell).map(|c| Arc::clone(&c.devices)) else {
                self.report(first.token, Err(SendError::Closed));
                continue;
            };
            if first.id.is_some() {
                self.seal_and_forward(cell, &devices, vec![first], now, rng);
                continue;
            }
            let mut bytes = first.body.len();
            let mut bundle = vec![first];
            while let Some(next) = fresh.peek().filter(|f| f.cell == cell && f.id.is_none())
                && bundle.len() < BUNDLE_MESSAGES
                && bytes + next.body.len() <= BUNDLE_BYTES
            {
                bytes += next.body.len();
                if let Some(next) = fresh.next() {
                    bundle.push(next);
                }
            }
            self.seal_and_forward(cell, &devices, bundle, now, rng);
        }
    }

    fn seal_and_forward(
        &mut self,
        cell: CellId,
        devices: &[Arc<RemoteDevice>],
        bundle: Vec<Fresh>,
        now: Instant,
        rng: &mut impl CryptoRngCore,
    ) {
        let single = bundle.len() == 1;
        // Each message's deadline counts from its submission; the bundle's is the earliest.
        let due = bundle.iter().map(|f| f.due).min().unwrap_or(now);
        let id = match bundle.first().and_then(|f| f.id) {
            Some(id) => id,
            None => self.sends.next_id(),
        };
        let mut tokens = Vec::with_capacity(bundle.len());
        let mut messages = Vec::with_capacity(bundle.len());
        for f in bundle {
            let mid = if single { id } else { self.sends.message_id() };
            tokens.push((f.token, mid));
            messages.push((mid, f.body));
        }
        let mut send = PendingSend {
            id,
            cell,
            messages,
            devices: devices
                .iter()
                .map(|d| DeviceSend {
                    node: d.node(),
                    device: Some(Arc::clone(d)),
                    envelope: Bytes::new(),
                    state: DevState::Unsealed,
                })
                .collect(),
            tokens,
            told: Told::Nothing,
            saved: false,
            created: now.timestamp(),
        };
        if let Err(e) = Self::seal_devices(&mut self.endpoint, &mut self.out, &mut send, now, rng) {
            // None of its FORWARDs go out (sealing for one device failed after earlier ones
            // were sealed): its messages fail as one.
            self.out
                .retain(|r| !matches!(r, Record::Forward { id: f, .. } if *f == id));
            let events = resolve(&mut send, Err(e.into()));
            self.events.extend(events);
            return;
        }
        if self.sends.len() >= MAX_RETAINED {
            self.forget_reported();
        }
        self.arm_deadline(due, id);
        self.expiries.push_back((send.created.plus(RETAIN), id));
        self.sends.insert(send);
    }

    /// Seals `send` for each of its devices that waits to be sealed and whose keys are
    /// known, and forwards each.
    fn seal_devices(
        endpoint: &mut Endpoint,
        out: &mut Vec<Record>,
        send: &mut PendingSend,
        now: Instant,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(), SealError> {
        let single = matches!(&send.messages[..], [(m, _)] if *m == send.id);
        for dev in &mut send.devices {
            let Some(device) = dev
                .device
                .clone()
                .filter(|_| dev.state == DevState::Unsealed)
            else {
                continue;
            };
            let envelope = if single {
                endpoint.seal(&device, send.id, now, &send.messages[0].1, rng)?
            } else {
                endpoint.seal_bundle(&device, send.id, now, &send.messages, rng)?
            };
            dev.envelope = envelope.clone();
            dev.state = DevState::Sent;
            out.push(Record::Forward {
                to: dev.node,
                id: send.id,
                envelope,
            });
        }
        Ok(())
    }

    /// Seals a kept send again for its devices marked for it. A device it cannot be sealed
    /// for (a key HPKE refuses) is refused.
    fn seal_kept(&mut self, id: MsgId, now: Instant, rng: &mut impl CryptoRngCore) {
        let Some(send) = self.sends.get_mut(&id) else {
            return;
        };
        if send
            .devices
            .iter()
            .any(|d| d.state == DevState::Unsealed && d.device.is_none())
        {
            // A saved send whose device's keys this run has not seen: look its cell up.
            let cell = send.cell;
            self.lookup_for(cell, Waiting::Restored);
            return;
        }
        if Self::seal_devices(&mut self.endpoint, &mut self.out, send, now, rng).is_err() {
            for d in &mut send.devices {
                if d.state == DevState::Unsealed && d.device.is_some() {
                    d.state = DevState::Refused(RefuseCode::Other(0));
                }
            }
        }
        self.settle(id);
    }

    /// Marks a kept send to be sealed again (after a RESET) for `device`, or (restored) for
    /// every device that waits for it, in the next round.
    fn reseal(&mut self, id: MsgId, device: Option<NodeId>) {
        if let Some(send) = self.sends.get_mut(&id) {
            for dev in &mut send.devices {
                if device.is_none_or(|n| n == dev.node) && !dev.state.settled() {
                    dev.state = DevState::Unsealed;
                }
            }
            self.to_seal.push(id);
        }
    }

    /// Makes room in memory: forgets the oldest sends whose outcome was reported (a saved
    /// one is still on disk and comes back at the next start).
    fn forget_reported(&mut self) {
        let reported: Vec<MsgId> = self
            .sends
            .iter()
            .filter(|s| s.tokens.is_empty() && s.told != Told::Nothing)
            .map(|s| s.id)
            .take(MAX_RETAINED / 16)
            .collect();
        for id in reported {
            self.sends.remove(&id);
        }
    }

    fn relay_answer(
        &mut self,
        to: NodeId,
        id: MsgId,
        answer: Result<Accepted, RefuseCode>,
        now: Instant,
    ) {
        let Some(send) = self.sends.get_mut(&id) else {
            return;
        };
        let Some(dev) = send.devices.iter_mut().find(|d| d.node == to) else {
            return;
        };
        // One answer per FORWARD, except that a pushed envelope whose device left before
        // taking it is reported again: queued, or refused with a transient code when the
        // relay could not keep it (13.5), and then it is sent again as after any other.
        let again = dev.state == DevState::Pushed
            && match answer {
                Ok(a) => a == Accepted::Queued,
                Err(code) => code.is_transient(),
            };
        if dev.state != DevState::Sent && !again {
            return;
        }
        dev.state = match answer {
            Ok(Accepted::Pushed) => DevState::Pushed,
            Ok(Accepted::Queued) => DevState::Queued,
            Err(code) if code.is_transient() => {
                let at = now.plus_millis(RETRY_AFTER_MS);
                self.retries.push((at, id, to));
                DevState::Retry(at)
            }
            Err(code) => DevState::Refused(code),
        };
        self.settle(id);
    }

    /// Opens one DELIVER; returns its id if the relay may be told DELIVERED now.
    fn deliver(
        &mut self,
        from: NodeId,
        id: MsgId,
        envelope: &[u8],
        now: Instant,
        rng: &mut impl CryptoRngCore,
    ) -> Option<MsgId> {
        // A mailbox that does not receive leaves messages to the relay, unopened.
        if !self.config.receive && matches!(envelope.get(1), Some(1 | 2)) {
            return None;
        }
        let opened = self
            .endpoint
            .open(from, id, envelope, now, &self.revocations, rng);
        match opened {
            Ok(Opened::Messages(received)) => return self.received(received),
            Ok(Opened::Acked { from, ids, reset }) => {
                for id in ids {
                    if let Some(send) = self.sends.get_mut(&id)
                        && let Some(dev) = send.devices.iter_mut().find(|d| d.node == from)
                    {
                        dev.state = DevState::Acked;
                        self.settle(id);
                    }
                }
                if reset {
                    self.resend_to(from);
                }
            }
            Ok(Opened::Reset { from }) => self.resend_to(from),
            Ok(Opened::Unknown { reply }) => {
                self.out.push(Record::Forward {
                    to: reply.to,
                    id: reply.id,
                    envelope: reply.envelope,
                });
                if self.reset_holds.len() < MAX_RESET_HOLDS {
                    self.reset_holds
                        .entry(id)
                        .or_insert(now.plus_millis(RESET_HOLD_MS));
                    return None;
                }
            }
            // Not now: the relay keeps it and hands it again on the next connection.
            Err(OpenError::RateLimited(_)) => return None,
            // Answers to a session of an earlier process of this device, forgeries, junk:
            // the relay may forget them.
            Err(_) => {}
        }
        Some(id)
    }

    /// An envelope of messages opened: new ones go to the application; a copy of one this
    /// run holds waits for it; one delivered before is acknowledged again.
    fn received(&mut self, r: Received) -> Option<MsgId> {
        let key = (r.from_cell, r.id);
        match self.held.get(&key) {
            // Its first copy is with the application: it is answered when taken.
            Some(Held::Handed { .. }) => return None,
            Some(Held::Taken { needs }) => {
                let needs = *needs;
                self.endpoint.ack(r.ack);
                self.delivered_wait.push_back((needs, r.id));
                return None;
            }
            None => {}
        }
        match self.seen.check(r.from_cell, r.id, r.time) {
            Verdict::Seen => {
                self.endpoint.ack(r.ack);
                self.reset_holds.remove(&r.id);
                return Some(r.id);
            }
            Verdict::TooOld => return Some(r.id),
            Verdict::New => {}
        }
        // Messages of a bundle the application took part of in an earlier run are not
        // handed over twice.
        let (cell, time, ack) = (r.from_cell, r.time, r.ack);
        let bundle = r.messages.len() != 1 || r.messages[0].id != r.id;
        let messages: Vec<Message> = r
            .messages
            .into_iter()
            .filter(|m| !bundle || self.seen.check(cell, m.id, time) == Verdict::New)
            .collect();
        if messages.is_empty() {
            self.take_envelope(key, ack, time);
            return None;
        }
        let first = self.handed;
        self.handed += messages.len() as u64;
        let ids = messages.iter().map(|m| m.id).collect();
        self.to_app.extend(messages);
        self.held.insert(
            key,
            Held::Handed {
                ack,
                time,
                first,
                ids,
            },
        );
        self.handed_order.push_back((self.handed, key));
        None
    }

    fn hand_over(&mut self) {
        let mut messages = std::mem::take(&mut self.to_app);
        while !messages.is_empty() {
            let rest = messages.split_off(messages.len().min(HAND_OVER));
            self.events.push_back(Event::Messages(messages));
            messages = rest;
        }
    }

    fn push_delivered(&mut self, ids: Vec<MsgId>) {
        for chunk in ids.chunks(MAX_IDS) {
            self.out.push(Record::Delivered(chunk.to_vec()));
        }
    }

    /// A device lost its session with us: seal again what it has not acknowledged.
    fn resend_to(&mut self, device: NodeId) {
        let ids: Vec<MsgId> = self
            .sends
            .iter()
            .filter(|s| {
                s.devices.iter().any(|d| {
                    d.node == device
                        && matches!(
                            d.state,
                            DevState::Sent
                                | DevState::Pushed
                                | DevState::Queued
                                | DevState::Retry(_)
                        )
                })
            })
            .map(|s| s.id)
            .collect();
        for id in ids {
            self.reseal(id, Some(device));
        }
    }

    /// Resolves a send whose outcome is known (saving it first when what was promised
    /// must survive a restart); forgets it once every device is settled.
    fn settle(&mut self, id: MsgId) {
        let Some(send) = self.sends.get_mut(&id) else {
            return;
        };
        let acked = send.devices.iter().any(|d| d.state == DevState::Acked);
        let queued = send.devices.iter().any(|d| d.state == DevState::Queued);
        let waiting = send.devices.iter().any(|d| d.state.waiting());
        let settled = send.devices.iter().all(|d| d.state.settled());
        let outcome = if acked {
            Some(Ok(Status::Delivered))
        } else if waiting {
            None
        } else if queued {
            Some(Ok(Status::Queued))
        } else {
            let code = send.devices.iter().find_map(|d| match d.state {
                DevState::Refused(c) => Some(c),
                _ => None,
            });
            Some(Err(SendError::Refused(
                code.unwrap_or(RefuseCode::Other(0)),
            )))
        };
        if settled {
            let told_unknown = send.told == Told::Unknown;
            if let Some(outcome) = outcome {
                let events = resolve(send, outcome);
                self.events.extend(events);
            }
            if told_unknown {
                // The application was told it did not know: it may send this again under its
                // id, from this run or another. Kept (and saved) until it expires, so that such
                // a retry learns the outcome instead of sending it twice.
                self.ops.push(StoreOp::PutSend(id, send.save()));
                send.saved = true;
                return;
            }
            if send.saved {
                self.ops.push(StoreOp::DeleteSend(id));
            }
            self.sends.remove(&id);
            return;
        }
        match outcome {
            // Some device still has to get it: the promise must outlive this process.
            Some(Ok(status)) => {
                let needs = self.next_commit;
                self.want_commit = true;
                promise(send, status, &mut self.ops, &mut self.reports, needs);
            }
            Some(Err(e)) => {
                let events = resolve(send, Err(e));
                self.events.extend(events);
            }
            None if send.saved => self.ops.push(StoreOp::PutSend(id, send.save())),
            None => {}
        }
    }

    /// The acknowledgement timeout of a send passed.
    fn outcome_due(&mut self, id: MsgId) {
        let Some(send) = self.sends.get_mut(&id) else {
            return;
        };
        if send.tokens.is_empty() {
            return;
        }
        if send.devices.iter().any(|d| d.state == DevState::Queued) {
            // Stored for some device while others did not answer: queued, saved first.
            let needs = self.next_commit;
            self.want_commit = true;
            promise(
                send,
                Status::Queued,
                &mut self.ops,
                &mut self.reports,
                needs,
            );
            return;
        }
        // Kept, and tried again on reconnects: no promise made, but saved, so that the
        // application may send it again under its id in a later run and be told its outcome.
        let events = resolve(send, Err(SendError::Unknown(id)));
        self.events.extend(events);
        self.ops.push(StoreOp::PutSend(id, send.save()));
        send.saved = true;
    }
}

/// Saves `send` and reports `status` to whoever waits once the commit `needs` is durable.
fn promise(
    send: &mut PendingSend,
    status: Status,
    ops: &mut Vec<StoreOp>,
    reports: &mut VecDeque<(u64, Event)>,
    needs: u64,
) {
    ops.push(StoreOp::PutSend(send.id, send.save()));
    send.saved = true;
    send.told = match status {
        Status::Delivered => Told::Delivered,
        Status::Queued => Told::Queued,
    };
    let devices = send.devices.len();
    for (token, mid) in send.tokens.drain(..) {
        let result = Ok(Sent {
            id: mid,
            status,
            devices,
        });
        reports.push_back((needs, Event::Sent { token, result }));
    }
}

/// Reports `outcome` to everyone waiting for `send`.
fn resolve(send: &mut PendingSend, outcome: Result<Status, SendError>) -> Vec<Event> {
    let devices = send.devices.len();
    send.told = match &outcome {
        Ok(Status::Delivered) => Told::Delivered,
        Ok(Status::Queued) => Told::Queued,
        Err(_) => Told::Unknown,
    };
    send.tokens
        .drain(..)
        .map(|(token, mid)| {
            let result = match &outcome {
                Ok(status) => Ok(Sent {
                    id: mid,
                    status: *status,
                    devices,
                }),
                Err(SendError::Unknown(_)) => Err(SendError::Unknown(mid)),
                Err(e) => Err(e.clone()),
            };
            Event::Sent { token, result }
        })
        .collect()
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox")
            .field("relay", &self.relay)
            .field("connected", &self.connected)
            .field("sends", &self.sends.len())
            .field("handed", &self.handed)
            .field("taken", &self.taken)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
