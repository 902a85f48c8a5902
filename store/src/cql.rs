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
    EmbeddingStore, FailureRecord, ScanCursor, ScanPage, StoreError, StoredRow, now_unix_ms, row, storage_key,
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
        let corrupt = |reason: String| StoreError::Corrupt { model: model.to_owned(), reason };
        match status.unwrap_or(row::STATUS_VECTOR as i32) as u8 {
            row::STATUS_VECTOR => {
                let bytes = vector.unwrap_or_default();
                let dim = dim.unwrap_or(0).max(0) as usize;
                if bytes.len() != dim * 4 {
                    return Err(corrupt(format!("key {key:?}: dim {dim} but {} vector bytes", bytes.len())));
                }
                let vector = embark_proto::f32_from_le(&bytes).unwrap_or_default();
                Ok(Some(StoredRow::Vector { vector, created_at_ms: at }))
            }
            row::STATUS_FAILED => Ok(Some(StoredRow::Failed(FailureRecord {
                code: code.unwrap_or(0),
                reason: reason.unwrap_or_default(),
                at_unix_ms: at,
            }))),
            s => Err(corrupt(format!("key {key:?}: unknown status {s}"))),
        }
    }

    async fn write_all(
        &self,
        model: &str,
        rows: Vec<(String, Option<Vec<f32>>, Option<FailureRecord>)>,
    ) -> Result<(), StoreError> {
        let now = now_unix_ms();
        stream::iter(rows)
            .map(|(key, vector, failure)| async move {
                let skey = storage_key(&key).into_owned();
                let done = match (vector, failure) {
                    (Some(v), _) => {
                        let mut blob = Vec::with_capacity(v.len() * 4);
                        for x in &v {
                            blob.extend_from_slice(&x.to_le_bytes());
                        }
                        let values = (model, skey, blob, v.len() as i32, row::STATUS_VECTOR as i32, CqlTimestamp(now));
                        self.session.execute_unpaged(&self.put_vector, values).await
                    }
                    (None, Some(f)) => {
                        let values =
                            (model, skey, row::STATUS_FAILED as i32, f.code, f.reason, CqlTimestamp(f.at_unix_ms));
                        self.session.execute_unpaged(&self.put_failure, values).await
                    }
                    (None, None) => return Ok(()),
                };
                done.map(|_| ()).map_err(cql_err)
            })
            .buffer_unordered(self.concurrency)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }
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

    async fn put_vectors(&self, model: &str, rows: Vec<(String, Vec<f32>)>) -> Result<(), StoreError> {
        self.write_all(model, rows.into_iter().map(|(k, v)| (k, Some(v), None)).collect()).await
    }

    async fn put_failures(&self, model: &str, rows: Vec<(String, FailureRecord)>) -> Result<(), StoreError> {
        self.write_all(model, rows.into_iter().map(|(k, f)| (k, None, Some(f))).collect()).await
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
                return Err(StoreError::Corrupt {
                    model: model.to_owned(),
                    reason: format!("key {key:?}: dim {dim:?} but {} vector bytes", bytes.len()),
                });
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
        stream::iter(0..keys.len())
            .map(|i| async move {
                let skey = storage_key(&keys[i]);
                self.session.execute_unpaged(&self.delete, (model, skey.as_ref())).await.map(|_| ()).map_err(cql_err)
            })
            .buffer_unordered(self.concurrency)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }
}
