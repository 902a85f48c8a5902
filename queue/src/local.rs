//! One machine's durable miss queue: [`PendingMisses`], a table in the
//! redb file of `--data-dir` (the embedded store's file; with `--store
//! cql://` the vectors are in CQL and the file holds only this queue), and
//! [`LocalMissQueue`], the front's [`MissPublisher`] and the fill loop's
//! [`MissSource`] over it.
//!
//! Publishing never blocks a Lookup: `publish` only hands the event to a
//! bounded buffer, and a flusher task writes the buffer to the table in
//! batches (one durable commit per batch). The fill loop reads the table,
//! and a miss leaves it only in `settle`, after its vector or failure
//! record is written. A miss still in the buffer at a crash is not lost for
//! good: the key is still unknown, so the next Lookup of it queues it again.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use backon::Retryable;
use embark_proto::{
    internal::v1::{DeadLetter, MissEvent},
    now_unix_ms,
};
use prost::Message as _;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{Mutex, Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{
    MissPublisher, MissSource, QueueError,
    backoff::{Backoff, StopSleeper},
    codec,
};

/// Queue sequence number -> encoded [`MissEvent`], oldest first. The name
/// is the one the embedded store used when the queue lived there: files
/// written before keep their queue.
const PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("pending_misses");

fn db_err(e: impl Into<redb::Error>) -> QueueError {
    QueueError::Storage(e.into())
}

/// The durable FIFO of misses waiting to be embedded on one machine.
///
/// Every method is blocking (call it from a blocking thread). A miss stays
/// in the queue until [`PendingMisses::settle`] removes it, which the fill
/// loop calls only after the vector or failure record is written: a crash
/// in between means the miss is processed again, never lost.
#[derive(Clone)]
pub struct PendingMisses {
    db: Arc<Database>,
}

impl std::fmt::Debug for PendingMisses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingMisses").finish_non_exhaustive()
    }
}

impl PendingMisses {
    /// The queue in `db` (the embedded store's file: one file, one process),
    /// creating its table if the file has none yet, so a read never meets
    /// a missing table.
    pub fn open(db: Arc<Database>) -> Result<Self, QueueError> {
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(PENDING).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(Self { db })
    }

    /// Appends misses at the tail, in one durable transaction.
    pub fn enqueue(&self, events: &[MissEvent]) -> Result<(), QueueError> {
        if events.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(PENDING).map_err(db_err)?;
            append(&mut table, events)?;
        }
        txn.commit().map_err(db_err)
    }

    /// Up to `max` misses that are due at `now_ms`, oldest first. Looks at
    /// most `4 * max` entries, so a run of delayed retries at the head can
    /// only slow the queue, never stall it.
    pub fn peek_ready(&self, max: usize, now_ms: i64) -> Result<Vec<(u64, MissEvent)>, QueueError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(PENDING).map_err(db_err)?;
        let mut out = Vec::with_capacity(max);
        for entry in table.iter().map_err(db_err)?.take(max.saturating_mul(4)) {
            let (seq, value) = entry.map_err(db_err)?;
            let event =
                MissEvent::decode(value.value()).map_err(|source| QueueError::Corrupt { seq: seq.value(), source })?;
            if event.not_before_unix_ms <= now_ms {
                out.push((seq.value(), event));
                if out.len() == max {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Removes processed misses and re-appends those to retry later, in one
    /// durable transaction.
    pub fn settle(&self, done: &[u64], retry: &[MissEvent]) -> Result<(), QueueError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(PENDING).map_err(db_err)?;
            for seq in done {
                table.remove(*seq).map_err(db_err)?;
            }
            append(&mut table, retry)?;
        }
        txn.commit().map_err(db_err)
    }

    /// How many misses are queued (due or not).
    pub fn len(&self) -> Result<u64, QueueError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(PENDING).map_err(db_err)?;
        table.len().map_err(db_err)
    }

    pub fn is_empty(&self) -> Result<bool, QueueError> {
        Ok(self.len()? == 0)
    }
}

fn append(table: &mut redb::Table<'_, u64, &[u8]>, events: &[MissEvent]) -> Result<(), QueueError> {
    let next = match table.last().map_err(db_err)? {
        Some((k, _)) => k.value() + 1,
        None => 0,
    };
    for (seq, e) in (next..).zip(events) {
        table.insert(seq, codec::encode_miss(e).as_slice()).map_err(db_err)?;
    }
    Ok(())
}

