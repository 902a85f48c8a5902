//! The fill loop's decisions, on the real embedded store: what is skipped,
//! retried, recorded as failed and settled.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use embark_proto::internal::v1::{DeadLetter, MissEvent};
use embark_queue::{MissSource, QueueError, backoff::Backoff};
use embark_store::{EmbeddingStore, StoredRow, embedded::EmbeddedStore, now_unix_ms};
use kfc::{EmbedError, EmbedOutcome, Embedder, FillConfig, FillLoop};

/// An in-memory source that records what was settled.
#[derive(Default)]
struct RecordingSource {
    settled: Mutex<Vec<(Vec<u64>, Vec<MissEvent>)>>,
    dead: Mutex<Vec<DeadLetter>>,
}

#[async_trait]
impl MissSource for RecordingSource {
    type Token = u64;
    async fn next_batch(&self, _max: usize) -> Result<Vec<(u64, MissEvent)>, QueueError> {
        std::future::pending().await
    }
    async fn settle(&self, done: Vec<u64>, retry: Vec<MissEvent>, dead: Vec<DeadLetter>) -> Result<(), QueueError> {
        self.settled.lock().expect("lock").push((done, retry));
        self.dead.lock().expect("lock").extend(dead);
        Ok(())
    }
}

/// Answers each call with the next scripted response; records the inputs.
#[derive(Default)]
struct ScriptedEmbedder {
    script: Mutex<VecDeque<Result<Vec<EmbedOutcome>, EmbedError>>>,
    calls: Mutex<Vec<Vec<String>>>,
    /// The version each call named.
    versions: Mutex<Vec<String>>,
}

#[async_trait]
impl Embedder for ScriptedEmbedder {
    async fn embed(&self, _model: &str, version: &str, inputs: Vec<String>) -> Result<Vec<EmbedOutcome>, EmbedError> {
        self.calls.lock().expect("lock").push(inputs);
        self.versions.lock().expect("lock").push(version.to_owned());
        self.script
            .lock()
            .expect("lock")
            .pop_front()
            .unwrap_or_else(|| Err(EmbedError::Other("script exhausted".into())))
    }
}

fn miss(key: &str, attempts: u32) -> MissEvent {
    MissEvent {
        model: "m".into(),
        key: key.into(),
        first_seen_unix_ms: now_unix_ms(),
        attempts,
        not_before_unix_ms: 0,
        dim: 0,
        trace_context: Default::default(),
        version: String::new(),
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    store: Arc<EmbeddedStore>,
    source: Arc<RecordingSource>,
    embedder: Arc<ScriptedEmbedder>,
    fill: FillLoop<RecordingSource, ScriptedEmbedder>,
}

fn rig(script: Vec<Result<Vec<EmbedOutcome>, EmbedError>>) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).expect("open"));
    let source = Arc::new(RecordingSource::default());
    let embedder = Arc::new(ScriptedEmbedder { script: Mutex::new(script.into()), ..Default::default() });
    let config = FillConfig {
        max_attempts: 3,
        backoff: Backoff { base: Duration::from_secs(10), max: Duration::from_secs(60) },
        ..FillConfig::default()
    };
    let fill = FillLoop::new(source.clone(), embedder.clone(), store.clone(), config);
    Rig { _dir: dir, store, source, embedder, fill }
}

#[tokio::test]
async fn stored_keys_are_skipped_duplicates_embedded_once_and_everything_settled() {
    let r = rig(vec![Ok(vec![EmbedOutcome::Vector(vec![1.0, 2.0])])]);
    r.store.put_vectors("m", vec![("known".into(), vec![9.0, 9.0])]).await.expect("put");
    let stats =
        r.fill.round(vec![(1, miss("new", 0)), (2, miss("known", 0)), (3, miss("new", 0))]).await.expect("round");
    assert_eq!((stats.embedded, stats.skipped, stats.retried), (1, 1, 0));
    assert_eq!(*r.embedder.calls.lock().expect("lock"), vec![vec!["new".to_string()]]);
    let settled = r.source.settled.lock().expect("lock").clone();
    assert_eq!(settled, vec![(vec![1, 2, 3], vec![])]);
    let rows = r.store.get_many("m", &["new".into()]).await.expect("get");
    assert!(matches!(&rows[0], Some(StoredRow::Vector { vector, .. }) if vector == &[1.0, 2.0]));
}

