//! The store flags every binary shares (`embark`, `kfc`), so a deployment
//! configures the store the same way everywhere, and [`EmbeddedArgs`], the
//! one place the embedded store's file is named and opened.

use std::{path::PathBuf, time::Duration};

use crate::{
    cql::{CqlAuth, CqlTls},
    embedded::EmbeddedStore,
    secret::Secret,
};

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
    /// User name for the cluster's PasswordAuthenticator (CQL); needs a
    /// password.
    #[arg(long, env = "EMBARK_CQL_USERNAME")]
    pub cql_username: Option<String>,
    /// Its password. Prefer --cql-password-file: a flag shows in `ps`.
    #[arg(long, env = "EMBARK_CQL_PASSWORD", hide_env_values = true, conflicts_with = "cql_password_file")]
    pub cql_password: Option<Secret>,
    /// A file holding the password (one trailing newline is ignored), e.g. a
    /// mounted secret.
    #[arg(long, env = "EMBARK_CQL_PASSWORD_FILE")]
    pub cql_password_file: Option<PathBuf>,
    /// Speak TLS to the nodes (their client_encryption_options). The node's
    /// certificate is verified against --cql-tls-ca, or the system's trust
    /// store without it.
    #[arg(long, env = "EMBARK_CQL_TLS")]
    pub cql_tls: bool,
    /// PEM file of the CA(s) the nodes' certificates must chain to; only
    /// these are trusted.
    #[arg(long, env = "EMBARK_CQL_TLS_CA")]
    pub cql_tls_ca: Option<PathBuf>,
    /// PEM client certificate (chain, leaf first), for nodes that require
    /// one (require_client_auth); needs --cql-tls-key.
    #[arg(long, env = "EMBARK_CQL_TLS_CERT", requires = "cql_tls_key")]
    pub cql_tls_cert: Option<PathBuf>,
    /// PEM private key of --cql-tls-cert.
    #[arg(long, env = "EMBARK_CQL_TLS_KEY", requires = "cql_tls_cert")]
    pub cql_tls_key: Option<PathBuf>,
    /// The name every node's certificate must carry (DNS name or IP).
    /// Default: the first host of --store; if that is an IP address, each
    /// node's certificate must carry that node's own address.
    #[arg(long, env = "EMBARK_CQL_TLS_SERVER_NAME")]
    pub cql_tls_server_name: Option<String>,
}

