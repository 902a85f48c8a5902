//! `embark serve --uds PATH`: the same gRPC service on a Unix domain socket,
//! for a ranker on the same host; the socket file is removed at exit.

use std::time::Duration;

use embark_proto::embark::v1::{LookupRequest, ModelsRequest, Source, emb_ark_client::EmbArkClient};
use embark_tests::{Server, binary, connect_uds};
use tonic::transport::Endpoint;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_over_a_unix_socket() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("embark.sock");
    let data = dir.path().join("data");
    let mut embark = Server::start(
        &binary("embark"),
        &[
            "serve",
            "--models",
            "minilm-l6-v2",
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--uds",
            sock.to_str().expect("utf-8"),
        ],
    )
    .await?;
    assert!(sock.exists(), "the socket is bound once ready");

    let channel = connect_uds(Endpoint::from_static("http://[::]:50051"), sock.clone()).await?;
    let mut client = EmbArkClient::new(channel);
    let models = client.models(ModelsRequest {}).await?.into_inner();
    assert_eq!(models.models.len(), 1);
    let r = client
        .lookup(LookupRequest {
            model: "minilm-l6-v2".into(),
            keys: vec!["over a unix socket".into()],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!((r.dim, r.sources), (384, vec![Source::OovPending as i32]));

    let status = embark.terminate(Duration::from_secs(20))?;
    assert!(status.success(), "{status}");
    assert!(!sock.exists(), "the socket file is removed at exit");
    Ok(())
}
