//! Image URLs through `embark up`: OOV at once, then the real vector (equal
//! to the Pillow-fed reference); an unfetchable URL ends as OOV_FAILED and
//! stays so without being queued again.

use std::time::Duration;

use embark_proto::embark::v1::{LookupRequest, Source};
use embark_tests::{Server, binary, cosine, efficientnet_reference, eventually, http_fixtures::ImageServer, rows};

const MODEL: &str = "efficientnet-lite0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_url_is_oov_then_its_real_vector_and_a_404_is_oov_failed() -> anyhow::Result<()> {
    let images = ImageServer::start().await?;
    let data = tempfile::tempdir()?;
    let dir = data.path().to_str().expect("utf-8 path");
    let embark =
        Server::start(&binary("embark"), &["up", "--data-dir", dir, "--fetch-allow-nets", "127.0.0.0/8"]).await?;
    let mut client = embark.embark_client().await?;
    let keys = vec![images.url("/img/cat.jpg"), images.url("/missing")];
    let request = LookupRequest { model: MODEL.into(), keys, ..Default::default() };

    let first = client.lookup(request.clone()).await?.into_inner();
    assert_eq!(first.dim, 1280);
    assert_eq!(first.sources, vec![Source::OovPending as i32; 2]);

    let done = eventually(Duration::from_secs(60), "the image to be filled and the 404 recorded", || {
        let (mut client, request) = (client.clone(), request.clone());
        async move {
            let r = client.lookup(request).await?.into_inner();
            let settled = r.sources[0] != Source::OovPending as i32 && r.sources[1] == Source::OovFailed as i32;
            Ok(settled.then_some(r))
        }
    })
    .await?;
    assert!(matches!(Source::try_from(done.sources[0])?, Source::Store | Source::Cache));
    let got = rows(&done.vectors, 1280);
    let c = cosine(&got[0], &efficientnet_reference("cat.jpg"));
    assert!(c >= 0.99, "cosine {c} to the reference");
    assert!(got[1].iter().all(|v| *v == 0.0), "a failed key gets the OOV row");

    let text = embark.metrics_text().await?;
    let failures =
        embark_tests::metric_value(&text, &format!("kfc_embed_failures_total{{model=\"{MODEL}\",code=\"NOT_FOUND\"}}"));
    assert_eq!(failures, 1.0, "{text}");
    let published = embark_tests::metric_value(&text, "embark_misses_published_total");
    // Asked again: answered from the failure record, not queued again.
    client.lookup(request).await?;
    assert_eq!(embark.metric("embark_misses_published_total").await?, published);
    Ok(())
}
