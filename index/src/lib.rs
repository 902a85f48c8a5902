//! Nearest-neighbour search over one model's vectors, for `EmbArk.Similar`,
//! `embark dedup` and the duplicate-detection teams.
//!
//! - [`SimilarityIndex`]: keys and unit vectors of one model. Below
//!   [`IndexConfig::exact_below`] vectors it searches exactly (a scan of a
//!   flat matrix, which is fast and has perfect recall at that size); once
//!   it grows past that it builds an HNSW graph (`hnsw_rs`) off the lock,
//!   then drops the flat copy so the vectors are held once.
//! - Scores are cosine similarities in [-1, 1]: vectors are normalised on
//!   the way in, and the graph's distance is `1 - dot`.
//! - Memory is bounded by [`IndexConfig::max_vectors`]: beyond it new keys
//!   are not indexed (and counted by the caller), never evicting silently.
//! - Replacing or removing a key leaves a tombstone that searches filter
//!   out; HNSW graphs cannot delete nodes cheaply.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    sync::Arc,
};

use hnsw_rs::{anndists::dist::Distance, hnsw::Hnsw};
use parking_lot::RwLock;

/// How an index searches and how large it may grow.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// Below this many vectors, search is an exact scan; at it, the HNSW
    /// graph is built.
    pub exact_below: usize,
    /// Vectors (live and replaced) the index holds at most.
    pub max_vectors: usize,
    /// HNSW `M`: links per node and layer.
    pub max_connections: usize,
    /// HNSW candidate list while building.
    pub ef_construction: usize,
    /// HNSW candidate list while searching (at least `k`).
    pub ef_search: usize,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self { exact_below: 20_000, max_vectors: 250_000, max_connections: 16, ef_construction: 128, ef_search: 96 }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IndexError {
    #[error("the vector has {got} dimensions, the model {expected}")]
    Dimension { expected: usize, got: usize },
    #[error("the vector is zero (or not finite) and has no direction")]
    NoDirection,
}

/// One search result.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub key: Arc<str>,
    /// Cosine similarity with the query.
    pub score: f32,
}

/// What an [`SimilarityIndex::insert`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InsertReport {
    pub added: usize,
    /// Keys that were indexed already: their old vector is a tombstone now.
    pub replaced: usize,
    /// Not indexed: the index holds `max_vectors` already.
    pub full: usize,
    /// Not indexed: wrong dimension, zero or not finite.
    pub rejected: usize,
}

/// `1 - dot(a, b)` of unit vectors, i.e. `1 - cosine`. Eight running sums
/// let the compiler vectorise the loop (a single running sum cannot be
/// reordered under IEEE rules, which is why `hnsw_rs`'s own `DistDot`
/// without its SIMD feature runs several times slower).
#[derive(Debug, Clone, Copy, Default)]
pub struct UnitDot;

impl Distance<f32> for UnitDot {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

/// The dot product, vectorisable.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            sums[i] += x[i] * y[i];
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// `v / |v|`, or `None` for a zero or non-finite vector.
pub fn normalized(v: &[f32]) -> Option<Vec<f32>> {
    let norm = dot(v, v).sqrt();
    (norm.is_finite() && norm > 0.0).then(|| v.iter().map(|x| x / norm).collect())
}

type Graph = Hnsw<'static, f32, UnitDot>;

/// Measured graph overhead per node at M = 16 (see [`SimilarityIndex::memory_bytes`]).
const GRAPH_BYTES_PER_NODE: usize = 3_380;

struct Inner {
    /// Id -> key (ids are dense and never reused).
    keys: Vec<Arc<str>>,
    /// Live key -> id.
    ids: HashMap<Arc<str>, usize>,
    /// Id -> replaced or removed.
    dead: Vec<bool>,
    /// How many of `dead` are true.
    tombstones: usize,
    /// Unit vectors by id, while the index is exact (and during the build).
    flat: Vec<f32>,
    graph: Option<Arc<Graph>>,
    /// A graph build is running off the lock.
    building: bool,
    /// Bytes of key text held.
    key_bytes: usize,
}

/// Keys and vectors of one model, searchable by cosine similarity.
pub struct SimilarityIndex {
    dim: usize,
    config: IndexConfig,
    inner: RwLock<Inner>,
}

impl std::fmt::Debug for SimilarityIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimilarityIndex").field("dim", &self.dim).field("len", &self.len()).finish_non_exhaustive()
    }
}

