//! The ScyllaDB/Cassandra store, through the official `scylla` driver.
//!
//! One partition per (model, key). A batch read is concurrent prepared
//! single-partition SELECTs (token-aware routing sends each to a replica
//! of its partition), never `IN` across partitions; writes are concurrent
//! single-partition INSERTs (a multi-partition batch would only add a
//! coordinator hop). Every value is a bind marker. The schema is created
//! by [`CqlStore::migrate`] (`embark migrate`), not implicitly.
//!
//! Schema: DESIGN.md's table, plus `code int` (the failure code), with
//! `status int` rather than `tinyint`: the in-process CQL server the tests
//! use (kassandra 0.14) cannot decode TINYINT bind values, and miscounts a
//! literal in a prepared INSERT. `int` costs 3 bytes a row and keeps every
//! value a bind marker.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt, stream};
pub use scylla::statement::Consistency;
use scylla::{
    client::{session::Session, session_builder::SessionBuilder},
    response::{PagingState, PagingStateResponse},
    statement::prepared::PreparedStatement,
    value::CqlTimestamp,
};

use crate::{
    EmbeddingStore, FailureRecord, Filled, FilledRow, ScanCursor, ScanPage, StoreError, StoredRow, now_unix_ms, row,
    storage_key,
};

#[derive(Debug, Clone)]
pub struct CqlConfig {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// The keyspace's replication, as CQL (used by `migrate` only).
    pub replication: String,
    pub read_consistency: Consistency,
    pub write_consistency: Consistency,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Single-partition reads (or writes) in flight per batch.
    pub concurrency: usize,
    /// Rows expire this long after they are written (none by default).
    pub write_ttl: Option<Duration>,
}

impl Default for CqlConfig {
    fn default() -> Self {
        Self {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "embark".into(),
            replication: "{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}".into(),
            read_consistency: Consistency::LocalOne,
            write_consistency: Consistency::LocalQuorum,
            request_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(5),
            concurrency: 64,
            write_ttl: None,
        }
    }
}

impl CqlConfig {
    /// Parses `cql://host[:port][,host[:port]...]/keyspace`.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let bad =
            |why: &str| StoreError::Config(format!("{url:?}: {why} (expected cql://host:port[,host:port]/keyspace)"));
        let rest = url.strip_prefix("cql://").ok_or_else(|| bad("not a cql:// URL"))?;
        let (hosts, keyspace) = rest.split_once('/').unwrap_or((rest, "embark"));
        let nodes: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| if h.contains(':') { h.to_owned() } else { format!("{h}:9042") })
            .collect();
        if nodes.is_empty() {
            return Err(bad("no host"));
        }
        let keyspace = if keyspace.is_empty() { "embark" } else { keyspace };
        if !keyspace.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(bad("the keyspace name may hold letters, digits and _ only"));
        }
        Ok(Self { nodes, keyspace: keyspace.to_owned(), ..Self::default() })
    }
}

/// Parses a consistency level name (`local_quorum`, `one`, `quorum`...).
pub fn parse_consistency(s: &str) -> Result<Consistency, String> {
    Ok(match s.to_ascii_lowercase().replace('-', "_").as_str() {
        "any" => Consistency::Any,
        "one" => Consistency::One,
        "two" => Consistency::Two,
        "three" => Consistency::Three,
        "quorum" => Consistency::Quorum,
        "all" => Consistency::All,
        "local_one" => Consistency::LocalOne,
        "local_quorum" => Consistency::LocalQuorum,
        "each_quorum" => Consistency::EachQuorum,
        other => {
            return Err(format!(
                "unknown consistency {other:?}: one of any, one, two, three, quorum, all, local_one, local_quorum, each_quorum"
            ));
        }
    })
}

fn cql_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Cql(e.to_string())
}

pub struct CqlStore {
    session: Arc<Session>,
    get: PreparedStatement,
    /// One INSERT per row kind, every value a bind marker.
    put_vector: PreparedStatement,
    put_failure: PreparedStatement,
    delete: PreparedStatement,
    scan: PreparedStatement,
    concurrency: usize,
}

impl std::fmt::Debug for CqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CqlStore").finish_non_exhaustive()
    }
}

async fn session(config: &CqlConfig) -> Result<Session, StoreError> {
    SessionBuilder::new()
        .known_nodes(&config.nodes)
        .connection_timeout(config.connect_timeout)
        // Schema changes come from `migrate`, which waits for agreement
        // itself; no implicit wait on every DDL.
        .auto_await_schema_agreement(false)
        .build()
        .await
        .map_err(|e| StoreError::Cql(format!("connecting to {:?}: {e}", config.nodes)))
}

