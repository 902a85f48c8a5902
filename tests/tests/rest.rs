//! The REST/JSON API (`embark up --rest-listen`) against a live server:
//! the same vectors and errors as gRPC, mapped to HTTP codes; the same
//! tokens and roles over the same TLS; and schemathesis, property-based,
//! against the server's own OpenAPI document.

use std::{path::Path, time::Duration};

use embark_proto::embark::v1::{LookupRequest, Source, VectorType};
use embark_tests::{SecuredEmbark, Server, binary, eventually, free_port};
use serde_json::{Value, json};

const MODEL: &str = "minilm-l6-v2";

fn utf8(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// POSTs `body` as JSON (with `token`, if any); the status and the parsed
/// answer.
async fn post(client: &reqwest::Client, url: &str, body: &Value, token: Option<&str>) -> anyhow::Result<(u16, Value)> {
    let mut request = client.post(url).header("content-type", "application/json").body(serde_json::to_vec(body)?);
    if let Some(t) = token {
        request = request.header("authorization", format!("Bearer {}", t.trim()));
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, serde_json::from_slice(&response.bytes().await?)?))
}

async fn get(client: &reqwest::Client, url: &str, token: Option<&str>) -> anyhow::Result<(u16, Value)> {
    let mut request = client.get(url);
    if let Some(t) = token {
        request = request.header("authorization", format!("Bearer {}", t.trim()));
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, serde_json::from_slice(&response.bytes().await?)?))
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_answers_as_grpc_does_and_conforms_to_its_openapi_document() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let rest = format!("127.0.0.1:{}", free_port());
    let server = Server::start(
        &binary("embark"),
        &[
            "up",
            "--models",
            MODEL,
            "--data-dir",
            utf8(data.path()),
            "--rest-listen",
            &rest,
            "--similar-refresh-secs",
            "1",
        ],
    )
    .await?;
    let base = format!("http://{rest}/v1");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;

    let (code, models) = get(&http, &format!("{base}/models"), None).await?;
    assert_eq!(code, 200, "{models}");
    assert_eq!(
        models["models"][0],
        json!({
            "name": MODEL,
            "kind": "text",
            "dim": 384,
            "version": embark_tests::builtin_version(MODEL),
            "current": true,
            "stored_vectors": models["models"][0]["stored_vectors"],
            "stored_vectors_counted_at_unix_ms": models["models"][0]["stored_vectors_counted_at_unix_ms"],
        })
    );

    // An unknown key: its OOV row at once, then the real vector.
    let (red, blue) = ("a red running shoe", "a blue running shoe");
    let ask = json!({"model": MODEL, "keys": [red, blue, red]});
    let (code, first) = post(&http, &format!("{base}/lookup"), &ask, None).await?;
    assert_eq!(code, 200, "{first}");
    assert_eq!(first["sources"], json!(["OOV_PENDING", "OOV_PENDING", "OOV_PENDING"]));
    assert_eq!(first["mask"], json!([false, false, false]));
    let filled = eventually(Duration::from_secs(60), "both keys embedded", || {
        let (http, url, ask) = (http.clone(), format!("{base}/lookup"), ask.clone());
        async move {
            let (_, v) = post(&http, &url, &ask, None).await?;
            Ok((v["mask"] == json!([true, true, true])).then_some(v))
        }
    })
    .await?;
    assert_eq!(filled["dim"], 384);
    let rows: Vec<Vec<f32>> = serde_json::from_value(filled["vectors"].clone())?;
    assert_eq!((rows.len(), rows[0].len()), (3, 384));
    assert_eq!(rows[0], rows[2], "duplicate keys get the same row");
    // ... the very floats gRPC answers, and base64 is its exact bytes.
    let mut grpc = server.embark_client().await?;
    let keys = vec![red.to_owned(), blue.to_owned(), red.to_owned()];
    let direct = grpc.lookup(LookupRequest { model: MODEL.into(), keys, ..Default::default() }).await?.into_inner();
    assert!(direct.sources.iter().all(|&s| s == Source::Cache as i32 || s == Source::Store as i32));
    assert_eq!(floats(&direct.vectors), rows.concat(), "JSON floats round-trip exactly");
    let (_, b64) = post(
        &http,
        &format!("{base}/lookup"),
        &json!({"model": MODEL, "keys": [red, blue, red], "encoding": "base64"}),
        None,
    )
    .await?;
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64["vectors_base64"].as_str().expect("base64"))?;
    assert_eq!(bytes, direct.vectors.to_vec());
    assert!(b64.get("vectors").is_none());
    assert_eq!(b64["vector_type"], "f32");

    // Issue 14: compact types, as gRPC answers them: i8 in base64 with
    // its scales, f16 as numbers (the f16 values).
    let typed = |t: VectorType| {
        let keys = vec![red.to_owned(), blue.to_owned(), red.to_owned()];
        let mut grpc = grpc.clone();
        async move {
            let r = LookupRequest { model: MODEL.into(), keys, vector_type: t as i32, ..Default::default() };
            anyhow::Ok(grpc.lookup(r).await?.into_inner())
        }
    };
    let i8_grpc = typed(VectorType::I8).await?;
    let (_, i8_rest) = post(
        &http,
        &format!("{base}/lookup"),
        &json!({"model": MODEL, "keys": [red, blue, red], "encoding": "base64", "vector_type": "i8"}),
        None,
    )
    .await?;
    let decode = |v: &Value| base64::engine::general_purpose::STANDARD.decode(v.as_str().expect("base64"));
    assert_eq!(i8_rest["vector_type"], "i8");
    assert_eq!(decode(&i8_rest["vectors_base64"])?, i8_grpc.vectors.to_vec());
    assert_eq!(decode(&i8_rest["scales_base64"])?, i8_grpc.scales.to_vec());
    assert_eq!((i8_grpc.vectors.len(), i8_grpc.scales.len()), (3 * 384, 3 * 4));
    let f16_grpc = typed(VectorType::F16).await?;
    let (_, f16_rest) = post(
        &http,
        &format!("{base}/lookup"),
        &json!({"model": MODEL, "keys": [red, blue, red], "vector_type": "f16"}),
        None,
    )
    .await?;
    let f16_rows: Vec<Vec<f32>> = serde_json::from_value(f16_rest["vectors"].clone())?;
    let want = embark_proto::vectors::decode_matrix(VectorType::F16, &f16_grpc.vectors, &[], 384).expect("rows");
    assert_eq!(f16_rows.concat(), want);
    let (code, bad) =
        post(&http, &format!("{base}/lookup"), &json!({"model": MODEL, "keys": [red], "vector_type": "f64"}), None)
            .await?;
    assert_eq!(code, 400, "{bad}");

    // Similar, by key once indexed, and by vector.
    let near = eventually(Duration::from_secs(60), "the index to hold both keys", || {
        let (http, url) = (http.clone(), format!("{base}/similar"));
        async move {
            let (code, v) = post(&http, &url, &json!({"model": MODEL, "key": red, "k": 3}), None).await?;
            Ok((code == 200 && v["neighbours"].as_array().is_some_and(|n| n.iter().any(|x| x["key"] == blue)))
                .then_some(v))
        }
    })
    .await?;
    assert_eq!(near["exact"], true);
    let (code, by_vector) =
        post(&http, &format!("{base}/similar"), &json!({"model": MODEL, "vector": rows[0], "k": 1}), None).await?;
    assert_eq!((code, by_vector["neighbours"][0]["key"].as_str()), (200, Some(red)), "{by_vector}");

    // Errors: the gRPC code's name and the server's message, as HTTP codes.
    let error = |v: &Value| (v["error"]["code"].as_str().map(str::to_owned), v["error"]["message"].is_string());
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        ("lookup", json!({"model": "nope", "keys": ["x"]}), 404, "NOT_FOUND"),
        ("lookup", json!({"model": MODEL, "keys": [""]}), 400, "INVALID_ARGUMENT"),
        ("lookup", json!({"model": MODEL}), 400, "INVALID_ARGUMENT"),
        ("lookup", json!({"model": MODEL, "keys": ["x"], "colour": 1}), 400, "INVALID_ARGUMENT"),
        ("lookup", json!({"model": MODEL, "keys": vec!["k"; 4097]}), 429, "RESOURCE_EXHAUSTED"),
        ("similar", json!({"model": MODEL, "vector": vec![0.0; 384]}), 400, "INVALID_ARGUMENT"),
        ("similar", json!({"model": MODEL, "vector": [1.0, 2.0]}), 400, "INVALID_ARGUMENT"),
        ("similar", json!({"model": MODEL, "key": red, "vector": [1.0]}), 400, "INVALID_ARGUMENT"),
        ("similar", json!({"model": MODEL, "key": "never seen"}), 409, "FAILED_PRECONDITION"),
    ];
    for (route, body, want, name) in cases {
        let (code, answer) = post(&http, &format!("{base}/{route}"), &body, None).await?;
        assert_eq!((code, error(&answer)), (want, (Some(name.to_owned()), true)), "{route} {body}: {answer}");
    }
    let not_json = http.post(format!("{base}/lookup")).body("model=x").send().await?;
    assert_eq!(not_json.status().as_u16(), 415);
    let (code, missing) = get(&http, &format!("{base}/nothing-here"), None).await?;
    assert_eq!((code, error(&missing).0.as_deref()), (404, Some("NOT_FOUND")));

    // Invalidate: forgotten and queued again.
    let (code, done) =
        post(&http, &format!("{base}/invalidate"), &json!({"model": MODEL, "keys": [red]}), None).await?;
    assert_eq!((code, &done["invalidated"]), (200, &json!(1)), "{done}");
    let (_, after) = post(&http, &format!("{base}/lookup"), &json!({"model": MODEL, "keys": [red]}), None).await?;
    assert_eq!(after["sources"], json!(["OOV_PENDING"]));

    // The document, served, and the server checked against it.
    let (code, doc) = get(&http, &format!("{base}/openapi.json"), None).await?;
    assert_eq!((code, doc["info"]["title"].as_str()), (200, Some("EmbArk REST API")));
    schemathesis(&format!("{base}/openapi.json")).await?;
    drop(server);
    Ok(())
}

