//! A team's own model, by configuration only: `examples/models.toml` adds
//! paraphrase-MiniLM-L3-v2 (3 layers, mean pooling, not normalised; no
//! code of EmbArk names it) beside the shipped models, with weights from
//! `scripts/setup-example-model.sh`.
//! - `embark up` serves it: its Lookups answer its vectors, equal to
//!   onnxruntime's on the original ONNX export (an independent reference);
//! - the ONNX engine serves the model's original ONNX export with ONNX
//!   Runtime, equal to the candle engine on the same texts; and the
//!   shipped image model exported to ONNX by our own script, equal to the
//!   candle engine end to end on the same photos;
//! - the `retina` binary serves what the catalogue says too;
//! - a catalogue with a bad field, weights whose SHA-256 differs, or a
//!   `dim` the network does not give, is refused at start with a message
//!   naming the entry and field or file.

use std::{path::PathBuf, process::Command, time::Duration};

use embark_proto::{
    embark::v1::{LookupRequest, ModelsRequest, Source},
    retina::v1::{EmbedRequest, ModelsRequest as RetinaModelsRequest},
};
use embark_tests::{Server, binary, cosine, eventually, fixtures, http_fixtures::ImageServer, models_dir, rows};

const OWN: &str = "paraphrase-minilm-l3-v2";
const DIM: usize = 384;

fn catalogue() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models.toml")
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// (text, onnxruntime's unnormalised mean-pooled vector).
fn reference() -> Vec<(String, Vec<f32>)> {
    let text = std::fs::read_to_string(fixtures().join("paraphrase_minilm_l3_reference.json")).expect("fixture");
    let v: serde_json::Value = serde_json::from_str(&text).expect("fixture json");
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|c| {
            let vector = c["mean_pooled_unnormalised"].as_array().expect("vector");
            (
                c["text"].as_str().expect("text").to_owned(),
                vector.iter().map(|x| x.as_f64().unwrap_or(f64::NAN) as f32).collect(),
            )
        })
        .collect()
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt()
}

/// Each vector equals the reference: same direction and same length (the
/// entry says `normalize = false`).
fn assert_matches_reference(got: &[Vec<f32>], want: &[(String, Vec<f32>)]) {
    for (v, (text, r)) in got.iter().zip(want) {
        assert_eq!(v.len(), DIM);
        let c = cosine(v, r);
        assert!(c >= 0.99999, "{text:?}: cosine {c} with onnxruntime");
        let (n, rn) = (norm(v), norm(r));
        assert!((n - rn).abs() / rn < 1e-4, "{text:?}: length {n}, onnxruntime {rn} (normalised by mistake?)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_added_by_configuration_answers_lookups_with_its_vectors() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let catalogue = catalogue();
    let embark = Server::start(
        &binary("embark"),
        &[
            "up",
            "--models-config",
            path(&catalogue),
            "--models",
            &format!("{OWN},minilm-l6-v2"),
            "--data-dir",
            path(data.path()),
        ],
    )
    .await?;
    let mut client = embark.embark_client().await?;
    let models = client.models(ModelsRequest {}).await?.into_inner().models;
    let own = models.iter().find(|m| m.name == OWN).expect("the new model is listed");
    assert_eq!((own.dim as usize, own.version.as_str()), (DIM, "paraphrase-MiniLM-L3-v2/vital-0.2.1/mean-128"));

    let want = reference();
    let keys: Vec<String> = want.iter().map(|(t, _)| t.clone()).collect();
    let first = client
        .lookup(LookupRequest { model: OWN.into(), keys: keys.clone(), ..Default::default() })
        .await?
        .into_inner();
    assert!(first.sources.iter().all(|s| *s == Source::OovPending as i32));
    let own_vectors = filled(&client, OWN, &keys).await?;
    assert_matches_reference(&own_vectors, &want);

    // The shipped model beside it keeps its own pipeline (L2-normalised).
    for v in filled(&client, "minilm-l6-v2", &keys).await? {
        assert!((norm(&v) - 1.0).abs() < 1e-4);
    }
    Ok(())
}

/// Looks `keys` up in `model` until every one has its vector.
async fn filled(
    client: &embark_proto::embark::v1::emb_ark_client::EmbArkClient<tonic::transport::Channel>,
    model: &str,
    keys: &[String],
) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut first = client.clone();
    first.lookup(LookupRequest { model: model.into(), keys: keys.to_vec(), ..Default::default() }).await?;
    let answer = eventually(Duration::from_secs(60), "every key filled", || {
        let mut client = client.clone();
        let (model, keys) = (model.to_owned(), keys.to_vec());
        async move {
            let a = client.lookup(LookupRequest { model, keys, ..Default::default() }).await?.into_inner();
            Ok(a.sources.iter().all(|s| *s == Source::Store as i32 || *s == Source::Cache as i32).then_some(a))
        }
    })
    .await?;
    Ok(rows(&answer.vectors, answer.dim as usize))
}

/// The ONNX engine serves the original export (ONNX Runtime from the PyPI
/// wheel): its vectors equal the candle engine's on the same texts, and
/// onnxruntime's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_onnx_engine_serves_an_exported_encoder_equal_to_candle() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let catalogue = catalogue();
    let onnx = format!("{OWN}-onnx");
    let embark = Server::start(
        &binary("embark"),
        &[
            "up",
            "--models-config",
            path(&catalogue),
            "--models",
            &format!("{OWN},{onnx}"),
            "--data-dir",
            path(data.path()),
        ],
    )
    .await?;
    let client = embark.embark_client().await?;
    let want = reference();
    let keys: Vec<String> = want.iter().map(|(t, _)| t.clone()).collect();
    let from_onnx = filled(&client, &onnx, &keys).await?;
    let from_candle = filled(&client, OWN, &keys).await?;
    assert_matches_reference(&from_onnx, &want);
    for ((o, c), text) in from_onnx.iter().zip(&from_candle).zip(&keys) {
        let cos = cosine(o, c);
        assert!(cos >= 0.9999, "{text:?}: ONNX vs candle cosine {cos}");
    }
    Ok(())
}