/// Each miss is embedded by the version it names and stored in that
/// version's rows: a key stored under version 1 is not skipped for a miss
/// of version 2, and version 1's row is left as it was.
#[tokio::test]
async fn misses_are_routed_to_their_model_version_and_stored_apart() {
    let r = rig(vec![Ok(vec![EmbedOutcome::Vector(vec![2.0, 2.0])]), Ok(vec![EmbedOutcome::Vector(vec![1.0, 1.0])])]);
    let (v1, v2) = (embark_store::namespace("m", "1"), embark_store::namespace("m", "2"));
    r.store.put_vectors(&v1, vec![("both".into(), vec![9.0, 9.0])]).await.expect("put");
    let of = |key: &str, version: &str| MissEvent { version: version.into(), ..miss(key, 0) };
    let stats =
        r.fill.round(vec![(1, of("both", "2")), (2, of("both", "1")), (3, of("new", "1"))]).await.expect("round");
    assert_eq!((stats.embedded, stats.skipped), (2, 1), "version 1 had `both`, version 2 did not");
    assert_eq!(*r.embedder.versions.lock().expect("lock"), vec!["2".to_string(), "1".to_string()]);
    let row = |ns: &str, key: &str| {
        let (store, ns, key) = (r.store.clone(), ns.to_owned(), key.to_owned());
        async move { store.get_many(&ns, &[key]).await.expect("get").remove(0) }
    };
    assert!(matches!(row(&v2, "both").await, Some(StoredRow::Vector { vector, .. }) if vector == [2.0, 2.0]));
    assert!(matches!(row(&v1, "both").await, Some(StoredRow::Vector { vector, .. }) if vector == [9.0, 9.0]));
    assert!(matches!(row(&v1, "new").await, Some(StoredRow::Vector { vector, .. }) if vector == [1.0, 1.0]));
    assert!(row(&v2, "new").await.is_none());
}

#[tokio::test]
async fn permanent_failures_are_recorded_transient_ones_retried_then_given_up() {
    let failed = |transient| EmbedOutcome::Failed { code: 7, reason: "nope".into(), transient };
    let r = rig(vec![Ok(vec![failed(false), failed(true), failed(true)])]);
    let before = now_unix_ms();
    let stats =
        r.fill.round(vec![(1, miss("bad", 0)), (2, miss("flaky", 0)), (3, miss("hopeless", 2))]).await.expect("round");
    assert_eq!((stats.failed, stats.retried), (2, 1));

    let settled = r.source.settled.lock().expect("lock").clone();
    let (done, retry) = &settled[0];
    assert_eq!(done, &vec![1, 2, 3]);
    assert_eq!(retry.len(), 1);
    assert_eq!((retry[0].key.as_str(), retry[0].attempts), ("flaky", 1));
    assert!(retry[0].not_before_unix_ms >= before + 5_000, "retried after a backoff");

    let rows = r.store.get_many("m", &["bad".into(), "flaky".into(), "hopeless".into()]).await.expect("get");
    assert!(matches!(&rows[0], Some(StoredRow::Failed(f)) if f.code == 7 && f.reason == "nope"));
    assert!(rows[1].is_none(), "a transient failure is not recorded yet");
    assert!(matches!(&rows[2], Some(StoredRow::Failed(f)) if f.reason.starts_with("gave up after 3 attempts")));

    // What was given up on is handed to the source as dead letters.
    let dead = r.source.dead.lock().expect("lock").clone();
    let keys: Vec<&str> = dead.iter().filter_map(|d| d.event.as_ref()).map(|e| e.key.as_str()).collect();
    assert_eq!(keys, vec!["bad", "hopeless"]);
    assert_eq!((dead[0].code, dead[0].reason.as_str()), (7, "nope"));
}

#[tokio::test]
async fn an_unavailable_embedder_delays_every_miss_and_records_nothing() {
    let r = rig(vec![Err(EmbedError::Other("connection refused".into()))]);
    let stats = r.fill.round(vec![(1, miss("a", 0)), (2, miss("b", 4))]).await.expect("round");
    assert_eq!((stats.embedded, stats.failed, stats.retried), (0, 0, 2));
    assert!(stats.embedder_down, "the loop backs off before its next round");
    let settled = r.source.settled.lock().expect("lock").clone();
    let retry = &settled[0].1;
    // Whole-call failures do not use up the per-input attempts.
    assert_eq!(retry.iter().map(|e| e.attempts).collect::<Vec<_>>(), vec![0, 4]);
    assert!(retry.iter().all(|e| e.not_before_unix_ms > now_unix_ms()));
    let rows = r.store.get_many("m", &["a".into(), "b".into()]).await.expect("get");
    assert!(rows.iter().all(Option::is_none));
}