/// CQL credential or TLS flags that cannot be used as given.
#[derive(Debug, thiserror::Error)]
pub enum CqlSettingsError {
    #[error("--cql-username needs a password: --cql-password-file (or --cql-password)")]
    UserWithoutPassword,
    #[error("a CQL password was given without --cql-username")]
    PasswordWithoutUser,
    #[error("reading --cql-password-file {path}: {source}")]
    PasswordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} needs --cql-tls (without it the connection is not encrypted)")]
    TlsFlagWithoutTls(&'static str),
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
        c.auth = self.cql_auth()?;
        c.tls = self.cql_tls(&c.nodes)?;
        Ok(Some(c))
    }

    fn cql_auth(&self) -> Result<Option<CqlAuth>, CqlSettingsError> {
        let password = match (&self.cql_password, &self.cql_password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(path)) => Some(
                Secret::from_file(path)
                    .map_err(|source| CqlSettingsError::PasswordFile { path: path.clone(), source })?,
            ),
            (None, None) => None,
        };
        match (&self.cql_username, password) {
            (Some(username), Some(password)) => Ok(Some(CqlAuth { username: username.clone(), password })),
            (Some(_), None) => Err(CqlSettingsError::UserWithoutPassword),
            (None, Some(_)) => Err(CqlSettingsError::PasswordWithoutUser),
            (None, None) => Ok(None),
        }
    }

    fn cql_tls(&self, nodes: &[String]) -> Result<Option<CqlTls>, CqlSettingsError> {
        if !self.cql_tls {
            let given = [
                ("--cql-tls-ca", self.cql_tls_ca.is_some()),
                ("--cql-tls-cert", self.cql_tls_cert.is_some()),
                ("--cql-tls-key", self.cql_tls_key.is_some()),
                ("--cql-tls-server-name", self.cql_tls_server_name.is_some()),
            ];
            return match given.into_iter().find(|(_, set)| *set) {
                Some((flag, _)) => Err(CqlSettingsError::TlsFlagWithoutTls(flag)),
                None => Ok(None),
            };
        }
        let server_name = self.cql_tls_server_name.clone().or_else(|| {
            // The host of the first contact point, unless it is an address
            // (then each node is checked against its own address).
            let first = nodes.first()?;
            let host = first.rsplit_once(':').map_or(first.as_str(), |(host, _)| host);
            host.parse::<std::net::IpAddr>().is_err().then(|| host.to_owned())
        });
        Ok(Some(CqlTls {
            ca: self.cql_tls_ca.clone(),
            client_cert: self.cql_tls_cert.clone().zip(self.cql_tls_key.clone()),
            server_name,
        }))
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

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        store: StoreArgs,
    }

    fn parse(args: &[&str]) -> Result<StoreArgs, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("test").chain(args.iter().copied())).map(|c| c.store)
    }

    fn cql(args: &[&str]) -> Result<crate::cql::CqlConfig, crate::StoreError> {
        let mut all = vec!["--store", "cql://db1.example:9142,db2.example/ks"];
        all.extend_from_slice(args);
        Ok(parse(&all).expect("flags parse").cql()?.expect("a CQL store"))
    }

    #[test]
    fn credentials_come_from_a_flag_or_a_file_and_are_never_printed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("password");
        std::fs::write(&file, "from-the-file\n").expect("write");
        let file = file.to_str().expect("utf-8");

        let c = cql(&["--cql-username", "embark", "--cql-password-file", file]).expect("settings");
        let auth = c.auth.as_ref().expect("credentials");
        assert_eq!((auth.username.as_str(), auth.password.expose()), ("embark", "from-the-file"));
        assert!(!format!("{c:?}").contains("from-the-file"), "{c:?}");

        let args = parse(&["--cql-username", "embark", "--cql-password", "on-the-line"]).expect("flags");
        assert!(!format!("{args:?}").contains("on-the-line"), "{args:?}");
        assert_eq!(args.cql_password.as_ref().map(|p| p.expose()), Some("on-the-line"));

        let both = parse(&["--cql-password", "a", "--cql-password-file", file]).expect_err("one or the other");
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict, "{both}");
        let e = cql(&["--cql-username", "embark"]).expect_err("no password");
        assert!(matches!(e, crate::StoreError::CqlSettings(CqlSettingsError::UserWithoutPassword)), "{e:?}");
        let e = cql(&["--cql-password", "pw"]).expect_err("no user");
        assert!(matches!(e, crate::StoreError::CqlSettings(CqlSettingsError::PasswordWithoutUser)), "{e:?}");
        let missing = dir.path().join("missing");
        let e = cql(&["--cql-username", "u", "--cql-password-file", missing.to_str().expect("utf-8")])
            .expect_err("no file");
        assert!(e.to_string().contains("--cql-password-file") && e.to_string().contains("missing"), "{e}");
        assert!(cql(&[]).expect("settings").auth.is_none());
    }

    #[test]
    fn tls_settings_need_tls_and_the_name_defaults_to_the_first_host() {
        assert!(cql(&[]).expect("settings").tls.is_none());
        let tls = cql(&["--cql-tls", "--cql-tls-ca", "/ca.pem"]).expect("settings").tls.expect("tls");
        assert_eq!(tls.ca.as_deref(), Some(std::path::Path::new("/ca.pem")));
        assert_eq!(tls.server_name.as_deref(), Some("db1.example"));
        assert!(tls.client_cert.is_none());

        let tls = cql(&["--cql-tls", "--cql-tls-server-name", "*.x"]).expect("settings").tls.expect("tls");
        assert_eq!(tls.server_name.as_deref(), Some("*.x"));
        // An address as the first host: each node is checked against its own.
        let args = parse(&["--store", "cql://10.0.0.1:9142/ks", "--cql-tls"]).expect("flags");
        assert_eq!(args.cql().expect("settings").and_then(|c| c.tls).expect("tls").server_name, None);

        let tls = cql(&["--cql-tls", "--cql-tls-cert", "/c.pem", "--cql-tls-key", "/c.key"]).expect("settings");
        assert!(tls.tls.and_then(|t| t.client_cert).is_some());
        let e = parse(&["--cql-tls", "--cql-tls-cert", "/c.pem"]).expect_err("a certificate needs its key");
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument, "{e}");
        for flag in ["--cql-tls-ca", "--cql-tls-server-name"] {
            let e = cql(&[flag, "x"]).expect_err("TLS flags without --cql-tls");
            assert!(e.to_string().contains(flag) && e.to_string().contains("--cql-tls "), "{e}");
        }
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