/// Runs schemathesis (`$EMBARK_SCHEMATHESIS`, installed by
/// `scripts/install-schemathesis.sh`) against `schema_url`: positive and
/// negative examples of every operation, deterministic, bounded in time.
/// Checks: no 5xx, only documented status codes, JSON where documented,
/// answers that match their schemas, and invalid input refused with a 4xx.
async fn schemathesis(schema_url: &str) -> anyhow::Result<()> {
    let st = std::env::var("EMBARK_SCHEMATHESIS").map_err(|_| {
        anyhow::anyhow!("EMBARK_SCHEMATHESIS is not set: run scripts/install-schemathesis.sh (scripts/test.sh does)")
    })?;
    // Its own working directory: schemathesis keeps a `.schemathesis/`
    // cache where it runs, which must not land in the checkout.
    let work = tempfile::tempdir()?;
    let mut command = tokio::process::Command::new(st);
    command
        .current_dir(work.path())
        .args(["run", schema_url])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection",
        ])
        .args(["--max-examples", "40", "--generation-deterministic", "--workers", "1", "--request-timeout", "20"])
        .args(["--phases", "examples,coverage,fuzzing", "--report-dir"])
        .arg(work.path().join("report"))
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(240), command.output()).await??;
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{report}");
    anyhow::ensure!(out.status.success(), "schemathesis found the server off its OpenAPI document:\n{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_takes_the_grpc_servers_tls_tokens_and_roles() -> anyhow::Result<()> {
    let rest = format!("127.0.0.1:{}", free_port());
    let secured = SecuredEmbark::start(MODEL, &["--rest-listen", &rest]).await?;
    let c = secured.certs();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(c.join("ca.pem"))?)?;
    let https = reqwest::Client::builder()
        .add_root_certificate(ca)
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(30))
        .build()?;
    // The dev certificate names 127.0.0.1.
    let base = format!("https://{rest}/v1");
    let read = std::fs::read_to_string(c.join("ranker.token"))?;
    let admin = std::fs::read_to_string(c.join("ops.token"))?;
    let ask = json!({"model": MODEL, "keys": ["hello"]});

    let (code, refused) = post(&https, &format!("{base}/lookup"), &ask, None).await?;
    assert_eq!((code, refused["error"]["code"].as_str()), (401, Some("UNAUTHENTICATED")), "{refused}");
    let (code, refused) = post(&https, &format!("{base}/lookup"), &ask, Some("not-a-token")).await?;
    assert_eq!(code, 401, "{refused}");
    let (code, answer) = post(&https, &format!("{base}/lookup"), &ask, Some(&read)).await?;
    assert_eq!((code, &answer["sources"]), (200, &json!(["OOV_PENDING"])), "{answer}");
    let (code, models) = get(&https, &format!("{base}/models"), Some(&read)).await?;
    assert_eq!(code, 200, "{models}");

    let invalidate = json!({"model": MODEL, "keys": ["hello"]});
    let (code, denied) = post(&https, &format!("{base}/invalidate"), &invalidate, Some(&read)).await?;
    assert_eq!((code, denied["error"]["code"].as_str()), (403, Some("PERMISSION_DENIED")), "{denied}");
    let (code, done) = post(&https, &format!("{base}/invalidate"), &invalidate, Some(&admin)).await?;
    assert_eq!(code, 200, "{done}");

    // The document is public; plaintext gets no answer from a TLS port.
    let (code, _) = get(&https, &format!("{base}/openapi.json"), None).await?;
    assert_eq!(code, 200);
    let plain = reqwest::Client::new().get(format!("http://{rest}/v1/openapi.json")).send().await;
    assert!(plain.is_err() || plain.is_ok_and(|r| !r.status().is_success()), "plaintext on the TLS port");
    Ok(())
}
