//! Publishing misses: the [`MissPublisher`] seam and its single-machine
//! implementation, [`LocalMissQueue`].
//!
//! Publishing never blocks a Lookup: `publish` only hands the event to a
//! bounded buffer. On one machine a flusher task writes the buffer to the
//! durable queue in the redb file in batches (one commit per batch), and
//! the fill loop reads that queue through [`kfc::MissSource`]. A miss still
//! in the buffer at a crash is not lost for good: the key is still unknown,
//! so the next Lookup of it queues it again.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use embark_proto::embark::v1::{DeadLetter, MissEvent};
use embark_store::{StoreError, embedded::PendingMisses, now_unix_ms};
use kfc::{MissSource, SourceError};
use tokio::sync::{Mutex, Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// Where a Lookup sends its misses.
pub trait MissPublisher: Send + Sync + 'static {
    /// Queues `event` without waiting. Returns false if it was dropped (the
    /// buffer is full); the caller then forgets the key's dedup entry so the
    /// next Lookup tries again.
    fn publish(&self, event: MissEvent) -> bool;
}

/// The durable in-process miss queue of `embark up` / `embark serve` on the
/// embedded store.
pub struct LocalMissQueue {
    pending: PendingMisses,
    buffer: mpsc::Sender<MissEvent>,
    /// Taken by the flusher task.
    buffer_rx: Mutex<Option<mpsc::Receiver<MissEvent>>>,
    /// Wakes the fill loop when misses were written.
    written: Notify,
    stop: CancellationToken,
    /// The durable queue holds at most this many misses; beyond it new
    /// misses are dropped (counted) and queued again by a later Lookup,
    /// so a flood of unknown keys cannot fill the disk.
    max_queued: u64,
    /// The queue's length after the last write or settle (read on the
    /// Lookup path without touching the file).
    queued: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for LocalMissQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalMissQueue").finish_non_exhaustive()
    }
}

/// Misses written per redb commit at most.
const FLUSH_BATCH: usize = 1024;

impl LocalMissQueue {
    /// A queue over `pending` with room for `buffer` misses not yet
    /// written, holding at most `max_queued` on disk.
    pub fn new(pending: PendingMisses, buffer: usize, max_queued: u64) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let q = Arc::new(Self {
            pending,
            buffer: tx,
            buffer_rx: Mutex::new(Some(rx)),
            written: Notify::new(),
            stop: CancellationToken::new(),
            max_queued: max_queued.max(1),
            queued: std::sync::atomic::AtomicU64::new(0),
        });
        q.update_depth();
        q
    }

    /// Starts the task that writes buffered misses to the durable queue.
    /// It runs until [`LocalMissQueue::close`], then writes what is left.
    pub fn spawn_flusher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let Some(mut rx) = this.buffer_rx.lock().await.take() else {
                return;
            };
            let mut failures = 0u32;
            let backoff = kfc::backoff::Backoff::default();
            loop {
                let first = tokio::select! {
                    biased;
                    m = rx.recv() => m,
                    _ = this.stop.cancelled() => None,
                };
                let Some(first) = first else { break };
                let mut batch = vec![first];
                while batch.len() < FLUSH_BATCH {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                // Retry until written: these misses are acknowledged to
                // nobody else, so dropping them would lose them until the
                // next Lookup.
                loop {
                    match this.write(batch.clone()).await {
                        Ok(()) => {
                            failures = 0;
                            break;
                        }
                        Err(e) => {
                            failures += 1;
                            let delay = backoff.delay(failures);
                            tracing::error!(error = %e, ?delay, "writing misses to the durable queue failed");
                            if this.stop.is_cancelled() {
                                break;
                            }
                            tokio::time::sleep(delay).await;
                        }
                    }
                }
            }
            // Shutdown: write what the buffer still holds.
            rx.close();
            let mut rest = Vec::new();
            while let Ok(m) = rx.try_recv() {
                rest.push(m);
            }
            if !rest.is_empty() {
                let n = rest.len();
                match this.write(rest).await {
                    Ok(()) => tracing::info!(misses = n, "flushed buffered misses at shutdown"),
                    Err(e) => tracing::error!(error = %e, misses = n, "could not flush misses at shutdown"),
                }
            }
        })
    }

    /// Stops the flusher after it has written what is buffered.
    pub fn close(&self) {
        self.stop.cancel();
    }

    async fn write(&self, batch: Vec<MissEvent>) -> Result<(), StoreError> {
        let pending = self.pending.clone();
        let n = batch.len();
        tokio::task::spawn_blocking(move || pending.enqueue(&batch)).await.map_err(StoreError::Task)??;
        metrics::counter!("embark_misses_queued_total").increment(n as u64);
        self.update_depth();
        self.written.notify_one();
        Ok(())
    }

    /// Misses in the durable queue.
    pub fn depth(&self) -> u64 {
        self.pending.len().unwrap_or(0)
    }

    fn update_depth(&self) {
        let depth = self.depth();
        self.queued.store(depth, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("embark_miss_queue_depth").set(depth as f64);
    }
}