/// The shipped image model exported to ONNX by our own script
/// (NCHW input): through the ONNX engine, end to end from the image
/// files, its vectors equal the candle engine's (NHWC) on the same photos.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_onnx_engine_serves_an_exported_image_encoder_equal_to_candle() -> anyhow::Result<()> {
    let images = ImageServer::start().await?;
    let data = tempfile::tempdir()?;
    let catalogue = catalogue();
    let embark = Server::start(
        &binary("embark"),
        &[
            "up",
            "--models-config",
            path(&catalogue),
            "--models",
            "efficientnet-lite0,efficientnet-lite0-onnx",
            "--data-dir",
            path(data.path()),
            "--fetch-allow-nets",
            "127.0.0.0/8",
        ],
    )
    .await?;
    let client = embark.embark_client().await?;
    let keys: Vec<String> = ["/img/cat.jpg", "/img/coffee.webp", "/img/astronaut.png", "/photos/rocket.jpg"]
        .iter()
        .map(|p| images.url(p))
        .collect();
    let from_onnx = filled(&client, "efficientnet-lite0-onnx", &keys).await?;
    let from_candle = filled(&client, "efficientnet-lite0", &keys).await?;
    for ((o, c), key) in from_onnx.iter().zip(&from_candle).zip(&keys) {
        assert_eq!(o.len(), 1280);
        let cos = cosine(o, c);
        assert!(cos >= 0.9999, "{key}: ONNX vs candle cosine {cos}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retina_binary_serves_what_the_catalogue_says() -> anyhow::Result<()> {
    let catalogue = catalogue();
    let retina = Server::start(&binary("retina"), &["--models-config", path(&catalogue), "--models", OWN]).await?;
    let mut client = retina.retina_client().await?;
    let models = client.models(RetinaModelsRequest {}).await?.into_inner().models;
    assert_eq!(models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), vec![OWN]);
    let want = reference();
    let inputs = want.iter().map(|(t, _)| t.clone()).collect();
    let reply = client.embed(EmbedRequest { model: OWN.into(), inputs, ..Default::default() }).await?.into_inner();
    assert!(reply.failures.is_empty(), "{:?}", reply.failures);
    assert_matches_reference(&rows(&reply.vectors, DIM), &want);
    Ok(())
}

/// `embark up` with `catalogue`, expected to refuse to start: its stderr.
fn refused_start(catalogue: &std::path::Path) -> anyhow::Result<String> {
    let data = tempfile::tempdir()?;
    let out = Command::new(binary("embark"))
        .args(["up", "--models-config", path(catalogue), "--data-dir", path(data.path())])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .env("EMBARK_MODELS_DIR", models_dir())
        .output()?;
    anyhow::ensure!(!out.status.success(), "started with a bad catalogue");
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_bad_catalogue_or_a_wrong_weight_file_is_refused_at_start() -> anyhow::Result<()> {
    let original = std::fs::read_to_string(catalogue())?;
    let dir = tempfile::tempdir()?;

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, original.replace("max_tokens = 128", "max_tokens = 0"))?;
    let e = refused_start(&bad)?;
    assert!(e.contains("model 3 (\"paraphrase-minilm-l3-v2\"), field `text.max_tokens`"), "{e}");

    // The digest of another file: the weights are refused, not served.
    let wrong = dir.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        original.replace(
            "sha256 = \"4d59d8028bd304f4cf32dd5ae1c35482ebe16c8315ee7b6a34c732d8fbe3393c\"",
            "sha256 = \"53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db\"",
        ),
    )?;
    let e = refused_start(&wrong)?;
    assert!(e.contains(OWN) && e.contains("the catalogue says 53aa5117"), "{e}");

    // More tokens than the model has positions: refused at load, not as a
    // failed batch whenever a long text comes.
    let long = dir.path().join("long.toml");
    std::fs::write(&long, original.replace("max_tokens = 128", "max_tokens = 1024"))?;
    let e = refused_start(&long)?;
    assert!(e.contains(OWN) && e.contains("text.max_tokens is 1024, but the model has 512 positions"), "{e}");

    // A dim the network does not give: refused at load, not at every fill.
    let own_entry = "version = \"paraphrase-MiniLM-L3-v2/vital-0.2.1/mean-128\"\nkind = \"text\"\nengine = \"candle\"\narchitecture = \"bert\"\ndim = 384";
    assert!(original.contains(own_entry));
    let wrong_dim = dir.path().join("dim.toml");
    std::fs::write(&wrong_dim, original.replace(own_entry, &own_entry.replace("dim = 384", "dim = 512")))?;
    let e = refused_start(&wrong_dim)?;
    assert!(e.contains(OWN) && e.contains("gives 384 values per input, but the catalogue says dim = 512"), "{e}");
    Ok(())
}
