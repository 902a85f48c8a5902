//! The in-process tier: a moka cache bounded in bytes.
//!
//! Entries are keyed by a 128-bit hash of (model, key), so a lookup builds
//! no key string and an entry costs 16 bytes of key however long the URL.
//! A collision needs ~2^64 distinct keys; we accept that (invariant in
//! ARCHITECTURE.md). Vectors are shared `Arc<[f32]>`: a hit costs one copy,
//! into the response.

use std::{sync::Arc, time::Duration};

use moka::sync::Cache;

/// Identifies (model, key) in the tier and the miss dedup window.
pub type KeyHash = u128;

pub fn key_hash(model: &str, key: &str) -> KeyHash {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(model.as_bytes());
    // A separator that cannot occur in a model name keeps ("ab","c") and
    // ("a","bc") apart.
    h.update(&[0xff]);
    h.update(key.as_bytes());
    h.digest128()
}

#[derive(Debug, Clone)]
pub enum CachedRow {
    Vector(Arc<[f32]>),
    /// Known un-embeddable until this time (ms since epoch).
    Failed {
        until_unix_ms: i64,
    },
}

/// Per-entry bookkeeping moka and the hash map add, on top of the vector.
const ENTRY_OVERHEAD_BYTES: u32 = 96;

#[derive(Clone)]
pub struct VectorCache {
    inner: Cache<KeyHash, CachedRow>,
}

impl std::fmt::Debug for VectorCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorCache").field("entries", &self.inner.entry_count()).finish()
    }
}

impl VectorCache {
    /// A tier holding at most about `capacity_bytes` (vectors plus entry
    /// overhead), evicting by TinyLFU; entries also expire after `ttl`.
    pub fn new(capacity_bytes: u64, ttl: Option<Duration>) -> Self {
        let mut b = Cache::builder().max_capacity(capacity_bytes).weigher(|_k: &KeyHash, v: &CachedRow| -> u32 {
            match v {
                CachedRow::Vector(v) => (v.len() as u32).saturating_mul(4).saturating_add(ENTRY_OVERHEAD_BYTES),
                CachedRow::Failed { .. } => ENTRY_OVERHEAD_BYTES,
            }
        });
        if let Some(ttl) = ttl {
            b = b.time_to_live(ttl);
        }
        Self { inner: b.build() }
    }

    pub fn get(&self, k: &KeyHash) -> Option<CachedRow> {
        self.inner.get(k)
    }

    pub fn insert(&self, k: KeyHash, row: CachedRow) {
        self.inner.insert(k, row);
    }

    pub fn invalidate(&self, k: &KeyHash) {
        self.inner.invalidate(k);
    }

    /// Approximate bytes held (for the gauge).
    pub fn weighted_size(&self) -> u64 {
        self.inner.weighted_size()
    }

    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }
}

/// The miss dedup window: a key missed by 1000 requests at once is queued
/// once, and not again until the window passes (by then it is normally
/// stored). Bounded: under a flood of distinct misses the oldest entries
/// go first, which at worst queues a key twice (harmless: KFC skips keys
/// already stored).
#[derive(Clone)]
pub struct MissDedup {
    inner: Cache<KeyHash, ()>,
}

impl std::fmt::Debug for MissDedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MissDedup").finish_non_exhaustive()
    }
}

impl MissDedup {
    pub fn new(window: Duration, max_keys: u64) -> Self {
        Self { inner: Cache::builder().max_capacity(max_keys).time_to_live(window).build() }
    }

    /// True for exactly one caller per key per window, even when many ask
    /// at once (moka coalesces concurrent inserts of one key).
    pub fn first_in_window(&self, k: KeyHash) -> bool {
        self.inner.entry(k).or_insert(()).is_fresh()
    }

    pub fn forget(&self, k: &KeyHash) {
        self.inner.invalidate(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_separates_model_and_key() {
        assert_ne!(key_hash("ab", "c"), key_hash("a", "bc"));
        assert_eq!(key_hash("m", "k"), key_hash("m", "k"));
    }

    #[test]
    fn dedup_admits_one_per_window() {
        let d = MissDedup::new(Duration::from_secs(60), 1000);
        let k = key_hash("m", "k");
        assert!(d.first_in_window(k));
        assert!(!d.first_in_window(k));
        d.forget(&k);
        assert!(d.first_in_window(k));
    }

    #[test]
    fn cache_is_bounded_in_bytes() {
        let c = VectorCache::new(100 * (384 * 4 + 96), None);
        for i in 0..1000u32 {
            c.insert(key_hash("m", &i.to_string()), CachedRow::Vector(vec![0.0; 384].into()));
        }
        c.inner.run_pending_tasks();
        assert!(c.entry_count() <= 100, "{}", c.entry_count());
    }
}
