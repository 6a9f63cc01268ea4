//! Ordered writes to one peer's link that never make the writer wait.
//!
//! A driver loop (a mailbox's, a relay's) must keep reading while a peer's link is slow, or
//! the two sides could wait on each other. An [`Outbox`] writes each payload straight into the
//! link's queue while that has room and nothing of the outbox is still waiting, so the common
//! case costs no hand-off between tasks; otherwise the payload waits, in order, for a task
//! that writes it as room appears. The caller bounds what waits (see [`Outbox::waiting`] and
//! [`Outbox::backlog`]), and may count it, with other outboxes', in a shared total
//! ([`Outbox::counted`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::node::{PeerSender, TrySendError};

/// Writes payloads to one link, in order, without waiting.
#[derive(Debug)]
pub(crate) struct Outbox {
    link: PeerSender,
    queue: mpsc::UnboundedSender<Bytes>,
    /// Bytes given to the task and not yet taken by the link: this outbox's, and the total
    /// of every outbox sharing it.
    waiting: Arc<Counts>,
    task: Option<JoinHandle<()>>,
}

/// What an outbox's task has not handed to the link yet.
#[derive(Debug, Default)]
struct Counts {
    mine: AtomicUsize,
    total: Option<Arc<AtomicUsize>>,
}

impl Counts {
    fn add(&self, n: usize) -> usize {
        if let Some(t) = &self.total {
            t.fetch_add(n, Ordering::AcqRel);
        }
        self.mine.fetch_add(n, Ordering::AcqRel) + n
    }

    fn sub(&self, n: usize) {
        if let Some(t) = &self.total {
            t.fetch_sub(n, Ordering::AcqRel);
        }
        self.mine.fetch_sub(n, Ordering::AcqRel);
    }
}

impl Outbox {
    /// An outbox for `link` (it spawns the task that writes what has to wait).
    pub(crate) fn new(link: PeerSender) -> Self {
        Self::start(link, None)
    }

    /// An outbox for `link` that also counts what waits in `total`, shared with others.
    pub(crate) fn counted(link: PeerSender, total: Arc<AtomicUsize>) -> Self {
        Self::start(link, Some(total))
    }

    fn start(link: PeerSender, total: Option<Arc<AtomicUsize>>) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let waiting = Arc::new(Counts {
            mine: AtomicUsize::new(0),
            total,
        });
        let task = tokio::spawn(write_waiting(link.clone(), rx, Arc::clone(&waiting)));
        Self {
            link,
            queue,
            waiting,
            task: Some(task),
        }
    }

    /// Writes `payload` after everything written before it; returns the bytes now waiting.
    /// Payloads for a link that closed are dropped.
    pub(crate) fn send(&self, payload: Bytes) -> usize {
        // Zero means the task has handed everything earlier to the link: writing straight
        // into the link keeps the order.
        let payload = if self.waiting.mine.load(Ordering::Acquire) == 0 {
            match self.link.try_send(payload) {
                Ok(()) => return 0,
                Err(TrySendError::Full(payload)) => payload,
                Err(e) => {
                    tracing::debug!(error = ?e, "payload dropped");
                    return 0;
                }
            }
        } else {
            payload
        };
        let len = payload.len();
        let waiting = self.waiting.add(len);
        if self.queue.send(payload).is_err() {
            self.waiting.sub(len);
        }
        waiting
    }

    /// Bytes written but not yet taken by the link.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.mine.load(Ordering::Acquire)
    }

    /// Bytes written and not yet taken by the link's driver: what waits here and what waits
    /// in the link's command queue.
    pub(crate) fn backlog(&self) -> usize {
        self.waiting() + self.link.queued_bytes()
    }

    /// Waits up to `patience` for what is waiting to reach the link, then stops.
    pub(crate) async fn finish(mut self, patience: Duration) {
        let (closed, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.queue, closed));
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(patience, &mut task).await.is_err()
        {
            task.abort();
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Gives back, when the task ends however it ends (an abort included), what it still held.
struct Unwritten {
    rx: mpsc::UnboundedReceiver<Bytes>,
    waiting: Arc<Counts>,
    /// A payload taken from `rx` and not yet in the link.
    holding: usize,
}

impl Drop for Unwritten {
    fn drop(&mut self) {
        self.rx.close();
        let mut left = std::mem::take(&mut self.holding);
        while let Ok(p) = self.rx.try_recv() {
            left += p.len();
        }
        self.waiting.sub(left);
    }
}

async fn write_waiting(link: PeerSender, rx: mpsc::UnboundedReceiver<Bytes>, waiting: Arc<Counts>) {
    let mut u = Unwritten {
        rx,
        waiting,
        holding: 0,
    };
    while let Some(payload) = u.rx.recv().await {
        let len = payload.len();
        u.holding = len;
        let sent = link.send(payload).await;
        u.holding = 0;
        u.waiting.sub(len);
        if sent.is_err() {
            // The link closed: what waits would go nowhere (given back as `u` drops).
            return;
        }
    }
}
