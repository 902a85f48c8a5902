//! The ONNX engine (`engine = "onnx"` in the catalogue): a team exports its
//! own encoder to ONNX and serves it with no code change.
//!
//! ONNX Runtime runs the graph, through the `ort` crate with its
//! `load-dynamic` feature: the shared library is loaded at start from
//! `--onnxruntime-lib`, the `libonnxruntime.so` PyPI's onnxruntime wheel
//! ships (fetched and sha256-checked by `scripts/setup-onnxruntime.sh`),
//! so nothing is downloaded at build or run time and the same wheel's
//! library could bring its CUDA execution provider on a GPU machine.
//! Sessions run with every graph optimisation, on the model's own
//! inference thread (ONNX Runtime parallelises inside a batch).
//!
//! Text encoders (`architecture = "bert"`) take `input_ids` and
//! `attention_mask` (and `token_type_ids`, zeros, when the graph has it),
//! tokenized as the entry says. The entry's `onnx_output` names the output
//! to read (default: the first): token vectors `(n, len, hidden)` are
//! pooled as the entry says; a sentence vector `(n, dim)` is taken as it
//! is. `normalize` applies to both.
//!
//! Image encoders take the graph's first input, the pixels as the entry's
//! `[model.image]` preprocesses them (`(n, 3, crop, crop)` for `"nchw"`,
//! `(n, crop, crop, 3)` for `"nhwc"`), and give `(n, dim)` or
//! `(n, dim, 1, 1)`.

use std::{path::Path, sync::OnceLock};

use ort::{
    environment::Environment,
    session::{Session, builder::GraphOptimizationLevel},
    value::Tensor,
};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::catalog::{ImageSettings, Layout, ModelSpec, Pooling, TextSettings};

/// Why the ONNX engine could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error(
        "loading ONNX Runtime from {path}: {reason} (scripts/setup-onnxruntime.sh installs it; --onnxruntime-lib points at it)"
    )]
    Runtime { path: String, reason: String },
    #[error("the ONNX model: {0}")]
    Ort(#[from] ort::Error),
    #[error("the tokenizer: {0}")]
    Tokenizer(String),
    #[error("the ONNX model has no output {name:?}; it has {available:?}")]
    NoOutput { name: String, available: Vec<String> },
    #[error(
        "output {name:?} has shape {shape:?}; expected (batch, dim), (batch, dim, 1, 1) or (batch, tokens, hidden)"
    )]
    Shape { name: String, shape: Vec<i64> },
}

/// The process's ONNX Runtime, loaded once (the first ONNX model loads it).
static RUNTIME: OnceLock<Result<Environment, String>> = OnceLock::new();

fn runtime(lib: &Path) -> Result<&'static Environment, OnnxError> {
    let loaded = RUNTIME.get_or_init(|| {
        ort::init_from(lib)
            .map_err(|e| e.to_string())?
            .with_name("embark")
            .with_telemetry(false)
            .build()
            .map_err(|e| e.to_string())
    });
    match loaded {
        Ok(env) => Ok(env),
        Err(reason) => Err(OnnxError::Runtime { path: lib.display().to_string(), reason: reason.clone() }),
    }
}

/// A text encoder graph and its tokenizer.
pub struct OnnxTextEncoder {
    session: Session,
    tokenizer: Tokenizer,
    output: String,
    token_types: bool,
    pooling: Pooling,
    normalize: bool,
}

impl std::fmt::Debug for OnnxTextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxTextEncoder").field("output", &self.output).finish_non_exhaustive()
    }
}

/// A session on `graph` with every optimisation, one thread per core, and
/// the name of the output the entry reads.
fn session(lib: &Path, graph: &[u8], spec: &ModelSpec) -> Result<(Session, String), OnnxError> {
    let env = runtime(lib)?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let session = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(ort::Error::from)?
        .with_intra_threads(threads)
        .map_err(ort::Error::from)?
        .commit_from_memory(graph)?;
    let outputs: Vec<String> = session.outputs().iter().map(|o| o.name().to_owned()).collect();
    let output = match &spec.onnx_output {
        Some(name) if outputs.contains(name) => name.clone(),
        Some(name) => return Err(OnnxError::NoOutput { name: name.clone(), available: outputs }),
        None => {
            outputs.first().cloned().ok_or_else(|| OnnxError::NoOutput { name: "(any)".into(), available: vec![] })?
        }
    };
    Ok((session, output))
}

