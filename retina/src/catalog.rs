//! The model catalogue: which models exist, their output, weights and
//! preprocessing, read from a TOML file (`--models-config`; the shipped
//! `models.toml` is built in and used when none is given). A team serves
//! its own encoder by adding an entry and pointing it at weights: no code
//! change. See docs/models.md.
//!
//! A catalogue is checked as a whole when it is read: an entry with a
//! missing or bad field is refused with a message naming the entry and the
//! field, before anything is loaded. The weights' SHA-256 is checked when
//! the engine loads them ([`ModelFile::read_checked`]).
//!
//! Specs live for the whole process (`&'static`): a catalogue is read once
//! at start-up and leaked, so every metric label and map key can borrow
//! its names without copies.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use serde::Deserialize;
use sha2::Digest as _;

/// The shipped catalogue (the repository's `models.toml`).
pub const BUILTIN_TOML: &str = include_str!("../../models.toml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    Image,
    Text,
}

/// What runs the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// In-process Rust (candle): the architectures built in code.
    Candle,
    /// ONNX Runtime on an exported graph (`weights` is the `.onnx` file).
    Onnx,
}

/// The network's architecture, for engines that build it in code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Architecture {
    /// EfficientNet-Lite0 (image): the global-average-pooled 1280-d head.
    EfficientnetLite0,
    /// A BERT-family encoder (text) with its `tokenizer.json`, pooled into
    /// a sentence vector (candle: safetensors and `config.json`).
    Bert,
    /// Any image encoder exported to ONNX: preprocessed pixels in, one
    /// vector per image out (the ONNX engine only).
    ImageEncoder,
}

impl Architecture {
    fn kind(self) -> ModelKind {
        match self {
            Self::EfficientnetLite0 | Self::ImageEncoder => ModelKind::Image,
            Self::Bert => ModelKind::Text,
        }
    }
}

/// A file of a model: where, and the SHA-256 it must have.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    /// Relative to the models directory unless absolute.
    pub path: PathBuf,
    /// Lower-case hex; a file with another digest is refused.
    pub sha256: Option<String>,
}

/// Why a model file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has SHA-256 {actual}, the catalogue says {expected}: wrong or damaged file")]
    Digest { path: String, actual: String, expected: String },
}

impl ModelFile {
    /// Its path under `models_dir`.
    pub fn resolve(&self, models_dir: &Path) -> PathBuf {
        models_dir.join(&self.path)
    }

    /// Reads it whole and checks its digest.
    pub fn read_checked(&self, models_dir: &Path) -> Result<Vec<u8>, FileError> {
        let path = self.resolve(models_dir);
        let bytes =
            std::fs::read(&path).map_err(|source| FileError::Io { path: path.display().to_string(), source })?;
        if let Some(expected) = &self.sha256 {
            let actual = hex(&sha2::Sha256::digest(&bytes));
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(FileError::Digest { path: path.display().to_string(), actual, expected: expected.clone() });
            }
        }
        Ok(bytes)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sentence pooling of a text encoder's token vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// Mean over the attention mask (sentence-transformers' default).
    Mean,
    /// The first token's vector.
    Cls,
}

/// How a text model tokenizes and pools.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSettings {
    /// The encoder's `config.json` (Hugging Face format); the candle engine
    /// builds the network from it (the ONNX engine needs none).
    pub config: Option<ModelFile>,
    /// A fast-tokenizer `tokenizer.json`.
    pub tokenizer: ModelFile,
    /// Longer inputs are truncated to this many tokens.
    pub max_tokens: usize,
    pub pooling: Pooling,
    /// L2-normalise the sentence vector.
    pub normalize: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

/// The memory layout of the network's input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Batch, height, width, channels.
    Nhwc,
    /// Batch, channels, height, width.
    Nchw,
}

/// How an image becomes the network's input: shorter side to `resize`
/// (antialiased bilinear, as Pillow), centre crop `crop` x `crop`, then
/// `(value - mean[c]) / std[c]` per channel on 0..=255 values, channels in
/// `channels` order, in `layout`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSettings {
    pub resize: usize,
    pub crop: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub channels: ChannelOrder,
    pub layout: Layout,
}