impl SimilarityIndex {
    pub fn new(dim: usize, config: IndexConfig) -> Self {
        let inner = Inner {
            keys: Vec::new(),
            ids: HashMap::new(),
            dead: Vec::new(),
            tombstones: 0,
            flat: Vec::new(),
            graph: None,
            building: false,
            key_bytes: 0,
        };
        Self { dim, config, inner: RwLock::new(inner) }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Live keys.
    pub fn len(&self) -> usize {
        self.inner.read().ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `key` is indexed (live).
    pub fn contains(&self, key: &str) -> bool {
        self.inner.read().ids.contains_key(key)
    }

    /// Whether searches go through the HNSW graph (else they are exact).
    pub fn is_approximate(&self) -> bool {
        self.inner.read().graph.is_some()
    }

    /// An estimate of the heap the index holds: vectors, key text and maps,
    /// and the graph. `hnsw_rs` keeps each neighbour link as a
    /// reference-counted allocation; `scripts/bench-similar.sh` measured
    /// 2.7 KiB (384-d) to 3.8 KiB (1280-d) of RSS per vector beyond the
    /// vector itself at M = 16, so the graph is counted at 3.3 KiB a node.
    pub fn memory_bytes(&self) -> usize {
        let inner = self.inner.read();
        let n = inner.keys.len();
        let keys = inner.key_bytes + n * (16 + 1) + inner.ids.capacity() * 32;
        let flat = inner.flat.capacity() * 4;
        let graph = if inner.graph.is_some() { n * (self.dim * 4 + GRAPH_BYTES_PER_NODE) } else { 0 };
        keys + flat + graph
    }

    fn check(&self, v: &[f32]) -> Result<Vec<f32>, IndexError> {
        if v.len() != self.dim {
            return Err(IndexError::Dimension { expected: self.dim, got: v.len() });
        }
        normalized(v).ok_or(IndexError::NoDirection)
    }

    /// Indexes (or re-indexes) vectors. Blocking: with a graph, insertion
    /// costs a search per vector, so async callers run it on a blocking
    /// thread. Crossing [`IndexConfig::exact_below`] builds the graph here,
    /// while searches keep using the exact scan.
    pub fn insert(&self, rows: &[(String, Vec<f32>)]) -> InsertReport {
        let mut report = InsertReport::default();
        let unit: Vec<(&str, Vec<f32>)> = rows
            .iter()
            .filter_map(|(k, v)| match self.check(v) {
                Ok(u) => Some((k.as_str(), u)),
                Err(_) => {
                    report.rejected += 1;
                    None
                }
            })
            .collect();
        let (graph, to_graph, build) = {
            let mut inner = self.inner.write();
            let mut to_graph = Vec::new();
            for (key, v) in unit {
                // The bound is on live keys (a replaced or removed key's old
                // slot does not count), and slots, tombstones included, stay
                // under twice it, so memory is bounded either way; a
                // restart drops the tombstones.
                let replaces = inner.ids.contains_key(key);
                if (!replaces && inner.ids.len() >= self.config.max_vectors)
                    || inner.keys.len() >= self.config.max_vectors.saturating_mul(2)
                {
                    report.full += 1;
                    continue;
                }
                let id = inner.keys.len();
                let key: Arc<str> = Arc::from(key);
                if let Some(old) = inner.ids.insert(key.clone(), id) {
                    inner.dead[old] = true;
                    inner.tombstones += 1;
                    report.replaced += 1;
                } else {
                    report.added += 1;
                }
                inner.key_bytes += key.len();
                inner.keys.push(key);
                inner.dead.push(false);
                if inner.graph.is_some() {
                    to_graph.push((v, id));
                } else {
                    inner.flat.extend_from_slice(&v);
                }
            }
            let build = inner.graph.is_none() && !inner.building && inner.keys.len() >= self.config.exact_below;
            if build {
                inner.building = true;
            }
            (inner.graph.clone(), to_graph, build)
        };
        // The graph takes concurrent inserts through `&self`; ids are
        // mapped to keys before they reach it, so a search never meets an
        // id without a key.
        if let Some(graph) = graph
            && !to_graph.is_empty()
        {
            let refs: Vec<(&[f32], usize)> = to_graph.iter().map(|(v, id)| (v.as_slice(), *id)).collect();
            graph.parallel_insert_slice(&refs);
        }
        if build {
            self.build_graph();
        }
        report
    }

    /// Builds the graph from a snapshot of the flat matrix without holding
    /// the lock, adds what arrived meanwhile, then swaps it in.
    fn build_graph(&self) {
        let (snapshot, n) = {
            let inner = self.inner.read();
            (inner.flat.clone(), inner.keys.len())
        };
        let graph = Graph::new(
            self.config.max_connections,
            // A sizing hint for the layer tables, not a bound.
            (2 * n).clamp(n, self.config.max_vectors.max(n)),
            16,
            self.config.ef_construction,
            UnitDot,
        );
        let refs: Vec<(&[f32], usize)> = snapshot.chunks_exact(self.dim).zip(0..).collect();
        graph.parallel_insert_slice(&refs);
        let mut inner = self.inner.write();
        let late: Vec<(&[f32], usize)> = inner.flat.chunks_exact(self.dim).zip(0..).skip(n).collect();
        graph.parallel_insert_slice(&late);
        inner.graph = Some(Arc::new(graph));
        inner.flat = Vec::new();
        inner.building = false;
    }

    /// Forgets keys; absent ones are ignored. Returns how many were indexed.
    pub fn remove(&self, keys: &[String]) -> usize {
        let mut inner = self.inner.write();
        let mut n = 0;
        for k in keys {
            if let Some(id) = inner.ids.remove(k.as_str()) {
                inner.dead[id] = true;
                inner.tombstones += 1;
                n += 1;
            }
        }
        n
    }

    /// The `k` keys most similar to `query` with a score of at least
    /// `min_score`, best first, leaving out `exclude` (the query's own key).
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        min_score: f32,
        exclude: Option<&str>,
    ) -> Result<Vec<Hit>, IndexError> {
        self.search_with_ef(query, k, min_score, exclude, self.config.ef_search)
    }

    /// [`SimilarityIndex::search`] with another HNSW candidate list size
    /// (the benchmark sweeps it; exact search ignores it).
    pub fn search_with_ef(
        &self,
        query: &[f32],
        k: usize,
        min_score: f32,
        exclude: Option<&str>,
        ef: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        let q = self.check(query)?;
        if k == 0 {
            return Ok(Vec::new());
        }
        let inner = self.inner.read();
        let skip = exclude.and_then(|key| inner.ids.get(key).copied());
        let alive = |id: usize| Some(id) != skip && !inner.dead.get(id).copied().unwrap_or(true);
        let mut hits: Vec<(usize, f32)> = match &inner.graph {
            Some(graph) => {
                // Not `search_filter`: with a filter, hnsw_rs 0.3 gives up
                // its early exit and walks most of the graph. Instead ask
                // for more than k and drop dead ids and the excluded key
                // afterwards (tombstones are few; Invalidate is rare).
                let want = k + 1 + inner.tombstones.min(4 * k);
                graph
                    .search(&q, want, ef.max(want))
                    .into_iter()
                    .filter(|n| alive(n.d_id))
                    .map(|n| (n.d_id, 1.0 - n.distance))
                    .collect()
            }
            None => {
                // Exact: keep the k best in a min-heap.
                let mut heap = BinaryHeap::with_capacity(k + 1);
                for (id, v) in inner.flat.chunks_exact(self.dim).enumerate() {
                    if !alive(id) {
                        continue;
                    }
                    let s = dot(&q, v);
                    if s < min_score {
                        continue;
                    }
                    heap.push(Reverse(Scored(s, id)));
                    if heap.len() > k {
                        heap.pop();
                    }
                }
                heap.into_iter().map(|Reverse(Scored(s, id))| (id, s)).collect()
            }
        };
        hits.retain(|&(_, s)| s >= min_score);
        hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        hits.truncate(k);
        Ok(hits.into_iter().map(|(id, score)| Hit { key: inner.keys[id].clone(), score: score.min(1.0) }).collect())
    }
}

/// A score ordered by `total_cmp`, for the heap.
#[derive(PartialEq)]
struct Scored(f32, usize);
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scored {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then(other.1.cmp(&self.1))
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    fn random_rows(n: usize, dim: usize, seed: u64) -> Vec<(String, Vec<f32>)> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|i| (format!("k{i}"), (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect())).collect()
    }

