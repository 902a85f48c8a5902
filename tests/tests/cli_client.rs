//! The client verbs of the `embark` binary (`get`, `similar`, `invalidate`,
//! `models`) against a live `embark up`: over TCP and the Unix socket, as
//! tables and as JSON, with the same vectors a gRPC client gets; and over
//! TLS with tokens, where a read token may not invalidate.

use std::{path::Path, process::Output, time::Duration};

use embark_proto::embark::v1::{LookupRequest, Source};
use embark_tests::{SecuredEmbark, Server, binary, eventually};

const MODEL: &str = "minilm-l6-v2";

/// Runs `embark ARGS` with a bounded time, without the caller's token.
async fn embark(args: &[&str]) -> anyhow::Result<Output> {
    let mut command = tokio::process::Command::new(binary("embark"));
    command.args(args).env_remove("EMBARK_TOKEN").env_remove("EMBARK_ADDR").kill_on_drop(true);
    Ok(tokio::time::timeout(Duration::from_secs(90), command.output()).await??)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(out.status.success(), "exit {:?}: {}", out.status, stderr(out));
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_similar_invalidate_and_models_against_a_live_server() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("embark.sock");
    let data = dir.path().join("data");
    let server = Server::start(
        &binary("embark"),
        &["up", "--models", MODEL, "--data-dir", utf8(&data), "--uds", utf8(&sock), "--similar-refresh-secs", "1"],
    )
    .await?;
    let addr = format!("http://{}", server.grpc);
    let unix = format!("unix://{}", sock.display());

    // models: the same answer over TCP and the socket.
    let models = json(&embark(&["models", "--addr", &addr, "--json"]).await?)?;
    assert_eq!(models, json(&embark(&["models", "--addr", &unix, "--json"]).await?)?);
    let first = &models[0];
    assert_eq!(
        (first["name"].as_str(), first["kind"].as_str(), first["dim"].as_u64()),
        (Some(MODEL), Some("text"), Some(384))
    );
    let table = stdout(&embark(&["models", "--addr", &addr]).await?);
    assert!(table.starts_with("NAME") && table.contains(MODEL), "{table}");

    // get --wait: asks again until both keys are embedded.
    let (red, blue) = ("a red running shoe", "a blue running shoe");
    let got = json(&embark(&["get", "--addr", &addr, "-m", MODEL, "--wait", "60", "--json", red, blue]).await?)?;
    assert_eq!(got["dim"], 384);
    let rows = got["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2);
    let vectors: Vec<Vec<f32>> = rows
        .iter()
        .map(|r| r["vector"].as_array().expect("vector").iter().map(|x| x.as_f64().expect("number") as f32).collect())
        .collect();
    for (row, key) in rows.iter().zip([red, blue]) {
        assert_eq!(row["key"], key);
        assert!(matches!(row["source"].as_str(), Some("STORE" | "CACHE")), "{row}");
    }
    // ... the very floats a gRPC client gets.
    let mut client = server.embark_client().await?;
    let direct = client
        .lookup(LookupRequest { model: MODEL.into(), keys: vec![red.into(), blue.into()], ..Default::default() })
        .await?
        .into_inner();
    let floats: Vec<f32> =
        direct.vectors.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    assert_eq!(floats, vectors.concat(), "JSON floats round-trip exactly");

    // Keys from stdin, over the socket, as a table.
    let mut piped = tokio::process::Command::new(binary("embark"));
    piped.args(["get", "--addr", &unix, "-m", MODEL, "-"]).stdin(std::process::Stdio::piped()).kill_on_drop(true);
    piped.stdout(std::process::Stdio::piped());
    let mut child = piped.spawn()?;
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(format!("{red}\n{blue}\n").as_bytes()).await?;
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await??;
    let table = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(table.starts_with("KEY") && table.contains("VECTOR (384-d)"), "{table}");
    assert_eq!(table.lines().filter(|l| l.contains("CACHE") || l.contains("STORE")).count(), 2, "{table}");

    // similar: the blue shoe is the red shoe's neighbour once indexed.
    let similar = eventually(Duration::from_secs(60), "the index to hold both keys", || {
        let addr = addr.clone();
        async move {
            let v =
                json(&embark(&["similar", "--addr", &addr, "-m", MODEL, "--key", red, "-k", "3", "--json"]).await?)?;
            Ok(v["neighbours"].as_array().is_some_and(|n| n.iter().any(|x| x["key"] == blue)).then_some(v))
        }
    })
    .await?;
    assert!(similar["exact"].as_bool().expect("exact"), "two vectors: exact search");
    let score = similar["neighbours"][0]["score"].as_f64().expect("score");
    assert!(score > 0.5 && score <= 1.0, "{similar}");
    // ... and by vector, which finds the key itself first.
    let query: Vec<String> = vectors[0].iter().map(|x| x.to_string()).collect();
    let by_vector = embark(&["similar", "--addr", &addr, "-m", MODEL, "--vector", &query.join(","), "-k", "1"]).await?;
    assert!(
        stdout(&by_vector).lines().nth(1).is_some_and(|l| l.ends_with(red)),
        "{}{}",
        stdout(&by_vector),
        stderr(&by_vector)
    );

    // invalidate: the key is forgotten and queued again.
    let done = json(&embark(&["invalidate", "--addr", &addr, "-m", MODEL, "--json", red]).await?)?;
    assert_eq!(done["invalidated"], 1, "{done}");
    let after = client
        .lookup(LookupRequest { model: MODEL.into(), keys: vec![red.into()], ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(after.sources, vec![Source::OovPending as i32]);

    // Errors: the server's message, a non-zero exit, nothing on stdout.
    let unknown = embark(&["get", "--addr", &addr, "-m", "nope", "x"]).await?;
    assert!(!unknown.status.success());
    assert!(stderr(&unknown).contains("NotFound: unknown model \"nope\""), "{}", stderr(&unknown));
    assert!(unknown.stdout.is_empty());
    let bad_dim = embark(&["similar", "--addr", &addr, "-m", MODEL, "--vector", "1,2,3"]).await?;
    assert!(!bad_dim.status.success() && stderr(&bad_dim).contains("InvalidArgument"), "{}", stderr(&bad_dim));
    let nobody = format!("http://127.0.0.1:{}", embark_tests::free_port());
    let down = embark(&["models", "--addr", &nobody, "--attempts", "1", "--timeout-ms", "2000"]).await?;
    assert!(!down.status.success() && stderr(&down).contains(&nobody), "{}", stderr(&down));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_verbs_speak_tls_and_carry_tokens() -> anyhow::Result<()> {
    let secured = SecuredEmbark::start(MODEL, &[]).await?;
    let (server, c) = (&secured.server, secured.certs());
    // The dev certificate names 127.0.0.1, so the host of --addr checks it.
    let addr = format!("https://{}", server.grpc);
    let ca = c.join("ca.pem");
    let tls = ["--addr", &addr, "--ca", utf8(&ca)];
    let with = |extra: &[&str]| [&tls[..], extra].concat().iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let run = |args: Vec<String>| async move { embark(&args.iter().map(String::as_str).collect::<Vec<_>>()).await };

    let refused = run([vec!["models".to_string()], with(&[])].concat()).await?;
    assert!(!refused.status.success() && stderr(&refused).contains("Unauthenticated"), "{}", stderr(&refused));

    let read = utf8(&c.join("ranker.token")).to_owned();
    let models = run([vec!["models".to_string()], with(&["--token-file", &read, "--json"])].concat()).await?;
    assert_eq!(json(&models)?[0]["name"], MODEL);

    let by_env = {
        let mut command = tokio::process::Command::new(binary("embark"));
        command.arg("models").args(with(&[])).env("EMBARK_TOKEN", std::fs::read_to_string(c.join("ranker.token"))?);
        tokio::time::timeout(Duration::from_secs(60), command.output()).await??
    };
    assert!(by_env.status.success(), "$EMBARK_TOKEN is sent: {}", stderr(&by_env));

    let denied =
        run([vec!["invalidate".to_string()], with(&["--token-file", &read, "-m", MODEL, "k"])].concat()).await?;
    assert!(!denied.status.success(), "a read token may not invalidate");
    assert!(
        stderr(&denied).contains("PermissionDenied") && stderr(&denied).contains("needs admin"),
        "{}",
        stderr(&denied)
    );

    let admin = utf8(&c.join("ops.token")).to_owned();
    let done =
        run([vec!["invalidate".to_string()], with(&["--token-file", &admin, "-m", MODEL, "k", "--json"])].concat())
            .await?;
    assert_eq!(json(&done)?["invalidated"], 1);

    let plain = embark(&["models", "--addr", &format!("http://{}", server.grpc), "--attempts", "1"]).await?;
    assert!(!plain.status.success(), "a plaintext client gets no answer from a TLS server");
    Ok(())
}
