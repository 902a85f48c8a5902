//! The approximate index: a USearch HNSW graph (`usearch`, C++ behind
//! `cxx`) over one model's unit vectors, stored as [`Quantization`] says.
//!
//! Why USearch: its graph keeps each node's neighbours in one flat array of
//! 32-bit slots (about 150 B a node at M = 16, where `hnsw_rs` held every
//! link as its own reference-counted allocation, 3.3 KiB a node), stores
//! vectors in f16 or i8, removes keys for real (their slots are reused),
//! and takes inserts and searches from several threads at once. What it
//! asks of its caller, this module provides:
//!
//! - **Thread slots.** Every call borrows one of the slots reserved up
//!   front and fails when none is free; [`Slots`] makes callers wait
//!   instead.
//! - **Capacity.** An insert past the reserved capacity fails, and growing
//!   it must not overlap any other call; `resize` is held shared by every
//!   call and exclusively while the capacity doubles.

use std::num::NonZeroUsize;

use parking_lot::{Condvar, Mutex, RwLock};
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

/// How the graph stores its vectors. Scores of an `F16` or `I8` graph are
/// computed on the stored type: within about 1e-3 (f16) or 1e-2 (i8) of
/// the f32 cosine on unit vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    F32,
    /// Half the bytes of f32; recall and scores as f32's on our vectors
    /// (`scripts/bench-similar.sh`).
    #[default]
    F16,
    /// A quarter of the bytes; USearch scales unit vectors by 127.
    I8,
}

impl Quantization {
    /// Bytes of one stored component.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
            Self::I8 => 1,
        }
    }

    fn scalar_kind(self) -> ScalarKind {
        match self {
            Self::F32 => ScalarKind::F32,
            Self::F16 => ScalarKind::F16,
            Self::I8 => ScalarKind::I8,
        }
    }
}

impl std::str::FromStr for Quantization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "i8" => Ok(Self::I8),
            other => Err(format!("{other:?} is not a vector type of the index (f32, f16 or i8)")),
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::I8 => "i8",
        })
    }
}

/// What the graph refused; a bug or an allocation failure, never the
/// caller's input (vectors are checked before they get here).
#[derive(Debug, thiserror::Error)]
#[error("the similarity graph: {0}")]
pub struct GraphError(String);

/// USearch's errors are C++ exceptions; their message is what we keep.
fn refused(e: impl std::fmt::Display) -> GraphError {
    GraphError(e.to_string())
}

/// Where a graph's bytes go (USearch's own accounting).
#[derive(Debug, Clone, Copy, Default)]
pub struct GraphMemory {
    /// Everything USearch holds.
    pub total: usize,
    /// The node tape: headers and neighbour lists, allocated.
    pub links: usize,
    /// Of those, lost to alignment or reserved ahead.
    pub links_unused: usize,
    /// The vector tape, allocated.
    pub vectors: usize,
    /// Of those, lost to alignment or reserved ahead.
    pub vectors_unused: usize,
    /// Slots reserved (the key table and slot arrays are sized by it).
    pub capacity: usize,
}

/// How the graph is shaped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GraphShape {
    pub(crate) dim: usize,
    pub(crate) connectivity: usize,
    pub(crate) expansion_add: usize,
    pub(crate) expansion_search: usize,
    pub(crate) quantization: Quantization,
}

/// A counting semaphore for blocking callers: USearch's thread slots.
struct Slots {
    free: Mutex<Vec<usize>>,
    returned: Condvar,
}

impl Slots {
    fn new(n: usize) -> Self {
        Self { free: Mutex::new((0..n).collect()), returned: Condvar::new() }
    }

    /// Runs `f` with a slot of its own.
    fn with<T>(&self, f: impl FnOnce(usize) -> T) -> T {
        let slot = {
            let mut free = self.free.lock();
            loop {
                if let Some(s) = free.pop() {
                    break s;
                }
                self.returned.wait(&mut free);
            }
        };
        struct Return<'a>(&'a Slots, usize);
        impl Drop for Return<'_> {
            fn drop(&mut self) {
                self.0.free.lock().push(self.1);
                self.0.returned.notify_one();
            }
        }
        let _back = Return(self, slot);
        f(slot)
    }
}

