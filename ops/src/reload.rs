//! Configuration read from files and swapped in place while the server
//! runs: TLS certificates and keys (rotated by cert-manager, Vault, a
//! cron job) and the principals file. [`Reloadable`] holds the current
//! value; [`watch`] re-reads the files when their bytes change (polled:
//! Kubernetes swaps a secret's files by renaming a symlinked directory,
//! which no mtime-on-one-file watch sees reliably) or at once on SIGHUP.
//!
//! A file that fails to load keeps the previous value in service: a
//! half-written certificate never takes a server down. Failures are
//! logged and counted (`config_reloads_total{config, result}`).

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

/// How often the files are compared with what was loaded, by default.
pub const DEFAULT_RELOAD_EVERY: Duration = Duration::from_secs(5);

/// A value loaded from files, replaced whole when they change. Readers
/// take an `Arc` of the current value: a connection or request keeps the
/// value it started with.
#[derive(Debug)]
pub struct Reloadable<T> {
    current: RwLock<Arc<T>>,
}

impl<T: Default> Default for Reloadable<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T> Reloadable<T> {
    pub fn new(value: T) -> Self {
        Self { current: RwLock::new(Arc::new(value)) }
    }

    /// The value in service now.
    pub fn current(&self) -> Arc<T> {
        // A writer never panics while holding the lock (it only swaps an
        // Arc), so a poisoned lock still holds a whole value.
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn replace(&self, value: T) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
    }
}

/// Re-runs `load` and swaps its result into `target` whenever the bytes
/// of `files` differ from those last loaded, checked every `every`, or
/// when the process receives SIGHUP; until `stop`. `name` labels logs
/// and metrics ("tls", "principals").
pub fn watch<T, E>(
    name: &'static str,
    files: Vec<PathBuf>,
    every: Duration,
    target: Arc<Reloadable<T>>,
    load: impl Fn() -> Result<T, E> + Send + 'static,
    stop: CancellationToken,
) where
    T: Send + Sync + 'static,
    E: std::fmt::Display,
{
    // Read now, not in the task: a change made before the task first runs
    // must still count as a change.
    let mut seen = read_all(&files);
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file changes only"))
            .ok();
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => false,
                _ = hangup_received(&mut hangup) => true,
            };
            let now = read_all(&files);
            if !forced && now == seen {
                continue;
            }
            match load() {
                Ok(value) => {
                    target.replace(value);
                    seen = now;
                    tracing::info!(config = name, forced, "reloaded");
                    metrics::counter!("config_reloads_total", "config" => name, "result" => "ok").increment(1);
                }
                Err(e) => {
                    // Retried at the next tick only if the bytes change
                    // again: a broken file is reported once, not every 5 s.
                    seen = now;
                    tracing::error!(config = name, error = %e, "reload failed; the previous configuration stays in service");
                    metrics::counter!("config_reloads_total", "config" => name, "result" => "error").increment(1);
                }
            }
        }
    });
}

#[cfg(unix)]
async fn hangup_received(hangup: &mut Option<tokio::signal::unix::Signal>) {
    match hangup {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn hangup_received(_: &mut Option<()>) {
    std::future::pending().await
}

/// The bytes of each file, or `None` where it cannot be read (mid-rename).
fn read_all(files: &[PathBuf]) -> Vec<Option<Vec<u8>>> {
    files.iter().map(|f| std::fs::read(f).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_old_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("n");
        std::fs::write(&path, "1").expect("write");
        let load = {
            let path = path.clone();
            move || -> Result<u32, String> {
                std::fs::read_to_string(&path)
                    .map_err(|e| e.to_string())?
                    .trim()
                    .parse()
                    .map_err(|_| "not a number".into())
            }
        };
        let target = Arc::new(Reloadable::new(load().expect("first load")));
        let stop = CancellationToken::new();
        watch("test", vec![path.clone()], Duration::from_millis(100), target.clone(), load, stop.clone());
        let wait_for = |want: u32| {
            let target = target.clone();
            async move {
                for _ in 0..50 {
                    if *target.current() == want {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                false
            }
        };
        std::fs::write(&path, "2").expect("write");
        assert!(wait_for(2).await, "the new value is in service");
        std::fs::write(&path, "garbage").expect("write");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(*target.current(), 2, "a file that fails to load keeps the previous value");
        std::fs::write(&path, "3").expect("write");
        assert!(wait_for(3).await, "a fixed file is loaded");
        stop.cancel();
    }
}
