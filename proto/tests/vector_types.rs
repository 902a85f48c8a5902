//! The cosine of each compact Lookup type to float32 on real vectors: the
//! reference vectors of the shipped models' fixtures (8 photos through
//! EfficientNet-Lite0, 1280-d; 5 texts through MiniLM-L6, 384-d; 3 through
//! paraphrase-MiniLM-L3, 384-d, unnormalised). docs/vector-types.md quotes
//! what this prints (`cargo test -p embark-proto --test vector_types --
//! --nocapture`).

use std::path::PathBuf;

use embark_proto::{
    embark::v1::VectorType,
    vectors::{pack, type_name, unpack},
};

fn fixture(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("json")
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

#[test]
fn compact_types_keep_the_direction_of_real_vectors() {
    let sets: [(&str, Vec<Vec<f32>>); 3] = [
        (
            "efficientnet-lite0 (8 photos)",
            fixture("efficientnet_reference.json")["images"]
                .as_array()
                .expect("images")
                .iter()
                .map(|i| floats(&i["vector"]))
                .collect(),
        ),
        (
            "minilm-l6-v2 (5 texts)",
            fixture("minilm_reference.json")["cases"]
                .as_array()
                .expect("cases")
                .iter()
                .map(|c| floats(&c["vector"]))
                .collect(),
        ),
        (
            "paraphrase-minilm-l3-v2 (3 texts)",
            fixture("paraphrase_minilm_l3_reference.json")["items"]
                .as_array()
                .expect("items")
                .iter()
                .map(|c| floats(&c["mean_pooled_unnormalised"]))
                .collect(),
        ),
    ];
    // The floors the docs promise.
    let floors = [(VectorType::F16, 0.9999), (VectorType::Bf16, 0.999), (VectorType::I8, 0.999)];
    println!("| model | f16 | bf16 | i8 |  (lowest cosine to f32)");
    for (name, rows) in &sets {
        assert!(!rows.is_empty() && rows.iter().all(|r| r.len() >= 384), "{name}");
        let mut line = format!("| {name} |");
        for (t, floor) in floors {
            let worst = rows
                .iter()
                .map(|row| {
                    let mut packed = Vec::new();
                    pack(t, row, &mut packed);
                    let mut back = Vec::new();
                    assert!(unpack(t, &packed, row.len(), &mut back));
                    cosine(row, &back)
                })
                .fold(1.0f64, f64::min);
            assert!(worst >= floor, "{name} {}: cosine {worst} < {floor}", type_name(t));
            line.push_str(&format!(" {worst:.9} |"));
        }
        println!("{line}");
    }
}
