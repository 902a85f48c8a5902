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

use std::{net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt, stream};
pub use scylla::statement::Consistency;
use scylla::{
    client::{
        session::{OpenSsl010Config, Session},
        session_builder::SessionBuilder,
    },
    errors::{
        ConnectionError, ConnectionPoolError, ConnectionSetupRequestErrorKind, DbError, DeserializationError,
        ExecutionError, IntoRowsResultError, MaybeFirstRowError, MetadataError, NewSessionError, PrepareError,
        RequestAttemptError, RowsError, UseKeyspaceError,
    },
    response::{PagingState, PagingStateResponse},
    statement::{prepared::PreparedStatement, unprepared::Statement},
    value::CqlTimestamp,
};

use crate::{
    CorruptRow, EmbeddingStore, FailureRecord, Filled, FilledRow, ScanCursor, ScanPage, StoreError, StoredRow,
    now_unix_ms, row, secret::Secret, storage_key,
};

/// A user of the cluster's `PasswordAuthenticator` (SASL PLAIN: the
/// password crosses the wire, so use it with TLS).
#[derive(Debug, Clone)]
pub struct CqlAuth {
    pub username: String,
    pub password: Secret,
}

/// TLS to every node (the server side is ScyllaDB's or Cassandra's
/// `client_encryption_options`), through the system's OpenSSL.
#[derive(Debug, Clone, Default)]
pub struct CqlTls {
    /// PEM CA(s) the nodes' certificates must chain to, and the only ones
    /// trusted. `None`: the system's trust store (`/etc/ssl/certs`).
    pub ca: Option<PathBuf>,
    /// Client certificate chain (leaf first) and its key, PEM, for nodes
    /// that require one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The name (DNS name or IP address) every node's certificate must
    /// carry. `None`: each node's certificate must carry that node's
    /// address (what the driver checks by itself).
    pub server_name: Option<String>,
}

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
    /// Credentials, for a cluster that requires them.
    pub auth: Option<CqlAuth>,
    /// TLS, for a cluster that requires it; plain TCP if `None`.
    pub tls: Option<CqlTls>,
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
            auth: None,
            tls: None,
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

