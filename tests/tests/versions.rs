//! Two versions of one model served side by side, and rankers moved from
//! one to the other with `embark reembed` then `embark promote`, with no
//! OOV spike: `embark up` on the CQL store (kassandra in this process,
//! through the real `scylla` driver), so the batch tools reach the same
//! store while it serves.
//!
//! The second version is the shipped MiniLM with CLS pooling: the same
//! weights, another output (as a retrained head would give), no download.

use std::{
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use cql_test_server::CqlTestServer;
use embark_proto::embark::v1::{LookupRequest, LookupResponse, ModelsRequest, Source};
use embark_tests::{Server, binary, cosine, eventually, rows};

const MODEL: &str = "minilm-l6-v2";
const V2: &str = "minilm-l6-v2/cls-pooling-test";
const DIM: usize = 384;

/// The built-in catalogue with a second version of the text model (CLS
/// pooling), the built-in one marked current.
fn two_version_catalogue() -> String {
    let builtin = retina::catalog::BUILTIN_TOML;
    let start = builtin.find("[[model]]").expect("an entry");
    let end = builtin[start + 1..].find("[[model]]").map(|i| i + start + 1).expect("a second entry");
    let v1 = &builtin[start..end];
    assert!(v1.contains("pooling = \"mean\""), "the text entry pools by mean");
    let v2 = v1
        .replacen("version = \"", &format!("version = \"{V2}\"\n# was: "), 1)
        .replace("pooling = \"mean\"", "pooling = \"cls\"");
    let v1 = v1.replacen("version = \"", "current = true\nversion = \"", 1);
    format!("{v1}\n{v2}")
}

/// One Lookup's answer as the ranker saw it: the version and the sources.
type Answer = (String, Vec<Source>);

fn sources(r: &LookupResponse) -> Vec<Source> {
    r.sources.iter().map(|s| Source::try_from(*s).expect("known source")).collect()
}

fn lookup(keys: &[String], version: &str) -> LookupRequest {
    LookupRequest { model: MODEL.into(), keys: keys.to_vec(), version: version.into(), ..Default::default() }
}

/// Runs `embark <args>` with the store and catalogue flags; returns stdout,
/// or the failure with stderr.
fn tool(args: &[&str], common: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(binary("embark"))
        .args(args)
        .args(common)
        .env("EMBARK_MODELS_DIR", embark_tests::models_dir())
        .current_dir(std::env::temp_dir())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "embark {args:?} exited {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reembed_then_promote_moves_rankers_to_a_new_version_without_an_oov_spike() -> anyhow::Result<()> {
    let cql = CqlTestServer::start()?;
    let url = format!("cql://{}/embark_versions", cql.addr);
    embark_tests::migrate(&url)?;
    let dir = tempfile::tempdir()?;
    let catalogue = dir.path().join("models.toml");
    std::fs::write(&catalogue, two_version_catalogue())?;
    let catalogue = catalogue.to_str().expect("utf-8");
    let data = dir.path().join("data");
    let v1 = embark_tests::builtin_version(MODEL);

    let embark = Server::start(
        &binary("embark"),
        &[
            "up",
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--store",
            &url,
            "--models-config",
            catalogue,
            "--models",
            MODEL,
            "--version-refresh-secs",
            "1",
            "--coverage-refresh-secs",
            "1",
        ],
    )
    .await?;
    let mut client = embark.embark_client().await?;

    // Version 1 is current: the catalogue says so. Its keys fill.
    let keys: Vec<String> = (0..40).map(|i| format!("catalogue item {i}: a red running shoe, size {i}")).collect();
    let first = client.lookup(lookup(&keys, "")).await?.into_inner();
    assert_eq!(first.version, v1);
    let settled = eventually(Duration::from_secs(120), "version 1 filled", || {
        let mut c = client.clone();
        let keys = keys.clone();
        async move {
            let r = c.lookup(lookup(&keys, "")).await?.into_inner();
            Ok(sources(&r).iter().all(|s| matches!(s, Source::Store | Source::Cache)).then_some(r))
        }
    })
    .await?;
    let v1_rows = rows(&settled.vectors, DIM);

    // Both versions at once: a ranker that asks for version 2 gets its own
    // vectors (queued and filled apart), never version 1's.
    let pinned = keys[..3].to_vec();
    let r = client.lookup(lookup(&pinned, V2)).await?.into_inner();
    assert_eq!((r.version.as_str(), sources(&r)), (V2, vec![Source::OovPending; 3]), "v2 has none of v1's rows");
    let v2_answer = eventually(Duration::from_secs(120), "version 2 filled", || {
        let mut c = client.clone();
        let pinned = pinned.clone();
        async move {
            let r = c.lookup(lookup(&pinned, V2)).await?.into_inner();
            Ok(sources(&r).iter().all(|s| matches!(s, Source::Store | Source::Cache)).then_some(r))
        }
    })
    .await?;
    for (a, b) in rows(&v2_answer.vectors, DIM).iter().zip(&v1_rows) {
        let c = cosine(a, b);
        assert!(c < 0.999, "CLS and mean pooling give other vectors (cosine {c})");
    }
    let again = client.lookup(lookup(&pinned, "")).await?.into_inner();
    assert_eq!((again.version.as_str(), rows(&again.vectors, DIM)), (v1.as_str(), v1_rows[..3].to_vec()));

    // A ranker keeps looking up (no version) through the switch; every
    // answer is recorded.
    let seen: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let ranker = {
        let (mut c, keys, seen, stop) = (client.clone(), keys.clone(), seen.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = c.lookup(lookup(&keys, "")).await {
                    let r = r.into_inner();
                    let s = sources(&r);
                    seen.lock().expect("lock").push((r.version, s));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let common = ["--store", &url, "--models-config", catalogue];
    // Too early: version 2 holds 3 of version 1's 40 vectors.
    let refused = tool(&["promote", "--model", MODEL, "--version", V2], &common).expect_err("below the coverage");
    assert!(refused.to_string().contains("refused") && refused.to_string().contains("embark reembed"), "{refused}");

    let checkpoint = dir.path().join("reembed.json");
    let summary = tool(
        &[
            "reembed",
            "--model",
            MODEL,
            "--to-version",
            V2,
            "--json",
            "--checkpoint",
            checkpoint.to_str().expect("utf-8"),
        ],
        &common,
    )?;
    let summary: serde_json::Value = serde_json::from_str(summary.trim())?;
    assert_eq!(summary["scanned"], 40, "{summary}");
    assert_eq!(summary["embedded"], 37, "{summary}");
    assert_eq!(summary["already_stored"], 3, "the keys version 2 had: {summary}");
    assert!(!checkpoint.exists(), "a finished reembed leaves no checkpoint");

    let promoted = tool(&["promote", "--model", MODEL, "--version", V2, "--json"], &common)?;
    let promoted: serde_json::Value = serde_json::from_str(promoted.trim())?;
    assert_eq!(
        (promoted["from_vectors"].as_u64(), promoted["to_vectors"].as_u64()),
        (Some(40), Some(40)),
        "{promoted}"
    );

    // Every replica follows within --version-refresh-secs.
    eventually(Duration::from_secs(30), "the ranker answered from version 2", || {
        let seen = seen.clone();
        async move { Ok(seen.lock().expect("lock").iter().filter(|(v, _)| v == V2).nth(5).map(|_| ())) }
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    ranker.await?;

    let seen = seen.lock().expect("lock").clone();
    let switch = seen.iter().position(|(v, _)| v == V2).expect("answers from version 2");
    assert!(switch > 0, "answers from version 1 before the promote");
    assert!(seen[switch..].iter().all(|(v, _)| v == V2), "no answer goes back to version 1 once switched");
    let total: usize = seen.iter().map(|(_, s)| s.len()).sum();
    let hits: usize = seen.iter().flat_map(|(_, s)| s).filter(|s| matches!(s, Source::Store | Source::Cache)).count();
    println!(
        "hit rate through the switch: {hits}/{total} = {:.4} over {} Lookups ({} before, {} after)",
        hits as f64 / total as f64,
        seen.len(),
        switch,
        seen.len() - switch
    );
    assert_eq!(hits, total, "no OOV for keys the old version knew, through the switch: {seen:?}");

    // A ranker trained on version 1 keeps getting version 1.
    let pinned_v1 = client.lookup(lookup(&keys, &v1)).await?.into_inner();
    assert_eq!((pinned_v1.version.as_str(), rows(&pinned_v1.vectors, DIM)), (v1.as_str(), v1_rows.clone()));
    assert!(sources(&pinned_v1).iter().all(|s| matches!(s, Source::Store | Source::Cache)));

    // Models lists both versions, the current one, and their coverage.
    let models = eventually(Duration::from_secs(30), "coverage counted after the reembed", || {
        let mut c = client.clone();
        async move {
            let m = c.models(ModelsRequest {}).await?.into_inner().models;
            Ok(m.iter().any(|i| i.version == V2 && i.stored_vectors == 40).then_some(m))
        }
    })
    .await?;
    let text: Vec<_> = models.iter().filter(|m| m.name == MODEL).collect();
    assert_eq!(text.len(), 2, "{models:?}");
    assert!(text.iter().any(|m| m.version == V2 && m.current));
    assert!(text.iter().any(|m| m.version == v1 && !m.current && m.stored_vectors == 40));

    // The old version's rows go; version 2 is untouched. Retiring the
    // current version is refused.
    let refused = tool(&["retire", "--model", MODEL, "--version", V2], &common).expect_err("current");
    assert!(refused.to_string().contains("is current"), "{refused}");
    let retired = tool(&["retire", "--model", MODEL, "--version", &v1, "--json"], &common)?;
    let retired: serde_json::Value = serde_json::from_str(retired.trim())?;
    assert_eq!(retired["removed"], 40, "{retired}");
    let v2_after = client.lookup(lookup(&keys, "")).await?.into_inner();
    assert!(sources(&v2_after).iter().all(|s| matches!(s, Source::Store | Source::Cache)));
    Ok(())
}

/// Issue 12: a release before versions stored its rows under the bare
/// model name, which no version reads, so after an upgrade every stored
/// key was a miss. `embark adopt` copies them into the current version
/// (no network run): the upgraded `embark up` answers them from the store,
/// and `retire --unversioned` removes the old rows afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_the_rows_stored_before_versions() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    let data_flag = data.to_str().expect("utf-8");
    let keys: Vec<String> = (0..20).map(|i| format!("a title stored before versions, number {i}")).collect();
    let vector = |i: usize| (0..DIM).map(|d| ((i * DIM + d) as f32 * 0.001).sin()).collect::<Vec<f32>>();
    {
        use embark_store::EmbeddingStore;
        let old = embark_store::embedded::EmbeddedStore::open(&data.join("embark.redb"))?;
        old.put_vectors(MODEL, keys.iter().enumerate().map(|(i, k)| (k.clone(), vector(i))).collect()).await?;
    }
    let common = ["--data-dir", data_flag];

    let adopted: serde_json::Value = serde_json::from_str(&tool(&["adopt", "--model", MODEL, "--json"], &common)?)?;
    assert_eq!((adopted["scanned"].as_u64(), adopted["copied"].as_u64()), (Some(20), Some(20)), "{adopted}");
    assert_eq!(adopted["version"].as_str(), Some(embark_tests::builtin_version(MODEL).as_str()));

    let mut embark = Server::start(&binary("embark"), &["up", "--data-dir", data_flag, "--models", MODEL]).await?;
    let mut client = embark.embark_client().await?;
    let r = client.lookup(lookup(&keys, "")).await?.into_inner();
    assert_eq!(sources(&r), vec![Source::Store; 20], "every key stored before the upgrade is a hit");
    let got = rows(&r.vectors, DIM);
    for (i, row) in got.iter().enumerate() {
        assert_eq!(row, &vector(i), "key {i}: the stored vector, as it was");
    }
    embark.terminate(Duration::from_secs(30))?;

    let retired: serde_json::Value =
        serde_json::from_str(&tool(&["retire", "--model", MODEL, "--unversioned", "--json"], &common)?)?;
    assert_eq!(retired["removed"].as_u64(), Some(20), "{retired}");
    let again: serde_json::Value = serde_json::from_str(&tool(&["adopt", "--model", MODEL, "--json"], &common)?)?;
    assert_eq!(again["scanned"].as_u64(), Some(0), "nothing unversioned is left: {again}");
    Ok(())
}