impl CqlStore {
    /// Creates the keyspace and table if they do not exist. Safe to run
    /// again; the statements are plain CQL valid on ScyllaDB and Cassandra.
    pub async fn migrate(config: &CqlConfig) -> Result<(), StoreError> {
        let s = session(config).await?;
        let ks = &config.keyspace;
        let statements = [
            format!("CREATE KEYSPACE {ks} WITH replication = {}", config.replication),
            format!(
                "CREATE TABLE {ks}.embeddings (model text, key text, vector blob, dim int, status int, \
                 code int, reason text, created_at timestamp, PRIMARY KEY ((model, key)))"
            ),
        ];
        for stmt in statements {
            if let Err(e) = s.query_unpaged(stmt.as_str(), &[]).await {
                let text = e.to_string();
                // Already there (from an earlier migrate): fine.
                if !text.to_ascii_lowercase().contains("already exist") {
                    return Err(StoreError::Cql(format!("{stmt}: {text}")));
                }
            }
        }
        Ok(())
    }

    pub async fn connect(config: &CqlConfig) -> Result<Self, StoreError> {
        let session = session(config).await?;
        let ks = &config.keyspace;
        let prepare = |q: String, c: Consistency| {
            let session = &session;
            async move {
                let mut p = session
                    .prepare(q.as_str())
                    .await
                    .map_err(|e| StoreError::Cql(format!("preparing {q:?}: {e} (did `embark migrate` run?)")))?;
                p.set_consistency(c);
                p.set_request_timeout(Some(config.request_timeout));
                p.set_is_idempotent(true);
                Ok::<_, StoreError>(p)
            }
        };
        let ttl = config.write_ttl.map(|t| format!(" USING TTL {}", t.as_secs().max(1))).unwrap_or_default();
        let get = prepare(
            format!(
                "SELECT vector, dim, status, code, reason, created_at FROM {ks}.embeddings WHERE model = ? AND key = ?"
            ),
            config.read_consistency,
        )
        .await?;
        let put_vector = prepare(
            format!(
                "INSERT INTO {ks}.embeddings (model, key, vector, dim, status, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?){ttl}"
            ),
            config.write_consistency,
        )
        .await?;
        let put_failure = prepare(
            format!(
                "INSERT INTO {ks}.embeddings (model, key, status, code, reason, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?){ttl}"
            ),
            config.write_consistency,
        )
        .await?;
        let delete =
            prepare(format!("DELETE FROM {ks}.embeddings WHERE model = ? AND key = ?"), config.write_consistency)
                .await?;
        // The partition key is (model, key), so a model's rows are found by
        // a token-ordered scan of the whole table, filtered here. Paging
        // state is what the driver resumes from, also in a later process.
        let scan =
            prepare(format!("SELECT model, key, vector, dim, status FROM {ks}.embeddings"), config.read_consistency)
                .await?;
        Ok(Self {
            session: Arc::new(session),
            get,
            put_vector,
            put_failure,
            delete,
            scan,
            concurrency: config.concurrency.max(1),
        })
    }

    async fn get_one(&self, model: &str, key: &str) -> Result<Option<StoredRow>, StoreError> {
        let skey = storage_key(key);
        let result = self.session.execute_unpaged(&self.get, (model, skey.as_ref())).await.map_err(cql_err)?;
        let rows = result.into_rows_result().map_err(cql_err)?;
        type Row = (Option<Vec<u8>>, Option<i32>, Option<i32>, Option<i32>, Option<String>, Option<CqlTimestamp>);
        let Some((vector, dim, status, code, reason, created)) = rows.maybe_first_row::<Row>().map_err(cql_err)? else {
            return Ok(None);
        };
        let at = created.map(|t| t.0).unwrap_or(0);
        let corrupt = |reason: String| Ok(Some(StoredRow::Corrupt { reason }));
        match status.unwrap_or(row::STATUS_VECTOR as i32) as u8 {
            row::STATUS_VECTOR => {
                let bytes = vector.unwrap_or_default();
                let dim = dim.unwrap_or(0).max(0) as usize;
                if bytes.len() != dim * 4 {
                    return corrupt(format!("dim {dim} but {} vector bytes", bytes.len()));
                }
                let vector = embark_proto::f32_from_le(&bytes).unwrap_or_default();
                Ok(Some(StoredRow::Vector { vector, created_at_ms: at }))
            }
            row::STATUS_FAILED => Ok(Some(StoredRow::Failed(FailureRecord {
                code: code.unwrap_or(0),
                reason: reason.unwrap_or_default(),
                at_unix_ms: at,
            }))),
            s => corrupt(format!("unknown status {s}")),
        }
    }

    /// Writes rows, each with its CQL write timestamp (microseconds): the
    /// newest timestamp wins, deletes included, which is how a stale fill
    /// loses to an Invalidate (see `put_filled`).
    async fn write_all(&self, model: &str, rows: Vec<(String, Filled, i64)>) -> Result<(), StoreError> {
        let now = now_unix_ms();
        stream::iter(rows)
            .map(|(key, value, write_ts)| async move {
                let skey = storage_key(&key).into_owned();
                let done = match value {
                    Filled::Vector(v) => {
                        let mut blob = Vec::with_capacity(v.len() * 4);
                        for x in &v {
                            blob.extend_from_slice(&x.to_le_bytes());
                        }
                        let values = (model, skey, blob, v.len() as i32, row::STATUS_VECTOR as i32, CqlTimestamp(now));
                        self.session.execute_unpaged(&at(&self.put_vector, write_ts), values).await
                    }
                    Filled::Failure(f) => {
                        let values =
                            (model, skey, row::STATUS_FAILED as i32, f.code, f.reason, CqlTimestamp(f.at_unix_ms));
                        self.session.execute_unpaged(&at(&self.put_failure, write_ts), values).await
                    }
                };
                done.map(|_| ()).map_err(cql_err)
            })
            .buffer_unordered(self.concurrency)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }
}

