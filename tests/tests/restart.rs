//! Durability: misses queued by one process are filled by the next, even
//! after a crash; vectors survive restarts and are not embedded again.

use std::time::Duration;

use embark_proto::embark::v1::{LookupRequest, Source};
use embark_tests::{Server, binary, eventually};

const MODEL: &str = "minilm-l6-v2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_misses_and_vectors_survive_crashes_and_restarts() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let dir = data.path().to_str().expect("utf-8 path");
    let keys: Vec<String> =
        ["first durable text", "second durable text", "third durable text"].into_iter().map(String::from).collect();
    let request = LookupRequest { model: MODEL.into(), keys: keys.clone(), ..Default::default() };

    // 1. The front alone queues the misses durably; then it crashes.
    let mut serve = Server::start(&binary("embark"), &["serve", "--data-dir", dir]).await?;
    let r = serve.embark_client().await?.lookup(request.clone()).await?.into_inner();
    assert_eq!(r.sources, vec![Source::OovPending as i32; 3]);
    eventually(Duration::from_secs(10), "the misses to reach the durable queue", || async {
        Ok((serve.metric("embark_miss_queue_depth").await? == 3.0).then_some(()))
    })
    .await?;
    serve.kill();

    // 2. `embark up` on the same directory fills them with no new Lookup.
    let mut up = Server::start(&binary("embark"), &["up", "--data-dir", dir]).await?;
    let filled = format!("kfc_filled_total{{model=\"{MODEL}\",outcome=\"vector\"}}");
    eventually(Duration::from_secs(60), "the resumed misses to be filled", || async {
        // Appears with the first fill.
        Ok((up.metric_or_zero(&filled).await? == 3.0).then_some(()))
    })
    .await?;
    let r = up.embark_client().await?.lookup(request.clone()).await?.into_inner();
    assert_eq!(r.sources, vec![Source::Store as i32; 3], "filled before any Lookup of this process");
    let vectors = r.vectors;
    // The queue entries are removed once the store write returned, a moment after the count.
    eventually(Duration::from_secs(10), "the filled misses to leave the queue", || async {
        Ok((up.metric("embark_miss_queue_depth").await? == 0.0).then_some(()))
    })
    .await?;
    up.kill();

    // 3. After a crash the vectors are still there and nothing is re-embedded.
    let mut up = Server::start(&binary("embark"), &["up", "--data-dir", dir]).await?;
    let r = up.embark_client().await?.lookup(request.clone()).await?.into_inner();
    assert_eq!(r.sources, vec![Source::Store as i32; 3]);
    assert_eq!(r.vectors, vectors);
    assert_eq!(up.metric(&format!("retina_embedded_inputs_total{{model=\"{MODEL}\"}}")).await?, 0.0);

    // 4. A graceful stop exits 0 and keeps misses still pending.
    let r = up
        .embark_client()
        .await?
        .lookup(LookupRequest {
            model: MODEL.into(),
            keys: vec!["queued just before SIGTERM".into()],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(r.sources, vec![Source::OovPending as i32]);
    let status = up.terminate(Duration::from_secs(30))?;
    assert!(status.success(), "exit status {status}:\n{}", up.log_text());
    Ok(())
}
