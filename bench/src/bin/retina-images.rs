//! `retina-images`: EfficientNet-Lite0 throughput, candle vs PyTorch.
//!
//! For each batch size: images/s on preprocessed tensors (the network
//! alone) and end to end from encoded JPEGs (decode, Pillow-exact resize
//! and network; decoding parallel across the batch), then the same under
//! eager PyTorch on CPU (bench/python/torch_efficientnet.py, same weights,
//! same thread count), and the ratio.

use std::{
    io::Cursor,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use rayon::prelude::*;
use retina::{
    image_model::{EfficientNetLite0, INPUT_SIZE},
    preprocess,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8,16,32")]
    batches: Vec<usize>,
    /// Seconds timed per case (after two warm-up batches).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Threads for both (rayon for candle, torch.set_num_threads).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, env = "EMBARK_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Python with torch (scripts/bench-retina.sh makes this venv).
    #[arg(long, env = "TORCH_PYTHON")]
    torch_python: Option<PathBuf>,
    /// Skip the PyTorch run.
    #[arg(long)]
    no_torch: bool,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn timed(seconds: f64, mut f: impl FnMut() -> anyhow::Result<usize>) -> anyhow::Result<f64> {
    f()?;
    f()?;
    let (mut n, start) = (0usize, Instant::now());
    while start.elapsed() < Duration::from_secs_f64(seconds) {
        n += f()?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    rayon::ThreadPoolBuilder::new().num_threads(args.threads).build_global()?;
    let home = PathBuf::from(std::env::var_os("HOME").unwrap_or_default());
    let models = args.models_dir.clone().unwrap_or_else(|| home.join(".cache/embark/models"));
    let weights = models.join("efficientnet-lite0");
    let model = EfficientNetLite0::load(&weights).context("run scripts/setup-models.sh")?;

    // JPEGs: the fixture photos, re-encoded at quality 90 at their sizes.
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images");
    let dir = std::env::temp_dir().join(format!("embark-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut jpeg_paths = Vec::new();
    let mut jpegs = Vec::new();
    for f in ["cat.jpg", "coffee.webp", "astronaut.png", "rocket.bmp"] {
        let img = image::open(fixtures.join(f))?.to_rgb8();
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut out), 90).encode_image(&img)?;
        let path = dir.join(format!("{f}.jpg"));
        std::fs::write(&path, &out)?;
        jpeg_paths.push(path);
        jpegs.push(out);
    }

    let one: Vec<f32> = (0..INPUT_SIZE * INPUT_SIZE * 3).map(|i| (0.9 * (0.0137 * i as f64).sin()) as f32).collect();
    let limits = preprocess::DecodeLimits::default();
    let settings = retina::catalog::builtin()
        .spec("efficientnet-lite0")
        .and_then(|s| s.image.as_ref())
        .ok_or_else(|| anyhow::anyhow!("no image settings for efficientnet-lite0"))?;
    let mut rust = serde_json::Map::new();
    for &b in &args.batches {
        let tensor = one.repeat(b);
        let t = timed(args.seconds, || {
            model.embed(&tensor, b, INPUT_SIZE)?;
            Ok(b)
        })?;
        let e = timed(args.seconds, || {
            let pixels: Vec<Vec<f32>> = (0..b)
                .into_par_iter()
                .map(|i| preprocess::prepare(&jpegs[i % jpegs.len()], &limits, settings))
                .collect::<Result<_, _>>()?;
            model.embed(&pixels.concat(), b, INPUT_SIZE)?;
            Ok(b)
        })?;
        eprintln!("candle  batch {b:>2}: {t:7.1} img/s tensors, {e:7.1} img/s from JPEG");
        rust.insert(b.to_string(), serde_json::json!({ "tensor": t, "jpeg": e }));
    }

    let torch = if args.no_torch {
        None
    } else {
        let python = args.torch_python.clone().unwrap_or_else(|| home.join(".cache/embark/venv-torch/bin/python"));
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/torch_efficientnet.py");
        let batches = args.batches.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",");
        let out = Command::new(&python)
            .arg(&script)
            .arg(weights.join("model.safetensors"))
            .args(&jpeg_paths)
            .args([
                "--batches",
                &batches,
                "--seconds",
                &args.seconds.to_string(),
                "--threads",
                &args.threads.to_string(),
            ])
            .output()
            .with_context(|| format!("running {} (scripts/bench-retina.sh installs torch)", python.display()))?;
        anyhow::ensure!(out.status.success(), "torch run failed:\n{}", String::from_utf8_lossy(&out.stderr));
        Some(serde_json::from_slice::<serde_json::Value>(&out.stdout)?)
    };

    println!("\nEfficientNet-Lite0, {} threads, images/s (higher is better)", args.threads);
    println!("| batch | candle tensors | torch tensors | ratio | candle JPEG e2e | torch JPEG e2e | ratio |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for &b in &args.batches {
        let r = &rust[&b.to_string()];
        let (ct, ce) = (r["tensor"].as_f64().unwrap_or(0.0), r["jpeg"].as_f64().unwrap_or(0.0));
        let (tt, te) = match &torch {
            Some(t) => (
                t["tensor"][b.to_string()].as_f64().unwrap_or(f64::NAN),
                t["jpeg"][b.to_string()].as_f64().unwrap_or(f64::NAN),
            ),
            None => (f64::NAN, f64::NAN),
        };
        println!("| {b} | {ct:.1} | {tt:.1} | {:.2}x | {ce:.1} | {te:.1} | {:.2}x |", ct / tt, ce / te);
    }
    if let Some(t) = &torch {
        println!("\ntorch {} ({} threads)", t["torch"], t["threads"]);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&serde_json::json!({ "candle": rust, "torch": torch }))?)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
