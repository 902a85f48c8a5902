//! Benchmark (not a test): how long a miss stays a miss on `embark up`, next
//! to the model's own inference time, measured in the same run.
//!
//! For each model, K fresh keys one at a time: a Lookup answers
//! OOV_PENDING at t0; the same Lookup is repeated every `--poll-ms` until it
//! answers STORE or CACHE at t1. Miss-to-fill is t1 - t0 (p50, p99). The
//! model's time is one `Engine::embed` of one input, in this process, on
//! the same weights (images are served from the test fixtures over loopback
//! HTTP in both cases).
//!
//! `scripts/bench-lookup.sh` runs it (with its defaults) after the Lookup
//! benchmark; the script's arguments go to `lookup-bench`, not here. Or run
//! it directly after a release build.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use embark_proto::embark::v1::{LookupRequest, Source, emb_ark_client::EmbArkClient};
use embark_tests::{KillOnDrop, free_port, http_fixtures::ImageServer, models_dir};
use hdrhistogram::Histogram;

#[derive(Debug, Parser)]
struct Args {
    /// Fresh keys per model.
    #[arg(long, default_value_t = 50)]
    keys: usize,
    /// How often a pending key is looked up again, in milliseconds.
    #[arg(long, default_value_t = 2)]
    poll_ms: u64,
    /// Where `embark` is (default: next to this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(args))
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().context("exe dir")?.to_path_buf(),
    };
    let images = ImageServer::start().await?;
    let data = tempfile::tempdir()?;
    let port = free_port();
    let _embark = KillOnDrop(
        Command::new(bin_dir.join("embark"))
            .arg("up")
            .arg("--data-dir")
            .arg(data.path())
            .arg("--models-dir")
            .arg(models_dir())
            .args(["--listen", &format!("127.0.0.1:{port}"), "--metrics-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--fetch-allow-nets", "127.0.0.0/8"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("starting embark up")?,
    );
    let started = Instant::now();
    let mut client = loop {
        if let Ok(c) = EmbArkClient::connect(format!("http://127.0.0.1:{port}")).await {
            break c.max_decoding_message_size(64 << 20);
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("embark up did not start within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // The model's own time, in this process, same weights and inputs.
    let engine = {
        let dir = models_dir();
        let specs = retina::catalog::builtin().select(&[]).map_err(anyhow::Error::msg)?;
        let config = retina::EngineConfig {
            fetch: retina::fetch::FetchConfig {
                allow: vec!["127.0.0.0/8".parse()?],
                ..retina::fetch::FetchConfig::default()
            },
            ..retina::EngineConfig::default()
        };
        tokio::task::spawn_blocking(move || retina::Engine::load(&dir, &specs, config)).await??
    };

    println!("miss-to-fill on `embark up`, {} fresh keys per model, polled every {} ms", args.keys, args.poll_ms);
    println!("  {:<20} {:>12} {:>12} {:>14}", "model", "fill p50 ms", "fill p99 ms", "model p50 ms");
    for model in ["minilm-l6-v2", "efficientnet-lite0"] {
        let input = |i: usize| match model {
            "minilm-l6-v2" => format!("a fresh product title number {i} for the miss-to-fill benchmark"),
            _ => images.url(&format!("/img/cat.jpg?fresh={i}")),
        };
        let mut model_time = Histogram::<u64>::new(3)?;
        for i in 0..args.keys.min(20) {
            let t = Instant::now();
            let r = engine.embed(model, vec![input(1_000_000 + i)]).await?;
            anyhow::ensure!(r.iter().all(Result::is_ok), "the model failed on its own input");
            model_time.record(t.elapsed().as_micros() as u64)?;
        }
        let mut fill = Histogram::<u64>::new(3)?;
        for i in 0..args.keys {
            let req = || LookupRequest { model: model.into(), keys: vec![input(i)], ..Default::default() };
            let first = client.lookup(req()).await?.into_inner();
            anyhow::ensure!(first.sources == vec![Source::OovPending as i32], "key {i} was not new");
            let t0 = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(args.poll_ms)).await;
                let r = client.lookup(req()).await?.into_inner();
                if r.sources.iter().all(|s| *s == Source::Store as i32 || *s == Source::Cache as i32) {
                    break;
                }
                anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "key {i} not filled within 60 s");
            }
            fill.record(t0.elapsed().as_micros() as u64)?;
        }
        println!("  {:<20} {:>12.1} {:>12.1} {:>14.1}", model, ms(&fill, 0.5), ms(&fill, 0.99), ms(&model_time, 0.5));
    }
    Ok(())
}