impl ImageSettings {
    /// Values per preprocessed image.
    pub fn input_len(&self) -> usize {
        self.crop * self.crop * 3
    }
}

/// One served model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// What Lookups name (`[a-z0-9._-]`, 1 to 64 characters).
    pub name: String,
    /// Changes whenever the output for the same input changes. Several
    /// entries may share a name with different versions: each is served,
    /// and stored, apart.
    pub version: String,
    /// Of several versions of one name, the one a request naming no
    /// version gets until `embark promote` records another in the store.
    /// A name with one entry needs no mark.
    #[serde(default)]
    pub current: bool,
    pub kind: ModelKind,
    pub engine: EngineKind,
    pub architecture: Architecture,
    /// Length of every vector.
    pub dim: usize,
    pub weights: ModelFile,
    /// Required for text models.
    pub text: Option<TextSettings>,
    /// Required for image models.
    pub image: Option<ImageSettings>,
    /// The OOV row: `dim` numbers in a file (whitespace or comma separated),
    /// relative to the catalogue file's directory unless absolute; zeros
    /// when absent. `--oov MODEL=PATH` overrides it.
    pub oov_file: Option<PathBuf>,
    /// Most inputs per forward pass for this model (default: the engine's
    /// `--max-batch`).
    pub max_batch: Option<usize>,
    /// The ONNX engine: the graph output to read (default: the first). A
    /// text model's token vectors `(n, tokens, hidden)` are pooled as its
    /// entry says; `(n, dim)` (or `(n, dim, 1, 1)`) is taken as it is.
    pub onnx_output: Option<String>,
}

/// Why a catalogue was refused.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("reading the model catalogue {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the model catalogue {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("the model catalogue {path}: model {entry} ({name:?}), field `{field}`: {reason}")]
    Field { path: String, entry: usize, name: String, field: &'static str, reason: String },
    #[error("the model catalogue {path} lists no model")]
    Empty { path: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default, rename = "model")]
    models: Vec<ModelSpec>,
}

/// The models a process may serve, in file order.
#[derive(Debug)]
pub struct Catalog {
    /// Where it came from (a path, or "built-in").
    pub source: String,
    models: Vec<ModelSpec>,
}

/// The longest vector an entry may declare: the message size limits of
/// Lookup answers and Retina replies are set for rows up to this long.
pub const MAX_DIM: usize = 16_384;

/// What the built-in catalogue is called in messages.
pub const BUILTIN_SOURCE: &str = "built-in models.toml";

