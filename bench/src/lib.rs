//! Benchmark programs, each a binary in `src/bin/`, each measuring EmbArk
//! against its peer in the same run on the same machine:
//!
//! - `retina-images`: EfficientNet-Lite0 images/s on candle vs eager
//!   PyTorch on CPU, same weights, preprocessed tensors and JPEG end to end.
//! - `kfc-fill`: a backlog of misses drained by KFC (real broker, CQL
//!   store) against Retina alone on the same inputs.
//! - `lookup-bench`: Lookup against Redis MGET, a gRPC echo and a raw
//!   stream of the same bytes, over TCP and a Unix socket; peak, latency
//!   curves ([`plot`]), memory per cached entry.
//! - `miss-to-fill`: on `embark up`, how long a fresh key takes from its
//!   first Lookup to a stored vector, against the model's own time.
//! - `similar-bench`: the `Similar` index (HNSW) against an exact scan and
//!   NumPy: recall@10, queries/s, memory.
//! - `drill` (not a benchmark): the fault drill of `scripts/drill.sh`.
//!
//! Run them with `scripts/bench-retina.sh`, `scripts/bench-kfc.sh`,
//! `scripts/bench-lookup.sh` (which runs `miss-to-fill` too),
//! `scripts/bench-similar.sh` and `scripts/drill.sh`; they are not tests.

pub mod plot;
