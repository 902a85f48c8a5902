//! The in-process tier (quick_cache, bounded in bytes) and the miss dedup
//! window (moka, for its per-entry time-to-live).
//!
//! Entries are keyed by a 128-bit hash of (model, key), so a lookup builds
//! no key string and an entry costs 16 bytes of key however long the URL.
//! The hash is SipHash-1-3 under a random key drawn at start: keys are
//! URLs an attacker can choose, and with a secret key they cannot aim a
//! collision (which would answer one key with another's vector); by chance
//! a collision needs ~2^64 distinct keys (invariant in ARCHITECTURE.md).
//! Rows are shared `Bytes`, packed in the model's tier type
//! (`embark_proto::vectors`; little-endian f32 unless `--tier-type` says
//! otherwise): a hit in that type costs one copy, into the response.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;

use moka::sync::Cache;

/// Identifies (model, key) in the tier and the miss dedup window.
pub type KeyHash = u128;

/// This process's SipHash key: tier keys never leave the process, so
/// they need not be stable across restarts, only unpredictable.
static TIER_HASH_KEY: std::sync::LazyLock<[u8; 16]> = std::sync::LazyLock::new(rand::random);

pub fn key_hash(model: &str, key: &str) -> KeyHash {
    use std::hash::Hasher;
    let mut h = siphasher::sip128::SipHasher13::new_with_key(&TIER_HASH_KEY);
    h.write(model.as_bytes());
    // A separator that cannot occur in a model name (nor in UTF-8) keeps
    // ("ab","c") and ("a","bc") apart.
    h.write(&[0xff]);
    h.write(key.as_bytes());
    siphasher::sip128::Hasher128::finish128(&h).as_u128()
}

#[derive(Debug, Clone)]
pub enum CachedRow {
    /// The row packed in the model's tier type (`embark_proto::vectors`;
    /// little-endian f32 by default, `dim * 4` bytes), in an allocation of
    /// exactly that size (see [`le_bytes`]).
    Vector(Bytes),
    /// Known un-embeddable until this time (ms since epoch).
    Failed { until_unix_ms: i64 },
}

/// A row as little-endian f32 bytes, in an allocation of exactly
/// `4 * v.len()` bytes. `Bytes` keeps its reference count apart from the
/// data (unlike `Arc<[f32]>`, whose 16-byte header pushes a 5120-byte row
/// into the allocator's 6144-byte size class), and a hit is copied into the
/// response as it is, with no conversion.
pub fn le_bytes(v: &[f32]) -> Bytes {
    let mut out = Vec::with_capacity(v.len() * 4);
    embark_proto::extend_le_f32(&mut out, v);
    Bytes::from(out)
}

/// A tier entry: the row and, with a TTL, when it expires.
#[derive(Debug, Clone)]
struct Entry {
    row: CachedRow,
    expires_unix_ms: i64,
}

/// Per-entry bookkeeping on top of the vector: the 16-byte key, the entry,
/// the shared `Bytes` header, and the cache's slot and metadata.
const ENTRY_OVERHEAD_BYTES: u64 = 96;

/// Weighs an entry by its vector bytes plus the bookkeeping.
#[derive(Debug, Clone, Copy)]
struct RowWeighter;

impl quick_cache::Weighter<KeyHash, Entry> for RowWeighter {
    fn weight(&self, _: &KeyHash, e: &Entry) -> u64 {
        match &e.row {
            CachedRow::Vector(v) => v.len() as u64 + ENTRY_OVERHEAD_BYTES,
            CachedRow::Failed { .. } => ENTRY_OVERHEAD_BYTES,
        }
    }
}