/// `statement` with an explicit write timestamp (microseconds).
fn at(statement: &PreparedStatement, ts: i64) -> PreparedStatement {
    let mut s = statement.clone();
    s.set_timestamp(Some(ts));
    s
}

/// Microseconds since the Unix epoch: the CQL write timestamp of a write
/// made now (client-side, so deletes and fills compare on one clock).
fn now_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

#[async_trait]
impl EmbeddingStore for CqlStore {
    async fn get_many(&self, model: &str, keys: &[String]) -> Result<Vec<Option<StoredRow>>, StoreError> {
        // Indices, not `&String`s: a closure over borrowed items trips the
        // higher-ranked lifetime check inside `async_trait`.
        stream::iter(0..keys.len())
            .map(|i| self.get_one(model, &keys[i]))
            .buffered(self.concurrency)
            .try_collect()
            .await
    }

    /// One query per key, answered in completion order: what arrived before
    /// a caller's deadline is kept, and one key's error is that key's alone.
    async fn get_each(&self, model: &str, keys: &[String], sink: &mut (dyn FnMut(usize, crate::RowRead) + Send)) {
        let mut reads = stream::iter(0..keys.len())
            .map(|i| async move { (i, self.get_one(model, &keys[i]).await.map_err(std::sync::Arc::new)) })
            .buffer_unordered(self.concurrency);
        while let Some((i, read)) = reads.next().await {
            sink(i, read);
        }
    }

    async fn put_vectors(&self, model: &str, rows: Vec<(String, Vec<f32>)>) -> Result<(), StoreError> {
        let ts = now_micros();
        self.write_all(model, rows.into_iter().map(|(k, v)| (k, Filled::Vector(v), ts)).collect()).await
    }

    async fn put_failures(&self, model: &str, rows: Vec<(String, FailureRecord)>) -> Result<(), StoreError> {
        let ts = now_micros();
        self.write_all(model, rows.into_iter().map(|(k, f)| (k, Filled::Failure(f), ts)).collect()).await
    }

    /// Each row is written with the time its input was seen (the end of
    /// that millisecond) as its CQL timestamp: a delete made after that
    /// has a newer timestamp and wins, with no read before the write.
    async fn put_filled(&self, model: &str, rows: Vec<FilledRow>) -> Result<Vec<bool>, StoreError> {
        let n = rows.len();
        let rows =
            rows.into_iter().map(|r| (r.key, r.value, r.seen_at_ms.saturating_mul(1000).saturating_add(999))).collect();
        self.write_all(model, rows).await?;
        // Whether the store kept a row is settled by timestamps on the
        // replicas; the caller counts it as written.
        Ok(vec![true; n])
    }

    async fn scan(&self, model: &str, cursor: Option<ScanCursor>, page: usize) -> Result<ScanPage, StoreError> {
        let mut statement = self.scan.clone();
        statement.set_page_size(page.clamp(1, 5000) as i32);
        let state = match cursor {
            Some(c) => PagingState::new_from_raw_bytes(c.0),
            None => PagingState::start(),
        };
        let (result, paging) = self.session.execute_single_page(&statement, (), state).await.map_err(cql_err)?;
        let rows = result.into_rows_result().map_err(cql_err)?;
        type Row = (String, String, Option<Vec<u8>>, Option<i32>, Option<i32>);
        let mut out = ScanPage::default();
        for r in rows.rows::<Row>().map_err(cql_err)? {
            let (m, key, vector, dim, status) = r.map_err(cql_err)?;
            if m != model || status.unwrap_or(row::STATUS_VECTOR as i32) != row::STATUS_VECTOR as i32 {
                continue;
            }
            let bytes = vector.unwrap_or_default();
            if bytes.len() != dim.unwrap_or(0).max(0) as usize * 4 {
                crate::skip_corrupt(model, &key, &format!("dim {dim:?} but {} vector bytes", bytes.len()));
                continue;
            }
            out.rows.push((key, embark_proto::f32_from_le(&bytes).unwrap_or_default()));
        }
        out.next = match paging {
            PagingStateResponse::HasMorePages { state } => state.as_bytes_slice().map(|b| ScanCursor(b.to_vec())),
            PagingStateResponse::NoMorePages => None,
        };
        Ok(out)
    }

    async fn delete(&self, model: &str, keys: &[String]) -> Result<(), StoreError> {
        let delete = at(&self.delete, now_micros());
        let delete = &delete;
        stream::iter(0..keys.len())
            .map(|i| async move {
                let skey = storage_key(&keys[i]);
                self.session.execute_unpaged(delete, (model, skey.as_ref())).await.map(|_| ()).map_err(cql_err)
            })
            .buffer_unordered(self.concurrency)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }
}
