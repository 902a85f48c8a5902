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
pub mod otlp;

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
/// The store rows of a built-in model's current version: what a front
/// reads and a fill writes (`model@version`, see `embark_store::namespace`).
pub fn stored_as(model: &str) -> String {
    embark_store::namespace(model, &builtin_version(model))
}

/// The current version of a built-in model (empty for a model the
/// built-in catalogue does not have).
pub fn builtin_version(model: &str) -> String {
    retina::catalog::builtin().spec(model).map(|s| s.version.clone()).unwrap_or_default()
}

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
    /// Whether the test stopped it (terminate, kill): a server that exits
    /// otherwise is reported when dropped.
    stopped: bool,
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
            // `EMBARK_TEST_RUST_LOG` to see more of a server under test, e.g.
            // `info,librdkafka=debug` with `--kafka-property debug=cgrp`.
            .env("RUST_LOG", std::env::var("EMBARK_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut server = Self { child, grpc, metrics, log, _logdir: logdir, stopped: false };
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

    /// The value of `series` (name plus labels exactly as rendered) in a
    /// scrape of `/metrics`. Panics if the scrape has no such series: a
    /// renamed metric must fail the test, not read as 0 (see [`metric_value`]).
    pub async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        Ok(metric_value(&self.metrics_text().await?, series))
    }

    /// Like [`Server::metric`], but 0 while the series does not exist yet:
    /// for polling a counter with labels, which appears only once it is
    /// first incremented, until it reaches a positive target (a missing
    /// series then times the wait out instead of passing).
    pub async fn metric_or_zero(&self, series: &str) -> anyhow::Result<f64> {
        Ok(metric_value_or_zero(&self.metrics_text().await?, series))
    }

    /// SIGTERM, then wait (bounded) for a clean exit; returns the status.
    pub fn terminate(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        self.stopped = true;
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
        self.stopped = true;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// How the process ended, if it has (without waiting): a test that
    /// faults what the server depends on checks the server outlived it.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Server {
    /// Kills the server. One that had exited on its own before the test
    /// stopped it (a crash the test did not cause) says so, with the end
    /// of its log, so a failure in CI shows why.
    fn drop(&mut self) {
        if !self.stopped
            && let Ok(Some(status)) = self.child.try_wait()
        {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("server on {} exited by itself ({status}); its log ends:\n{}", self.grpc, tail.join("\n"));
        }
        self.kill();
    }
}

/// The value of the sample `series` (name plus labels exactly as rendered,
/// e.g. `kfc_filled_total{model="m",outcome="vector"}`) in Prometheus text.
///
/// Panics, naming the series and the metrics the scrape does have, when the
/// series is absent or its value does not parse: an assertion that a
/// counter is 0 must not pass because the counter was renamed. For a series
/// that may legitimately not exist yet, use [`metric_value_or_zero`].
pub fn metric_value(text: &str, series: &str) -> f64 {
    match find_sample(text, series) {
        Some(Ok(v)) => v,
        Some(Err(raw)) => panic!("series {series} has the value {raw:?}, not a number"),
        None => panic!("{}", missing_series(text, series)),
    }
}

/// Like [`metric_value`], but 0 when the series is absent: only for a
/// series that appears on its first increment (a counter with labels) and
/// is polled until it reaches a positive target. A value that does not
/// parse still panics.
pub fn metric_value_or_zero(text: &str, series: &str) -> f64 {
    match find_sample(text, series) {
        Some(Ok(v)) => v,
        Some(Err(raw)) => panic!("series {series} has the value {raw:?}, not a number"),
        None => 0.0,
    }
}

/// The sample line of exactly `series`: its parsed value, or the raw text
/// when it does not parse.
fn find_sample<'t>(text: &'t str, series: &str) -> Option<Result<f64, &'t str>> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().map_err(|_| v.trim()))
}

/// Why `series` was not found: the series of the same metric name (other
/// labels), and every metric name in the scrape.
fn missing_series(text: &str, series: &str) -> String {
    let name_of = |s: &str| s.split(['{', ' ']).next().unwrap_or_default().to_owned();
    let name = name_of(series);
    let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    let same_name: Vec<&str> =
        samples.iter().filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s)).filter(|s| name_of(s) == name).collect();
    let mut names: Vec<String> = samples.iter().map(|l| name_of(l)).collect();
    names.sort();
    names.dedup();
    format!(
        "series {series} is not in the scrape; series named {name}: [{}]; metrics in the scrape: [{}]",
        same_name.join(", "),
        names.join(", ")
    )
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

/// CPU time a process has used so far, user and system, all threads, in
/// seconds (`/proc/PID/stat` fields 14 and 15, in USER_HZ ticks: 100 per
/// second on Linux, a constant of its ABI whatever the kernel's HZ).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count after its ')'.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).context("no ')' in /proc/PID/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("short /proc/PID/stat")?.parse::<u64>()? as f64 / 100.0)
    };
    Ok(tick(11)? + tick(12)?)
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

