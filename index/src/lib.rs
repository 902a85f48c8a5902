//! Nearest-neighbour search over one model's vectors, for `EmbArk.Similar`,
//! `embark dedup` and the duplicate-detection teams.
//!
//! - [`SimilarityIndex`]: keys and unit vectors of one model. Below
//!   [`IndexConfig::exact_below`] vectors it searches exactly (a scan of a
//!   flat f32 matrix, which is fast and has perfect recall at that size);
//!   once it grows past that it builds an HNSW graph ([`graph`]: USearch,
//!   vectors in [`IndexConfig::quantization`]) off the lock, then drops the
//!   flat copy so the vectors are held once.
//! - Scores are cosine similarities in [-1, 1]: vectors are normalised on
//!   the way in, and the graph's distance is `1 - dot`.
//! - Memory is bounded by [`IndexConfig::max_vectors`] live keys: beyond
//!   it new keys are not indexed (and counted by the caller), never
//!   evicting silently.
//! - Replacing or removing a key frees its slot for real, in the flat
//!   matrix and in the graph alike: no tombstones accumulate.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    sync::Arc,
};

use parking_lot::{Mutex, RwLock};

pub mod graph;

use graph::{Graph, GraphShape};
pub use graph::{GraphError, GraphMemory, Quantization};