/// Defect 11.5: the front queues a key whose stored vector has another dim
/// than the model serves, but the filler skipped any stored vector, so the
/// key stayed `OOV_PENDING` for good; and a reply of the wrong dim was
/// stored as it came.
#[tokio::test]
async fn a_stored_vector_of_the_wrong_dim_is_requeued_by_the_front_but_skipped_by_the_filler() {
    let r = rig(vec![Ok(vec![EmbedOutcome::Vector(vec![1.0, 2.0, 3.0]), EmbedOutcome::Vector(vec![5.0])])]);
    r.store.put_vectors("m", vec![("stale".into(), vec![9.0])]).await.expect("put");
    let with_dim = |key: &str| MissEvent { dim: 3, ..miss(key, 0) };
    let stats = r.fill.round(vec![(1, with_dim("stale")), (2, with_dim("short"))]).await.expect("round");
    assert_eq!(*r.embedder.calls.lock().expect("lock"), vec![vec!["stale".to_string(), "short".to_string()]]);
    assert_eq!((stats.embedded, stats.skipped, stats.retried), (1, 0, 1));
    let rows = r.store.get_many("m", &["stale".into(), "short".into()]).await.expect("get");
    assert!(matches!(&rows[0], Some(StoredRow::Vector { vector, .. }) if vector == &[1.0, 2.0, 3.0]), "re-embedded");
    assert!(rows[1].is_none(), "a vector of the wrong dim is never stored");
    let retry = r.source.settled.lock().expect("lock")[0].1.clone();
    assert_eq!((retry[0].key.as_str(), retry[0].attempts), ("short", 1));
}

/// The embedded store, failing every write for one model.
struct FailingFor {
    inner: Arc<EmbeddedStore>,
    model: &'static str,
}

#[async_trait]
impl EmbeddingStore for FailingFor {
    async fn get_many(&self, model: &str, keys: &[String]) -> Result<Vec<Option<StoredRow>>, embark_store::StoreError> {
        self.inner.get_many(model, keys).await
    }
    async fn put_vectors(&self, model: &str, rows: Vec<(String, Vec<f32>)>) -> Result<(), embark_store::StoreError> {
        self.inner.put_vectors(model, rows).await
    }
    async fn put_failures(
        &self,
        model: &str,
        rows: Vec<(String, embark_store::FailureRecord)>,
    ) -> Result<(), embark_store::StoreError> {
        self.inner.put_failures(model, rows).await
    }
    async fn put_filled(
        &self,
        model: &str,
        rows: Vec<embark_store::FilledRow>,
    ) -> Result<Vec<bool>, embark_store::StoreError> {
        if model == self.model {
            return Err(embark_store::StoreError::Config("writes refused".into()));
        }
        self.inner.put_filled(model, rows).await
    }
    async fn delete(&self, model: &str, keys: &[String]) -> Result<(), embark_store::StoreError> {
        self.inner.delete(model, keys).await
    }
    async fn scan(
        &self,
        model: &str,
        cursor: Option<embark_store::ScanCursor>,
        page: usize,
    ) -> Result<embark_store::ScanPage, embark_store::StoreError> {
        self.inner.scan(model, cursor, page).await
    }
}

/// Defect 11.15: when a later model's write failed, the whole batch was
/// handed back, and the dead letters of the models before it, whose
/// failure records were already written, were never sent (the replay
/// skips their keys as stored).
#[tokio::test]
async fn dead_letters_of_a_failed_round_are_lost() {
    let r = rig(vec![
        Ok(vec![EmbedOutcome::Failed { code: 7, reason: "nope".into(), transient: false }]),
        Ok(vec![EmbedOutcome::Vector(vec![1.0])]),
    ]);
    let store: Arc<dyn EmbeddingStore> = Arc::new(FailingFor { inner: r.store.clone(), model: "z" });
    let fill = FillLoop::new(r.source.clone(), r.embedder.clone(), store, FillConfig::default());
    let in_z = MissEvent { model: "z".into(), ..miss("later", 0) };
    let result = fill.round(vec![(1, miss("poison", 0)), (2, in_z)]).await;
    assert!(result.is_err(), "model z's write failed");
    let dead = r.source.dead.lock().expect("lock").clone();
    assert_eq!(dead.len(), 1, "model m's dead letter was sent");
    assert_eq!(r.source.settled.lock().expect("lock")[0].0, vec![1], "and its miss settled; z's was handed back");
}