/// One model's graph. Keys are the index's dense ids.
pub(crate) struct Graph {
    index: Index,
    shape: GraphShape,
    slots: Slots,
    /// Shared by every call, exclusive while the capacity grows.
    resize: RwLock<()>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph").field("shape", &self.shape).field("size", &self.index.size()).finish()
    }
}

/// Thread slots: enough for every core to insert and for searches beside.
fn thread_slots() -> usize {
    std::thread::available_parallelism().map_or(2, NonZeroUsize::get) * 4
}

impl Graph {
    pub(crate) fn new(shape: GraphShape, capacity: usize) -> Result<Self, GraphError> {
        let options = IndexOptions {
            dimensions: shape.dim,
            // Vectors are normalised on the way in: 1 - dot is 1 - cosine.
            metric: MetricKind::IP,
            quantization: shape.quantization.scalar_kind(),
            connectivity: shape.connectivity,
            expansion_add: shape.expansion_add,
            expansion_search: shape.expansion_search,
            multi: false,
        };
        let index = Index::new(&options).map_err(refused)?;
        let slots = thread_slots();
        index.reserve_capacity_and_threads(capacity.max(64), slots).map_err(refused)?;
        Ok(Self { index, shape, slots: Slots::new(slots), resize: RwLock::new(()) })
    }

    /// Whether `id` is in the graph.
    pub(crate) fn contains(&self, id: u64) -> bool {
        let _shared = self.resize.read();
        self.index.contains(id)
    }

    /// Bytes USearch holds: graph, vectors, and the key table.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.index.memory_usage()
    }

    /// Where USearch's bytes go.
    pub(crate) fn memory(&self) -> GraphMemory {
        let m = self.index.memory_stats();
        let total = self.index.memory_usage();
        GraphMemory {
            total,
            links: m.graph_allocated,
            links_unused: m.graph_wasted + m.graph_reserved,
            vectors: m.vectors_allocated,
            vectors_unused: m.vectors_wasted + m.vectors_reserved,
            capacity: self.index.capacity(),
        }
    }

    /// Makes room for `more` vectors beyond those held, doubling.
    pub(crate) fn make_room(&self, more: usize) -> Result<(), GraphError> {
        let need = self.index.size() + more;
        if need <= self.index.capacity() {
            return Ok(());
        }
        let _alone = self.resize.write();
        let capacity = self.index.capacity();
        if need > capacity {
            self.index.reserve_capacity_and_threads(need.max(capacity * 2), thread_slots()).map_err(refused)?;
        }
        Ok(())
    }

    /// Adds `id` (absent from the graph; [`Graph::remove`] it first), with
    /// room made beforehand.
    pub(crate) fn add(&self, id: u64, unit: &[f32]) -> Result<(), GraphError> {
        let _shared = self.resize.read();
        self.slots.with(|_| self.index.add(id, unit)).map_err(refused)?;
        Ok(())
    }

    /// Adds many distinct ids from every core (a build).
    pub(crate) fn add_parallel(&self, rows: &[(u64, &[f32])]) -> Result<(), GraphError> {
        self.make_room(rows.len())?;
        let threads = std::thread::available_parallelism().map_or(2, NonZeroUsize::get);
        let chunk = rows.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let workers: Vec<_> = rows
                .chunks(chunk)
                .map(|part| s.spawn(move || part.iter().try_for_each(|(id, v)| self.add(*id, v))))
                .collect();
            workers.into_iter().try_for_each(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        })
    }

    /// Forgets `id` (absent ids are ignored); its slot is reused.
    pub(crate) fn remove(&self, id: u64) -> Result<(), GraphError> {
        let _shared = self.resize.read();
        self.slots.with(|_| self.index.remove(id)).map_err(refused)?;
        Ok(())
    }

    /// The `want` nearest ids to the unit vector `q` and their cosines,
    /// searching with a candidate list of `ef`.
    pub(crate) fn search(&self, q: &[f32], want: usize, ef: usize) -> Result<Vec<(u64, f32)>, GraphError> {
        let _shared = self.resize.read();
        let matches = self
            .slots
            .with(|_| {
                // A per-call candidate list would need a call of its own in the
                // binding; the benchmark sweeps it, the service keeps one.
                if self.index.expansion_search() != ef {
                    self.index.change_expansion_search(ef);
                }
                self.index.search(q, want)
            })
            .map_err(refused)?;
        Ok(matches.keys.into_iter().zip(matches.distances).map(|(id, d)| (id, 1.0 - d)).collect())
    }
}
