//! The store flags every binary shares (`embark`, `kfc`), so a deployment
//! configures the store the same way everywhere, and [`EmbeddedArgs`], the
//! one place the embedded store's file is named and opened.

use std::{path::PathBuf, time::Duration};

use crate::embedded::EmbeddedStore;

/// Where the embedded store lives: `<data-dir>/embark.redb`.
#[derive(Debug, Clone, clap::Args)]
pub struct EmbeddedArgs {
    /// Where the embedded store (embark.redb) lives. The file belongs to one
    /// process: an `embark up` on it must be stopped before a batch tool
    /// opens it.
    #[arg(long, env = "EMBARK_DATA_DIR", default_value = "embark-data")]
    pub data_dir: PathBuf,
    /// Page cache of the embedded store file (EmbArk's tier holds the hot
    /// vectors, so little is needed here).
    #[arg(long, env = "EMBARK_EMBEDDED_CACHE_BYTES", default_value = "64MiB", value_parser = parse_bytes)]
    pub embedded_cache_bytes: u64,
}

/// The embedded store's file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenEmbeddedError {
    #[error("creating the data directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening {path} (does another embark use this --data-dir?): {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: crate::StoreError,
    },
}

impl EmbeddedArgs {
    /// The store file.
    pub fn path(&self) -> PathBuf {
        self.data_dir.join("embark.redb")
    }

    /// Opens (or creates, with its directory) the store file.
    pub fn open(&self) -> Result<EmbeddedStore, OpenEmbeddedError> {
        std::fs::create_dir_all(&self.data_dir)
            .map_err(|source| OpenEmbeddedError::CreateDir { path: self.data_dir.clone(), source })?;
        let path = self.path();
        let cache = usize::try_from(self.embedded_cache_bytes).unwrap_or(usize::MAX);
        EmbeddedStore::open_with_cache(&path, cache).map_err(|source| OpenEmbeddedError::Open { path, source })
    }
}

/// Parses `1024`, `512MiB`, `1GiB`, `64KiB` (also KB/MB/GB as powers of 1000).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: expected a number of bytes, e.g. 512MiB"))?;
    let mul = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        u => return Err(format!("{s:?}: unknown unit {u:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mul).ok_or_else(|| format!("{s:?} is too large"))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("2 GB"), Ok(2_000_000_000));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("1PiB").is_err());
    }

    #[test]
    fn a_file_held_by_another_store_is_refused_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = EmbeddedArgs { data_dir: dir.path().join("nested"), embedded_cache_bytes: 1 << 20 };
        let _held = args.open().expect("first open creates the directory and the file");
        let err = args.open().expect_err("one file, one process");
        assert!(matches!(err, OpenEmbeddedError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains("embark.redb"), "{err}");
    }
}
