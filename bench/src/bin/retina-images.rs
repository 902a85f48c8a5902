//! `retina-images`: EfficientNet-Lite0 throughput on Retina's two engines
//! against onnxruntime and PyTorch, in one run.
//!
//! For each batch size: images/s on preprocessed tensors (the network
//! alone) and end to end from encoded JPEGs (decode, Pillow-exact resize
//! and network; decoding parallel across the batch), both in turn (decode a
//! batch, then embed it) and pipelined as Retina runs (the next batch
//! decodes while the network embeds this one), for
//! - Retina's candle engine (the shipped safetensors),
//! - Retina's ONNX engine (ONNX Runtime through `ort`, on the graph
//!   `scripts/export_efficientnet_onnx.py` exports from the same weights),
//! - onnxruntime from Python on the same graph, graph optimisations on
//!   (bench/python/ort_efficientnet.py),
//! - PyTorch on CPU at its fastest of eager and BatchNorm-folded
//!   channels_last, under inference mode (bench/python/torch_efficientnet.py),
//!
//! all at the same thread count, with the ratios against onnxruntime.

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
    /// Retina's cases are timed in this many alternating rounds of
    /// `seconds / rounds` each (median reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Threads for both (rayon for candle, torch.set_num_threads).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, env = "EMBARK_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Python with torch (scripts/bench-retina.sh makes this venv).
    #[arg(long, env = "TORCH_PYTHON")]
    torch_python: Option<PathBuf>,
    /// Skip Retina's candle engine.
    #[arg(long)]
    no_candle: bool,
    /// Skip the PyTorch run.
    #[arg(long)]
    no_torch: bool,
    /// ONNX Runtime's library for Retina's ONNX engine
    /// (scripts/setup-onnxruntime.sh).
    #[arg(long, env = "EMBARK_ONNXRUNTIME_LIB")]
    onnxruntime_lib: Option<PathBuf>,
    /// Python with onnxruntime, numpy and Pillow (scripts/bench-retina.sh
    /// makes this venv); default: the torch venv's.
    #[arg(long, env = "ORT_PYTHON")]
    ort_python: Option<PathBuf>,
    /// Skip the ONNX runs (Retina's engine and onnxruntime's Python).
    #[arg(long)]
    no_onnx: bool,
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

/// Images/s from JPEG as Retina runs it: decoding (parallel across the
/// batch, on the rayon pool) in one thread while the network embeds the
/// previous batch in another, one batch queued between them, as Retina's
/// decode tasks feed its engine thread. `prepare` makes a batch, `embed`
/// runs the network on it and returns its size.
fn pipelined<P: Send>(
    seconds: f64,
    prepare: &(impl Fn() -> anyhow::Result<P> + Sync),
    mut embed: impl FnMut(P) -> anyhow::Result<usize>,
) -> anyhow::Result<f64> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<anyhow::Result<P>>(1);
        // Stops at its next send once the receiver is gone.
        scope.spawn(move || while tx.send(prepare()).is_ok() {});
        let next = || rx.recv().context("the decoding thread stopped")?;
        timed(seconds, || embed(next()?))
    })
}

/// Images/s of one engine at batch `b` three ways: on tensors (`one`
/// repeated), from JPEG in turn (decode a batch, then embed it) and from
/// JPEG pipelined. The three are timed in alternation, `--rounds` times
/// each for `--seconds / --rounds`, and each figure is the median of its
/// rounds: a shared VM's slow and fast moments then fall on all three, and
/// their ratios hold still where back-to-back runs of seconds each differed
/// by a third.
fn three_ways(
    args: &Args,
    b: usize,
    one: &[f32],
    prepare: impl Fn() -> anyhow::Result<Vec<f32>> + Sync,
    mut embed: impl FnMut(Vec<f32>) -> anyhow::Result<()>,
) -> anyhow::Result<serde_json::Value> {
    let slice = args.seconds / args.rounds.max(1) as f64;
    let mut runs: [Vec<f64>; 3] = Default::default();
    for _ in 0..args.rounds.max(1) {
        runs[0].push(timed(slice, || embed(one.repeat(b)).map(|()| b))?);
        runs[1].push(timed(slice, || embed(prepare()?).map(|()| b))?);
        runs[2].push(pipelined(slice, &prepare, |pixels| embed(pixels).map(|()| b))?);
    }
    let [t, e, p] = runs.map(|mut r| {
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    });
    Ok(serde_json::json!({ "tensor": t, "jpeg": e, "jpeg_pipelined": p }))
}

