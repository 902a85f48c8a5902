//! Benchmark programs, each a binary in `src/bin/`, each measuring EmbArk
//! against its peer in the same run on the same machine:
//!
//! - `retina-images`: EfficientNet-Lite0 images/s on candle vs eager
//!   PyTorch on CPU, same weights, preprocessed tensors and JPEG end to end.
//!
//! Run them with `scripts/bench-retina.sh`; they are not tests.
