//! The batch tools on the `embark` binary: `backfill`, `export`, `dedup`
//! (and `dev-certs`, which writes development certificates and tokens), and
//! the client verbs `get`, `similar`, `invalidate`, `models` ([`client`]),
//! which talk to a running server instead of the store.
//!
//! They share how they find the store ([`StoreLocation`]), how they show
//! progress ([`Progress`]) and how they survive an interruption
//! ([`Checkpoint`]): each tool stops taking new work on Ctrl-C or SIGTERM,
//! finishes what is in flight, records where it stopped and exits 130; the
//! same command run again carries on from there.

pub(crate) mod backfill;
pub(crate) mod client;
pub(crate) mod dedup;
pub(crate) mod dev_certs;
pub(crate) mod export;
pub(crate) mod versions;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Args;
use embark_store::{EmbeddingStore, ScanCursor};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Serialize, de::DeserializeOwned};

/// Exit status of a tool that was interrupted and can be resumed.
pub(crate) const EXIT_INTERRUPTED: i32 = 130;

/// Which store a tool reads and writes: the same flags as `embark serve`.
#[derive(Debug, Args)]
pub(crate) struct StoreLocation {
    #[command(flatten)]
    pub store: embark_store::args::StoreArgs,
    #[command(flatten)]
    pub embedded: embark_store::args::EmbeddedArgs,
    /// Where the model's name is looked up (its dim, and for backfill its
    /// weights).
    #[command(flatten)]
    pub catalog: retina::config::CatalogArg,
}

impl StoreLocation {
    pub(crate) async fn open(&self) -> anyhow::Result<Arc<dyn EmbeddingStore>> {
        match self.store.cql()? {
            Some(cfg) => Ok(Arc::new(embark_store::cql::CqlStore::connect(&cfg).await?)),
            None => Ok(Arc::new(self.embedded.open()?)),
        }
    }
}

/// The catalogue entry of `model` at `version`; for an empty version, the
/// current one: what `embark promote` recorded in the store, else the
/// catalogue's `current` entry. An unknown model or version is an error
/// listing the known ones.
pub(crate) async fn model_version(
    catalog: &retina::config::CatalogArg,
    store: &dyn EmbeddingStore,
    model: &str,
    version: &str,
) -> anyhow::Result<&'static retina::ModelSpec> {
    let catalog = catalog.load()?;
    let current = catalog
        .spec(model)
        .with_context(|| format!("unknown model {model:?}; {} has {:?}", catalog.source, catalog.names()))?;
    let version = match version {
        "" => match store.current_version(model).await.context("reading the model's current version")? {
            Some(promoted) => promoted.version,
            None => return Ok(current),
        },
        v => v.to_owned(),
    };
    catalog.spec_version(model, &version).with_context(|| {
        format!(
            "model {model:?} has no version {version:?} in {}; it has {:?}",
            catalog.source,
            catalog.versions(model)
        )
    })
}

/// Where the scan of `model` at `version` (empty: the current one) reads:
/// its dim and its rows' namespace.
pub(crate) async fn scanned_version(
    catalog: &retina::config::CatalogArg,
    store: &dyn EmbeddingStore,
    model: &str,
    version: &str,
) -> anyhow::Result<(usize, String)> {
    let spec = model_version(catalog, store, model, version).await?;
    Ok((spec.dim, embark_store::namespace(model, &spec.version)))
}

/// A progress bar on stderr with rate and ETA (a spinner with the rate when
/// the total is unknown). When stderr is not a terminal (pipes, CI, tests)
/// it draws nothing and reports its position through the log instead, at
/// most once a second.
pub(crate) struct Progress {
    bar: ProgressBar,
    what: &'static str,
    logged: Instant,
}

impl Progress {
    pub(crate) fn new(total: Option<u64>, what: &'static str) -> Self {
        let bar = match total {
            Some(n) => ProgressBar::new(n).with_style(
                ProgressStyle::with_template(&format!(
                    "{what} {{bar:40}} {{pos}}/{{len}} {{per_sec}} ETA {{eta}} {{msg}}"
                ))
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template(&format!("{what} {{spinner}} {{pos}} {{per_sec}} {{elapsed}} {{msg}}"))
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        };
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        Self { bar, what, logged: Instant::now() }
    }

    pub(crate) fn inc(&mut self, n: u64) {
        self.bar.inc(n);
        self.log();
    }

    pub(crate) fn set_position(&mut self, n: u64) {
        self.bar.set_position(n);
        self.log();
    }

    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }

    fn log(&mut self) {
        if self.bar.is_hidden() && self.logged.elapsed() >= Duration::from_secs(1) {
            tracing::info!(what = self.what, done = self.bar.position(), total = self.bar.length(), "progress");
            self.logged = Instant::now();
        }
    }
}

/// The scan cursor a checkpoint saved (hex), `None` at the start.
pub(crate) fn saved_cursor(hex: Option<&str>) -> anyhow::Result<Option<ScanCursor>> {
    hex.map(|h| ScanCursor::from_hex(h).context("the checkpoint's cursor is not hex")).transpose()
}

/// A small JSON file that says where a tool stopped, replaced atomically
/// (write aside, fsync, rename) so a crash leaves the old or the new one.
#[derive(Debug, Clone)]
pub(crate) struct Checkpoint {
    path: PathBuf,
}

impl Checkpoint {
    pub(crate) fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn load<T: DeserializeOwned>(&self) -> anyhow::Result<Option<T>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is not a checkpoint of this tool", self.path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path.display())),
        }
    }

    pub(crate) fn save<T: Serialize>(&self, value: &T) -> anyhow::Result<()> {
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
            serde_json::to_writer(&mut f, value)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path).with_context(|| format!("replacing {}", self.path.display()))
    }

    pub(crate) fn remove(&self) -> anyhow::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

/// Interruptions at an exact point, for the tools' resume tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use embark_store::{ScanCursor, ScanPage, StoreError, embedded::EmbeddedStore};
    use tokio_util::sync::CancellationToken;

    use super::*;

    /// A store that cancels `stop` while serving its `n`-th scan, as a
    /// Ctrl-C arriving during that page would.
    pub(crate) struct StopAfterScans {
        pub inner: EmbeddedStore,
        pub left: AtomicUsize,
        pub stop: CancellationToken,
    }

    #[async_trait]
    impl embark_store::wrap::StoreWrapper for StopAfterScans {
        fn inner(&self) -> &dyn EmbeddingStore {
            &self.inner
        }
        async fn scan(&self, model: &str, cursor: Option<ScanCursor>, page: usize) -> Result<ScanPage, StoreError> {
            if self.left.fetch_sub(1, Ordering::SeqCst) == 1 {
                self.stop.cancel();
            }
            self.inner.scan(model, cursor, page).await
        }
    }

    /// Where a built-in model's current version keeps its rows.
    pub(crate) fn current_rows(model: &str) -> String {
        let spec = retina::catalog::builtin().spec(model).expect("a built-in model");
        embark_store::namespace(model, &spec.version)
    }

    /// Appends bytes to a file, as a write torn by a crash after the last
    /// checkpoint would leave.
    pub(crate) fn append_junk(path: &Path) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(path).expect("open partial file");
        f.write_all(b"torn,write\n\x01\x02\x03").expect("append");
    }
}
