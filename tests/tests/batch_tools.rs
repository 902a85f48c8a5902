//! The batch tools on real processes and the real text model:
//! - `embark backfill` of 1,000 keys, interrupted (SIGINT) and resumed,
//!   embeds each key once and reports failures by code;
//! - `embark export` round-trips: `vectors.npy` (read here and by NumPy),
//!   `keys.jsonl` and `embeddings.parquet` equal the stored vectors;
//! - `embark up` on that store answers `Similar` from the loaded index
//!   (HNSW), indexes vectors filled afterwards, and forgets invalidated ones;
//! - `embark dedup` finds planted near-duplicate pairs, exactly and
//!   through HNSW, and nothing else.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use embark_proto::embark::v1::{InvalidateRequest, LookupRequest, SimilarRequest, Source, similar_request::Query};
use embark_store::{EmbeddingStore, StoredRow, embedded::EmbeddedStore};
use embark_tests::{KillOnDrop, Server, binary, eventually, models_dir};
use parquet::record::{ListAccessor, RowAccessor};

const MODEL: &str = "minilm-l6-v2";
const DIM: usize = 384;

fn catalogue() -> Vec<String> {
    let colours = ["red", "blue", "green", "black", "white", "yellow", "grey", "pink", "brown", "orange"];
    let things = ["bicycle", "sofa", "lamp", "jacket", "kettle", "guitar", "backpack", "watch", "chair", "camera"];
    let extras = [
        "for sale",
        "barely used",
        "with free delivery",
        "in original box",
        "like new",
        "vintage",
        "for kids",
        "large size",
        "small size",
        "on discount",
    ];
    let mut keys = Vec::new();
    for c in colours {
        for t in things {
            for e in extras {
                keys.push(format!("{c} {t} {e}"));
            }
        }
    }
    keys
}

/// Runs a tool to completion (bounded), returning (exit code, stdout).
fn run_tool(args: &[&str]) -> anyhow::Result<(i32, String)> {
    let out = Command::new(binary("embark"))
        .args(args)
        .env("EMBARK_MODELS_DIR", models_dir())
        .stdin(Stdio::null())
        .output()
        .context("running embark")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.code().is_some(),
        "killed by a signal: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), stdout + &String::from_utf8_lossy(&out.stderr)))
}

fn summary(output: &str) -> anyhow::Result<serde_json::Value> {
    let line = output.lines().find(|l| l.starts_with('{')).with_context(|| format!("no JSON summary in:\n{output}"))?;
    Ok(serde_json::from_str(line)?)
}

/// Backfill, SIGINT once it has made progress, wait for its summary.
fn interrupted_backfill(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut child = KillOnDrop(
        Command::new(binary("embark"))
            .args(args)
            .env("EMBARK_MODELS_DIR", models_dir())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let stderr = child.0.stderr.take().context("stderr")?;
    let started = Instant::now();
    let mut seen = String::new();
    let mut lines = BufReader::new(stderr);
    loop {
        let mut line = String::new();
        if lines.read_line(&mut line)? == 0 {
            anyhow::bail!("backfill ended before reporting progress:\n{seen}");
        }
        seen.push_str(&line);
        // `progress ... done=N`: interrupt after the first progress report.
        if line.contains("progress") && line.contains("done=") {
            let ok = Command::new("kill").arg("-INT").arg(child.0.id().to_string()).status()?.success();
            anyhow::ensure!(ok, "kill -INT failed");
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(120), "no progress report:\n{seen}");
    }
    // Keep draining stderr: the tool must be able to log its way out.
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut lines, &mut rest);
        rest
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.0.try_wait()? {
            break s;
        }
        anyhow::ensure!(Instant::now() < deadline, "backfill did not stop after SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.0.stdout.take().context("stdout")?, &mut stdout)?;
    seen.push_str(&rest.join().unwrap_or_default());
    assert_eq!(status.code(), Some(130), "an interrupted backfill exits 130:\n{stdout}\n{seen}");
    summary(&stdout)
}

fn read_npy(path: &Path) -> anyhow::Result<(usize, usize, Vec<f32>)> {
    let bytes = std::fs::read(path)?;
    anyhow::ensure!(bytes.starts_with(b"\x93NUMPY\x01\x00"), "not an .npy v1.0 file");
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len])?;
    anyhow::ensure!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"), "{header}");
    let shape = header.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).context("shape")?;
    let dims: Vec<usize> =
        shape.split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse()).collect::<Result<_, _>>()?;
    let data = embark_proto::f32_from_le(&bytes[10 + len..]).context("not whole float32s")?;
    Ok((dims[0], dims[1], data))
}

