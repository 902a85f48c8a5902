//! `embark up` end to end: OOV at once, then the real vectors; equal to
//! Retina and to an independent reference; one embedding for 200
//! concurrent misses; Invalidate; Models.

use std::time::Duration;

use embark_proto::{
    embark::v1::{InvalidateRequest, LookupRequest, ModelKind, ModelsRequest, Source},
    retina::v1::EmbedRequest,
};
use embark_tests::{Server, binary, cosine, eventually, minilm_reference, rows};

const MODEL: &str = "minilm-l6-v2";

async fn start_up(data: &std::path::Path) -> anyhow::Result<Server> {
    Server::start(&binary("embark"), &["up", "--data-dir", data.to_str().expect("utf-8 path")]).await
}

fn sources(raw: &[i32]) -> Vec<Source> {
    raw.iter().map(|s| Source::try_from(*s).expect("known source")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_texts_are_oov_at_once_then_equal_retina_and_the_reference() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let embark = start_up(data.path()).await?;
    let reference = minilm_reference();
    assert!(reference.len() >= 3);
    let mut keys: Vec<String> = reference.iter().map(|(t, _)| t.clone()).collect();
    keys.push(keys[0].clone()); // a duplicate is answered like its twin
    let mut client = embark.embark_client().await?;
    let request = LookupRequest { model: MODEL.into(), keys: keys.clone(), ..Default::default() };

    let first = client.lookup(request.clone()).await?.into_inner();
    assert_eq!(first.dim, 384);
    assert_eq!(first.vectors.len(), keys.len() * 384 * 4);
    assert!(first.vectors.iter().all(|b| *b == 0), "OOV rows are zeros by default");
    assert_eq!(sources(&first.sources), vec![Source::OovPending; keys.len()]);

    let filled = eventually(Duration::from_secs(60), "the vectors to be filled", || {
        let (mut client, request) = (client.clone(), request.clone());
        async move {
            let r = client.lookup(request).await?.into_inner();
            let done = sources(&r.sources).iter().all(|s| matches!(s, Source::Store | Source::Cache));
            Ok(done.then_some(r))
        }
    })
    .await?;
    let got = rows(&filled.vectors, 384);
    for ((text, want), row) in reference.iter().zip(&got) {
        let c = cosine(row, want);
        eprintln!("cosine to the numpy reference {c:.7}: {text:?}");
        assert!(c >= 0.9999, "{text:?}: cosine {c} to the numpy reference");
    }
    assert_eq!(got[0], got[keys.len() - 1], "duplicate keys get the same row");

    // A third Lookup is served from the in-process tier.
    let third = client.lookup(request).await?.into_inner();
    assert_eq!(sources(&third.sources), vec![Source::Cache; keys.len()]);
    assert_eq!(third.vectors, filled.vectors);

    // The same texts through a separate Retina process.
    let retina = Server::start(&binary("retina"), &[]).await?;
    let embedded = retina
        .retina_client()
        .await?
        .embed(EmbedRequest { model: MODEL.into(), inputs: keys.clone(), ..Default::default() })
        .await?
        .into_inner();
    assert!(embedded.failures.is_empty(), "{:?}", embedded.failures);
    for (i, (a, b)) in rows(&embedded.vectors, 384).iter().zip(&got).enumerate() {
        let c = cosine(a, b);
        assert!(c >= 0.9999, "{:?}: cosine {c} between Retina and EmbArk", keys[i]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_misses_of_one_key_embed_it_once() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let embark = start_up(data.path()).await?;
    let client = embark.embark_client().await?;
    let key = "a key that two hundred rankers miss at once";
    let calls =
        (0..200).map(|_| {
            let mut c = client.clone();
            async move {
                c.lookup(LookupRequest { model: MODEL.into(), keys: vec![key.into()], ..Default::default() }).await
            }
        });
    let answers = futures::future::join_all(calls).await;
    let mut pending = 0;
    for a in answers {
        let a = a?.into_inner();
        assert_eq!(a.sources.len(), 1);
        if a.sources[0] == Source::OovPending as i32 {
            pending += 1;
        }
    }
    assert!(pending >= 1, "the first Lookups miss");
    // A Lookup counts its miss (published or deduplicated) before it
    // answers: these are final once every Lookup returned.
    let text = embark.metrics_text().await?;
    assert_eq!(embark_tests::metric_value(&text, "embark_misses_published_total"), 1.0, "{text}");
    assert_eq!(embark_tests::metric_value(&text, "embark_misses_deduplicated_total"), (pending - 1) as f64);

    let embedded = format!("retina_embedded_inputs_total{{model=\"{MODEL}\"}}");
    let filled = format!("kfc_filled_total{{model=\"{MODEL}\",outcome=\"vector\"}}");
    let stored = |key: &'static str| {
        let client = client.clone();
        move || {
            let mut client = client.clone();
            async move {
                let r = client
                    .lookup(LookupRequest { model: MODEL.into(), keys: vec![key.into()], ..Default::default() })
                    .await?;
                Ok((r.into_inner().sources != vec![Source::OovPending as i32]).then_some(()))
            }
        }
    };
    eventually(Duration::from_secs(60), "the key to be filled", stored(key)).await?;
    // Instead of sleeping before judging that nothing embedded the key a
    // second time: a later key, queued only now, is filled after anything
    // still queued for the first (`embark up` runs one fill loop, which
    // takes the durable queue in order), so once it is filled the count
    // is final.
    let later = "a key missed after the first was filled";
    eventually(Duration::from_secs(60), "the later key to be filled", stored(later)).await?;
    let text = embark.metrics_text().await?;
    assert_eq!(embark_tests::metric_value(&text, &embedded), 2.0, "each key embedded once: {text}");
    assert_eq!(embark_tests::metric_value(&text, &filled), 2.0, "{text}");
    assert_eq!(embark_tests::metric_value(&text, "embark_misses_published_total"), 2.0, "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_listed_and_invalidate_queues_keys_again() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let embark = start_up(data.path()).await?;
    let mut client = embark.embark_client().await?;

    let models = client.models(ModelsRequest {}).await?.into_inner().models;
    let listed: Vec<_> = models.iter().map(|m| (m.name.as_str(), m.dim, m.kind)).collect();
    assert_eq!(
        listed,
        vec![("efficientnet-lite0", 1280, ModelKind::Image as i32), (MODEL, 384, ModelKind::Text as i32)]
    );
    assert!(models.iter().all(|m| !m.version.is_empty()));

    let request = LookupRequest { model: MODEL.into(), keys: vec!["invalidate me".into()], ..Default::default() };
    client.lookup(request.clone()).await?;
    let stored = |client: &embark_proto::embark::v1::emb_ark_client::EmbArkClient<_>| {
        let (mut client, request) = (client.clone(), request.clone());
        async move {
            let r = client.lookup(request).await?.into_inner();
            Ok((r.sources[0] != Source::OovPending as i32).then_some(()))
        }
    };
    eventually(Duration::from_secs(60), "the first fill", || stored(&client)).await?;

    let n = client
        .invalidate(InvalidateRequest {
            model: MODEL.into(),
            keys: vec!["invalidate me".into(), "invalidate me".into()],
        })
        .await?
        .into_inner()
        .invalidated;
    assert_eq!(n, 1);
    let after = client.lookup(request.clone()).await?.into_inner();
    assert_eq!(after.sources, vec![Source::OovPending as i32], "invalidated keys are unknown again");
    eventually(Duration::from_secs(60), "the refill", || stored(&client)).await?;
    let series = format!("retina_embedded_inputs_total{{model=\"{MODEL}\"}}");
    assert_eq!(embark.metric(&series).await?, 2.0, "embedded once, then once more after Invalidate");
    Ok(())
}
