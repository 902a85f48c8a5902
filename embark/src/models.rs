//! The models this front serves, every version of each, with its OOV row
//! and its metric handles (resolved once, so the Lookup path does not
//! format labels), and which version of each model is current.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use embark_proto::{
    embark::v1::{ModelInfo, ModelKind as WireKind, Source, VectorType},
    vectors,
};
use retina::{ModelKind, ModelSpec};

/// What an unknown key's row is, per model.
#[derive(Debug, Clone, PartialEq)]
pub enum OovPolicy {
    /// All zeros (the default): a ranker can tell nothing from it.
    Zeros,
    /// A vector read from a file: `dim` numbers separated by whitespace or
    /// commas (e.g. the mean of the model's vectors, which some rankers
    /// prefer to zeros).
    File(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum ModelConfigError {
    #[error("unknown model {name:?}; known models: {known:?}")]
    Unknown { name: String, known: Vec<&'static str> },
    #[error("--oov {0:?}: expected MODEL=PATH or MODEL@VERSION=PATH")]
    BadOovFlag(String),
    #[error("--tier-type {0:?}: expected MODEL=TYPE or MODEL@VERSION=TYPE, TYPE one of f32, f16, bf16, i8")]
    BadTierType(String),
    #[error("OOV file {path} for model {model}: {reason}")]
    OovFile { model: String, path: String, reason: String },
}

/// One served version of a model.
#[derive(Debug)]
pub struct ServedModel {
    pub spec: &'static ModelSpec,
    /// Where this version's rows, tier entries and misses live
    /// (`embark_store::namespace`: `name@version`).
    pub namespace: String,
    /// The OOV row, `spec.dim` values.
    pub oov: Arc<[f32]>,
    /// How the tier keeps this version's rows (`--tier-type`; f32 unless
    /// told): a packed row of `embark_proto::vectors`.
    pub tier_type: VectorType,
    /// The OOV row packed as `tier_type`, as the tier's rows are.
    pub oov_packed: bytes::Bytes,
    pub metrics: ModelMetrics,
}

impl ServedModel {
    /// `row` packed as the tier keeps it, in an allocation of exactly its
    /// size (see `cache::le_bytes`).
    pub fn pack(&self, row: &[f32]) -> bytes::Bytes {
        let mut out = Vec::with_capacity(vectors::packed_row_bytes(self.tier_type, row.len()));
        vectors::pack(self.tier_type, row, &mut out);
        bytes::Bytes::from(out)
    }
}

/// A model kind as the JSON APIs and the CLI's tables name it: `image`,
/// `text`, or `unspecified` for a value this build does not know.
pub fn kind_name(kind: i32) -> &'static str {
    match WireKind::try_from(kind) {
        Ok(WireKind::Image) => "image",
        Ok(WireKind::Text) => "text",
        _ => "unspecified",
    }
}

/// A row's source as the JSON APIs and the CLI name it: its protobuf name
/// (`STORE`, `OOV_PENDING`...), `SOURCE_UNSPECIFIED` for an unknown value.
pub fn source_name(source: i32) -> &'static str {
    Source::try_from(source).unwrap_or(Source::Unspecified).as_str_name()
}

/// Metric handles of one model, resolved once.
#[derive(Debug)]
pub struct ModelMetrics {
    pub lookups: metrics::Counter,
    pub latency: metrics::Histogram,
    keys: [metrics::Counter; 5],
}

impl ModelMetrics {
    fn new(model: &'static str) -> Self {
        let keys = |s: &'static str| metrics::counter!("embark_lookup_keys_total", "model" => model, "source" => s);
        Self {
            lookups: metrics::counter!("embark_lookups_total", "model" => model),
            latency: metrics::histogram!("embark_lookup_latency_seconds", "model" => model),
            keys: [keys("cache"), keys("store"), keys("oov_pending"), keys("oov_failed"), keys("oov_unavailable")],
        }
    }

