//! Bad requests get their documented status and a message naming the
//! limit; nothing crashes and nothing is queued for them.

use embark_proto::{
    embark::v1::{InvalidateRequest, LookupRequest},
    retina::v1::{EmbedRequest, FailureCode},
};
use embark_tests::{Server, binary};
use tonic::Code;

const MODEL: &str = "minilm-l6-v2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_lookup_gets_its_status() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let dir = data.path().to_str().expect("utf-8 path");
    let embark = Server::start(
        &binary("embark"),
        &["serve", "--data-dir", dir, "--max-batch-keys", "8", "--max-key-bytes", "64"],
    )
    .await?;
    let mut client = embark.embark_client().await?;
    let lookup = |model: &str, keys: Vec<String>| LookupRequest { model: model.into(), keys, ..Default::default() };

    let cases = [
        (lookup("", vec!["x".into()]), Code::InvalidArgument, "model is required"),
        (lookup("no-such-model", vec!["x".into()]), Code::NotFound, "unknown model \"no-such-model\""),
        (lookup(MODEL, vec!["ok".into(), String::new()]), Code::InvalidArgument, "keys[1] is empty"),
        (lookup(MODEL, vec!["k".repeat(65)]), Code::InvalidArgument, "limit is 64 bytes (--max-key-bytes)"),
        (lookup(MODEL, vec!["k".into(); 9]), Code::ResourceExhausted, "limit is 8 (--max-batch-keys)"),
    ];
    for (request, code, message) in cases {
        let status = client.lookup(request.clone()).await.expect_err("a bad request fails");
        assert_eq!(status.code(), code, "{request:?}: {status:?}");
        assert!(status.message().contains(message), "{:?} does not say {message:?}", status.message());
    }
    let status = client
        .invalidate(InvalidateRequest { model: MODEL.into(), keys: vec![String::new()] })
        .await
        .expect_err("empty key");
    assert_eq!(status.code(), Code::InvalidArgument);

    // Nothing was queued, and the server still answers.
    assert_eq!(embark.metric("embark_misses_published_total").await?, 0.0);
    let ok = client.lookup(lookup(MODEL, vec!["k".repeat(64); 8])).await?.into_inner();
    assert_eq!(ok.sources.len(), 8);
    assert_eq!(ok.vectors.len(), 8 * 384 * 4);
    // An empty batch is a valid, empty answer.
    let empty = client.lookup(lookup(MODEL, vec![])).await?.into_inner();
    assert_eq!((empty.dim, empty.vectors.len()), (384, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retina_refuses_bad_requests_and_reports_bad_inputs() -> anyhow::Result<()> {
    let retina = Server::start(&binary("retina"), &["--max-input-bytes", "100", "--max-request-inputs", "4"]).await?;
    let mut client = retina.retina_client().await?;
    let embed = |model: &str, inputs: Vec<String>| EmbedRequest { model: model.into(), inputs, ..Default::default() };

    let s = client.embed(embed("", vec!["x".into()])).await.expect_err("no model");
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = client.embed(embed("nope", vec!["x".into()])).await.expect_err("unknown model");
    assert_eq!(s.code(), Code::NotFound);
    let s = client.embed(embed(MODEL, vec!["x".into(); 5])).await.expect_err("too many inputs");
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(s.message().contains("--max-request-inputs"), "{}", s.message());

    let r = client.embed(embed(MODEL, vec!["fine".into(), "y".repeat(101)])).await?.into_inner();
    assert_eq!(r.dim, 384);
    assert_eq!(r.vectors.len(), 2 * 384 * 4);
    assert_eq!(r.failures.len(), 1);
    let f = &r.failures[0];
    assert_eq!((f.index, f.code, f.transient), (1, FailureCode::InvalidInput as i32, false));
    assert!(f.reason.contains("limit of 100 bytes"), "{}", f.reason);
    assert!(r.vectors[384 * 4..].iter().all(|b| *b == 0), "a failed input's row is zeros");
    Ok(())
}

/// Defect 11.4: a request was decoded in full (64 MiB allowed) before its
/// keys were checked: 16 MiB of empty keys became ~200 MiB of `String`s,
/// and a handful of such requests took the sidecar's memory. Now the
/// decode limit follows the request limits and the field count is checked
/// before anything is allocated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_decoded_in_full_before_validation() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let dir = data.path().to_str().expect("utf-8 path");
    let embark = Server::start(&binary("embark"), &["serve", "--data-dir", dir, "--max-batch-keys", "4096"]).await?;
    let mut client = embark.embark_client().await?.max_encoding_message_size(usize::MAX);
    let before = embark_tests::peak_rss_bytes(embark.pid())?;

    // 8M empty keys: 16 MiB on the wire, inside the byte limit that 4096
    // keys of 8 KiB need; refused by the field guard.
    let flood = LookupRequest { model: MODEL.into(), keys: vec![String::new(); 8 << 20], ..Default::default() };
    let status = client.lookup(flood).await.expect_err("refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("fields"), "{}", status.message());
    // Over the byte limit: refused from its length prefix.
    let huge = LookupRequest { model: MODEL.into(), keys: vec!["k".repeat(8192); 5000], ..Default::default() };
    let status = client.lookup(huge).await.expect_err("refused");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    let grown = embark_tests::peak_rss_bytes(embark.pid())?.saturating_sub(before);
    assert!(grown < 120 << 20, "peak RSS grew by {} MiB", grown >> 20);
    // Still serving.
    let ok = client
        .lookup(LookupRequest { model: MODEL.into(), keys: vec!["k".into()], ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(ok.sources.len(), 1);
    Ok(())
}