/// The durable in-process miss queue of `embark up`, and of `embark serve`
/// without Kafka, on either store (its file is the one in `--data-dir`).
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
    queued: AtomicU64,
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
            queued: AtomicU64::new(0),
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
            let backoff = Backoff::default();
            // A batch whose writes were still failing when the stop came:
            // it gets one more try with the shutdown flush.
            let mut unwritten = Vec::new();
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
                // Retried until written (or the stop): these misses are
                // acknowledged to nobody else, so dropping them would lose
                // them until the next Lookup.
                let written = (|| this.write(batch.clone()))
                    .retry(backoff.delays())
                    .sleep(StopSleeper(this.stop.clone()))
                    .when(|_| !this.stop.is_cancelled())
                    .notify(
                        |e, delay| tracing::error!(error = %e, ?delay, "writing misses to the durable queue failed"),
                    )
                    .await;
                if written.is_err() {
                    unwritten = batch;
                    break;
                }
            }
            // Shutdown: write what the buffer still holds.
            rx.close();
            let mut rest = unwritten;
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

    async fn write(&self, batch: Vec<MissEvent>) -> Result<(), QueueError> {
        let pending = self.pending.clone();
        let n = batch.len();
        tokio::task::spawn_blocking(move || pending.enqueue(&batch)).await??;
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
        self.queued.store(depth, Ordering::Relaxed);
        metrics::gauge!("embark_miss_queue_depth").set(depth as f64);
    }
}

impl MissPublisher for LocalMissQueue {
    fn publish(&self, event: MissEvent) -> bool {
        if self.queued.load(Ordering::Relaxed) >= self.max_queued {
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

    async fn next_batch(&self, max: usize) -> Result<Vec<(u64, MissEvent)>, QueueError> {
        loop {
            // Register for a wake-up before looking, so a write between the
            // look and the wait is not missed.
            let written = self.written.notified();
            let pending = self.pending.clone();
            let batch = tokio::task::spawn_blocking(move || pending.peek_ready(max, now_unix_ms())).await??;
            if !batch.is_empty() {
                return Ok(batch);
            }
            let _ = tokio::time::timeout(IDLE_POLL, written).await;
        }
    }

    /// Dead letters are already failure records in the store; one machine
    /// has no DLQ to forward them to.
    async fn settle(&self, done: Vec<u64>, retry: Vec<MissEvent>, _dead: Vec<DeadLetter>) -> Result<(), QueueError> {
        let pending = self.pending.clone();
        tokio::task::spawn_blocking(move || pending.settle(&done, &retry)).await??;
        self.update_depth();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn miss(key: &str) -> MissEvent {
        MissEvent { model: "m".into(), key: key.into(), ..MissEvent::default() }
    }

    fn delayed(key: &str, not_before_unix_ms: i64) -> MissEvent {
        MissEvent { not_before_unix_ms, ..miss(key) }
    }

    fn open(path: &std::path::Path) -> PendingMisses {
        PendingMisses::open(Arc::new(Database::create(path).expect("create"))).expect("open")
    }

    async fn wait_for_depth(queue: &LocalMissQueue, depth: u64) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while queue.depth() < depth {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the flusher writes them");
    }

    fn keys(batch: &[(u64, MissEvent)]) -> Vec<&str> {
        batch.iter().map(|(_, e)| e.key.as_str()).collect()
    }

    #[test]
    fn the_table_is_fifo_skips_delayed_and_settles() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = open(&dir.path().join("q.redb"));
        q.enqueue(&[miss("a"), delayed("late", 1000), miss("b")]).expect("enqueue");
        let ready = q.peek_ready(10, 500).expect("peek");
        assert_eq!(keys(&ready), ["a", "b"]);
        let mut again = ready[0].1.clone();
        again.attempts = 1;
        q.settle(&[ready[0].0, ready[1].0], &[again]).expect("settle");
        assert_eq!(keys(&q.peek_ready(10, 2000).expect("peek")), ["late", "a"]);
        assert_eq!(q.len().expect("len"), 2);
    }

    #[test]
    fn a_run_of_delayed_misses_cannot_stall_the_head() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = open(&dir.path().join("q.redb"));
        let mut events: Vec<MissEvent> = (0..8).map(|i| delayed(&format!("late{i}"), i64::MAX)).collect();
        events.push(miss("due"));
        q.enqueue(&events).expect("enqueue");
        assert!(q.peek_ready(2, 0).expect("peek").is_empty(), "looks at 4 x 2 entries, all delayed");
        assert_eq!(keys(&q.peek_ready(3, 0).expect("peek")), ["due"], "looks at 12: finds it");
    }

    #[test]
    fn a_corrupt_entry_is_a_typed_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(Database::create(dir.path().join("q.redb")).expect("create"));
        let q = PendingMisses::open(db.clone()).expect("open");
        let txn = db.begin_write().expect("txn");
        txn.open_table(PENDING).expect("table").insert(7, [0xffu8, 0xff, 0xff].as_slice()).expect("insert");
        txn.commit().expect("commit");
        assert!(matches!(q.peek_ready(10, 0), Err(QueueError::Corrupt { seq: 7, .. })));
    }