    pub fn keys(&self, source: Source) -> &metrics::Counter {
        match source {
            Source::Cache => &self.keys[0],
            Source::Store => &self.keys[1],
            Source::OovFailed => &self.keys[3],
            Source::OovUnavailable => &self.keys[4],
            Source::OovPending | Source::Unspecified => &self.keys[2],
        }
    }
}

/// Every served version of one model, in catalogue order, and which is
/// current.
#[derive(Debug)]
pub struct ServedVersions {
    versions: Vec<ServedModel>,
    /// Index into `versions`: what a Lookup naming no version gets. Starts
    /// at the catalogue's `current` entry; a promote recorded in the
    /// store moves it ([`ModelRegistry::set_current`]).
    current: AtomicUsize,
}

impl ServedVersions {
    pub fn current(&self) -> &ServedModel {
        &self.versions[self.current.load(Ordering::Acquire).min(self.versions.len() - 1)]
    }

    /// The served `version`; the current one for an empty version.
    pub fn get(&self, version: &str) -> Option<&ServedModel> {
        if version.is_empty() {
            return Some(self.current());
        }
        self.versions.iter().find(|m| m.spec.version == version)
    }

    pub fn all(&self) -> &[ServedModel] {
        &self.versions
    }

    pub fn version_names(&self) -> Vec<&str> {
        self.versions.iter().map(|m| m.spec.version.as_str()).collect()
    }
}

/// The served models by name.
#[derive(Debug, Default)]
pub struct ModelRegistry {
    models: HashMap<&'static str, ServedVersions>,
}

impl ModelRegistry {
    /// `oov_flags` are `MODEL=PATH` pairs (every version of the model) or
    /// `MODEL@VERSION=PATH` (that version only, e.g. for versions of
    /// different dims); a version without one takes its catalogue entry's
    /// `oov_file`, else zeros.
    pub fn new(specs: &[&'static ModelSpec], oov_flags: &[String]) -> Result<Self, ModelConfigError> {
        let mut policies: HashMap<String, OovPolicy> = HashMap::new();
        for flag in oov_flags {
            let (target, path) = flag.split_once('=').ok_or_else(|| ModelConfigError::BadOovFlag(flag.clone()))?;
            let names = |s: &&ModelSpec| s.name == target || embark_store::namespace(&s.name, &s.version) == target;
            if !specs.iter().any(names) {
                return Err(ModelConfigError::Unknown {
                    name: target.to_owned(),
                    known: specs.iter().map(|s| s.name.as_str()).collect(),
                });
            }
            policies.insert(target.to_owned(), OovPolicy::File(PathBuf::from(path)));
        }
        let mut models: HashMap<&'static str, ServedVersions> = HashMap::new();
        for &spec in specs {
            let name = spec.name.as_str();
            let namespace = embark_store::namespace(name, &spec.version);
            // A flag for this version, else one for the model (every version).
            let policy = policies
                .get(&namespace)
                .or_else(|| policies.get(name))
                .cloned()
                .or_else(|| spec.oov_file.clone().map(OovPolicy::File))
                .unwrap_or(OovPolicy::Zeros);
            let oov = oov_row(spec, &policy)?;
            let oov_packed = crate::cache::le_bytes(&oov);
            let served = ServedModel {
                spec,
                namespace,
                oov,
                tier_type: VectorType::F32,
                oov_packed,
                metrics: ModelMetrics::new(name),
            };
            let entry = models
                .entry(name)
                .or_insert_with(|| ServedVersions { versions: Vec::new(), current: AtomicUsize::new(0) });
            if spec.current {
                entry.current.store(entry.versions.len(), Ordering::Release);
            }
            entry.versions.push(served);
        }
        Ok(Self { models })
    }

    /// Keeps the tier rows of some models in a compact type: `flags` are
    /// `MODEL=TYPE` (every version) or `MODEL@VERSION=TYPE`, with TYPE one
    /// of `f32`, `f16`, `bf16`, `i8` (`--tier-type`). A row is packed once,
    /// when it enters the tier; a Lookup of another type converts it.
    pub fn set_tier_types(&mut self, flags: &[String]) -> Result<(), ModelConfigError> {
        let mut types: HashMap<String, VectorType> = HashMap::new();
        for flag in flags {
            let bad = || ModelConfigError::BadTierType(flag.clone());
            let (target, name) = flag.split_once('=').ok_or_else(bad)?;
            let t = vectors::parse_type(name).ok_or_else(bad)?;
            if !self.all().any(|m| m.spec.name == target || m.namespace == target) {
                return Err(ModelConfigError::Unknown {
                    name: target.to_owned(),
                    known: self.all().map(|m| m.spec.name.as_str()).collect(),
                });
            }
            types.insert(target.to_owned(), t);
        }
        for versions in self.models.values_mut() {
            for m in &mut versions.versions {
                let t = types.get(&m.namespace).or_else(|| types.get(m.spec.name.as_str()));
                m.tier_type = t.copied().unwrap_or(VectorType::F32);
                m.oov_packed = m.pack(&m.oov.clone());
            }
        }
        Ok(())
    }

    /// The current version of `name`.
    pub fn get(&self, name: &str) -> Option<&ServedModel> {
        self.models.get(name).map(ServedVersions::current)
    }

    /// Every served version of `name`.
    pub fn versions(&self, name: &str) -> Option<&ServedVersions> {
        self.models.get(name)
    }

    /// Every served version of every model.
    pub fn all(&self) -> impl Iterator<Item = &ServedModel> {
        self.models.values().flat_map(|v| v.versions.iter())
    }

    /// Makes `version` current for `name`. `Ok(true)` when that changed
    /// which version is current; `Err` with the served versions when this
    /// front does not serve it.
    pub fn set_current(&self, name: &str, version: &str) -> Result<bool, Vec<String>> {
        let Some(served) = self.models.get(name) else { return Err(Vec::new()) };
        let Some(i) = served.versions.iter().position(|m| m.spec.version == version) else {
            return Err(served.version_names().into_iter().map(str::to_owned).collect());
        };
        Ok(served.current.swap(i, Ordering::AcqRel) != i)
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.models.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// One entry per served version, by name then catalogue order; the
    /// coverage fields are the caller's to fill.
    pub fn infos(&self) -> Vec<ModelInfo> {
        let mut v: Vec<ModelInfo> = Vec::new();
        for name in self.names() {
            let served = &self.models[name];
            let current = served.current().spec.version.as_str();
            v.extend(served.versions.iter().map(|m| ModelInfo {
                name: m.spec.name.clone(),
                dim: m.spec.dim as u32,
                kind: match m.spec.kind {
                    ModelKind::Image => WireKind::Image,
                    ModelKind::Text => WireKind::Text,
                } as i32,
                version: m.spec.version.clone(),
                current: m.spec.version == current,
                ..ModelInfo::default()
            }));
        }
        v
    }
}

fn oov_row(spec: &ModelSpec, policy: &OovPolicy) -> Result<Arc<[f32]>, ModelConfigError> {
    match policy {
        OovPolicy::Zeros => Ok(vec![0f32; spec.dim].into()),
        OovPolicy::File(path) => {
            let err = |reason: String| ModelConfigError::OovFile {
                model: spec.name.clone(),
                path: path.display().to_string(),
                reason,
            };
            let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
            let values = text
                .split(|c: char| c.is_whitespace() || c == ',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<f32>().map_err(|e| err(format!("{s:?} is not a number: {e}"))))
                .collect::<Result<Vec<f32>, _>>()?;
            if values.len() != spec.dim {
                return Err(err(format!("{} values, the model's dim is {}", values.len(), spec.dim)));
            }
            if values.iter().any(|v| !v.is_finite()) {
                return Err(err("values must be finite".into()));
            }
            Ok(values.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minilm() -> &'static ModelSpec {
        retina::catalog::builtin().spec("minilm-l6-v2").expect("the built-in text model")
    }

    #[test]
    fn oov_defaults_to_zeros_and_reads_files() {
        let r = ModelRegistry::new(&[minilm()], &[]).expect("registry");
        assert!(r.get("minilm-l6-v2").expect("model").oov.iter().all(|v| *v == 0.0));

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("oov.txt");
        std::fs::write(&path, vec!["0.5"; 384].join(", ")).expect("write");
        let flag = format!("minilm-l6-v2={}", path.display());
        let r = ModelRegistry::new(&[minilm()], &[flag]).expect("registry");
        assert!(r.get("minilm-l6-v2").expect("model").oov.iter().all(|v| *v == 0.5));

        std::fs::write(&path, "1 2 3").expect("write");
        let flag = format!("minilm-l6-v2={}", path.display());
        let e = ModelRegistry::new(&[minilm()], &[flag]).expect_err("short file");
        assert!(e.to_string().contains("3 values, the model's dim is 384"), "{e}");
        assert!(ModelRegistry::new(&[minilm()], &["nope=x".into()]).is_err());
    }

    /// Review of issue 12: `--oov MODEL=PATH` applied to every version, so
    /// versions of different dims could not start with an OOV file. A flag
    /// may name one version (`MODEL@VERSION=PATH`).
    #[test]
    fn an_oov_flag_may_name_one_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wide: &'static ModelSpec =
            Box::leak(Box::new(ModelSpec { version: "wide".into(), dim: 8, current: true, ..minilm().clone() }));
        let (narrow_file, wide_file) = (dir.path().join("384.txt"), dir.path().join("8.txt"));
        std::fs::write(&narrow_file, vec!["0.5"; 384].join(" ")).expect("write");
        std::fs::write(&wide_file, ["0.25"; 8].join(" ")).expect("write");
        let flags = [
            format!("minilm-l6-v2@{}={}", minilm().version, narrow_file.display()),
            format!("minilm-l6-v2@wide={}", wide_file.display()),
        ];
        let r = ModelRegistry::new(&[minilm(), wide], &flags).expect("registry");
        let versions = r.versions("minilm-l6-v2").expect("served");
        assert!(versions.get(&minilm().version).expect("v1").oov.iter().all(|v| *v == 0.5));
        assert_eq!(versions.get("wide").expect("wide").oov.to_vec(), vec![0.25; 8]);
        // One flag for the model reaches every version: the 8-d one refuses a 384-d file.
        let e = ModelRegistry::new(&[minilm(), wide], &[format!("minilm-l6-v2={}", narrow_file.display())])
            .expect_err("dims differ");
        assert!(e.to_string().contains("the model's dim is 8"), "{e}");
        assert!(ModelRegistry::new(&[minilm()], &["minilm-l6-v2@nope=x".into()]).is_err(), "an unknown version");
    }

    #[test]
    fn a_catalogue_oov_file_is_used_unless_a_flag_overrides_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (entry, flag) = (dir.path().join("entry.txt"), dir.path().join("flag.txt"));
        std::fs::write(&entry, vec!["0.25"; 384].join(" ")).expect("write");
        std::fs::write(&flag, vec!["0.75"; 384].join(" ")).expect("write");
        let spec: &'static ModelSpec =
            Box::leak(Box::new(ModelSpec { oov_file: Some(entry.clone()), ..minilm().clone() }));
        let r = ModelRegistry::new(&[spec], &[]).expect("registry");
        assert!(r.get("minilm-l6-v2").expect("model").oov.iter().all(|v| *v == 0.25));
        let r = ModelRegistry::new(&[spec], &[format!("minilm-l6-v2={}", flag.display())]).expect("registry");
        assert!(r.get("minilm-l6-v2").expect("model").oov.iter().all(|v| *v == 0.75));
    }

    #[test]
    fn tier_types_name_a_served_model_and_a_known_type() {
        let mut r = ModelRegistry::new(&[minilm()], &[]).expect("registry");
        r.set_tier_types(&["minilm-l6-v2=f16".into()]).expect("f16");
        let m = r.get("minilm-l6-v2").expect("served");
        assert_eq!((m.tier_type, m.oov_packed.len()), (VectorType::F16, 384 * 2));
        for bad in ["minilm-l6-v2=f64", "minilm-l6-v2", "nope=f16", "minilm-l6-v2@nope=i8"] {
            assert!(r.set_tier_types(&[bad.into()]).is_err(), "{bad}");
        }
        let version = format!("minilm-l6-v2@{}", minilm().version);
        r.set_tier_types(&[format!("{version}=i8")]).expect("one version");
        let m = r.get("minilm-l6-v2").expect("served");
        assert_eq!((m.tier_type, m.oov_packed.len()), (VectorType::I8, 4 + 384));
    }
}