impl Catalog {
    /// Parses and checks a catalogue (`source` names it in errors).
    pub fn parse(text: &str, source: &str) -> Result<Self, CatalogError> {
        let file: CatalogFile =
            toml::from_str(text).map_err(|e| CatalogError::Parse { path: source.to_owned(), source: Box::new(e) })?;
        if file.models.is_empty() {
            return Err(CatalogError::Empty { path: source.to_owned() });
        }
        let mut names = HashSet::new();
        for (i, m) in file.models.iter().enumerate() {
            if names.contains(&(m.name.clone(), m.version.clone())) {
                return Err(CatalogError::Field {
                    path: source.to_owned(),
                    entry: i + 1,
                    name: m.name.clone(),
                    field: "version",
                    reason: "another entry has this name and version".into(),
                });
            }
            let field = |field: &'static str, reason: String| CatalogError::Field {
                path: source.to_owned(),
                entry: i + 1,
                name: m.name.clone(),
                field,
                reason,
            };
            check_model(m).map_err(|(f, r)| field(f, r))?;
            names.insert((m.name.clone(), m.version.clone()));
        }
        check_versions(&file.models, source)?;
        Ok(Self { source: source.to_owned(), models: file.models })
    }

    /// Reads the file at `path`, or the built-in catalogue for `None`, and
    /// keeps it for the life of the process.
    pub fn load(path: Option<&Path>) -> Result<&'static Self, CatalogError> {
        let catalog = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|source| CatalogError::Io { path: p.display().to_string(), source })?;
                let mut catalog = Self::parse(&text, &p.display().to_string())?;
                // An OOV file is the operator's, beside the catalogue (a
                // front without weights has no --models-dir to look in).
                let base = p.parent().unwrap_or(Path::new("."));
                for m in &mut catalog.models {
                    if let Some(f) = &m.oov_file
                        && f.is_relative()
                    {
                        m.oov_file = Some(base.join(f));
                    }
                }
                catalog
            }
            None => return Ok(builtin()),
        };
        // Read once per process; its specs are borrowed for its lifetime.
        Ok(Box::leak(Box::new(catalog)))
    }

    /// The current version of `name`: its entry marked `current`, or its
    /// only entry.
    pub fn spec(&'static self, name: &str) -> Option<&'static ModelSpec> {
        let mut versions = self.models.iter().filter(|s| s.name == name);
        let first = versions.next()?;
        Some(if first.current { first } else { versions.find(|s| s.current).unwrap_or(first) })
    }

    /// The entry of `name` at `version`; the current one for an empty
    /// version.
    pub fn spec_version(&'static self, name: &str, version: &str) -> Option<&'static ModelSpec> {
        if version.is_empty() {
            return self.spec(name);
        }
        self.models.iter().find(|s| s.name == name && s.version == version)
    }

    /// Every entry: every version of every model, in file order.
    pub fn specs(&'static self) -> impl Iterator<Item = &'static ModelSpec> {
        self.models.iter()
    }

    /// Every model's name once, in file order (what `--models` defaults to).
    pub fn names(&'static self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = Vec::new();
        for s in &self.models {
            if !names.contains(&s.name.as_str()) {
                names.push(s.name.as_str());
            }
        }
        names
    }

    /// The versions of `name`, in file order.
    pub fn versions(&'static self, name: &str) -> Vec<&'static str> {
        self.models.iter().filter(|s| s.name == name).map(|s| s.version.as_str()).collect()
    }

    /// Every version of each of `names`, or an error naming the unknown
    /// one and the known ones; every entry of the catalogue for an empty
    /// list.
    pub fn select(&'static self, names: &[String]) -> Result<Vec<&'static ModelSpec>, String> {
        if names.is_empty() {
            return Ok(self.specs().collect());
        }
        let mut out = Vec::new();
        for n in names {
            let before = out.len();
            out.extend(self.models.iter().filter(|s| &s.name == n));
            if out.len() == before {
                return Err(format!("unknown model {n:?}; {} has {:?}", self.source, self.names()));
            }
        }
        Ok(out)
    }
}

/// The shipped catalogue, parsed once.
pub fn builtin() -> &'static Catalog {
    static BUILTIN: OnceLock<Catalog> = OnceLock::new();
    // A unit test parses it: a bad built-in file fails the build's tests.
    BUILTIN.get_or_init(|| Catalog::parse(BUILTIN_TOML, BUILTIN_SOURCE).expect("the built-in models.toml is valid"))
}

/// The rules across entries of one name: versions of one model share its
/// kind (a ranker's keys are URLs or texts whatever the version), and of
/// several versions exactly one is marked `current`.
fn check_versions(models: &[ModelSpec], source: &str) -> Result<(), CatalogError> {
    let field = |i: usize, field: &'static str, reason: String| CatalogError::Field {
        path: source.to_owned(),
        entry: i + 1,
        name: models[i].name.clone(),
        field,
        reason,
    };
    for (i, m) in models.iter().enumerate() {
        if let Some(other) = models[..i].iter().find(|s| s.name == m.name && s.kind != m.kind) {
            return Err(field(
                i,
                "kind",
                format!(
                    "version {:?} of this model is {:?}; every version must be {:?}",
                    other.version, other.kind, m.kind
                ),
            ));
        }
    }
    for (i, m) in models.iter().enumerate() {
        let siblings: Vec<&ModelSpec> = models.iter().filter(|s| s.name == m.name).collect();
        let current = siblings.iter().filter(|s| s.current).count();
        if siblings.len() > 1 && current != 1 {
            let versions: Vec<&str> = siblings.iter().map(|s| s.version.as_str()).collect();
            return Err(field(
                i,
                "current",
                format!(
                    "{current} of its {} versions {versions:?} are marked current; mark exactly one `current = true`",
                    siblings.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Every semantic rule an entry must meet: `(field, reason)` of the first
/// broken one.
fn check_model(m: &ModelSpec) -> Result<(), (&'static str, String)> {
    let valid_name = !m.name.is_empty()
        && m.name.len() <= 64
        && m.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if !valid_name {
        return Err(("name", "use 1 to 64 characters of a-z, 0-9, '.', '_' or '-'".into()));
    }
    if m.version.trim().is_empty() || m.version.len() > 256 {
        return Err(("version", "give a version of 1 to 256 characters; change it whenever the output changes".into()));
    }
    if m.dim == 0 || m.dim > MAX_DIM {
        return Err(("dim", format!("{} is not a vector length (1 to {MAX_DIM})", m.dim)));
    }
    if m.architecture.kind() != m.kind {
        return Err((
            "architecture",
            format!("{:?} makes {:?} models, but kind is {:?}", m.architecture, m.architecture.kind(), m.kind),
        ));
    }
    check_file(&m.weights, "weights.path", "weights.sha256", true)?;
    if m.onnx_output.is_some() && m.engine != EngineKind::Onnx {
        return Err(("onnx_output", "only the ONNX engine reads a graph output".into()));
    }
    if m.engine == EngineKind::Candle && m.architecture == Architecture::ImageEncoder {
        return Err((
            "architecture",
            "candle builds \"efficientnet-lite0\" images; \"image-encoder\" needs engine = \"onnx\"".into(),
        ));
    }
    if m.max_batch == Some(0) {
        return Err(("max_batch", "must be at least 1".into()));
    }
    match m.kind {
        ModelKind::Text => {
            let Some(t) = &m.text else {
                return Err(("text", "a text model needs a [model.text] table (config, tokenizer, ...)".into()));
            };
            if m.image.is_some() {
                return Err(("image", "a text model takes no [model.image] table".into()));
            }
            match (&t.config, m.engine) {
                (Some(config), _) => check_file(config, "text.config.path", "text.config.sha256", false)?,
                (None, EngineKind::Candle) => {
                    return Err(("text.config", "the candle engine builds the encoder from its config.json".into()));
                }
                (None, EngineKind::Onnx) => {}
            }

            check_file(&t.tokenizer, "text.tokenizer.path", "text.tokenizer.sha256", false)?;
            if t.max_tokens == 0 || t.max_tokens > 8192 {
                return Err(("text.max_tokens", format!("{} is not a token limit (1 to 8192)", t.max_tokens)));
            }
        }
        ModelKind::Image => {
            let Some(img) = &m.image else {
                return Err(("image", "an image model needs a [model.image] table (resize, crop, ...)".into()));
            };
            if m.text.is_some() {
                return Err(("text", "an image model takes no [model.text] table".into()));
            }
            if !(16..=2048).contains(&img.crop) {
                return Err(("image.crop", format!("{} is not a crop size (16 to 2048 pixels)", img.crop)));
            }
            if img.resize < img.crop || img.resize > 4096 {
                return Err((
                    "image.resize",
                    format!("{} must be at least image.crop ({}) and at most 4096", img.resize, img.crop),
                ));
            }
            if img.mean.iter().any(|v| !v.is_finite()) {
                return Err(("image.mean", "three finite numbers, on 0..255 values".into()));
            }
            if img.std.iter().any(|v| !v.is_finite() || *v <= 0.0) {
                return Err(("image.std", "three positive numbers, on 0..255 values".into()));
            }
            if m.engine == EngineKind::Candle && img.layout != Layout::Nhwc {
                return Err(("image.layout", "the candle EfficientNet-Lite0 takes \"nhwc\"".into()));
            }
            if m.architecture == Architecture::EfficientnetLite0 && img.crop < 32 {
                return Err(("image.crop", "EfficientNet-Lite0 needs at least 32 pixels".into()));
            }
        }
    }
    Ok(())
}

fn check_file(
    f: &ModelFile,
    path_field: &'static str,
    sum_field: &'static str,
    sum_required: bool,
) -> Result<(), (&'static str, String)> {
    if f.path.as_os_str().is_empty() {
        return Err((path_field, "give the file's path (relative to --models-dir, or absolute)".into()));
    }
    match &f.sha256 {
        Some(s) if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Err((sum_field, format!("{s:?} is not a SHA-256 (64 hex digits)")))
        }
        None if sum_required => {
            Err((sum_field, "give the file's SHA-256 (sha256sum), so a wrong or damaged file is refused".into()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_catalogue_lists_the_shipped_models() {
        let c = builtin();
        assert_eq!(c.names(), vec!["minilm-l6-v2", "efficientnet-lite0"]);
        let text = c.spec("minilm-l6-v2").expect("minilm");
        assert_eq!((text.kind, text.dim, text.architecture), (ModelKind::Text, 384, Architecture::Bert));
        let image = c.spec("efficientnet-lite0").expect("efficientnet");
        assert_eq!((image.kind, image.dim), (ModelKind::Image, 1280));
        assert_eq!(image.image.as_ref().map(|i| (i.resize, i.crop)), Some((256, 224)));
    }

    fn refused(text: &str) -> String {
        match Catalog::parse(text, "test.toml") {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    /// The built-in file with one line replaced.
    fn edited(from: &str, to: &str) -> String {
        assert!(BUILTIN_TOML.contains(from), "{from}");
        BUILTIN_TOML.replacen(from, to, 1)
    }

    #[test]
    fn a_bad_entry_is_refused_naming_the_entry_and_the_field() {
        let e = refused(&edited("dim = 1280", "dim = 0"));
        assert!(e.contains("model 2 (\"efficientnet-lite0\"), field `dim`"), "{e}");
        let e = refused(&edited("crop = 224", "crop = 24").replace("resize = 256", "resize = 24"));
        assert!(e.contains("field `image.crop`") && e.contains("at least 32"), "{e}");
        let e = refused(&edited("dim = 1280", "dim = 100000"));
        assert!(e.contains("field `dim`"), "{e}");
        let e = refused(&edited("crop = 224", "crop = 300"));
        assert!(e.contains("field `image.resize`") && e.contains("image.crop (300)"), "{e}");
        let e = refused(&edited("kind = \"image\"", "kind = \"text\""));
        assert!(e.contains("field `architecture`"), "{e}");
        let e = refused(&edited("name = \"efficientnet-lite0\"", "name = \"minilm-l6-v2\""));
        assert!(e.contains("model 2") && e.contains("field `kind`"), "{e}");
        let e = refused(&edited("std = [128.0, 128.0, 128.0]", "std = [128.0, 0.0, 128.0]"));
        assert!(e.contains("field `image.std`"), "{e}");
        let e = refused(&edited("sha256 = \"c0e82d97", "sha256 = \"zz"));
        assert!(e.contains("field `weights.sha256`"), "{e}");
        let e = refused(&edited("pooling = \"mean\"", "pooling = \"max\""));
        assert!(e.contains("unknown variant `max`") && e.contains("line"), "{e}");
        let e = refused(&edited("normalize = true", "normalize = true\nnormalise = true"));
        assert!(e.contains("unknown field `normalise`"), "{e}");
        assert!(refused("").contains("lists no model"));
    }

    #[test]
    fn an_oov_file_is_found_beside_the_catalogue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("models.toml");
        std::fs::write(&path, edited("dim = 1280", "dim = 1280\noov_file = \"oov/efficientnet.txt\"")).expect("write");
        let catalog = Catalog::load(Some(&path)).expect("valid");
        let spec = catalog.spec("efficientnet-lite0").expect("entry");
        assert_eq!(spec.oov_file.as_deref(), Some(dir.path().join("oov/efficientnet.txt").as_path()));
    }

    #[test]
    fn weights_without_a_digest_are_refused() {
        let no_sum = edited(
            "weights = { path = \"efficientnet-lite0/model.safetensors\", sha256 = \"c0e82d979be67fad532eaced5e0b751b9ea4b9e1931ab56eac28fd295bbd4353\" }",
            "weights = { path = \"efficientnet-lite0/model.safetensors\" }",
        );
        assert!(refused(&no_sum).contains("field `weights.sha256`"));
    }

    #[test]
    fn a_file_whose_digest_differs_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("w.bin"), b"weights").expect("write");
        // sha256("weights")
        let right = hex(&sha2::Sha256::digest(b"weights"));
        let file = |sum: &str| ModelFile { path: "w.bin".into(), sha256: Some(sum.to_owned()) };
        assert_eq!(file(&right).read_checked(dir.path()).expect("matches"), b"weights");
        let wrong = "0".repeat(64);
        let e = file(&wrong).read_checked(dir.path()).expect_err("differs");
        assert!(matches!(e, FileError::Digest { .. }), "{e}");
        assert!(e.to_string().contains(&right), "{e}");
    }

    /// The built-in catalogue plus a second version of the text model
    /// (`extra` appended to the new entry).
    fn two_versions(extra: &str) -> String {
        let start = BUILTIN_TOML.find("[[model]]").expect("an entry");
        let end = BUILTIN_TOML[start + 1..].find("[[model]]").map(|i| i + start + 1).expect("a second entry");
        let minilm = &BUILTIN_TOML[start..end];
        let v2 = minilm.replacen("version = \"", &format!("{extra}\nversion = \"v2-"), 1);
        format!("{BUILTIN_TOML}\n{v2}")
    }

    #[test]
    fn versions_of_one_model_are_entries_with_one_marked_current() {
        let c: &'static Catalog =
            Box::leak(Box::new(Catalog::parse(&two_versions("current = true"), "t").expect("valid")));
        assert_eq!(c.names(), vec!["minilm-l6-v2", "efficientnet-lite0"], "a name once");
        let versions = c.versions("minilm-l6-v2");
        assert_eq!(versions.len(), 2);
        assert!(versions[1].starts_with("v2-"));
        assert_eq!(c.spec("minilm-l6-v2").map(|s| s.version.as_str()), Some(versions[1]), "the current one");
        assert_eq!(c.spec_version("minilm-l6-v2", versions[0]).map(|s| s.version.as_str()), Some(versions[0]));
        assert_eq!(c.spec_version("minilm-l6-v2", "").map(|s| s.version.as_str()), Some(versions[1]));
        assert!(c.spec_version("minilm-l6-v2", "nope").is_none());
        assert_eq!(c.select(&["minilm-l6-v2".into()]).expect("known").len(), 2, "every version");

        let e = refused(&two_versions(""));
        assert!(e.contains("field `current`") && e.contains("0 of its 2 versions"), "{e}");
        let both = two_versions("current = true").replacen(
            "name = \"minilm-l6-v2\"",
            "name = \"minilm-l6-v2\"\ncurrent = true",
            1,
        );
        assert!(refused(&both).contains("2 of its 2 versions"));
        let same = two_versions("current = true").replace("version = \"v2-", "version = \"");
        assert!(refused(&same).contains("another entry has this name and version"));
    }

    #[test]
    fn select_defaults_to_every_model_and_names_the_unknown_one() {
        let c = builtin();
        assert_eq!(c.select(&[]).expect("all").len(), 2);
        let e = c.select(&["nope".into()]).expect_err("unknown");
        assert!(e.contains("\"nope\"") && e.contains("minilm-l6-v2"), "{e}");
    }
}
