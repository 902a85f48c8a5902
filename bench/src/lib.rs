//! Benchmark programs, each a binary in `src/bin/`, each measuring EmbArk
//! against its peer in the same run on the same machine:
//!
//! - `retina-images`: EfficientNet-Lite0 images/s on candle vs eager
//!   PyTorch on CPU, same weights, preprocessed tensors and JPEG end to end.
//! - `kfc-fill`: a backlog of misses drained by KFC (real broker, CQL
//!   store) against Retina alone on the same inputs.
//!
//! Run them with `scripts/bench-retina.sh` and `scripts/bench-kfc.sh`; they
//! are not tests.