impl MissPublisher for LocalMissQueue {
    fn publish(&self, event: MissEvent) -> bool {
        if self.queued.load(std::sync::atomic::Ordering::Relaxed) >= self.max_queued {
            metrics::counter!("embark_misses_dropped_total", "reason" => "queue_full").increment(1);
            return false;
        }
        match self.buffer.try_send(event) {
            Ok(()) => true,
            Err(_) => {
                metrics::counter!("embark_misses_dropped_total", "reason" => "buffer_full").increment(1);
                false
            }
        }
    }
}

/// How often an idle fill loop looks again for delayed retries coming due.
const IDLE_POLL: Duration = Duration::from_millis(250);

#[async_trait]
impl MissSource for LocalMissQueue {
    type Token = u64;

    async fn next_batch(&self, max: usize) -> Result<Vec<(u64, MissEvent)>, SourceError> {
        loop {
            // Register for a wake-up before looking, so a write between the
            // look and the wait is not missed.
            let written = self.written.notified();
            let pending = self.pending.clone();
            let batch = tokio::task::spawn_blocking(move || pending.peek_ready(max, now_unix_ms()))
                .await
                .map_err(|e| SourceError(e.to_string()))?
                .map_err(|e| SourceError(e.to_string()))?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            let _ = tokio::time::timeout(IDLE_POLL, written).await;
        }
    }

    /// Dead letters are already failure records in the store; one machine
    /// has no DLQ to forward them to.
    async fn settle(&self, done: Vec<u64>, retry: Vec<MissEvent>, _dead: Vec<DeadLetter>) -> Result<(), SourceError> {
        let pending = self.pending.clone();
        tokio::task::spawn_blocking(move || pending.settle(&done, &retry))
            .await
            .map_err(|e| SourceError(e.to_string()))?
            .map_err(|e| SourceError(e.to_string()))?;
        self.update_depth();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use embark_store::embedded::EmbeddedStore;

    use super::*;

    fn miss(key: &str) -> MissEvent {
        MissEvent { model: "m".into(), key: key.into(), ..MissEvent::default() }
    }

    /// Defect 11.10: the embedded miss queue grew without bound on disk
    /// under a flood of unknown keys.
    #[tokio::test]
    async fn the_embedded_miss_queue_is_unbounded_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).expect("open");
        let queue = LocalMissQueue::new(store.pending_misses(), 64, 3);
        let flusher = queue.spawn_flusher();
        for k in ["a", "b", "c"] {
            assert!(queue.publish(miss(k)));
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            while queue.depth() < 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the flusher writes them");
        assert!(!queue.publish(miss("d")), "the queue is full: refused, the Lookup's caller queues it later");
        queue.close();
        flusher.await.expect("flusher");
        assert_eq!(queue.depth(), 3);
    }
}