/// How an index searches and how large it may grow.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// Below this many vectors, search is an exact scan; at it, the HNSW
    /// graph is built.
    pub exact_below: usize,
    /// Live keys the index holds at most.
    pub max_vectors: usize,
    /// HNSW `M`: links per node and layer.
    pub max_connections: usize,
    /// HNSW candidate list while building.
    pub ef_construction: usize,
    /// HNSW candidate list while searching (at least `k`).
    pub ef_search: usize,
    /// How the graph stores vectors (the exact scan keeps f32).
    pub quantization: Quantization,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            exact_below: 20_000,
            max_vectors: 250_000,
            max_connections: 16,
            ef_construction: 128,
            ef_search: 96,
            quantization: Quantization::default(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IndexError {
    #[error("the vector has {got} dimensions, the model {expected}")]
    Dimension { expected: usize, got: usize },
    #[error("the vector is zero (or not finite) and has no direction")]
    NoDirection,
    #[error("{0}")]
    Graph(String),
}

impl From<GraphError> for IndexError {
    fn from(e: GraphError) -> Self {
        Self::Graph(e.to_string())
    }
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
    /// Keys that were indexed already: their vector is replaced.
    pub replaced: usize,
    /// Not indexed: the index holds `max_vectors` already.
    pub full: usize,
    /// Not indexed: wrong dimension, zero or not finite, or the graph
    /// refused it (out of memory).
    pub rejected: usize,
}

/// The dot product, vectorisable: eight running sums let the compiler use
/// SIMD lanes (a single running sum cannot be reordered under IEEE rules).
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

struct Inner {
    /// Id -> key; `None` for a free id (removed, to be reused).
    keys: Vec<Option<Arc<str>>>,
    /// Live key -> id.
    ids: HashMap<Arc<str>, usize>,
    /// Ids free for reuse.
    free: Vec<usize>,
    /// Unit vectors by id, while the index is exact (and during the build).
    flat: Vec<f32>,
    graph: Option<Arc<Graph>>,
    /// A graph build is running off the lock; the ids written meanwhile
    /// are put right in the graph before it is swapped in.
    building: Option<Vec<usize>>,
    /// The graph could not be built (out of memory): stay exact.
    graph_failed: bool,
    /// Bytes of key text held.
    key_bytes: usize,
}

impl Inner {
    /// An id for a new key: a free one, or the next.
    fn new_id(&mut self) -> usize {
        self.free.pop().unwrap_or(self.keys.len())
    }

    fn set_key(&mut self, id: usize, key: Arc<str>) {
        self.key_bytes += key.len();
        if id == self.keys.len() {
            self.keys.push(Some(key.clone()));
        } else {
            self.keys[id] = Some(key.clone());
        }
        self.ids.insert(key, id);
    }

    fn free_id(&mut self, key: &str) -> Option<usize> {
        let id = self.ids.remove(key)?;
        if let Some(k) = self.keys[id].take() {
            self.key_bytes -= k.len();
        }
        self.free.push(id);
        if let Some(touched) = &mut self.building {
            touched.push(id);
        }
        Some(id)
    }

    /// Writes a flat row (exact phase).
    fn write_row(&mut self, dim: usize, id: usize, unit: &[f32]) {
        let at = id * dim;
        if at == self.flat.len() {
            self.flat.extend_from_slice(unit);
        } else {
            self.flat[at..at + dim].copy_from_slice(unit);
        }
        if let Some(touched) = &mut self.building {
            touched.push(id);
        }
    }
}

/// Keys and vectors of one model, searchable by cosine similarity.
pub struct SimilarityIndex {
    dim: usize,
    config: IndexConfig,
    inner: RwLock<Inner>,
    /// One writer at a time (inserts and removes): the graph is changed
    /// outside `inner`'s lock, so searches go on meanwhile, and ids are
    /// reused only once the graph has let go of them.
    writer: Mutex<()>,
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
            free: Vec::new(),
            flat: Vec::new(),
            graph: None,
            building: None,
            graph_failed: false,
            key_bytes: 0,
        };
        Self { dim, config, inner: RwLock::new(inner), writer: Mutex::new(()) }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// How the graph stores vectors (once there is one).
    pub fn quantization(&self) -> Quantization {
        self.config.quantization
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

    /// The heap the index holds: key text and maps, the flat matrix while
    /// exact, and what USearch reports for the graph (its vectors, links
    /// and key table).
    pub fn memory_bytes(&self) -> usize {
        let inner = self.inner.read();
        let keys = inner.key_bytes + inner.keys.capacity() * 16 + inner.ids.capacity() * 32 + inner.free.capacity() * 8;
        let flat = inner.flat.capacity() * 4;
        let graph = inner.graph.as_ref().map_or(0, |g| g.memory_bytes());
        keys + flat + graph
    }

    /// Where the graph's bytes go, once there is one.
    pub fn graph_memory(&self) -> Option<GraphMemory> {
        self.inner.read().graph.as_ref().map(|g| g.memory())
    }

    fn shape(&self) -> GraphShape {
        GraphShape {
            dim: self.dim,
            connectivity: self.config.max_connections,
            expansion_add: self.config.ef_construction,
            expansion_search: self.config.ef_search,
            quantization: self.config.quantization,
        }
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
        // The last vector of a key repeated in one batch wins.
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(rows.len());
        for (i, (k, _)) in rows.iter().enumerate() {
            last.insert(k.as_str(), i);
        }
        let unit: Vec<(&str, Vec<f32>)> = rows
            .iter()
            .enumerate()
            .filter(|(i, (k, _))| last.get(k.as_str()) == Some(i))
            .filter_map(|(_, (k, v))| match self.check(v) {
                Ok(u) => Some((k.as_str(), u)),
                Err(_) => {
                    report.rejected += 1;
                    None
                }
            })
            .collect();
        let build = {
            let _writer = self.writer.lock();
            let graph = self.inner.read().graph.clone();
            match graph {
                None => self.insert_flat(unit, &mut report),
                Some(graph) => {
                    self.insert_graph(&graph, unit, &mut report);
                    false
                }
            }
        };
        // Without the writer lock: other inserts and removes go on during
        // the build (into the flat matrix, noted for the build to put right).
        if build {
            self.build_graph();
        }
        report
    }

    /// Whether a new key fits under the bound.
    fn has_room(&self, inner: &Inner) -> bool {
        inner.ids.len() < self.config.max_vectors
    }

    /// Writes rows into the flat matrix; says whether the graph is to be
    /// built now (the caller builds it after letting go of the writer lock).
    fn insert_flat(&self, unit: Vec<(&str, Vec<f32>)>, report: &mut InsertReport) -> bool {
        {
            let mut inner = self.inner.write();
            for (key, v) in unit {
                let id = match inner.ids.get(key) {
                    Some(&id) => {
                        report.replaced += 1;
                        id
                    }
                    None if self.has_room(&inner) => {
                        let id = inner.new_id();
                        inner.set_key(id, Arc::from(key));
                        report.added += 1;
                        id
                    }
                    None => {
                        report.full += 1;
                        continue;
                    }
                };
                inner.write_row(self.dim, id, &v);
            }
            let build = inner.building.is_none() && !inner.graph_failed && inner.ids.len() >= self.config.exact_below;
            if build {
                inner.building = Some(Vec::new());
            }
            build
        }
    }

    fn insert_graph(&self, graph: &Graph, unit: Vec<(&str, Vec<f32>)>, report: &mut InsertReport) {
        // Replacements first, one by one (each is a remove and an add of
        // its id); then the new keys, from every core when they are many.
        let mut new_rows: Vec<(u64, Vec<f32>)> = Vec::new();
        {
            let mut inner = self.inner.write();
            let mut replaced = Vec::new();
            for (key, v) in unit {
                match inner.ids.get(key) {
                    Some(&id) => replaced.push((id, v)),
                    None if self.has_room(&inner) => {
                        let id = inner.new_id();
                        inner.set_key(id, Arc::from(key));
                        new_rows.push((id as u64, v));
                    }
                    None => report.full += 1,
                }
            }
            drop(inner);
            for (id, v) in replaced {
                let done =
                    graph.remove(id as u64).and_then(|()| graph.make_room(1)).and_then(|()| graph.add(id as u64, &v));
                if done.is_ok() {
                    report.replaced += 1;
                } else {
                    self.forget_ids(&[id]);
                    report.rejected += 1;
                }
            }
        }
        let refs: Vec<(u64, &[f32])> = new_rows.iter().map(|(id, v)| (*id, v.as_slice())).collect();
        let added = if refs.len() >= 64 {
            graph.add_parallel(&refs).map(|()| refs.len())
        } else {
            graph
                .make_room(refs.len())
                .and_then(|()| refs.iter().try_for_each(|(id, v)| graph.add(*id, v)).map(|()| refs.len()))
        };
        match added {
            Ok(n) => report.added += n,
            Err(_) => {
                // Those the graph did not take are taken back from the map.
                let missing: Vec<usize> =
                    refs.iter().filter(|(id, _)| !graph.contains(*id)).map(|(id, _)| *id as usize).collect();
                report.added += refs.len() - missing.len();
                report.rejected += missing.len();
                self.forget_ids(&missing);
            }
        }
    }

    /// Drops ids from the map (their vectors are not in the graph).
    fn forget_ids(&self, ids: &[usize]) {
        let mut inner = self.inner.write();
        for &id in ids {
            if let Some(key) = inner.keys.get(id).cloned().flatten() {
                inner.free_id(&key);
            }
        }
    }

    /// Builds the graph from a snapshot of the flat matrix without holding
    /// either lock, then, as the one writer, puts right the ids written
    /// meanwhile and swaps it in.
    fn build_graph(&self) {
        let (snapshot, live) = {
            let inner = self.inner.read();
            let live: Vec<usize> = inner.ids.values().copied().collect();
            (inner.flat.clone(), live)
        };
        let built =
            Graph::new(self.shape(), (2 * live.len()).min(self.config.max_vectors.max(live.len()))).and_then(|graph| {
                let rows: Vec<(u64, &[f32])> =
                    live.iter().map(|&id| (id as u64, &snapshot[id * self.dim..(id + 1) * self.dim])).collect();
                graph.add_parallel(&rows).map(|()| graph)
            });
        let _writer = self.writer.lock();
        let mut inner = self.inner.write();
        let touched = inner.building.take().unwrap_or_default();
        let graph = built.and_then(|graph| {
            let mut touched = touched;
            touched.sort_unstable();
            touched.dedup();
            graph.make_room(touched.len())?;
            for id in touched {
                graph.remove(id as u64)?;
                if inner.keys.get(id).is_some_and(Option::is_some) {
                    graph.add(id as u64, &inner.flat[id * self.dim..(id + 1) * self.dim])?;
                }
            }
            Ok(graph)
        });
        match graph {
            Ok(graph) => {
                inner.graph = Some(Arc::new(graph));
                inner.flat = Vec::new();
            }
            Err(_) => inner.graph_failed = true,
        }
    }

    /// Forgets keys; absent ones are ignored. Returns how many were indexed.
    pub fn remove(&self, keys: &[String]) -> usize {
        let _writer = self.writer.lock();
        let graph = self.inner.read().graph.clone();
        let mut n = 0;
        for k in keys {
            let Some(id) = self.inner.read().ids.get(k.as_str()).copied() else { continue };
            // Out of the graph before the id can be reused.
            if let Some(graph) = &graph {
                let _ = graph.remove(id as u64);
            }
            if self.inner.write().free_id(k).is_some() {
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
        let graph = {
            let inner = self.inner.read();
            match &inner.graph {
                None => return Ok(self.exact(&inner, &q, k, min_score, exclude)),
                Some(graph) => graph.clone(),
            }
        };
        // The graph is searched without `inner`'s lock, and its ids mapped
        // to keys afterwards: an id removed meanwhile maps to nothing. (One
        // removed *and reused* within that instant would map to its new key.)
        let found = graph.search(&q, k + 1, ef.max(k + 1))?;
        let inner = self.inner.read();
        let skip = exclude.and_then(|key| inner.ids.get(key).copied());
        let hits = found.into_iter().map(|(id, s)| (id as usize, s)).filter(|&(id, _)| Some(id) != skip).collect();
        Ok(Self::ranked(&inner, hits, k, min_score))
    }

    /// The exact scan of the flat matrix: the k best in a min-heap.
    fn exact(&self, inner: &Inner, q: &[f32], k: usize, min_score: f32, exclude: Option<&str>) -> Vec<Hit> {
        let skip = exclude.and_then(|key| inner.ids.get(key).copied());
        let mut heap = BinaryHeap::with_capacity(k + 1);
        for (id, v) in inner.flat.chunks_exact(self.dim).enumerate() {
            if Some(id) == skip || inner.keys.get(id).is_none_or(Option::is_none) {
                continue;
            }
            let s = dot(q, v);
            if s < min_score {
                continue;
            }
            heap.push(Reverse(Scored(s, id)));
            if heap.len() > k {
                heap.pop();
            }
        }
        Self::ranked(inner, heap.into_iter().map(|Reverse(Scored(s, id))| (id, s)).collect(), k, min_score)
    }

    /// Live ids at or above `min_score`, best first, as keys.
    fn ranked(inner: &Inner, mut hits: Vec<(usize, f32)>, k: usize, min_score: f32) -> Vec<Hit> {
        hits.retain(|&(_, s)| s >= min_score);
        hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        hits.into_iter()
            .filter_map(|(id, score)| Some(Hit { key: inner.keys.get(id)?.clone()?, score: score.clamp(-1.0, 1.0) }))
            .take(k)
            .collect()
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
        index.insert(&[("east".to_string(), vec![-0.1, -1.0])]);
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

    /// Recall@10 of an index built past its threshold against exact search,
    /// over every 30th row as a query (its own key left out).
    fn recall_against_exact(rows: &[(String, Vec<f32>)], config: IndexConfig) -> f64 {
        let dim = rows[0].1.len();
        let exact = SimilarityIndex::new(dim, IndexConfig { exact_below: usize::MAX, ..config.clone() });
        exact.insert(rows);
        let approx = SimilarityIndex::new(dim, config);
        for chunk in rows.chunks(700) {
            approx.insert(chunk);
        }
        assert!(approx.is_approximate());
        let (mut found, mut total) = (0, 0);
        for (key, v) in rows.iter().step_by(30) {
            let truth = exact.search(v, 10, -1.0, Some(key)).expect("exact");
            let got = approx.search(v, 10, -1.0, Some(key)).expect("approx");
            total += truth.len();
            found += truth.iter().filter(|t| got.iter().any(|g| g.key == t.key)).count();
        }
        found as f64 / total as f64
    }

    #[test]
    fn every_vector_type_of_the_graph_keeps_recall_and_scores() {
        let rows = random_rows(3_000, 32, 11);
        for quantization in [Quantization::F32, Quantization::F16, Quantization::I8] {
            let config = IndexConfig { exact_below: 1_000, quantization, ..IndexConfig::default() };
            let recall = recall_against_exact(&rows, config.clone());
            assert!(recall >= 0.95, "{quantization}: recall@10 {recall}");
            // A key's own vector scores (about) 1 against itself.
            let index = SimilarityIndex::new(32, config);
            index.insert(&rows);
            let hit = &index.search(&rows[5].1, 1, -1.0, None).expect("search")[0];
            let tolerance = if quantization == Quantization::I8 { 2e-2 } else { 2e-3 };
            assert!(*hit.key == *"k5" && (hit.score - 1.0).abs() <= tolerance, "{quantization}: {hit:?}");
        }
    }

    #[test]
    fn removed_keys_leave_the_graph_and_their_slots_are_reused() {
        let dim = 16;
        let index = SimilarityIndex::new(dim, IndexConfig { exact_below: 100, ..IndexConfig::default() });
        let rows = random_rows(2_000, dim, 3);
        index.insert(&rows[..1_000]);
        assert!(index.is_approximate());
        let settled = index.memory_bytes();
        // Ten rounds of removing 100 keys and adding 100 new ones.
        for round in 0..10 {
            let gone: Vec<String> = rows[round * 100..(round + 1) * 100].iter().map(|(k, _)| k.clone()).collect();
            assert_eq!(index.remove(&gone), 100);
            let fresh = &rows[1_000 + round * 100..1_100 + round * 100];
            assert_eq!(index.insert(fresh).added, 100);
            for (key, v) in rows[round * 100..(round + 1) * 100].iter().step_by(10) {
                let hits = index.search(v, 5, -1.0, None).expect("search");
                assert!(hits.iter().all(|h| *h.key != **key), "{key} was removed");
            }
        }
        assert_eq!(index.len(), 1_000);
        let after = index.memory_bytes();
        assert!(after < settled * 5 / 4, "slots are reused: {settled} -> {after} bytes");
        // Replacing a key moves it.
        index.insert(&[("k1500".to_string(), rows[42].1.clone())]);
        let hits = index.search(&rows[42].1, 2, 0.99, None).expect("search");
        assert!(hits.iter().any(|h| &*h.key == "k1500"), "{hits:?}");
    }

    #[test]
    fn inserts_removes_and_searches_from_many_threads_at_once() {
        let dim = 16;
        let index = SimilarityIndex::new(dim, IndexConfig { exact_below: 200, ..IndexConfig::default() });
        let rows = random_rows(4_000, dim, 5);
        index.insert(&rows[..500]);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (index, rows) = (&index, &rows);
                s.spawn(move || {
                    for (i, chunk) in rows[500 + t * 875..500 + (t + 1) * 875].chunks(25).enumerate() {
                        index.insert(chunk);
                        if i % 3 == 0 {
                            index.remove(&[chunk[0].0.clone()]);
                        }
                    }
                });
                s.spawn(move || {
                    for (key, v) in rows.iter().step_by(40) {
                        let hits = index.search(v, 10, -1.0, Some(key)).expect("search");
                        assert!(hits.len() <= 10);
                    }
                });
            }
        });
        // 3,500 added by the writers, one of every three chunks' first key removed.
        let removed = 4 * 875usize.div_ceil(25).div_ceil(3);
        assert_eq!(index.len(), 4_000 - removed);
        let (key, v) = &rows[3_999];
        assert_eq!(&*index.search(v, 1, -1.0, None).expect("search")[0].key, key);
    }

    #[test]
    fn writes_during_the_graph_build_are_in_the_graph_it_swaps_in() {
        let dim = 16;
        let index = SimilarityIndex::new(dim, IndexConfig { exact_below: 2_000, ..IndexConfig::default() });
        let rows = random_rows(4_000, dim, 9);
        index.insert(&rows[..1_999]);
        std::thread::scope(|s| {
            // Crosses the threshold: this call builds the graph.
            s.spawn(|| index.insert(&rows[1_999..2_000]));
            // Meanwhile: new keys, replaced keys and removed keys.
            s.spawn(|| {
                for chunk in rows[2_000..].chunks(50) {
                    index.insert(chunk);
                    index.insert(&[(chunk[0].0.clone(), chunk[0].1.iter().map(|x| -x).collect())]);
                    index.remove(&[chunk[1].0.clone()]);
                }
            });
        });
        assert!(index.is_approximate());
        assert_eq!(index.len(), 4_000 - 40);
        for (i, (key, v)) in rows.iter().enumerate().step_by(7) {
            let hits = index.search(v, 3, -1.0, None).expect("search");
            let removed = i >= 2_000 && (i - 2_000) % 50 == 1;
            let replaced = i >= 2_000 && (i - 2_000) % 50 == 0;
            if removed {
                assert!(hits.iter().all(|h| *h.key != **key), "{key} was removed");
            } else if !replaced {
                assert!(hits.iter().any(|h| *h.key == **key), "{key} is not found by its own vector: {hits:?}");
            }
        }
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
