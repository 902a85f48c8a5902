//! BERT-family sentence encoders on candle (`architecture = "bert"`):
//! `minilm-l6-v2` (sentence-transformers all-MiniLM-L6-v2) and any other
//! BERT encoder in safetensors with its `config.json` and `tokenizer.json`.
//!
//! Matches sentence-transformers: the tokenizer's own truncation and fixed
//! padding from tokenizer.json are replaced by truncation at the entry's
//! `max_tokens` and padding to the longest input of the batch; token
//! vectors are pooled as the entry says (mean over the attention mask, or
//! the first token's) and L2-normalised if it says so.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::catalog::{Pooling, TextSettings};

#[derive(Debug, thiserror::Error)]
pub enum TextModelError {
    #[error("model config {path}: {source}")]
    Config { path: String, source: serde_json::Error },
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: String, reason: String },
    #[error(
        "text.max_tokens is {max_tokens}, but the model has {positions} positions (config.json max_position_embeddings)"
    )]
    TooManyTokens { max_tokens: usize, positions: usize },
    #[error("model: {0}")]
    Candle(#[from] candle_core::Error),
}

pub struct BertEncoder {
    tokenizer: Tokenizer,
    model: BertModel,
    device: Device,
    pooling: Pooling,
    normalize: bool,
}

impl std::fmt::Debug for BertEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertEncoder").field("pooling", &self.pooling).finish_non_exhaustive()
    }
}

/// The bytes of an encoder's three files (read and checked by the caller
/// against the catalogue's digests), and the paths errors name.
#[derive(Debug)]
pub struct BertFiles {
    pub config: Vec<u8>,
    pub config_path: String,
    pub tokenizer: Vec<u8>,
    pub tokenizer_path: String,
    pub weights: Vec<u8>,
}

impl BertEncoder {
    /// Builds the encoder from its files, tokenizing and pooling as
    /// `settings` say.
    pub fn load(files: BertFiles, settings: &TextSettings) -> Result<Self, TextModelError> {
        let config: Config = serde_json::from_slice(&files.config)
            .map_err(|source| TextModelError::Config { path: files.config_path.clone(), source })?;
        // A longer input would index past the position embeddings, and
        // fail its whole batch at run time.
        if settings.max_tokens > config.max_position_embeddings {
            return Err(TextModelError::TooManyTokens {
                max_tokens: settings.max_tokens,
                positions: config.max_position_embeddings,
            });
        }
        let tok_err = |e: tokenizers::Error| TextModelError::Tokenizer {
            path: files.tokenizer_path.clone(),
            reason: e.to_string(),
        };
        let mut tokenizer = Tokenizer::from_bytes(&files.tokenizer).map_err(tok_err)?;
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: settings.max_tokens, ..Default::default() }))
            .map_err(tok_err)?;
        tokenizer.with_padding(Some(PaddingParams { strategy: PaddingStrategy::BatchLongest, ..Default::default() }));

        let device = Device::Cpu;
        // Buffered rather than memory-mapped loading: read once at start,
        // and no `unsafe` (a mapped file changed underneath is UB).
        let vb = VarBuilder::from_buffered_safetensors(files.weights, DType::F32, &device)?;
        let model = BertModel::load(vb, &config)?;
        Ok(Self { tokenizer, model, device, pooling: settings.pooling, normalize: settings.normalize })
    }

    /// One sentence vector per text, in order.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, TextModelError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| TextModelError::Tokenizer { path: "the tokenizer".into(), reason: e.to_string() })?;
        let n = encodings.len();
        let len = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(n * len);
        let mut mask = Vec::with_capacity(n * len);
        for e in &encodings {
            ids.extend_from_slice(e.get_ids());
            mask.extend_from_slice(e.get_attention_mask());
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let token_types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &token_types, Some(&mask))?; // (n, len, hidden)

        let pooled = match self.pooling {
            Pooling::Mean => {
                let maskf = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (n, len, 1)
                let summed = hidden.broadcast_mul(&maskf)?.sum(1)?; // (n, hidden)
                let counts = maskf.sum(1)?.clamp(1e-9f32, f32::MAX)?; // (n, 1)
                summed.broadcast_div(&counts)?
            }
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        };
        if !self.normalize {
            return Ok(pooled.to_vec2::<f32>()?);
        }
        let norm = pooled.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
        Ok(pooled.broadcast_div(&norm)?.to_vec2::<f32>()?)
    }
}