/// `b` of the JPEGs decoded and preprocessed (in parallel on the rayon
/// pool), as one NCHW batch.
fn prepared_batch(
    jpegs: &[Vec<u8>],
    b: usize,
    limits: &preprocess::DecodeLimits,
    settings: &retina::catalog::ImageSettings,
) -> anyhow::Result<Vec<f32>> {
    let pixels: Vec<Vec<f32>> = (0..b)
        .into_par_iter()
        .map(|i| preprocess::prepare(&jpegs[i % jpegs.len()], limits, settings))
        .collect::<Result<_, _>>()?;
    Ok(pixels.concat())
}

/// What every Python peer is run with.
struct PeerArgs<'a> {
    jpegs: &'a [PathBuf],
    batches: &'a [usize],
    seconds: f64,
    threads: usize,
}

/// Runs `bench/python/<script>` on `model` under `python` and reads the
/// JSON object it prints (`package` names what scripts/bench-retina.sh
/// installs for it, in the error).
fn run_peer(
    python: &std::path::Path,
    script: &str,
    model: &std::path::Path,
    a: &PeerArgs<'_>,
    package: &str,
) -> anyhow::Result<serde_json::Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python").join(script);
    let batches = a.batches.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",");
    let out = Command::new(python)
        .arg(&script)
        .arg(model)
        .args(a.jpegs)
        .args(["--batches", &batches, "--seconds", &a.seconds.to_string(), "--threads", &a.threads.to_string()])
        .output()
        .with_context(|| format!("running {} (scripts/bench-retina.sh installs {package})", python.display()))?;
    anyhow::ensure!(out.status.success(), "{package} run failed:\n{}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
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
    for &b in args.batches.iter().filter(|_| !args.no_candle) {
        let figures = three_ways(
            &args,
            b,
            &one,
            || prepared_batch(&jpegs, b, &limits, settings),
            |pixels| {
                model.embed(&pixels, b, INPUT_SIZE)?;
                Ok(())
            },
        )?;
        eprintln!("candle  batch {b:>2}: {figures}");
        rust.insert(b.to_string(), figures);
    }
    drop(model);

    // Retina's ONNX engine, on the graph of examples/models.toml's
    // `efficientnet-lite0-onnx` entry (scripts/setup-example-model.sh).
    let onnx_graph = models.join("efficientnet-lite0-onnx/model.onnx");
    let mut onnx = serde_json::Map::new();
    if !args.no_onnx {
        let catalog = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models.toml");
        let catalog = retina::catalog::Catalog::load(Some(&catalog))?;
        let spec = catalog.spec("efficientnet-lite0-onnx").context("the example catalogue's ONNX image entry")?;
        let image = spec.image.as_ref().context("image settings")?;
        let graph = spec.weights.read_checked(&models).context("run scripts/setup-example-model.sh")?;
        let lib =
            args.onnxruntime_lib.clone().unwrap_or_else(|| home.join(".cache/embark/onnxruntime/libonnxruntime.so"));
        let mut encoder = retina::onnx::OnnxImageEncoder::load(&lib, &graph, spec, image)
            .with_context(|| format!("loading ONNX Runtime from {} (scripts/setup-onnxruntime.sh)", lib.display()))?;
        for &b in &args.batches {
            let figures = three_ways(
                &args,
                b,
                &one,
                || prepared_batch(&jpegs, b, &limits, image),
                |pixels| {
                    encoder.embed(pixels, b)?;
                    Ok(())
                },
            )?;
            eprintln!("onnx    batch {b:>2}: {figures}");
            onnx.insert(b.to_string(), figures);
        }
    }
    // The Python peers: same JPEGs, batches, seconds and threads.
    let default_python = home.join(".cache/embark/venv-torch/bin/python");
    let peer_args =
        PeerArgs { jpegs: &jpeg_paths, batches: &args.batches, seconds: args.seconds, threads: args.threads };
    let ort_python = if args.no_onnx {
        None
    } else {
        let python = args.ort_python.as_ref().or(args.torch_python.as_ref()).unwrap_or(&default_python);
        Some(run_peer(python, "ort_efficientnet.py", &onnx_graph, &peer_args, "onnxruntime")?)
    };
    let torch = if args.no_torch {
        None
    } else {
        let python = args.torch_python.as_ref().unwrap_or(&default_python);
        Some(run_peer(python, "torch_efficientnet.py", &weights.join("model.safetensors"), &peer_args, "torch")?)
    };

    // Every engine side by side, per batch: images/s on tensors and from
    // JPEG, the ratio of each to onnxruntime's (Python) on tensors, and
    // each engine's JPEG speed as a share of its own tensor speed.
    let peer = |v: &Option<serde_json::Value>, what: &str, b: usize| {
        v.as_ref().and_then(|t| t[what][b.to_string()].as_f64()).unwrap_or(f64::NAN)
    };
    let ours = |m: &serde_json::Map<String, serde_json::Value>, what: &str, b: usize| {
        m.get(&b.to_string()).and_then(|r| r[what].as_f64()).unwrap_or(f64::NAN)
    };
    println!("\nEfficientNet-Lite0, {} threads, images/s (higher is better)", args.threads);
    println!(
        "| batch | engine | tensors | vs onnxruntime | from JPEG, in turn | JPEG / tensors | from JPEG, pipelined | pipelined / tensors |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for &b in &args.batches {
        let reference = peer(&ort_python, "tensor", b);
        let torch_config = torch.as_ref().and_then(|t| t["config"][b.to_string()].as_str()).unwrap_or("?");
        // The Python peers decode in turn only (no pipelined figure).
        let rows = [
            (
                "Retina candle".to_owned(),
                ours(&rust, "tensor", b),
                ours(&rust, "jpeg", b),
                ours(&rust, "jpeg_pipelined", b),
            ),
            (
                "Retina ONNX (ort)".to_owned(),
                ours(&onnx, "tensor", b),
                ours(&onnx, "jpeg", b),
                ours(&onnx, "jpeg_pipelined", b),
            ),
            ("onnxruntime (Python)".to_owned(), reference, peer(&ort_python, "jpeg", b), f64::NAN),
            (format!("PyTorch ({torch_config})"), peer(&torch, "tensor", b), peer(&torch, "jpeg", b), f64::NAN),
        ];
        for (name, t, e, p) in rows {
            println!(
                "| {b} | {name} | {t:.1} | {:.2}x | {e:.1} | {:.2} | {p:.1} | {:.2} |",
                t / reference,
                e / t,
                p / t
            );
        }
    }
    if let Some(t) = &torch {
        println!("\ntorch {} ({} threads); its configurations on tensors: {}", t["torch"], t["threads"], t["configs"]);
    }
    if let Some(o) = &ort_python {
        println!("onnxruntime {} ({} threads, ORT_ENABLE_ALL)", o["onnxruntime"], o["threads"]);
    }
    if let Some(path) = &args.json {
        let all = serde_json::json!({ "candle": rust, "onnx": onnx, "onnxruntime": ort_python, "torch": torch });
        std::fs::write(path, serde_json::to_string_pretty(&all)?)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
