//! The store flags every binary shares (`embark`, `kfc`), so a deployment
//! configures the store the same way everywhere.

use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Where vectors live: `embedded` (a redb file in --data-dir) or
    /// `cql://host:port[,host:port]/keyspace` (ScyllaDB or Cassandra).
    #[arg(long, env = "EMBARK_STORE", default_value = "embedded")]
    pub store: String,
    /// Keyspace replication, used by `embark migrate` (CQL).
    #[arg(
        long,
        env = "EMBARK_CQL_REPLICATION",
        default_value = "{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}"
    )]
    pub cql_replication: String,
    /// Consistency of reads (CQL).
    #[arg(long, env = "EMBARK_CQL_READ_CONSISTENCY", default_value = "local_one", value_parser = crate::cql::parse_consistency)]
    pub cql_read_consistency: crate::cql::Consistency,
    /// Consistency of writes (CQL).
    #[arg(long, env = "EMBARK_CQL_WRITE_CONSISTENCY", default_value = "local_quorum", value_parser = crate::cql::parse_consistency)]
    pub cql_write_consistency: crate::cql::Consistency,
    /// Timeout of one CQL request, in milliseconds.
    #[arg(long, env = "EMBARK_CQL_REQUEST_TIMEOUT_MS", default_value_t = 500)]
    pub cql_request_timeout_ms: u64,
    /// Single-partition requests in flight per batch (CQL).
    #[arg(long, env = "EMBARK_CQL_CONCURRENCY", default_value_t = 64)]
    pub cql_concurrency: usize,
    /// Rows expire this many seconds after they are written (CQL; none by default).
    #[arg(long, env = "EMBARK_CQL_WRITE_TTL_SECS")]
    pub cql_write_ttl_secs: Option<u64>,
    /// Run the migration at start (CQL).
    #[arg(long, env = "EMBARK_CQL_MIGRATE_ON_START")]
    pub cql_migrate_on_start: bool,
}

impl StoreArgs {
    /// The CQL settings, or `None` for the embedded store.
    pub fn cql(&self) -> Result<Option<crate::cql::CqlConfig>, crate::StoreError> {
        if self.store == "embedded" {
            return Ok(None);
        }
        let mut c = crate::cql::CqlConfig::from_url(&self.store)?;
        c.replication = self.cql_replication.clone();
        c.read_consistency = self.cql_read_consistency;
        c.write_consistency = self.cql_write_consistency;
        c.request_timeout = Duration::from_millis(self.cql_request_timeout_ms);
        c.concurrency = self.cql_concurrency;
        c.write_ttl = self.cql_write_ttl_secs.map(Duration::from_secs);
        Ok(Some(c))
    }
}
