//! The README's client examples, run as written against `embark up`: the
//! grpcurl call and the Python grpcio + numpy client. `scripts/test.sh`
//! installs both tools (scripts/install-grpcurl.sh, examples/python/setup.sh).

use std::{path::PathBuf, process::Command, time::Duration};

use embark_tests::{Server, binary, eventually};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a setup script of the repo and returns the path it prints.
fn tool(script: &str) -> String {
    let out = Command::new("bash").arg(repo().join(script)).output().expect("run setup script");
    assert!(out.status.success(), "{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().last().expect("a path").trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_and_python_examples_work() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let embark = Server::start(&binary("embark"), &["up", "--data-dir", data.path().to_str().expect("utf-8")]).await?;
    let target = embark.grpc.to_string();

    // grpcurl, through reflection (no .proto files needed).
    let grpcurl = tool("scripts/install-grpcurl.sh");
    let out = Command::new(&grpcurl).args(["-plaintext", &target, "list"]).output()?;
    let services = String::from_utf8_lossy(&out.stdout);
    assert!(services.contains("embark.v1.EmbArk") && services.contains("grpc.health.v1.Health"), "{services}");
    assert!(!services.contains("retina.v1"), "EmbArk's port lists only what it serves: {services}");
    let call = |keys: &str| {
        Command::new(&grpcurl)
            .args(["-plaintext", "-d", &format!(r#"{{"model": "minilm-l6-v2", "keys": [{keys}]}}"#)])
            .args([&target, "embark.v1.EmbArk/Lookup"])
            .output()
    };
    let out = call(r#""a red running shoe", "a blue running shoe""#)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(reply["dim"], 384);
    assert_eq!(reply["sources"], serde_json::json!(["OOV_PENDING", "OOV_PENDING"]));

    // The Python client sees the OOV mask flip once the vectors are filled.
    let python = tool("examples/python/setup.sh");
    let script = repo().join("examples/python/lookup.py");
    let run = || {
        Command::new(&python)
            .arg(&script)
            .args(["--target", &target, "a red running shoe", "a blue running shoe", "a green hat"])
            .output()
    };
    let out = eventually(Duration::from_secs(60), "the Python client to see real rows", || async {
        let out = run()?;
        anyhow::ensure!(out.status.success(), "lookup.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(text.contains("real rows: 2/3").then_some(text))
    })
    .await?;
    assert!(out.contains("matrix (3, 384) float32"), "{out}");
    assert!(out.contains("STORE") || out.contains("CACHE"), "{out}");
    assert!(out.contains("OOV_PENDING  |v|=0.0000 a green hat"), "{out}");
    Ok(())
}
