//! Retina on untrusted image URLs, over real HTTP on loopback: every
//! hostile case gets its code and reason, Retina keeps serving, and 100
//! concurrent hostile requests leave its memory bounded.

use embark_proto::retina::v1::{EmbedRequest, EmbedResponse, FailureCode, ModelsRequest};
use embark_tests::{Server, binary, cosine, efficientnet_reference, http_fixtures::ImageServer, peak_rss_bytes, rows};

const MODEL: &str = "efficientnet-lite0";

async fn start_retina(extra: &[&str]) -> anyhow::Result<Server> {
    let mut args = vec![
        "--models",
        MODEL,
        "--fetch-max-bytes",
        "2000000",
        "--fetch-first-byte-timeout-ms",
        "700",
        "--fetch-total-timeout-ms",
        "2000",
        "--fetch-max-redirects",
        "3",
    ];
    args.extend_from_slice(extra);
    Server::start(&binary("retina"), &args).await
}

async fn embed(retina: &Server, urls: Vec<String>) -> anyhow::Result<EmbedResponse> {
    Ok(retina
        .retina_client()
        .await?
        .embed(EmbedRequest { model: MODEL.into(), inputs: urls, ..Default::default() })
        .await?
        .into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_embeds_like_the_reference_and_each_hostile_case_gets_its_code() -> anyhow::Result<()> {
    let images = ImageServer::start().await?;
    let retina = start_retina(&["--fetch-allow-nets", "127.0.0.0/8"]).await?;
    let models = retina.retina_client().await?.models(ModelsRequest {}).await?.into_inner().models;
    assert_eq!(models.iter().map(|m| (m.name.as_str(), m.dim)).collect::<Vec<_>>(), vec![(MODEL, 1280)]);

    // Each format, grayscale, alpha, 16-bit, animated, and via a redirect.
    let files = [
        "cat.jpg",
        "coffee.webp",
        "astronaut.png",
        "camera_gray.png",
        "logo_alpha.png",
        "rocket.bmp",
        "animated.gif",
        "camera_16bit.png",
    ];
    let mut urls: Vec<String> = files.iter().map(|f| images.url(&format!("/img/{f}"))).collect();
    urls.push(images.url("/redirect-cat"));
    let r = embed(&retina, urls).await?;
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    let got = rows(&r.vectors, 1280);
    for (file, row) in files.iter().zip(&got) {
        let c = cosine(row, &efficientnet_reference(file));
        let floor = if file.ends_with(".jpg") || file.ends_with(".webp") { 0.99 } else { 0.995 };
        assert!(c >= floor, "{file}: cosine {c} to the Pillow-fed reference");
    }
    assert_eq!(got[0], got[files.len()], "the redirect lands on the same image");

    // Hostile and broken inputs: (path or URL, code, transient, words in the reason).
    let closed = format!("http://127.0.0.1:{}/x.jpg", embark_tests::free_port());
    let cases: Vec<(String, FailureCode, bool, &str)> = vec![
        (images.url("/truncated.jpg"), FailureCode::Undecodable, false, "truncated Jpeg"),
        (images.url("/page.html"), FailureCode::NotAnImage, false, "unrecognised content"),
        (images.url("/missing"), FailureCode::NotFound, false, "404"),
        (images.url("/gone"), FailureCode::NotFound, false, "410"),
        (images.url("/error"), FailureCode::Unavailable, true, "503"),
        (images.url("/stall"), FailureCode::Timeout, true, "no response within"),
        (images.url("/huge"), FailureCode::TooLarge, false, "over the limit of 2000000 bytes"),
        (images.url("/declared-huge"), FailureCode::TooLarge, false, "(declared 100000000)"),
        (images.url("/lying-length"), FailureCode::NotAnImage, false, "unrecognised content"),
        (images.url("/bomb.png"), FailureCode::ImageTooLarge, false, "over the limits"),
        (images.url("/redirect-private"), FailureCode::BlockedAddress, false, "10.0.0.1"),
        (images.url("/redirect-loop"), FailureCode::TooManyRedirects, false, "more than 3 redirects"),
        (closed, FailureCode::Unavailable, true, "unreachable"),
        ("ftp://example.com/cat.jpg".into(), FailureCode::InvalidInput, false, "only http and https"),
        ("http://169.254.169.254/latest/meta-data/".into(), FailureCode::BlockedAddress, false, "not a public"),
    ];
    let r = embed(&retina, cases.iter().map(|c| c.0.clone()).collect()).await?;
    assert_eq!(r.failures.len(), cases.len(), "{:?}", r.failures);
    for (f, (url, code, transient, words)) in r.failures.iter().zip(&cases) {
        assert_eq!(f.code, *code as i32, "{url}: {f:?}");
        assert_eq!(f.transient, *transient, "{url}: {f:?}");
        assert!(f.reason.contains(words), "{url}: reason {:?} lacks {words:?}", f.reason);
    }
    assert!(r.vectors.iter().all(|b| *b == 0), "failed inputs get zero rows");

    // Still serving.
    let r = embed(&retina, vec![images.url("/img/cat.jpg")]).await?;
    assert!(r.failures.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_is_blocked_without_the_allow_list() -> anyhow::Result<()> {
    let images = ImageServer::start().await?;
    let retina = start_retina(&[]).await?;
    let by_name = images.url("/img/cat.jpg").replace("127.0.0.1", "localhost");
    let r = embed(&retina, vec![images.url("/img/cat.jpg"), by_name]).await?;
    assert_eq!(r.failures.len(), 2);
    for f in &r.failures {
        assert_eq!((f.code, f.transient), (FailureCode::BlockedAddress as i32, false), "{f:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_hostile_requests_leave_memory_bounded() -> anyhow::Result<()> {
    let images = ImageServer::start().await?;
    let retina = start_retina(&["--fetch-allow-nets", "127.0.0.0/8"]).await?;
    let before = peak_rss_bytes(retina.pid())?;
    let client = retina.retina_client().await?;
    let hostile =
        ["/huge", "/bomb.png", "/stall", "/truncated.jpg", "/lying-length", "/redirect-loop", "/declared-huge"];
    let calls = (0..100).map(|i| {
        let mut c = client.clone();
        let url = images.url(hostile[i % hostile.len()]);
        async move { c.embed(EmbedRequest { model: MODEL.into(), inputs: vec![url; 4], ..Default::default() }).await }
    });
    for r in futures::future::join_all(calls).await {
        let r = r?.into_inner();
        assert_eq!(r.failures.len(), 4);
    }
    let peak = peak_rss_bytes(retina.pid())?;
    eprintln!(
        "retina peak RSS: {:.0} MiB after 100 concurrent hostile requests x 4 URLs ({:.0} MiB before)",
        peak as f64 / 1048576.0,
        before as f64 / 1048576.0
    );
    // 32 downloads in flight x 2 MB cap, 2 decodes x 128 MiB cap, model and
    // runtime: well under 1 GiB. Unbounded handling would take tens of GiB
    // (the bomb alone declares 7.5 GB, /huge sends 64 MiB each).
    assert!(peak < 1 << 30, "peak RSS {peak} bytes");
    let r = embed(&retina, vec![images.url("/img/coffee.webp")]).await?;
    assert!(r.failures.is_empty(), "still serving");
    Ok(())
}