/// What failed in the CQL store, with the driver's error. Whether it is
/// transient decides the [`StoreError`] variant it comes in
/// ([`StoreError::CqlUnavailable`] or [`StoreError::CqlRejected`]).
#[derive(Debug, thiserror::Error)]
pub enum CqlError {
    #[error("connecting to {nodes:?}: {source}")]
    Connect {
        nodes: Vec<String>,
        #[source]
        source: NewSessionError,
    },
    /// The nodes refused the user name or password.
    #[error(
        "authentication failed: {nodes:?} refused the user {user:?} and its password \
         (--cql-username, --cql-password-file): {source}"
    )]
    Authentication {
        nodes: Vec<String>,
        user: String,
        #[source]
        source: NewSessionError,
    },
    /// The nodes require credentials and none were given.
    #[error(
        "authentication required: {nodes:?} require a user name and password \
         (--cql-username, --cql-password-file): {source}"
    )]
    AuthenticationRequired {
        nodes: Vec<String>,
        #[source]
        source: NewSessionError,
    },
    /// The TLS handshake failed: a certificate that does not verify, no
    /// client certificate where one is required, or no TLS on the node.
    #[error(
        "TLS handshake with {nodes:?} failed (check --cql-tls-ca, --cql-tls-server-name, \
         --cql-tls-cert, and that the nodes speak TLS): {source}"
    )]
    Tls {
        nodes: Vec<String>,
        #[source]
        source: NewSessionError,
    },
    /// The TLS settings could not be applied: a file that cannot be read or
    /// parsed, a key that does not match its certificate.
    #[error("setting up TLS: {what}: {source}")]
    TlsSetup {
        what: String,
        #[source]
        source: openssl::error::ErrorStack,
    },
    #[error("setting up TLS: reading {path}: {source}")]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up TLS: {path} holds no PEM certificate")]
    TlsNoCertificate { path: PathBuf },
    #[error("preparing {statement:?}: {source} (did `embark migrate` run?)")]
    Prepare {
        statement: String,
        #[source]
        source: PrepareError,
    },
    /// A statement of [`CqlStore::migrate`].
    #[error("{statement}: {source}")]
    Migrate {
        statement: String,
        #[source]
        source: ExecutionError,
    },
    /// A read or write of the table.
    #[error("{0}")]
    Execute(#[from] ExecutionError),
    /// The answer is not rows, or its metadata does not parse.
    #[error("reading the result: {0}")]
    NotRows(#[from] IntoRowsResultError),
    /// The row's columns are not of the types this version reads.
    #[error("reading a row: {0}")]
    Row(#[from] MaybeFirstRowError),
    /// The columns of a page are not of the types this version reads.
    #[error("reading rows: {0}")]
    Rows(#[from] RowsError),
    /// A row of a page does not deserialize.
    #[error("reading a row: {0}")]
    Deserialize(#[from] DeserializationError),
}

impl CqlError {
    /// Whether the same request may succeed later with nothing changed
    /// (see [`StoreError::CqlUnavailable`]).
    pub fn is_transient(&self) -> bool {
        match self {
            CqlError::Connect { source, .. } => matches!(
                source,
                // No node answered the first metadata fetch, or the names
                // do not resolve yet (a cluster still starting).
                NewSessionError::MetadataError(_) | NewSessionError::FailedToResolveAnyHostname(_)
            ),
            // Wrong settings, or a node that is not set up as ours expects.
            CqlError::Authentication { .. }
            | CqlError::AuthenticationRequired { .. }
            | CqlError::Tls { .. }
            | CqlError::TlsSetup { .. }
            | CqlError::TlsFile { .. }
            | CqlError::TlsNoCertificate { .. } => false,
            CqlError::Prepare { source, .. } => prepare_is_transient(source),
            CqlError::Migrate { source, .. } | CqlError::Execute(source) => execution_is_transient(source),
            // The schema is not the one `migrate` creates.
            CqlError::NotRows(_) | CqlError::Row(_) | CqlError::Rows(_) | CqlError::Deserialize(_) => false,
        }
    }
}

fn execution_is_transient(e: &ExecutionError) -> bool {
    match e {
        ExecutionError::RequestTimeout(_)
        | ExecutionError::ConnectionPoolError(_)
        | ExecutionError::SchemaAgreementError(_)
        | ExecutionError::MetadataError(_) => true,
        ExecutionError::LastAttemptError(a) => attempt_is_transient(a),
        ExecutionError::PrepareError(p) => prepare_is_transient(p),
        ExecutionError::UseKeyspaceError(UseKeyspaceError::RequestTimeout(_)) => true,
        ExecutionError::UseKeyspaceError(UseKeyspaceError::RequestError(a)) => attempt_is_transient(a),
        // A bad statement or bound values, an empty load-balancing plan (a
        // datacenter that does not exist), and what later drivers add.
        _ => false,
    }
}

fn prepare_is_transient(e: &PrepareError) -> bool {
    match e {
        PrepareError::ConnectionPoolError(_) => true,
        PrepareError::AllAttemptsFailed { first_attempt } => attempt_is_transient(first_attempt),
        _ => false,
    }
}

fn attempt_is_transient(e: &RequestAttemptError) -> bool {
    match e {
        RequestAttemptError::UnableToAllocStreamId | RequestAttemptError::BrokenConnectionError(_) => true,
        RequestAttemptError::DbError(db, _) => db_is_transient(db),
        _ => false,
    }
}

/// The server's errors that say "not now" rather than "not this": a
/// syntax error, an invalid query (an unknown table), a missing
/// permission or a configuration problem is the same on every try.
fn db_is_transient(e: &DbError) -> bool {
    matches!(
        e,
        DbError::Unavailable { .. }
            | DbError::Overloaded
            | DbError::IsBootstrapping
            | DbError::ReadTimeout { .. }
            | DbError::WriteTimeout { .. }
            | DbError::ReadFailure { .. }
            | DbError::WriteFailure { .. }
            | DbError::RateLimitReached { .. }
            | DbError::TruncateError
            | DbError::ServerError
            | DbError::Unprepared { .. }
    )
}

/// The [`StoreError`] of a CQL failure, by whether it is transient.
fn cql_err(e: impl Into<CqlError>) -> StoreError {
    let e = e.into();
    let e = Box::new(e);
    if e.is_transient() { StoreError::CqlUnavailable(e) } else { StoreError::CqlRejected(e) }
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
    /// For the statements of the small `model_versions` table, made
    /// unprepared when needed (rare: a promote, a replica's poll), so a
    /// keyspace migrated before that table existed still serves Lookups.
    keyspace: String,
    read_consistency: Consistency,
    write_consistency: Consistency,
    request_timeout: Duration,
}

impl std::fmt::Debug for CqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CqlStore").finish_non_exhaustive()
    }
}

async fn session(config: &CqlConfig) -> Result<Session, StoreError> {
    let mut builder = SessionBuilder::new()
        .known_nodes(&config.nodes)
        .connection_timeout(config.connect_timeout)
        // Schema changes come from `migrate`, which waits for agreement
        // itself; no implicit wait on every DDL.
        .auto_await_schema_agreement(false);
    if let Some(auth) = &config.auth {
        builder = builder.user(&auth.username, auth.password.expose());
    }
    if let Some(tls) = &config.tls {
        builder = builder.tls_context(Some(tls_context(tls)?));
    }
    builder.build().await.map_err(|source| cql_err(connect_error(config, source)))
}

/// The [`CqlError`] of a failed connect: authentication and TLS failures
/// named as such (the driver reports them deep inside a metadata error),
/// the rest as [`CqlError::Connect`].
fn connect_error(config: &CqlConfig, source: NewSessionError) -> CqlError {
    let nodes = config.nodes.clone();
    let connection = match &source {
        NewSessionError::MetadataError(MetadataError::ConnectionPoolError(ConnectionPoolError::Broken {
            last_connection_error,
        })) => Some(last_connection_error),
        _ => None,
    };
    match connection {
        Some(ConnectionError::ConnectionSetupRequestError(e)) => match &e.error {
            ConnectionSetupRequestErrorKind::DbError(DbError::AuthenticationError, _) => CqlError::Authentication {
                nodes,
                user: config.auth.as_ref().map(|a| a.username.clone()).unwrap_or_default(),
                source,
            },
            ConnectionSetupRequestErrorKind::MissingAuthentication => {
                CqlError::AuthenticationRequired { nodes, source }
            }
            _ => CqlError::Connect { nodes, source },
        },
        // OpenSSL's own failure (a certificate, a protocol mismatch), not a
        // connection that broke during the handshake.
        Some(ConnectionError::IoError(io))
            if config.tls.is_some()
                && io
                    .get_ref()
                    .and_then(|e| e.downcast_ref::<openssl::ssl::Error>())
                    .is_some_and(|e| e.ssl_error().is_some()) =>
        {
            CqlError::Tls { nodes, source }
        }
        _ => CqlError::Connect { nodes, source },
    }
}

/// The driver's TLS context for `tls`: peer verification on, against the
/// given CA only (or the system's trust store), at least TLS 1.2.
fn tls_context(tls: &CqlTls) -> Result<OpenSsl010Config, StoreError> {
    use openssl::{
        ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode, SslVersion},
        x509::{X509, store::X509StoreBuilder},
    };
    let setup = |what: String| move |source| cql_err(CqlError::TlsSetup { what, source });
    // Sets the system's trust store, peer verification and sane ciphers.
    let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(setup("OpenSSL".into()))?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(setup("OpenSSL".into()))?;
    if let Some(ca) = &tls.ca {
        let what = format!("--cql-tls-ca {}", ca.display());
        let pem = std::fs::read(ca).map_err(|source| cql_err(CqlError::TlsFile { path: ca.clone(), source }))?;
        let certs = X509::stack_from_pem(&pem).map_err(setup(what.clone()))?;
        if certs.is_empty() {
            return Err(cql_err(CqlError::TlsNoCertificate { path: ca.clone() }));
        }
        let mut store = X509StoreBuilder::new().map_err(setup(what.clone()))?;
        for cert in certs {
            store.add_cert(cert).map_err(setup(what.clone()))?;
        }
        b.set_cert_store(store.build());
    }
    if let Some((cert, key)) = &tls.client_cert {
        b.set_certificate_chain_file(cert).map_err(setup(format!("--cql-tls-cert {}", cert.display())))?;
        b.set_private_key_file(key, SslFiletype::PEM).map_err(setup(format!("--cql-tls-key {}", key.display())))?;
        b.check_private_key().map_err(setup("--cql-tls-key does not match --cql-tls-cert".into()))?;
    }
    if let Some(name) = tls.server_name.clone() {
        // The driver checks each node's certificate against the node's IP
        // address. With a name given, the certificate must carry that name
        // instead: only the address mismatch of the leaf is forgiven, and
        // only when the leaf carries the name; every other check stands.
        b.set_verify_callback(SslVerifyMode::PEER, move |ok, ctx| {
            ok || (ctx.error().as_raw() == IP_ADDRESS_MISMATCH
                && ctx.error_depth() == 0
                && ctx.current_cert().is_some_and(|cert| cert_carries_name(cert, &name)))
        });
    }
    Ok(OpenSsl010Config::new(b))
}

/// OpenSSL's `X509_V_ERR_IP_ADDRESS_MISMATCH`.
const IP_ADDRESS_MISMATCH: i32 = 64;

/// Whether `cert`'s subject alternative names hold `name`: an IP address
/// exactly, a DNS name case-insensitively, with a wildcard only as the
/// whole left-most label (`*.db.example` matches `n1.db.example`).
fn cert_carries_name(cert: &openssl::x509::X509Ref, name: &str) -> bool {
    let Some(sans) = cert.subject_alt_names() else { return false };
    let ip = name.parse::<IpAddr>().ok();
    sans.iter().any(|san| match ip {
        Some(ip) => san.ipaddress().is_some_and(|b| match ip {
            IpAddr::V4(v4) => b == v4.octets(),
            IpAddr::V6(v6) => b == v6.octets(),
        }),
        None => san.dnsname().is_some_and(|pattern| dns_name_matches(pattern, name)),
    })
}

fn dns_name_matches(pattern: &str, name: &str) -> bool {
    let (pattern, name) = (pattern.trim_end_matches('.'), name.trim_end_matches('.'));
    match pattern.strip_prefix("*.") {
        Some(rest) => name.split_once('.').is_some_and(|(label, parent)| {
            !label.is_empty() && parent.eq_ignore_ascii_case(rest) && rest.contains('.')
        }),
        None => pattern.eq_ignore_ascii_case(name),
    }
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
            // What `embark promote` records: each model's current version.
            format!("CREATE TABLE {ks}.model_versions (model text PRIMARY KEY, version text, promoted_at timestamp)"),
        ];
        for stmt in statements {
            match s.query_unpaged(stmt.as_str(), &[]).await {
                Ok(_) => {}
                // Already there (from an earlier migrate): fine.
                Err(ExecutionError::LastAttemptError(RequestAttemptError::DbError(
                    DbError::AlreadyExists { .. },
                    _,
                ))) => {}
                Err(source) => return Err(cql_err(CqlError::Migrate { statement: stmt, source })),
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
                    .map_err(|source| cql_err(CqlError::Prepare { statement: q, source }))?;
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
                "INSERT INTO {ks}.embeddings (model, key, vector, dim, status, code, reason, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?){ttl}"
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
            keyspace: ks.clone(),
            read_consistency: config.read_consistency,
            write_consistency: config.write_consistency,
            request_timeout: config.request_timeout,
        })
    }

    fn statement(&self, cql: String, consistency: Consistency) -> Statement {
        let mut s = Statement::new(cql);
        s.set_consistency(consistency);
        s.set_request_timeout(Some(self.request_timeout));
        s.set_is_idempotent(true);
        s
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
        let row = match status.unwrap_or(row::STATUS_VECTOR.into()) {
            s if s == i32::from(row::STATUS_VECTOR) => match vector_of(dim, vector.unwrap_or_default()) {
                Ok(vector) => StoredRow::Vector { vector, created_at_ms: at },
                Err(reason) => StoredRow::Corrupt { reason },
            },
            s if s == i32::from(row::STATUS_FAILED) => StoredRow::Failed(FailureRecord {
                code: code.unwrap_or(0),
                reason: reason.unwrap_or_default(),
                at_unix_ms: at,
            }),
            s => StoredRow::Corrupt { reason: CorruptRow::UnknownStatus(s.into()) },
        };
        Ok(Some(row))
    }

    /// Writes rows, each with its CQL write timestamp: the newest
    /// timestamp wins, deletes included, which is how a stale fill loses
    /// to an Invalidate (see `put_filled`).
    async fn write_all(&self, model: &str, rows: Vec<Write>) -> Result<(), StoreError> {
        let now = now_unix_ms();
        stream::iter(rows)
            .map(|Write { stored_key: skey, value, write_ts_micros: write_ts }| async move {
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
                        // The vector and dim cells are written empty (null,
                        // at this write's timestamp): CQL resolves cell by
                        // cell, so an older vector's cells (a row adopted
                        // at timestamp 1) must not outlive the record and
                        // read as a vector once its status cell expires.
                        let (no_vector, no_dim): (Option<Vec<u8>>, Option<i32>) = (None, None);
                        let values = (
                            model,
                            skey,
                            no_vector,
                            no_dim,
                            row::STATUS_FAILED as i32,
                            f.code,
                            f.reason,
                            CqlTimestamp(f.at_unix_ms),
                        );
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

/// One row for [`CqlStore::write_all`].
struct Write {
    /// The key as stored ([`storage_key`]).
    stored_key: String,
    /// A vector row or a failure record.
    value: Filled,
    /// The CQL write timestamp (microseconds since the epoch).
    write_ts_micros: i64,
}

/// A vector column as floats, if it holds `dim` of them.
fn vector_of(dim: Option<i32>, bytes: Vec<u8>) -> Result<Vec<f32>, CorruptRow> {
    let dim = dim.unwrap_or(0);
    let mismatch = || CorruptRow::DimMismatch { dim: dim.into(), bytes: bytes.len() };
    if usize::try_from(dim).ok().and_then(|d| d.checked_mul(4)) != Some(bytes.len()) {
        return Err(mismatch());
    }
    embark_proto::f32_from_le(&bytes).ok_or_else(mismatch)
}

/// `statement` with an explicit write timestamp (microseconds).
fn at(statement: &PreparedStatement, ts: i64) -> PreparedStatement {
    let mut s = statement.clone();
    s.set_timestamp(Some(ts));
    s
}

/// The CQL write timestamp of a copied row ([`CqlStore::copy_vectors`]):
/// older than every write a process makes, so whatever else is written to
/// the same key, before or after, wins.
const COPY_WRITE_TS_MICROS: i64 = 1;

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
        let rows = rows.into_iter().map(|(key, v)| Write {
            stored_key: storage_key(&key).into_owned(),
            value: Filled::Vector(v),
            write_ts_micros: ts,
        });
        self.write_all(model, rows.collect()).await
    }

    async fn put_failures(&self, model: &str, rows: Vec<(String, FailureRecord)>) -> Result<(), StoreError> {
        let ts = now_micros();
        let rows = rows.into_iter().map(|(key, f)| Write {
            stored_key: storage_key(&key).into_owned(),
            value: Filled::Failure(f),
            write_ts_micros: ts,
        });
        self.write_all(model, rows.collect()).await
    }

    /// Each row is written with the time its input was seen (the end of
    /// that millisecond) as its CQL timestamp: a delete made after that
    /// has a newer timestamp and wins, with no read before the write.
    async fn put_filled(&self, model: &str, rows: Vec<FilledRow>) -> Result<Vec<bool>, StoreError> {
        let n = rows.len();
        let rows = rows.into_iter().map(|r| Write {
            stored_key: storage_key(&r.key).into_owned(),
            value: r.value,
            write_ts_micros: r.seen_at_ms.saturating_mul(1000).saturating_add(999),
        });
        self.write_all(model, rows.collect()).await?;
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
            if m != model {
                continue;
            }
            if status.unwrap_or(row::STATUS_VECTOR as i32) != row::STATUS_VECTOR as i32 {
                out.other_keys.push(key);
                continue;
            }
            match vector_of(dim, vector.unwrap_or_default()) {
                Ok(vector) => out.rows.push((key, vector)),
                Err(reason) => {
                    crate::skip_corrupt(model, &key, &reason);
                    out.other_keys.push(key);
                }
            }
        }
        out.next = match paging {
            PagingStateResponse::HasMorePages { state } => state.as_bytes_slice().map(|b| ScanCursor(b.to_vec())),
            PagingStateResponse::NoMorePages => None,
        };
        Ok(out)
    }

    async fn current_version(&self, name: &str) -> Result<Option<crate::CurrentVersion>, StoreError> {
        let ks = &self.keyspace;
        let q = self.statement(
            format!("SELECT version, promoted_at FROM {ks}.model_versions WHERE model = ?"),
            self.read_consistency,
        );
        let rows =
            self.session.query_unpaged(q, (name,)).await.map_err(cql_err)?.into_rows_result().map_err(cql_err)?;
        let row = rows.maybe_first_row::<(Option<String>, Option<CqlTimestamp>)>().map_err(cql_err)?;
        Ok(row.and_then(|(version, at)| {
            Some(crate::CurrentVersion { version: version?, promoted_at_ms: at.map(|t| t.0).unwrap_or(0) })
        }))
    }

    async fn set_current_version(&self, name: &str, version: &str) -> Result<(), StoreError> {
        let ks = &self.keyspace;
        let q = self.statement(
            format!("INSERT INTO {ks}.model_versions (model, version, promoted_at) VALUES (?, ?, ?)"),
            self.write_consistency,
        );
        self.session.query_unpaged(q, (name, version, CqlTimestamp(now_unix_ms()))).await.map_err(cql_err)?;
        Ok(())
    }

    /// The rows absent at a read are written at a timestamp older than any
    /// other write ([`COPY_WRITE_TS_MICROS`]), so a row, failure or delete
    /// written before or meanwhile wins, with no lightweight transaction.
    async fn copy_vectors(&self, model: &str, rows: Vec<(String, Vec<f32>)>) -> Result<u64, StoreError> {
        let absent = stream::iter(rows)
            .map(|(skey, vector)| async move {
                let result = self.session.execute_unpaged(&self.get, (model, skey.as_str())).await.map_err(cql_err)?;
                let rows = result.into_rows_result().map_err(cql_err)?;
                Ok::<_, StoreError>((rows.rows_num() == 0).then_some((skey, vector)))
            })
            .buffer_unordered(self.concurrency)
            .try_collect::<Vec<_>>()
            .await?;
        let writes: Vec<Write> = absent
            .into_iter()
            .flatten()
            .map(|(stored_key, v)| Write {
                stored_key,
                value: Filled::Vector(v),
                write_ts_micros: COPY_WRITE_TS_MICROS,
            })
            .collect();
        let n = writes.len() as u64;
        self.write_all(model, writes).await?;
        Ok(n)
    }

    async fn purge(&self, model: &str, stored_keys: &[String]) -> Result<(), StoreError> {
        let delete = at(&self.delete, now_micros());
        let delete = &delete;
        stream::iter(0..stored_keys.len())
            .map(|i| async move {
                let key = stored_keys[i].as_str();
                self.session.execute_unpaged(delete, (model, key)).await.map(|_| ()).map_err(cql_err)
            })
            .buffer_unordered(self.concurrency)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
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

#[cfg(test)]
mod tests {
    use cql_test_server::CqlTestServer;
    use scylla::errors::BadQuery;

    use super::*;

    fn attempt(db: DbError) -> ExecutionError {
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, "from the server".into()))
    }

    #[test]
    fn timeouts_and_unavailable_replicas_are_transient_schema_and_query_errors_are_not() {
        let unavailable = [
            ExecutionError::RequestTimeout(Duration::from_millis(500)),
            attempt(DbError::Unavailable { consistency: Consistency::LocalQuorum, required: 2, alive: 1 }),
            attempt(DbError::ReadTimeout {
                consistency: Consistency::LocalOne,
                received: 0,
                required: 1,
                data_present: false,
            }),
            attempt(DbError::Overloaded),
            ExecutionError::LastAttemptError(RequestAttemptError::UnableToAllocStreamId),
        ];
        for e in unavailable {
            let text = e.to_string();
            let e = cql_err(e);
            assert!(
                matches!(&e, StoreError::CqlUnavailable(c) if matches!(**c, CqlError::Execute(_))),
                "{text}: {e:?}"
            );
            assert!(e.is_transient(), "{text}");
        }
        let rejected = [
            attempt(DbError::Invalid),
            attempt(DbError::SyntaxError),
            attempt(DbError::Unauthorized),
            ExecutionError::BadQuery(BadQuery::PartitionKeyExtraction),
            ExecutionError::EmptyPlan,
        ];
        for e in rejected {
            let text = e.to_string();
            let e = cql_err(e);
            assert!(matches!(&e, StoreError::CqlRejected(c) if matches!(**c, CqlError::Execute(_))), "{text}: {e:?}");
            assert!(!e.is_transient(), "{text}");
        }
        // A statement that does not prepare because the table is missing,
        // against one that does not prepare because no node answers.
        let missing_table = PrepareError::AllAttemptsFailed {
            first_attempt: RequestAttemptError::DbError(DbError::Invalid, "unconfigured table embeddings".into()),
        };
        let e = cql_err(CqlError::Prepare { statement: "SELECT".into(), source: missing_table });
        assert!(
            matches!(&e, StoreError::CqlRejected(c) if matches!(**c, CqlError::Prepare { .. })) && !e.is_transient(),
            "{e:?}"
        );
        let no_stream = PrepareError::AllAttemptsFailed { first_attempt: RequestAttemptError::UnableToAllocStreamId };
        let e = cql_err(CqlError::Prepare { statement: "SELECT".into(), source: no_stream });
        assert!(
            matches!(&e, StoreError::CqlUnavailable(c) if matches!(**c, CqlError::Prepare { .. })) && e.is_transient(),
            "{e:?}"
        );
        // The driver's error stays reachable as the source.
        let e = cql_err(ExecutionError::RequestTimeout(Duration::from_millis(500)));
        let source = std::error::Error::source(&e).and_then(|s| s.source());
        assert!(source.is_some_and(|s| s.downcast_ref::<ExecutionError>().is_some()), "{e:?}");
    }

    fn config(server: &CqlTestServer) -> CqlConfig {
        CqlConfig {
            nodes: vec![server.addr.to_string()],
            keyspace: "embark_errors".into(),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
            request_timeout: Duration::from_millis(300),
            connect_timeout: Duration::from_secs(2),
            ..CqlConfig::default()
        }
    }

    /// Through the real driver: no schema is a rejection, a server that
    /// stops answering is unavailability, and a second migrate is fine.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_driver_s_errors_are_classified() {
        let server = CqlTestServer::start().expect("server");
        let cfg = config(&server);
        let no_schema = CqlStore::connect(&cfg).await.expect_err("no table to prepare against");
        assert!(
            matches!(&no_schema, StoreError::CqlRejected(c) if matches!(**c, CqlError::Prepare { .. })),
            "{no_schema:?}"
        );
        assert!(!no_schema.is_transient());

        CqlStore::migrate(&cfg).await.expect("migrate");
        CqlStore::migrate(&cfg).await.expect("a second migrate finds the schema there");
        let store = CqlStore::connect(&cfg).await.expect("connect");
        store.put_vectors("m", vec![("k".into(), vec![1.0])]).await.expect("put");
        server.pause();
        let timeout = store.get_many("m", &["k".into()]).await.expect_err("the server does not answer");
        assert!(
            matches!(&timeout, StoreError::CqlUnavailable(c) if matches!(**c, CqlError::Execute(_))),
            "{timeout:?}"
        );
        assert!(timeout.is_transient());
        server.resume();
        let rows = store.get_many("m", &["k".into()]).await.expect("answered again");
        assert!(matches!(&rows[0], Some(StoredRow::Vector { vector, .. }) if vector == &[1.0]));
    }

    #[tokio::test]
    async fn no_node_listening_is_transient() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
        let cfg = CqlConfig {
            nodes: vec![format!("127.0.0.1:{port}")],
            connect_timeout: Duration::from_secs(1),
            ..CqlConfig::default()
        };
        let e = CqlStore::connect(&cfg).await.expect_err("nothing listens");
        assert!(matches!(&e, StoreError::CqlUnavailable(c) if matches!(**c, CqlError::Connect { .. })), "{e:?}");
        assert!(e.is_transient());
    }

    #[test]
    fn a_row_of_the_wrong_dim_or_status_is_corrupt() {
        assert_eq!(vector_of(Some(1), 1f32.to_le_bytes().to_vec()), Ok(vec![1.0]));
        assert_eq!(vector_of(Some(2), vec![0; 4]), Err(CorruptRow::DimMismatch { dim: 2, bytes: 4 }));
        assert_eq!(vector_of(Some(-1), vec![]), Err(CorruptRow::DimMismatch { dim: -1, bytes: 0 }));
        assert_eq!(vector_of(None, vec![]), Ok(vec![]));
    }
}
