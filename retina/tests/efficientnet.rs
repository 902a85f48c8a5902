//! EfficientNet-Lite0 against the independent numpy reference
//! (scripts/reference_efficientnet.py), on identical input tensors.

use std::path::PathBuf;

use retina::image_model::{DIM, EfficientNetLite0, INPUT_SIZE};

fn models_dir() -> PathBuf {
    std::env::var_os("EMBARK_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/embark/models"))
}

fn reference() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/efficientnet_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

fn model() -> EfficientNetLite0 {
    let dir = models_dir().join("efficientnet-lite0");
    EfficientNetLite0::load(&dir).unwrap_or_else(|e| panic!("{e}: run scripts/setup-models.sh"))
}

/// The reference's synthetic input, `0.9 * sin(0.0137 * i)` over CHW, as HWC.
fn synthetic() -> Vec<f32> {
    let s = INPUT_SIZE;
    let mut hwc = vec![0f32; s * s * 3];
    for c in 0..3 {
        for y in 0..s {
            for x in 0..s {
                let i = ((c * s + y) * s + x) as f64;
                hwc[(y * s + x) * 3 + c] = (0.9 * (0.0137 * i).sin()) as f32;
            }
        }
    }
    hwc
}

#[test]
fn the_network_equals_the_reference_on_identical_input() {
    let model = model();
    let want = floats(&reference()["synthetic"]["vector"]);
    assert_eq!(want.len(), DIM);
    // A batch of two: both rows must match (batching must not mix images).
    let mut two = synthetic();
    two.extend(synthetic());
    let got = model.embed(&two, 2, INPUT_SIZE).expect("embed").to_vec2::<f32>().expect("vec2");
    for row in &got {
        let c = cosine(row, &want);
        eprintln!("cosine to the numpy reference on identical input: {c:.7}");
        assert!(c >= 0.9999, "cosine {c}");
    }
}

/// End to end from the encoded fixture files (decoding and resizing
/// included) against the reference fed by Pillow.
#[test]
fn fixture_images_match_the_pillow_fed_reference_and_the_cat_is_a_cat() {
    let model = model();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images");
    let reference = reference();
    let cases = reference["images"].as_array().expect("images");
    assert!(cases.len() >= 5);
    for case in cases {
        let file = case["file"].as_str().expect("file");
        let bytes = std::fs::read(dir.join(file)).expect("fixture image");
        let pixels = retina::preprocess::prepare(&bytes, &Default::default(), image_settings()).expect("decodes");
        let pooled = model.embed(&pixels, 1, INPUT_SIZE).expect("embed");
        let got = pooled.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("vec");
        let c = cosine(&got, &floats(&case["vector"]));
        let lossy = file.ends_with(".jpg") || file.ends_with(".webp");
        let floor = if lossy { 0.99 } else { 0.995 };
        eprintln!("{file:18} cosine {c:.6} (floor {floor})");
        assert!(c >= floor, "{file}: cosine {c} < {floor}");
        if file == "cat.jpg" {
            let logits = model.classify(&pooled).expect("classify").flatten_all().expect("flat");
            let top = logits.argmax(0).and_then(|t| t.to_scalar::<u32>()).expect("argmax");
            // ImageNet 281..=285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
            assert!((281..=285).contains(&top), "cat.jpg classified as ImageNet class {top}");
        }
    }
}

/// The shipped catalogue's preprocessing of the model.
fn image_settings() -> &'static retina::catalog::ImageSettings {
    retina::catalog::builtin().spec("efficientnet-lite0").and_then(|s| s.image.as_ref()).expect("image settings")
}
