//! The CQL store through the real `scylla` driver against an in-process
//! CQL v4 server (kassandra): schema, round-trips, a 1000-key batch with
//! gaps, hashed long keys, a paged scan of one model, and reconnecting
//! after the server restarts.

use std::time::Duration;

use cql_test_server::CqlTestServer;
use embark_store::{
    EmbeddingStore, FailureRecord, ScanCursor, StoredRow,
    cql::{CqlConfig, CqlStore},
};

fn config(server: &CqlTestServer) -> CqlConfig {
    CqlConfig {
        nodes: vec![server.addr.to_string()],
        keyspace: "embark_test".into(),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        ..CqlConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectors_failures_long_keys_and_a_thousand_key_batch_round_trip() -> anyhow::Result<()> {
    let server = CqlTestServer::start()?;
    let cfg = config(&server);
    CqlStore::migrate(&cfg).await?;
    CqlStore::migrate(&cfg).await?; // running it again is fine
    let store = CqlStore::connect(&cfg).await?;

    let long = format!("https://img.example.com/{}", "x".repeat(2000));
    store.put_vectors("m", vec![("a".into(), vec![1.0, -2.5, 3.25]), (long.clone(), vec![7.0; 4])]).await?;
    let failure = FailureRecord { code: 4, reason: "HTTP 404".into(), at_unix_ms: 1_700_000_000_000 };
    store.put_failures("m", vec![("bad".into(), failure.clone())]).await?;

    let rows = store.get_many("m", &["a".into(), "bad".into(), "nope".into(), long.clone()]).await?;
    assert!(matches!(&rows[0], Some(StoredRow::Vector { vector, .. }) if vector == &[1.0, -2.5, 3.25]));
    assert_eq!(rows[1], Some(StoredRow::Failed(failure)));
    assert_eq!(rows[2], None);
    assert!(matches!(&rows[3], Some(StoredRow::Vector { vector, .. }) if vector == &[7.0; 4]), "long key round-trips");
    assert_eq!(store.get_many("other-model", &["a".into()]).await?, vec![None], "models do not share rows");

    // 1000 keys, every third one missing.
    let keys: Vec<String> = (0..1000).map(|i| format!("key-{i}")).collect();
    let stored: Vec<(String, Vec<f32>)> =
        keys.iter().enumerate().filter(|(i, _)| i % 3 != 0).map(|(i, k)| (k.clone(), vec![i as f32; 8])).collect();
    store.put_vectors("big", stored).await?;
    let rows = store.get_many("big", &keys).await?;
    assert_eq!(rows.len(), 1000);
    for (i, r) in rows.iter().enumerate() {
        match r {
            None => assert_eq!(i % 3, 0, "key-{i} is missing"),
            Some(StoredRow::Vector { vector, .. }) => assert!(i % 3 != 0 && vector == &vec![i as f32; 8], "key-{i}"),
            Some(other) => panic!("key-{i}: {other:?}"),
        }
    }

    store.delete("m", &["a".into()]).await?;
    assert_eq!(store.get_many("m", &["a".into()]).await?, vec![None]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_reconnects_after_the_server_restarts() -> anyhow::Result<()> {
    let server = CqlTestServer::start()?;
    let cfg = config(&server);
    CqlStore::migrate(&cfg).await?;
    let store = CqlStore::connect(&cfg).await?;
    store.put_vectors("m", vec![("k".into(), vec![1.0])]).await?;

    let server = server.restart()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match store.get_many("m", &["k".into()]).await {
            Ok(rows) => {
                assert!(matches!(&rows[0], Some(StoredRow::Vector { vector, .. }) if vector == &[1.0]));
                break;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("not reconnected yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => anyhow::bail!("no reconnect within 20 s: {e}"),
        }
    }
    drop(server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_pages_through_one_model_and_resumes_from_a_saved_cursor() -> anyhow::Result<()> {
    let server = CqlTestServer::start()?;
    let cfg = config(&server);
    CqlStore::migrate(&cfg).await?;
    let store = CqlStore::connect(&cfg).await?;
    let rows: Vec<(String, Vec<f32>)> = (0..250).map(|i| (format!("k{i}"), vec![i as f32, 1.0])).collect();
    store.put_vectors("m", rows.clone()).await?;
    store.put_vectors("other", (0..50).map(|i| (format!("k{i}"), vec![0.0])).collect()).await?;
    let failure = FailureRecord { code: 4, reason: "HTTP 404".into(), at_unix_ms: 1 };
    store.put_failures("m", vec![("failed".into(), failure)]).await?;

    let (mut seen, mut cursor, mut pages) = (Vec::new(), None, 0);
    loop {
        let page = store.scan("m", cursor.take(), 40).await?;
        pages += 1;
        seen.extend(page.rows);
        match page.next {
            // A new connection resumes from the hex a checkpoint would hold.
            Some(c) => cursor = Some(ScanCursor::from_hex(&c.to_hex()).expect("hex")),
            None => break,
        }
        anyhow::ensure!(pages < 100, "the scan does not end");
    }
    seen.sort_by_key(|(k, _)| k[1..].parse::<u32>().unwrap_or(u32::MAX));
    assert_eq!(seen, rows, "every vector of the model once, no failure records, no other model");
    assert!(pages >= 7, "{pages} pages of at most 40 rows");
    Ok(())
}

/// What the versions of a model need from the store: a current version
/// every replica reads, a count of a version's vectors, and the removal of
/// a version's every row (long keys by their stored hash, failure records
/// too), leaving other versions alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_versions_coverage_and_purge() -> anyhow::Result<()> {
    let server = CqlTestServer::start()?;
    let cfg = config(&server);
    CqlStore::migrate(&cfg).await?;
    let store = CqlStore::connect(&cfg).await?;

    assert_eq!(store.current_version("m").await?, None, "no promote yet");
    store.set_current_version("m", "1").await?;
    store.set_current_version("m", "2").await?;
    let current = store.current_version("m").await?.expect("recorded");
    assert_eq!(current.version, "2");
    assert!(current.promoted_at_ms > 1_700_000_000_000, "{current:?}");
    assert_eq!(store.current_version("other").await?, None);

    let (v1, v2) = (embark_store::namespace("m", "1"), embark_store::namespace("m", "2"));
    let long = format!("https://img.example.com/{}", "x".repeat(400));
    let rows: Vec<(String, Vec<f32>)> = (0..30).map(|i| (format!("k{i}"), vec![i as f32; 4])).collect();
    store.put_vectors(&v1, rows.clone()).await?;
    store.put_vectors(&v1, vec![(long.clone(), vec![1.0; 4])]).await?;
    store
        .put_failures(&v1, vec![("bad".into(), FailureRecord { code: 4, reason: "404".into(), at_unix_ms: 1 })])
        .await?;
    store.put_vectors(&v2, rows[..5].to_vec()).await?;
    assert_eq!((store.count_vectors(&v1).await?, store.count_vectors(&v2).await?), (31, 5));

    let mut stored = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.scan(&v1, cursor, 7).await?;
        stored.extend(page.rows.into_iter().map(|(k, _)| k).chain(page.other_keys));
        match page.next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(stored.len(), 32, "30 keys, the long key's hash, the failure record");
    store.purge(&v1, &stored).await?;
    assert_eq!(store.count_vectors(&v1).await?, 0);
    assert_eq!(
        store.get_many(&v1, &[long, "bad".into()]).await?,
        vec![None, None],
        "the long key and the failure went too"
    );
    assert_eq!(store.count_vectors(&v2).await?, 5, "the other version is untouched");
    Ok(())
}

/// `embark adopt` on CQL: rows copied by their stored keys (a long key is
/// found by its hash afterwards), never over the target's own row or
/// failure record, nor over a fill made after the copy. What this server
/// cannot check: it does not apply write timestamps (a later write always
/// wins, a delete leaves no tombstone), so that a delete record beats the
/// copy (its timestamp is newer than the copy's) is checked on the
/// embedded store only (`embark` `adopt_copies_...`), as for `put_filled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copied_rows_keep_their_stored_keys_and_never_win() -> anyhow::Result<()> {
    let server = CqlTestServer::start()?;
    let cfg = config(&server);
    CqlStore::migrate(&cfg).await?;
    let store = CqlStore::connect(&cfg).await?;
    let target = embark_store::namespace("m", "1");
    let long = format!("https://img.example.com/{}", "x".repeat(400));
    store.put_vectors("m", (0..6).map(|i| (format!("k{i}"), vec![i as f32; 4])).collect()).await?;
    store.put_vectors("m", vec![(long.clone(), vec![7.0; 4])]).await?;
    let page = store.scan("m", None, 100).await?;
    assert_eq!(page.rows.len(), 7);

    store.put_vectors(&target, vec![("k0".into(), vec![-1.0; 4])]).await?;
    store
        .put_failures(&target, vec![("k1".into(), FailureRecord { code: 4, reason: "404".into(), at_unix_ms: 1 })])
        .await?;
    let copied = store.copy_vectors(&target, page.rows.clone()).await?;
    assert_eq!(copied, 5, "k0 and k1 had rows");
    // A fill after the copy wins too, and a copy again changes nothing.
    store.put_vectors(&target, vec![("k3".into(), vec![-3.0; 4])]).await?;
    store.copy_vectors(&target, page.rows).await?;

    let keys: Vec<String> = ["k0", "k1", "k2", "k3", "k5"].map(String::from).into_iter().chain([long]).collect();
    let got = store.get_many(&target, &keys).await?;
    let vector = |r: &Option<StoredRow>| match r {
        Some(StoredRow::Vector { vector, .. }) => Some(vector.clone()),
        _ => None,
    };
    assert_eq!(vector(&got[0]), Some(vec![-1.0; 4]), "the target's own row stands");
    assert!(matches!(got[1], Some(StoredRow::Failed(_))), "{:?}", got[1]);
    assert_eq!(vector(&got[2]), Some(vec![2.0; 4]));
    assert_eq!(vector(&got[3]), Some(vec![-3.0; 4]), "a later fill wins over the copy");
    assert_eq!(vector(&got[4]), Some(vec![5.0; 4]));
    assert_eq!(vector(&got[5]), Some(vec![7.0; 4]), "the long key by its hash");
    Ok(())
}