    #[test]
    fn dot_matches_the_plain_sum_for_every_length() {
        for n in 0..40 {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32).collect();
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - plain).abs() <= 1e-3 * plain.abs().max(1.0), "n={n}");
        }
    }

    #[test]
    fn exact_search_ranks_by_cosine_and_honours_min_score_exclude_and_tombstones() {
        let index = SimilarityIndex::new(2, IndexConfig::default());
        let rows = vec![
            ("east".to_string(), vec![10.0, 0.0]),
            ("north-east".to_string(), vec![1.0, 1.0]),
            ("north".to_string(), vec![0.0, 3.0]),
            ("west".to_string(), vec![-1.0, 0.0]),
        ];
        assert_eq!(index.insert(&rows), InsertReport { added: 4, ..Default::default() });
        let keys = |hits: Vec<Hit>| hits.into_iter().map(|h| h.key.to_string()).collect::<Vec<_>>();
        let hits = index.search(&[1.0, 0.0], 3, -1.0, None).expect("search");
        assert!((hits[0].score - 1.0).abs() < 1e-6 && (hits[1].score - 0.70710677).abs() < 1e-6);
        assert_eq!(keys(hits), ["east", "north-east", "north"]);
        assert_eq!(keys(index.search(&[1.0, 0.0], 10, 0.5, Some("east")).expect("search")), ["north-east"]);
        index.remove(&["north-east".into()]);
        index.insert(&[("east".to_string(), vec![0.0, -1.0])]);
        assert_eq!(keys(index.search(&[1.0, 0.0], 10, -0.5, None).expect("search")), ["north", "east"]);
        assert_eq!(index.len(), 3);
        assert_eq!(index.search(&[1.0], 1, 0.0, None), Err(IndexError::Dimension { expected: 2, got: 1 }));
        assert_eq!(index.search(&[0.0, 0.0], 1, 0.0, None), Err(IndexError::NoDirection));
        assert_eq!(index.insert(&[("z".to_string(), vec![0.0, 0.0])]).rejected, 1);
    }

    #[test]
    fn the_graph_is_built_past_the_threshold_and_agrees_with_exact_search() {
        let dim = 32;
        let config = IndexConfig { exact_below: 1_000, ..IndexConfig::default() };
        let rows = random_rows(3_000, dim, 7);
        let exact = SimilarityIndex::new(dim, IndexConfig { exact_below: usize::MAX, ..config.clone() });
        exact.insert(&rows);
        let approx = SimilarityIndex::new(dim, config);
        for chunk in rows.chunks(700) {
            approx.insert(chunk);
        }
        assert!(approx.is_approximate() && !exact.is_approximate());
        assert_eq!(approx.len(), 3_000);
        let (mut found, mut total) = (0, 0);
        for (key, v) in rows.iter().step_by(30) {
            let truth = exact.search(v, 10, -1.0, Some(key)).expect("exact");
            let got = approx.search(v, 10, -1.0, Some(key)).expect("approx");
            assert!(got.iter().all(|h| *h.key != **key), "the query's own key is left out");
            total += truth.len();
            found += truth.iter().filter(|t| got.iter().any(|g| g.key == t.key)).count();
        }
        let recall = found as f64 / total as f64;
        assert!(recall >= 0.95, "recall@10 {recall}");
        // Replaced keys are filtered from graph results too.
        approx.insert(&[("k0".to_string(), rows[1].1.clone())]);
        let hits = approx.search(&rows[1].1, 2, 0.999, None).expect("search");
        let mut keys: Vec<String> = hits.iter().map(|h| h.key.to_string()).collect();
        keys.sort();
        assert_eq!(keys, ["k0", "k1"], "k0 now has k1's vector; its old one is gone");
    }

    /// Defect 11.11: tombstones counted toward the bound, so after removals
    /// or replacements a model's index refused new keys with room to spare.
    #[test]
    fn tombstones_count_toward_similar_max_vectors() {
        let index = SimilarityIndex::new(4, IndexConfig { max_vectors: 3, ..IndexConfig::default() });
        let rows = random_rows(5, 4, 7);
        assert_eq!(index.insert(&rows[..3]).added, 3);
        index.remove(&[rows[0].0.clone()]);
        let report = index.insert(&rows[3..4]);
        assert_eq!((report.added, report.full), (1, 0), "a removed key's slot is free again");
        let again = index.insert(&[(rows[1].0.clone(), rows[4].1.clone())]);
        assert_eq!((again.replaced, again.full), (1, 0), "replacing a key at the bound is not growth");
        assert_eq!(index.len(), 3);
        // Slots (tombstones included) stay under twice the bound.
        for _ in 0..10 {
            index.insert(&[(rows[2].0.clone(), rows[4].1.clone())]);
        }
        assert!(index.memory_bytes() > 0 && index.len() == 3);
    }

    #[test]
    fn the_index_stops_growing_at_its_bound() {
        let index = SimilarityIndex::new(4, IndexConfig { max_vectors: 10, ..IndexConfig::default() });
        let report = index.insert(&random_rows(15, 4, 1));
        assert_eq!((report.added, report.full), (10, 5));
        assert_eq!(index.len(), 10);
    }
}
