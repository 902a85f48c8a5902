//! Harness for end-to-end tests across real processes: the `embark` and
//! `retina` binaries started on free loopback ports, gRPC clients, metrics
//! scraped over real HTTP. Every wait is bounded; every process is killed
//! when its handle drops, so a failing test leaves nothing running.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub mod http_fixtures;
pub mod kafka;

use anyhow::{Context, bail};
use embark_proto::{embark::v1::emb_ark_client::EmbArkClient, retina::v1::retina_client::RetinaClient};
use tonic::transport::Channel;

/// Where the setup script put the weights (`EMBARK_MODELS_DIR` or the cache).
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("EMBARK_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/embark/models"));
    assert!(
        dir.join("minilm-l6-v2/model.safetensors").is_file(),
        "no model weights in {}: run scripts/setup-models.sh (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// A binary of this workspace, next to the test executable's `deps/`.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A free loopback port (bound then released; the OS does not hand it out
/// again at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// The repository's `tests/fixtures` directory.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A running server process.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    log: PathBuf,
    _logdir: tempfile::TempDir,
}

impl Server {
    /// Starts `binary` with `args` plus `--listen` and `--metrics-listen`
    /// on free ports, and waits (up to 60 s) until `/readyz` says ready.
    pub async fn start(binary: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        Self::start_on(binary, args, Some(grpc)).await
    }

    /// Starts `binary` with `args`, `--listen grpc` if given, and
    /// `--metrics-listen` on a free port; waits (up to 60 s) until ready.
    /// A process without a gRPC port (kfc) gets `grpc` = its metrics address.
    pub async fn start_on(binary: &Path, args: &[&str], grpc: Option<SocketAddr>) -> anyhow::Result<Self> {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let logdir = tempfile::tempdir()?;
        let log = logdir.path().join("server.log");
        let mut command = Command::new(binary);
        command.args(args);
        if let Some(grpc) = grpc {
            command.arg("--listen").arg(grpc.to_string());
        }
        let grpc = grpc.unwrap_or(metrics);
        let child = command
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .env("EMBARK_MODELS_DIR", models_dir())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut server = Self { child, grpc, metrics, log, _logdir: logdir };
        server.wait_ready(Duration::from_secs(60)).await?;
        Ok(server)
    }

    async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let url = format!("http://{}/readyz", self.metrics);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("server exited with {status} before it was ready:\n{}", self.log_text());
            }
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!("server not ready after {limit:?}:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn embark_client(&self) -> anyhow::Result<EmbArkClient<Channel>> {
        Ok(EmbArkClient::connect(format!("http://{}", self.grpc)).await?.max_decoding_message_size(256 << 20))
    }

    pub async fn retina_client(&self) -> anyhow::Result<RetinaClient<Channel>> {
        Ok(RetinaClient::connect(format!("http://{}", self.grpc)).await?.max_decoding_message_size(256 << 20))
    }

    /// The Prometheus text from `/metrics`.
    pub async fn metrics_text(&self) -> anyhow::Result<String> {
        Ok(reqwest::get(format!("http://{}/metrics", self.metrics)).await?.text().await?)
    }

    /// The value of the sample whose line starts with `series` (name plus
    /// labels exactly as rendered), or 0 if absent.
    pub async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        Ok(metric_value(&self.metrics_text().await?, series))
    }

    /// SIGTERM, then wait (bounded) for a clean exit; returns the status.
    pub fn terminate(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let ok = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status()?.success();
        anyhow::ensure!(ok, "kill -TERM failed");
        let started = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if started.elapsed() > limit {
                bail!("no exit {limit:?} after SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Polls `check` every 100 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if started.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rows of a little-endian f32 matrix.
pub fn rows(bytes: &[u8], dim: usize) -> Vec<Vec<f32>> {
    let values = embark_proto::f32_from_le(bytes).expect("matrix bytes are whole f32s");
    values.chunks(dim).map(<[f32]>::to_vec).collect()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// The reference vectors made by `scripts/reference_minilm.py`.
pub fn minilm_reference() -> Vec<(String, Vec<f32>)> {
    let text = std::fs::read_to_string(fixtures().join("minilm_reference.json")).expect("fixture");
    let v: serde_json::Value = serde_json::from_str(&text).expect("fixture json");
    v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let t = c["text"].as_str().expect("text").to_owned();
            let vec = c["vector"].as_array().expect("vector").iter().map(|x| x.as_f64().expect("f64") as f32).collect();
            (t, vec)
        })
        .collect()
}

/// The HTTP status of a GET of `url`.
pub async fn http_get_status(url: &str) -> anyhow::Result<u16> {
    Ok(reqwest::get(url).await?.status().as_u16())
}

/// Peak resident memory of a process (VmHWM), in bytes.
pub fn peak_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    proc_status_bytes(pid, "VmHWM")
}

/// Resident memory of a process now (VmRSS), in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    proc_status_bytes(pid, "VmRSS")
}

/// A `kB` field of `/proc/PID/status`, in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{field} in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

/// A gRPC channel over the Unix socket at `path`, with `endpoint`'s
/// settings (its URI is a placeholder: the connector ignores it).
pub async fn connect_uds(endpoint: tonic::transport::Endpoint, path: PathBuf) -> anyhow::Result<Channel> {
    Ok(endpoint
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await?)
}

/// A child process killed (SIGKILL, by its own handle) when dropped, for
/// programs that start servers without the readiness probe of [`Server`].
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The efficientnet-lite0 reference vector of a fixture image.
pub fn efficientnet_reference(file: &str) -> Vec<f32> {
    let text = std::fs::read_to_string(fixtures().join("efficientnet_reference.json")).expect("fixture");
    let v: serde_json::Value = serde_json::from_str(&text).expect("fixture json");
    v["images"]
        .as_array()
        .expect("images")
        .iter()
        .find(|c| c["file"] == file)
        .map(|c| c["vector"].as_array().expect("vector").iter().map(|x| x.as_f64().expect("f64") as f32).collect())
        .unwrap_or_else(|| panic!("no reference for {file}"))
}

/// The answer to `request` once the model's similarity index has loaded
/// (it answers UNAVAILABLE until then), waiting at most `limit`.
pub async fn similar_once_loaded(
    client: &EmbArkClient<Channel>,
    request: embark_proto::embark::v1::SimilarRequest,
    limit: Duration,
) -> anyhow::Result<embark_proto::embark::v1::SimilarResponse> {
    eventually(limit, "the similarity index to load", || {
        let (mut client, request) = (client.clone(), request.clone());
        async move {
            match client.similar(request).await {
                Ok(r) => Ok(Some(r.into_inner())),
                Err(s) if s.code() == tonic::Code::Unavailable => Ok(None),
                Err(s) => Err(s.into()),
            }
        }
    })
    .await
}