/// Runs `embark dev-certs --out dir` with `args` (certificates and tokens
/// for a test; see the command's help).
pub fn dev_certs(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(binary("embark")).arg("dev-certs").arg("--out").arg(dir).args(args).output()?;
    anyhow::ensure!(out.status.success(), "dev-certs: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// An `embark up` of `model` over TLS with tokens, from a development CA
/// the harness makes: the principals `ranker` (read) and `ops` (admin),
/// their token files `ranker.token` and `ops.token` and the CA `ca.pem`
/// in [`SecuredEmbark::certs`].
#[derive(Debug)]
pub struct SecuredEmbark {
    pub server: Server,
    certs: tempfile::TempDir,
    _data: tempfile::TempDir,
}

impl SecuredEmbark {
    /// Starts it with `extra` flags (e.g. `--rest-listen`).
    pub async fn start(model: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let certs = tempfile::tempdir()?;
        let c = certs.path();
        dev_certs(c, &["--server", "embark", "--token", "ranker=read", "--token", "ops=admin"])?;
        let data = tempfile::tempdir()?;
        let path = |p: PathBuf| p.to_str().map(str::to_owned).context("a UTF-8 temporary path");
        let owned = [
            "up".to_owned(),
            "--models".into(),
            model.into(),
            "--data-dir".into(),
            path(data.path().to_owned())?,
            "--tls-cert".into(),
            path(c.join("embark.pem"))?,
            "--tls-key".into(),
            path(c.join("embark.key"))?,
            "--auth-tokens".into(),
            path(c.join("tokens.toml"))?,
        ];
        let mut args: Vec<&str> = owned.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        let server = Server::start(&binary("embark"), &args).await?;
        Ok(Self { server, certs, _data: data })
    }

    /// The directory of `ca.pem`, `ranker.token`, `ops.token`.
    pub fn certs(&self) -> &Path {
        self.certs.path()
    }
}

/// A gRPC channel over TLS to `addr`, checking the server's certificate
/// against `ca` for the name `localhost`, presenting `identity` (certificate
/// and key files) if given. Connects at once, so a refused handshake is
/// this call's error.
pub async fn tls_channel(addr: SocketAddr, ca: &Path, identity: Option<(&Path, &Path)>) -> anyhow::Result<Channel> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca)?)).domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?));
    }
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    Ok(endpoint.connect().await?)
}

/// A request carrying `authorization: Bearer <token>`.
pub fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {}", token.trim()).parse().expect("an ASCII token");
    request.metadata_mut().insert("authorization", value);
    request
}

/// Replication of a test keyspace: the CQL test server is one node.
pub const TEST_REPLICATION: &str = "{'class': 'SimpleStrategy', 'replication_factor': 1}";

/// `embark migrate` of `store_url` (`cql://.../keyspace`) with
/// [`TEST_REPLICATION`]: the schema, by the same command operators run.
pub fn migrate(store_url: &str) -> anyhow::Result<()> {
    let out = Command::new(binary("embark"))
        .args(["migrate", "--store", store_url, "--cql-replication", TEST_REPLICATION])
        .output()?;
    anyhow::ensure!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "\
# TYPE embark_misses_published_total counter
embark_misses_published_total 0
# TYPE kfc_filled_total counter
kfc_filled_total{model=\"m\",outcome=\"vector\"} 3
kfc_filled_total{model=\"m\",outcome=\"failure\"} 1
embark_similar_vectors{model=\"m\"} 1.5e3
";

    #[test]
    fn metric_value_reads_the_exact_series() {
        assert_eq!(metric_value(SCRAPE, "embark_misses_published_total"), 0.0);
        assert_eq!(metric_value(SCRAPE, "kfc_filled_total{model=\"m\",outcome=\"vector\"}"), 3.0);
        assert_eq!(metric_value(SCRAPE, "kfc_filled_total{model=\"m\",outcome=\"failure\"}"), 1.0);
        assert_eq!(metric_value(SCRAPE, "embark_similar_vectors{model=\"m\"}"), 1500.0);
    }

    #[test]
    fn a_missing_series_panics_naming_it_and_what_the_scrape_has() {
        let panic = std::panic::catch_unwind(|| metric_value(SCRAPE, "kfc_filled_total{model=\"other\"}"))
            .expect_err("a missing series is an error, not 0");
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains("series kfc_filled_total{model=\"other\"} is not in the scrape"), "{message}");
        assert!(message.contains("kfc_filled_total{model=\"m\",outcome=\"vector\"}"), "{message}");
        assert!(
            message.contains(
                "metrics in the scrape: [embark_misses_published_total, embark_similar_vectors, kfc_filled_total]"
            ),
            "{message}"
        );
        // A prefix of a series is not the series.
        assert!(std::panic::catch_unwind(|| metric_value(SCRAPE, "embark_misses_published")).is_err());
    }

    #[test]
    fn or_zero_reads_a_missing_series_as_zero_only() {
        assert_eq!(metric_value_or_zero(SCRAPE, "kfc_filled_total{model=\"other\"}"), 0.0);
        assert_eq!(metric_value_or_zero(SCRAPE, "kfc_filled_total{model=\"m\",outcome=\"vector\"}"), 3.0);
        assert!(std::panic::catch_unwind(|| metric_value_or_zero("x NaNa\n", "x")).is_err(), "garbage is no 0");
    }
}