    #[tokio::test]
    async fn published_misses_are_handed_out_until_settled_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("q.redb");
        {
            let queue = LocalMissQueue::new(open(&path), 64, 100);
            let flusher = queue.spawn_flusher();
            for k in ["a", "b", "c"] {
                assert!(queue.publish(miss(k)));
            }
            wait_for_depth(&queue, 3).await;
            let batch = queue.next_batch(2).await.expect("batch");
            assert_eq!(keys(&batch), ["a", "b"]);
            // Settle "a", retry "b" later; "c" was never handed out.
            let retry = MissEvent { attempts: 1, not_before_unix_ms: i64::MAX, ..batch[1].1.clone() };
            queue.settle(vec![batch[0].0, batch[1].0], vec![retry], vec![]).await.expect("settle");
            assert_eq!(queue.depth(), 2);
            queue.close();
            flusher.await.expect("flusher");
        }
        // A restart: what was not settled is handed out again.
        let queue = LocalMissQueue::new(open(&path), 64, 100);
        assert_eq!(queue.depth(), 2, "c and the retry of b");
        let batch = queue.next_batch(10).await.expect("batch");
        assert_eq!(keys(&batch), ["c"], "the retry of b is not due");
    }

    #[tokio::test]
    async fn the_fill_loop_is_woken_by_a_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = LocalMissQueue::new(open(&dir.path().join("q.redb")), 64, 100);
        let flusher = queue.spawn_flusher();
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.next_batch(10).await }
        });
        assert!(queue.publish(miss("x")));
        let batch = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("woken").expect("task");
        assert_eq!(keys(&batch.expect("batch")), ["x"]);
        queue.close();
        flusher.await.expect("flusher");
    }

    #[tokio::test]
    async fn closing_writes_what_is_still_buffered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = LocalMissQueue::new(open(&dir.path().join("q.redb")), 64, 100);
        // Published, then closed, before the flusher ever ran: it still
        // writes them before it ends.
        for k in ["a", "b"] {
            assert!(queue.publish(miss(k)));
        }
        queue.close();
        queue.spawn_flusher().await.expect("flusher");
        assert_eq!(queue.depth(), 2);
    }

    #[test]
    fn a_full_buffer_refuses_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        // No flusher: the buffer of 2 fills up.
        let queue = LocalMissQueue::new(open(&dir.path().join("q.redb")), 2, 100);
        assert!(queue.publish(miss("a")));
        assert!(queue.publish(miss("b")));
        assert!(!queue.publish(miss("c")), "refused, not waited for");
    }

    /// Defect 11.10: the embedded miss queue grew without bound on disk
    /// under a flood of unknown keys.
    #[tokio::test]
    async fn the_embedded_miss_queue_is_unbounded_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = LocalMissQueue::new(open(&dir.path().join("q.redb")), 64, 3);
        let flusher = queue.spawn_flusher();
        for k in ["a", "b", "c"] {
            assert!(queue.publish(miss(k)));
        }
        wait_for_depth(&queue, 3).await;
        assert!(!queue.publish(miss("d")), "the queue is full: refused, the Lookup's caller queues it later");
        queue.close();
        flusher.await.expect("flusher");
        assert_eq!(queue.depth(), 3);
    }
}
