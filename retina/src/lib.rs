//! Retina, the embedding worker: inputs -> model -> vectors.
//!
//! - [`catalog`]: the model catalogue (`models.toml`: name, kind, dim,
//!   version, engine and architecture, weights and their SHA-256,
//!   preprocessing), checked when read; the front validates requests
//!   against it without loading weights.
//! - [`text`]: BERT-family sentence encoders on candle (`minilm-l6-v2`),
//!   pooled and normalised as the catalogue says.
//! - [`image_model`]: `efficientnet-lite0`, EfficientNet-Lite0 on candle
//!   (NHWC, BatchNorm folded at load), returning the 1280-d pooled vector.
//! - [`onnx`]: the ONNX engine: ONNX Runtime (loaded at start from the
//!   library PyPI's wheel ships) on an exported text or image encoder.
//! - [`fetch`]: SSRF-safe downloads of untrusted image URLs (public
//!   addresses only, checked on every redirect; bounded size and time).
//! - [`preprocess`]: untrusted bytes to the model's input tensor as Pillow
//!   makes it (format sniffing, decode limits, Pillow-exact resize, crop,
//!   normalisation, channel order and layout from the catalogue).
//! - [`engine`]: one inference thread per loaded model, fed by a bounded
//!   queue; requests arriving together are batched (max batch, max wait).
//!   Async callers never run inference on the runtime's worker threads.
//! - [`config`]: the engine's flags, shared by the `retina` binary and
//!   `embark up`.
//! - [`service`]: the `retina.v1.Retina` gRPC service over an [`engine::Engine`].
//!
//! The `retina` binary serves that service; `embark up` embeds the engine
//! in-process instead.

pub mod catalog;
pub mod config;
pub mod engine;
pub mod fetch;
pub mod image_model;
pub mod onnx;
pub mod preprocess;
pub mod service;
pub mod text;

pub use catalog::{Catalog, ModelKind, ModelSpec};
pub use engine::{Engine, EngineConfig, EngineError, InputFailure, InputResult};