/// The tier: a sharded quick_cache (S3-FIFO eviction) bounded in bytes.
///
/// quick_cache rather than moka: a hit takes one shard's read lock and
/// clones an `Arc`, with no read buffer, frequency sketch or maintenance
/// on the Lookup path. Under the Lookup benchmark moka's bookkeeping was a
/// quarter of the front's CPU. The optional TTL is checked on read.
#[derive(Clone)]
pub struct VectorCache {
    inner: Arc<quick_cache::sync::Cache<KeyHash, Entry, RowWeighter>>,
    ttl_ms: Option<i64>,
}

impl std::fmt::Debug for VectorCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorCache").field("entries", &self.inner.len()).finish()
    }
}

impl VectorCache {
    /// A tier holding at most about `capacity_bytes` (vectors plus entry
    /// overhead); entries expire `ttl` after insertion if given.
    pub fn new(capacity_bytes: u64, ttl: Option<Duration>) -> Self {
        // An estimate for sizing the shards' tables: 1280-d image vectors.
        let estimated_items = (capacity_bytes / (5120 + ENTRY_OVERHEAD_BYTES)).clamp(1024, 1 << 26) as usize;
        Self {
            inner: Arc::new(quick_cache::sync::Cache::with_weighter(
                estimated_items,
                capacity_bytes.max(1),
                RowWeighter,
            )),
            ttl_ms: ttl.map(|t| t.as_millis().min(i64::MAX as u128) as i64),
        }
    }

    pub fn get(&self, k: &KeyHash) -> Option<CachedRow> {
        let e = self.inner.get(k)?;
        if self.ttl_ms.is_some() && e.expires_unix_ms <= embark_store::now_unix_ms() {
            self.inner.remove(k);
            return None;
        }
        Some(e.row)
    }

    pub fn insert(&self, k: KeyHash, row: CachedRow) {
        let expires_unix_ms = match self.ttl_ms {
            Some(ttl) => embark_store::now_unix_ms().saturating_add(ttl),
            None => i64::MAX,
        };
        self.inner.insert(k, Entry { row, expires_unix_ms });
    }

    pub fn invalidate(&self, k: &KeyHash) {
        self.inner.remove(k);
    }

    /// Approximate bytes held (for the gauge).
    pub fn weighted_size(&self) -> u64 {
        self.inner.weight()
    }

    pub fn entry_count(&self) -> u64 {
        self.inner.len() as u64
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
    /// at once: `or_insert_with` runs one initialisation per key and makes
    /// concurrent callers wait for it (`or_insert` does not: it is a get
    /// then an insert, and two callers could both be first).
    pub fn first_in_window(&self, k: KeyHash) -> bool {
        self.inner.entry(k).or_insert_with(|| ()).is_fresh()
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

    /// A test in CI saw 200 concurrent Lookups of one key publish 2 misses:
    /// `entry().or_insert()` is a get then an insert, so two threads that
    /// both found nothing were both "first". Threads going through the
    /// same keys in step: exactly one of them is first for each key.
    #[test]
    fn concurrent_first_misses_of_one_key_admit_one() {
        let d = MissDedup::new(Duration::from_secs(60), 1_000_000);
        let keys: Vec<KeyHash> = (0..20_000).map(|i| key_hash("m", &i.to_string())).collect();
        let start = std::sync::Barrier::new(4);
        let firsts: usize = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        keys.iter().filter(|k| d.first_in_window(**k)).count()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().expect("worker")).sum()
        });
        assert_eq!(firsts, keys.len(), "one first per key");
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
            c.insert(key_hash("m", &i.to_string()), CachedRow::Vector(le_bytes(&[0.0; 384])));
        }
        assert!(c.entry_count() <= 100, "{}", c.entry_count());
        assert!(c.weighted_size() <= 100 * (384 * 4 + 96));
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let c = VectorCache::new(1 << 20, Some(Duration::from_millis(30)));
        let k = key_hash("m", "k");
        c.insert(k, CachedRow::Vector(le_bytes(&[1.0; 4])));
        assert!(c.get(&k).is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(c.get(&k).is_none(), "expired");
        assert_eq!(c.entry_count(), 0);
    }
}
