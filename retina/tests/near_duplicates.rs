//! Are EfficientNet-Lite0 vectors good for near-duplicate detection? From
//! 22 distinct photos (tests/fixtures/photos, scripts/make_photo_fixtures.py)
//! this makes four near-duplicates each — resized to 60%, recompressed as
//! JPEG quality 40, a 10% crop, a small watermark-like overlay — embeds all
//! 110 images through Retina's own decode and preprocessing, and checks that
//! every near-duplicate pair scores above every pair of distinct photos.
//! It prints the ROC AUC (goal >= 0.99) and the score ranges that
//! docs/similarity.md quotes.

use std::{io::Cursor, path::PathBuf};

use image::{ImageFormat, Rgb, RgbImage, codecs::jpeg::JpegEncoder, imageops::FilterType};
use retina::{
    image_model::EfficientNetLite0,
    preprocess::{DecodeLimits, prepare},
};

fn models_dir() -> PathBuf {
    std::env::var_os("EMBARK_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/embark/models"))
}

fn jpeg(img: &RgbImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, quality).encode_image(img).expect("encode jpeg");
    out
}

fn png(img: &RgbImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).expect("encode png");
    out.into_inner()
}

/// The four near-duplicates of a photo, encoded as a site would serve them.
fn variants(img: &RgbImage) -> Vec<(&'static str, Vec<u8>)> {
    let (w, h) = img.dimensions();
    let resized = image::imageops::resize(img, (w * 3 / 5).max(1), (h * 3 / 5).max(1), FilterType::Triangle);
    // 10% of the area off: 5% of width and height from every side.
    let (cx, cy) = (w / 20, h / 20);
    let cropped = image::imageops::crop_imm(img, cx, cy, w - 2 * cx, h - 2 * cy).to_image();
    // A light box with a dark border over the bottom-right corner, a fifth
    // of the width by a tenth of the height (a watermark or a price tag).
    let mut overlaid = img.clone();
    let (bw, bh) = (w / 5, h / 10);
    for y in h - bh - h / 40..h - h / 40 {
        for x in w - bw - w / 40..w - w / 40 {
            let border =
                y < h - bh - h / 40 + 2 || y >= h - h / 40 - 2 || x < w - bw - w / 40 + 2 || x >= w - w / 40 - 2;
            let p = overlaid.get_pixel_mut(x, y);
            *p = if border {
                Rgb([20, 20, 20])
            } else {
                Rgb([(p[0] as u16 / 3 + 170) as u8, (p[1] as u16 / 3 + 170) as u8, (p[2] as u16 / 3 + 170) as u8])
            };
        }
    }
    vec![
        ("resized", png(&resized)),
        ("jpeg-q40", jpeg(img, 40)),
        ("crop-10%", png(&cropped)),
        ("overlay", png(&overlaid)),
    ]
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn unit(v: Vec<f32>) -> Vec<f32> {
    let n = dot(&v, &v).sqrt();
    v.into_iter().map(|x| x / n).collect()
}

#[test]
fn near_duplicates_score_above_every_distinct_pair() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/photos");
    let mut photos: Vec<PathBuf> =
        std::fs::read_dir(&dir).expect("tests/fixtures/photos").map(|e| e.expect("entry").path()).collect();
    photos.sort();
    assert!(photos.len() >= 20, "{} photos; the test needs at least 20 distinct ones", photos.len());

    // (photo index, label, encoded bytes)
    let mut items: Vec<(usize, String, Vec<u8>)> = Vec::new();
    for (i, path) in photos.iter().enumerate() {
        let bytes = std::fs::read(path).expect("read photo");
        let img: RgbImage = image::load_from_memory(&bytes).expect("decode fixture").to_rgb8();
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("?").to_owned();
        items.push((i, format!("{name}/original"), bytes));
        for (what, b) in variants(&img) {
            items.push((i, format!("{name}/{what}"), b));
        }
    }

    let model = EfficientNetLite0::load(&models_dir().join("efficientnet-lite0"))
        .unwrap_or_else(|e| panic!("{e}: run scripts/setup-models.sh"));
    let limits = DecodeLimits::default();
    let settings =
        retina::catalog::builtin().spec("efficientnet-lite0").and_then(|s| s.image.as_ref()).expect("image settings");
    let mut vectors: Vec<Vec<f32>> = Vec::new();
    for chunk in items.chunks(16) {
        let mut pixels = Vec::new();
        for (_, label, bytes) in chunk {
            pixels.extend(prepare(bytes, &limits, settings).unwrap_or_else(|e| panic!("{label}: {e}")));
        }
        let out = model.embed(&pixels, chunk.len(), 224).expect("embed").to_vec2::<f32>().expect("vec2");
        vectors.extend(out.into_iter().map(unit));
    }

    let (mut positives, mut negatives) = (Vec::new(), Vec::new());
    for a in 0..items.len() {
        for b in a + 1..items.len() {
            let s = dot(&vectors[a], &vectors[b]);
            if items[a].0 == items[b].0 { positives.push((s, a, b)) } else { negatives.push((s, a, b)) }
        }
    }
    let cmp = |x: &&(f32, usize, usize), y: &&(f32, usize, usize)| x.0.total_cmp(&y.0);
    let lowest_positive = *positives.iter().min_by(cmp).expect("positives");
    let highest_negative = *negatives.iter().max_by(cmp).expect("negatives");
    // ROC AUC: the chance that a near-duplicate pair outscores a distinct pair.
    let mut wins = 0f64;
    for p in &positives {
        for n in &negatives {
            wins += if p.0 > n.0 {
                1.0
            } else if p.0 == n.0 {
                0.5
            } else {
                0.0
            };
        }
    }
    let auc = wins / (positives.len() * negatives.len()) as f64;
    let mean = |v: &[(f32, usize, usize)]| v.iter().map(|x| x.0 as f64).sum::<f64>() / v.len() as f64;
    eprintln!(
        "efficientnet-lite0 near-duplicates: {} photos, {} near-duplicate pairs, {} distinct pairs",
        photos.len(),
        positives.len(),
        negatives.len()
    );
    eprintln!(
        "ROC AUC {auc:.4}; near-duplicate scores {:.3}..{:.3} (mean {:.3}); distinct {:.3}..{:.3} (mean {:.3})",
        lowest_positive.0,
        positives.iter().max_by(cmp).expect("positives").0,
        mean(&positives),
        negatives.iter().min_by(cmp).expect("negatives").0,
        highest_negative.0,
        mean(&negatives)
    );
    for kind in ["resized", "jpeg-q40", "crop-10%", "overlay"] {
        let of_kind: Vec<f32> = positives
            .iter()
            .filter(|(_, a, b)| items[*a].1.ends_with("/original") && items[*b].1.ends_with(kind))
            .map(|p| p.0)
            .collect();
        let min = of_kind.iter().copied().fold(f32::INFINITY, f32::min);
        eprintln!("  original vs {kind:<9} lowest {min:.3}");
    }
    eprintln!(
        "lowest near-duplicate pair {} ~ {} ({:.3}); highest distinct pair {} ~ {} ({:.3})",
        items[lowest_positive.1].1,
        items[lowest_positive.2].1,
        lowest_positive.0,
        items[highest_negative.1].1,
        items[highest_negative.2].1,
        highest_negative.0
    );
    assert!(auc >= 0.99, "ROC AUC {auc:.4} is below the goal of 0.99");
    assert!(
        lowest_positive.0 > highest_negative.0,
        "a near-duplicate pair ({:.3}) scores below a distinct pair ({:.3})",
        lowest_positive.0,
        highest_negative.0
    );
}