fn client_python() -> Option<PathBuf> {
    let cache = std::env::var_os("EMBARK_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/embark"));
    let python = cache.join("venv-client/bin/python");
    python.exists().then_some(python)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_resumes_export_round_trips_and_similar_serves_the_store() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let data_dir = data.to_str().context("utf-8")?;
    let mut keys = catalogue();
    assert_eq!(keys.len(), 1000);
    // Three inputs the text model refuses (over its 64 KiB input limit).
    let refused: Vec<String> = (0..3).map(|i| format!("{i}{}", "x".repeat(70_000))).collect();
    let input = tmp.path().join("keys.txt");
    let mut text = keys.join("\n");
    text.push_str("\nred bicycle for sale\n\n"); // a duplicate line and a blank one
    text.push_str(&refused.join("\n"));
    std::fs::write(&input, text)?;
    let input = input.to_str().context("utf-8")?;

    // 1. Interrupted part-way, then resumed: each key embedded exactly once.
    let args = [
        "backfill",
        "--model",
        MODEL,
        "--input",
        input,
        "--data-dir",
        data_dir,
        "--batch",
        "4",
        "--concurrency",
        "1",
        "--json",
    ];
    let first = interrupted_backfill(&args)?;
    assert_eq!(first["interrupted"], true, "{first}");
    let done_first = first["embedded"].as_u64().context("embedded")?;
    assert!(done_first > 0 && first["not_reached"].as_u64() > Some(0), "{first}");
    assert_eq!(first["duplicate_lines"], 1);
    let (code, out) = run_tool(&args)?;
    assert_eq!(code, 0, "{out}");
    let second = summary(&out)?;
    let failed_first =
        first["failed"].as_object().map(|m| m.values().filter_map(|v| v.as_u64()).sum::<u64>()).unwrap_or(0);
    assert_eq!(
        second["already_stored"].as_u64(),
        Some(done_first),
        "the resumed run skips what the first stored: {second}"
    );
    assert_eq!(done_first + second["embedded"].as_u64().unwrap_or(0), 1000, "{first}\n{second}");
    assert_eq!(second["already_failed"].as_u64(), Some(failed_first));
    let failed_second: u64 =
        second["failed"].as_object().map(|m| m.values().filter_map(|v| v.as_u64()).sum()).unwrap_or(0);
    assert_eq!(failed_first + failed_second, 3, "refused inputs are reported by code: {first}\n{second}");
    // A third run has nothing to do.
    let (code, out) = run_tool(&args)?;
    assert_eq!(code, 0, "{out}");
    let third = summary(&out)?;
    assert_eq!((third["embedded"].as_u64(), third["already_stored"].as_u64()), (Some(0), Some(1000)), "{third}");
    // The human summary names the failure code.
    let (_, human) = run_tool(&args[..args.len() - 1])?;
    assert!(human.contains("already failed   3"), "{human}");

    // 2. Export: .npy + keys.jsonl + Parquet equal the stored vectors.
    let out_dir = tmp.path().join("export");
    let (code, out) = run_tool(&[
        "export",
        "--model",
        MODEL,
        "--out",
        out_dir.to_str().context("utf-8")?,
        "--data-dir",
        data_dir,
        "--page",
        "64",
        "--row-group",
        "300",
    ])?;
    assert_eq!(code, 0, "{out}");
    let (rows, dim, flat) = read_npy(&out_dir.join("vectors.npy"))?;
    assert_eq!((rows, dim, flat.len()), (1000, DIM, 1000 * DIM));
    let exported_keys: Vec<String> = std::fs::read_to_string(out_dir.join("keys.jsonl"))?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(exported_keys.len(), 1000);
    {
        let store = EmbeddedStore::open(&data.join("embark.redb"))?;
        let stored = store.get_many(&embark_tests::stored_as(MODEL), &exported_keys).await?;
        for (i, row) in stored.iter().enumerate() {
            match row {
                Some(StoredRow::Vector { vector, .. }) => {
                    assert_eq!(vector.as_slice(), &flat[i * DIM..(i + 1) * DIM], "row {i} ({})", exported_keys[i])
                }
                other => panic!("{}: {other:?}", exported_keys[i]),
            }
        }
        let mut sorted = exported_keys.clone();
        sorted.sort();
        keys.sort();
        assert_eq!(sorted, keys, "every stored key once, failures left out");
    }
    // Parquet: same keys and vectors, row for row.
    let reader =
        parquet::file::reader::SerializedFileReader::new(std::fs::File::open(out_dir.join("embeddings.parquet"))?)?;
    let mut n = 0;
    for row in parquet::file::reader::FileReader::get_row_iter(&reader, None)? {
        let row = row?;
        let key = row.get_string(0)?;
        let list = row.get_list(1)?;
        let vector: Vec<f32> = (0..list.len()).map(|j| list.get_float(j)).collect::<Result<_, _>>()?;
        assert_eq!(key, &exported_keys[n]);
        assert_eq!(vector.as_slice(), &flat[n * DIM..(n + 1) * DIM]);
        n += 1;
    }
    assert_eq!(n, 1000);
    assert!(!out_dir.join(".export-checkpoint.json").exists(), "a finished export leaves no checkpoint");
    // NumPy loads it as trainers would (when the client venv is installed).
    if let Some(python) = client_python() {
        let script = "import json,sys,numpy as np; v=np.load(sys.argv[1]+'/vectors.npy'); \
                      k=[json.loads(l) for l in open(sys.argv[1]+'/keys.jsonl')]; \
                      print(v.shape, v.dtype, len(k), float(v.sum()))";
        let out = Command::new(python).args(["-c", script, out_dir.to_str().context("utf-8")?]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let sum: f64 = flat.iter().map(|x| *x as f64).sum();
        let numpy_sum: f64 = text.split_whitespace().last().context("sum")?.parse()?;
        assert!(text.starts_with("(1000, 384) float32 1000"), "{text}");
        assert!((numpy_sum - sum).abs() < 1e-2, "{numpy_sum} vs {sum}");
    }

    // 3. `embark up` on that store: the index loads (HNSW above 500) and answers.
    let embark = Server::start(
        &binary("embark"),
        &["up", "--data-dir", data_dir, "--similar-exact-below", "500", "--models", MODEL],
    )
    .await?;
    let mut client = embark.embark_client().await?;
    let similar = |query: Query, k: u32, min_score: f32| SimilarRequest {
        model: MODEL.into(),
        query: Some(query),
        k,
        min_score,
        ..Default::default()
    };
    let request = similar(Query::Key("red bicycle for sale".into()), 10, 0.0);
    let answer = embark_tests::similar_once_loaded(&client, request, Duration::from_secs(60)).await?;
    assert!(!answer.exact, "1000 vectors with --similar-exact-below 500 go through HNSW");
    assert_eq!(answer.keys.len(), 10);
    assert!(!answer.keys.contains(&"red bicycle for sale".to_string()), "the query key is left out");
    assert!(answer.scores.windows(2).all(|w| w[0] >= w[1]), "best first: {:?}", answer.scores);
    assert!(answer.keys.iter().take(3).all(|k| k.contains("bicycle")), "{:?}", answer.keys);

    // By vector: the key itself comes first, with score 1.
    let looked = client
        .lookup(LookupRequest { model: MODEL.into(), keys: vec!["blue lamp vintage".into()], ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(looked.sources, vec![Source::Store as i32]);
    let by_vector = client.similar(similar(Query::Vector(looked.vectors.clone()), 3, 0.5)).await?.into_inner();
    assert_eq!(by_vector.keys[0], "blue lamp vintage");
    assert!((by_vector.scores[0] - 1.0).abs() < 1e-4, "{:?}", by_vector.scores);

    // A vector filled after start is found; an invalidated one no longer.
    let fresh = "a vintage blue lamp, slightly used".to_string();
    client.lookup(LookupRequest { model: MODEL.into(), keys: vec![fresh.clone()], ..Default::default() }).await?;
    eventually(Duration::from_secs(60), "the fresh key to be filled and indexed", || {
        let mut client = client.clone();
        let request = similar(Query::Vector(looked.vectors.clone()), 5, 0.0);
        let fresh = fresh.clone();
        async move { Ok(client.similar(request).await?.into_inner().keys.contains(&fresh).then_some(())) }
    })
    .await?;
    client.invalidate(InvalidateRequest { model: MODEL.into(), keys: vec!["blue lamp vintage".into()] }).await?;
    let after = client.similar(similar(Query::Vector(looked.vectors.clone()), 5, 0.0)).await?.into_inner();
    assert!(!after.keys.contains(&"blue lamp vintage".to_string()), "{:?}", after.keys);

    // Clear errors for bad queries.
    let code = |r: Result<tonic::Response<_>, tonic::Status>| {
        r.map(|_: tonic::Response<embark_proto::embark::v1::SimilarResponse>| ()).err().map(|s| s.code())
    };
    assert_eq!(
        code(client.similar(similar(Query::Vector(vec![0; 12].into()), 3, 0.0)).await),
        Some(tonic::Code::InvalidArgument)
    );
    assert_eq!(
        code(client.similar(similar(Query::Key("red sofa like new".into()), 0, 0.0)).await),
        Some(tonic::Code::InvalidArgument)
    );
    assert_eq!(
        code(client.similar(similar(Query::Key("red sofa like new".into()), 3, 2.0)).await),
        Some(tonic::Code::InvalidArgument)
    );
    assert_eq!(
        code(client.similar(similar(Query::Key("never seen before".into()), 3, 0.0)).await),
        Some(tonic::Code::FailedPrecondition)
    );
    let unknown = SimilarRequest {
        model: "nope".into(),
        query: Some(Query::Key("x".into())),
        k: 3,
        min_score: 0.0,
        ..Default::default()
    };
    assert_eq!(code(client.similar(unknown).await), Some(tonic::Code::NotFound));
    let empty = SimilarRequest { model: MODEL.into(), query: None, k: 3, min_score: 0.0, ..Default::default() };
    assert_eq!(code(client.similar(empty).await), Some(tonic::Code::InvalidArgument));
    let text = embark.metrics_text().await?;
    assert!(
        embark_tests::metric_value(
            &text,
            &format!(
                "embark_similar_vectors{{model=\"{MODEL}\",version=\"{}\"}}",
                embark_tests::builtin_version(MODEL)
            )
        ) >= 1000.0,
        "{text}"
    );
    Ok(())
}

/// Unit vectors; `planted[i]` pairs are a vector and a slightly moved copy.
fn planted_store(path: &Path, n: usize, pairs: usize) -> anyhow::Result<Vec<(String, String)>> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut gauss = move || {
        // Sum of uniforms: close enough to Gaussian for random directions.
        (0..4)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            })
            .sum::<f64>() as f32
    };
    let mut rows = Vec::new();
    let mut planted = Vec::new();
    for i in 0..n {
        let v: Vec<f32> = (0..DIM).map(|_| gauss()).collect();
        if i < pairs {
            let twin: Vec<f32> = v.iter().map(|x| x + 0.08 * gauss()).collect();
            planted.push((format!("item-{i:05}"), format!("twin-{i:05}")));
            rows.push((format!("twin-{i:05}"), twin));
        }
        rows.push((format!("item-{i:05}"), v));
    }
    let rt = tokio::runtime::Handle::current();
    let store = EmbeddedStore::open(path)?;
    tokio::task::block_in_place(|| rt.block_on(store.put_vectors(&embark_tests::stored_as(MODEL), rows)))?;
    Ok(planted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_finds_the_planted_pairs_exactly_and_through_hnsw() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data)?;
    let mut planted = planted_store(&data.join("embark.redb"), 3000, 25)?;
    planted.sort();
    for (label, exact_below) in [("exact", "100000"), ("hnsw", "1000")] {
        let out = tmp.path().join(format!("{label}.csv"));
        let (code, text) = run_tool(&[
            "dedup",
            "--model",
            MODEL,
            "--threshold",
            "0.9",
            "--out",
            out.to_str().context("utf-8")?,
            "--data-dir",
            data.to_str().context("utf-8")?,
            "--exact-below",
            exact_below,
            "--page",
            "500",
            "--concurrency",
            "2",
        ])?;
        assert_eq!(code, 0, "{text}");
        assert!(text.contains(if label == "exact" { "exact search" } else { "HNSW search" }), "{text}");
        let mut reader = csv::Reader::from_path(&out)?;
        assert_eq!(reader.headers()?.iter().collect::<Vec<_>>(), ["key_a", "key_b", "score"]);
        let mut found = Vec::new();
        let mut scores = HashMap::new();
        for r in reader.records() {
            let r = r?;
            found.push((r[0].to_owned(), r[1].to_owned()));
            scores.insert((r[0].to_owned(), r[1].to_owned()), r[2].parse::<f32>()?);
        }
        found.sort();
        assert_eq!(found, planted, "{label}: exactly the planted pairs, once each");
        assert!(scores.values().all(|s| *s >= 0.9 && *s <= 1.0));
        assert!(!out.with_extension("checkpoint.json").exists());
    }
    Ok(())
}