impl OnnxTextEncoder {
    /// Builds the session from the graph's bytes, with ONNX Runtime from
    /// `lib`, and the tokenizer from its bytes.
    pub fn load(
        lib: &Path,
        graph: &[u8],
        tokenizer: &[u8],
        spec: &ModelSpec,
        settings: &TextSettings,
    ) -> Result<Self, OnnxError> {
        let (session, output) = session(lib, graph, spec)?;
        let token_types = session.inputs().iter().any(|i| i.name() == "token_type_ids");
        let mut tokenizer = Tokenizer::from_bytes(tokenizer).map_err(|e| OnnxError::Tokenizer(e.to_string()))?;
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: settings.max_tokens, ..Default::default() }))
            .map_err(|e| OnnxError::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(Some(PaddingParams { strategy: PaddingStrategy::BatchLongest, ..Default::default() }));
        Ok(Self { session, tokenizer, output, token_types, pooling: settings.pooling, normalize: settings.normalize })
    }

    /// One sentence vector per text, in order.
    pub fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, OnnxError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings =
            self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| OnnxError::Tokenizer(e.to_string()))?;
        let n = encodings.len();
        let len = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(n * len);
        let mut mask = Vec::with_capacity(n * len);
        for e in &encodings {
            ids.extend(e.get_ids().iter().map(|&v| i64::from(v)));
            mask.extend(e.get_attention_mask().iter().map(|&v| i64::from(v)));
        }
        let shape = [n as i64, len as i64];
        let mut inputs = ort::inputs![
            "input_ids" => Tensor::from_array((shape, ids))?,
            "attention_mask" => Tensor::from_array((shape, mask.clone()))?,
        ];
        if self.token_types {
            inputs.push(("token_type_ids".into(), Tensor::from_array((shape, vec![0i64; n * len]))?.into()));
        }
        let outputs = self.session.run(inputs)?;
        let value = outputs
            .get(self.output.as_str())
            .ok_or_else(|| OnnxError::NoOutput { name: self.output.clone(), available: vec![] })?;
        let (out_shape, data) = value.try_extract_tensor::<f32>()?;
        let dims: Vec<i64> = out_shape.iter().copied().collect();
        let mut vectors: Vec<Vec<f32>> = match dims.as_slice() {
            [b, d] if *b as usize == n => data.chunks(*d as usize).map(<[f32]>::to_vec).collect(),
            [b, t, h] if *b as usize == n && *t as usize == len => {
                let (t, h) = (*t as usize, *h as usize);
                (0..n)
                    .map(|i| {
                        let rows = &data[i * t * h..(i + 1) * t * h];
                        let m = &mask[i * t..(i + 1) * t];
                        pool(rows, m, h, self.pooling)
                    })
                    .collect()
            }
            _ => return Err(OnnxError::Shape { name: self.output.clone(), shape: dims }),
        };
        if self.normalize {
            for v in &mut vectors {
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                v.iter_mut().for_each(|x| *x /= norm);
            }
        }
        Ok(vectors)
    }
}

/// An image encoder graph.
pub struct OnnxImageEncoder {
    session: Session,
    input: String,
    output: String,
    side: usize,
    layout: Layout,
}

impl std::fmt::Debug for OnnxImageEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxImageEncoder").field("input", &self.input).field("output", &self.output).finish()
    }
}

impl OnnxImageEncoder {
    /// Builds the session from the graph's bytes, with ONNX Runtime from
    /// `lib`; inputs are preprocessed as `settings` say.
    pub fn load(lib: &Path, graph: &[u8], spec: &ModelSpec, settings: &ImageSettings) -> Result<Self, OnnxError> {
        let (session, output) = session(lib, graph, spec)?;
        let input = session
            .inputs()
            .first()
            .map(|i| i.name().to_owned())
            .ok_or_else(|| OnnxError::NoOutput { name: "(an input)".into(), available: vec![] })?;
        Ok(Self { session, input, output, side: settings.crop, layout: settings.layout })
    }

    /// One vector per image of `pixels` (`n` images, preprocessed).
    pub fn embed(&mut self, pixels: Vec<f32>, n: usize) -> Result<Vec<Vec<f32>>, OnnxError> {
        let s = self.side as i64;
        let shape = match self.layout {
            Layout::Nchw => [n as i64, 3, s, s],
            Layout::Nhwc => [n as i64, s, s, 3],
        };
        let outputs = self.session.run(ort::inputs![self.input.as_str() => Tensor::from_array((shape, pixels))?])?;
        let value = outputs
            .get(self.output.as_str())
            .ok_or_else(|| OnnxError::NoOutput { name: self.output.clone(), available: vec![] })?;
        let (out_shape, data) = value.try_extract_tensor::<f32>()?;
        let dims: Vec<i64> = out_shape.iter().copied().collect();
        match dims.as_slice() {
            [b, d] | [b, d, 1, 1] if *b as usize == n => Ok(data.chunks(*d as usize).map(<[f32]>::to_vec).collect()),
            _ => Err(OnnxError::Shape { name: self.output.clone(), shape: dims }),
        }
    }
}

/// One sentence vector from token vectors `(tokens, hidden)`.
fn pool(rows: &[f32], mask: &[i64], hidden: usize, pooling: Pooling) -> Vec<f32> {
    match pooling {
        Pooling::Cls => rows[..hidden].to_vec(),
        Pooling::Mean => {
            let mut sum = vec![0f32; hidden];
            let mut count = 0f32;
            for (row, &m) in rows.chunks(hidden).zip(mask) {
                if m != 0 {
                    sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
                    count += 1.0;
                }
            }
            let count = count.max(1e-9);
            sum.iter_mut().for_each(|s| *s /= count);
            sum
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pooling_skips_padding_and_cls_takes_the_first_token() {
        let rows = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0];
        assert_eq!(pool(&rows, &[1, 1, 0], 2, Pooling::Mean), vec![2.0, 3.0]);
        assert_eq!(pool(&rows, &[1, 1, 0], 2, Pooling::Cls), vec![1.0, 2.0]);
    }

    #[test]
    fn a_missing_runtime_library_is_a_clear_error() {
        let e = runtime(Path::new("/nonexistent/libonnxruntime.so")).expect_err("no library");
        assert!(e.to_string().contains("scripts/setup-onnxruntime.sh"), "{e}");
    }
}
