//! Benchmark (not a test): EmbArk's Lookup against Redis MGET of the same
//! bytes, a plain tonic echo of the same bytes (what gRPC itself costs), and
//! a raw request/response stream of the same bytes (the transport's limit),
//! over loopback TCP and a Unix domain socket, in one run.
//!
//! - N keys (default 100k) of `dim` float32 (default 1280) go into EmbArk's
//!   store and hot tier, and, as the same bytes, into a `redis-server` this
//!   program starts (no persistence).
//! - C clients (default 32), each on its own connection, send batches of B
//!   keys (default 64) drawn Zipf(1.0) or uniform, closed loop, for T
//!   seconds after a warm-up: the peak.
//! - Then each system is driven open loop at fractions of its own peak, and
//!   latency is measured from each request's scheduled time, so a stall is
//!   not hidden by the requests it delayed (coordinated omission).
//! - EmbArk's resident memory per cached entry is measured against the raw
//!   vector bytes.
//! - TLS (`--tls`, on by default): a second `embark serve` on a copy of the
//!   store, with a certificate from `embark dev-certs` (ECDSA P-256, TLS 1.3,
//!   rustls on ring), is warmed the same way; then plaintext TCP and TLS
//!   are measured back to back at their peaks: what TLS costs a Lookup.
//! - Row types (`--vector-types`, default f16, bf16, i8): per type, an
//!   `embark serve` on a copy of the store with `--tier-type` of that type,
//!   warmed the same way (its memory per entry measured), then f32 from the
//!   first server and that type from this one back to back at their peaks
//!   over TCP.
//!
//! Writes `lookup-bench.json` and `lookup-bench.png` to `--out`. Run with
//! `scripts/bench-lookup.sh`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use embark_proto::{
    embark::v1::{
        InvalidateRequest, InvalidateResponse, LookupRequest, LookupResponse, ModelsRequest, ModelsResponse, Source,
        VectorType,
        emb_ark_client::EmbArkClient,
        emb_ark_server::{EmbArk, EmbArkServer},
    },
    vectors,
};
use embark_store::{EmbeddingStore, embedded::EmbeddedStore};
use embark_tests::{KillOnDrop, cpu_seconds, free_port, rss_bytes};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng, rngs::SmallRng};
use rand_distr::{Distribution, Zipf};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(about = "EmbArk Lookup vs Redis MGET vs gRPC echo vs raw stream, TCP and UDS")]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    keys: usize,
    #[arg(long, default_value_t = 1280)]
    dim: usize,
    #[arg(long, default_value_t = 32)]
    clients: usize,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Key popularity: zipf (exponent 1.0) or uniform.
    #[arg(long, default_value = "zipf")]
    dist: String,
    /// Seconds of each peak measurement, after `--warmup`.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Transports to measure.
    #[arg(long, value_delimiter = ',', default_value = "tcp,uds")]
    transports: Vec<String>,
    /// Offered load, as fractions of each system's peak (empty: no sweep).
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.3,0.5,0.7,0.9")]
    sweep: Vec<f64>,
    /// Seconds per sweep point.
    #[arg(long, default_value_t = 3.0)]
    sweep_seconds: f64,
    /// Where `embark` is (default: next to this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
    /// Also measure EmbArk over TLS against plaintext TCP.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    tls: bool,
    /// Compact row types to measure against f32 (empty: none): for each, a
    /// second `embark serve` keeps its tier in that type and answers in it.
    #[arg(long, value_delimiter = ',', default_value = "f16,bf16,i8")]
    vector_types: Vec<String>,
    /// Output directory for the JSON and the PNG.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
}

const MODEL: &str = "efficientnet-lite0";

fn key(i: usize) -> String {
    format!("https://img.example.com/catalog/{i:08}.jpg")
}

/// Deterministic vector bytes of key `i` (little-endian f32).
fn vector(i: usize, dim: usize) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(i as u64);
    (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(args))
}

async fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let started = Instant::now();
    while !ok() {
        if started.elapsed() > limit {
            bail!("{what} not ready after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A gRPC channel to `tcp://addr` or `unix://path`, with the client-side
/// settings a ranker should use: a 1 MiB max frame and large windows.
async fn channel(target: &str) -> anyhow::Result<Channel> {
    if let Some(addr) = target.strip_prefix("tls-buffered:") {
        return buffered_tls_channel(addr).await;
    }
    if let Some(addr) = target.strip_prefix("tls:") {
        let ca = TLS_CA.get().context("no CA for a TLS target")?;
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name("localhost");
        return Ok(tuned(Endpoint::from_shared(format!("https://{addr}"))?).tls_config(tls)?.connect().await?);
    }
    let endpoint = tuned(Endpoint::from_shared(if target.starts_with("unix:") {
        "http://[::]:50051".to_owned()
    } else {
        format!("http://{target}")
    })?);
    Ok(match target.strip_prefix("unix:") {
        Some(path) => embark_tests::connect_uds(endpoint, PathBuf::from(path)).await?,
        None => endpoint.connect().await?,
    })
}

/// A TLS channel (rustls on ring, as tonic's) whose reads of the socket go
/// through a 256 KiB buffer: rustls asks for at most 4 KiB per read, so a
/// 327 KiB answer costs a stock client about 80 `read` calls; through the
/// buffer, a few. The tuning a Rust ranker using rustls would make.
async fn buffered_tls_channel(addr: &str) -> anyhow::Result<Channel> {
    let ca = TLS_CA.get().context("no CA for a TLS target")?;
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject as _;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    // http://: the connector does TLS itself, tonic must not add its own.
    let endpoint = tuned(Endpoint::from_shared(format!("http://{addr}"))?);
    let addr = addr.to_owned();
    let connect = tower::service_fn(move |_: tonic::transport::Uri| {
        let (connector, addr) = (connector.clone(), addr.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from("localhost").map_err(std::io::Error::other)?;
            let tls = connector.connect(name, tokio::io::BufReader::with_capacity(256 << 10, tcp)).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector(connect).await?)
}

/// The CA of the TLS instance's certificate (`tls:` targets).
static TLS_CA: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

fn tuned(endpoint: Endpoint) -> Endpoint {
    endpoint
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .max_frame_size(Some((1 << 20) - 1))
}

/// The echo floor: `embark.v1.EmbArk/Lookup` answering the same bytes from
/// memory, with no cache, store or bookkeeping.
struct Echo {
    row_bytes: usize,
    payload: Bytes,
}

#[tonic::async_trait]
impl EmbArk for Echo {
    async fn lookup(&self, r: tonic::Request<LookupRequest>) -> Result<tonic::Response<LookupResponse>, tonic::Status> {
        let n = r.get_ref().keys.len();
        Ok(tonic::Response::new(LookupResponse {
            dim: (self.row_bytes / 4) as u32,
            vectors: self.payload.slice(..(n * self.row_bytes).min(self.payload.len())),
            sources: vec![Source::Cache as i32; n],
            ..Default::default()
        }))
    }
    async fn models(&self, _: tonic::Request<ModelsRequest>) -> Result<tonic::Response<ModelsResponse>, tonic::Status> {
        Ok(tonic::Response::new(ModelsResponse::default()))
    }
    async fn invalidate(
        &self,
        _: tonic::Request<InvalidateRequest>,
    ) -> Result<tonic::Response<InvalidateResponse>, tonic::Status> {
        Ok(tonic::Response::new(InvalidateResponse::default()))
    }
    async fn similar(
        &self,
        _: tonic::Request<embark_proto::embark::v1::SimilarRequest>,
    ) -> Result<tonic::Response<embark_proto::embark::v1::SimilarResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("the echo floor serves Lookup only"))
    }
}

/// Serves the echo on TCP and UDS; returns their addresses.
async fn start_echo(args: &Args, dir: &Path) -> anyhow::Result<(String, String)> {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let tcp_addr = tcp.local_addr()?.to_string();
    let uds_path = dir.join("echo.sock");
    let uds = tokio::net::UnixListener::bind(&uds_path)?;
    let payload = Bytes::from(vec![7u8; args.batch * args.dim * 4]);
    let router = embark_ops::grpc::server_builder(&embark_ops::grpc::ServerLimits::default(), Duration::from_secs(30))
        .add_service(EmbArkServer::new(Echo { row_bytes: args.dim * 4, payload }).max_encoding_message_size(256 << 20));
    let r2 = router.clone();
    tokio::spawn(async move { router.serve_with_incoming(embark_ops::grpc::incoming(tcp, 1024)).await });
    tokio::spawn(async move { r2.serve_with_incoming(embark_ops::grpc::incoming(uds, 1024)).await });
    Ok((tcp_addr, format!("unix:{}", uds_path.display())))
}

/// The raw limit: for each 4-byte request (a key count), the server writes
/// that many rows of bytes; the client reads them all.
async fn start_raw(args: &Args, dir: &Path) -> anyhow::Result<(String, String)> {
    let row = args.dim * 4;
    let payload: Arc<[u8]> = vec![7u8; args.batch * row].into();
    async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S, payload: Arc<[u8]>, row: usize) {
        let mut n = [0u8; 4];
        while s.read_exact(&mut n).await.is_ok() {
            let len = (u32::from_le_bytes(n) as usize * row).min(payload.len());
            if s.write_all(&payload[..len]).await.is_err() {
                break;
            }
        }
    }
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let tcp_addr = tcp.local_addr()?.to_string();
    let uds_path = dir.join("raw.sock");
    let uds = tokio::net::UnixListener::bind(&uds_path)?;
    let p = payload.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = tcp.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(serve(s, p.clone(), row));
        }
    });
    tokio::spawn(async move {
        while let Ok((s, _)) = uds.accept().await {
            tokio::spawn(serve(s, payload.clone(), row));
        }
    });
    Ok((tcp_addr, format!("unix:{}", uds_path.display())))
}

/// One client's connection to one system.
enum Conn {
    Grpc(EmbArkClient<Channel>),
    Redis(redis::aio::MultiplexedConnection),
    RawTcp(tokio::net::TcpStream, Vec<u8>),
    RawUnix(tokio::net::UnixStream, Vec<u8>),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum System {
    Embark,
    Redis,
    Echo,
    Raw,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Embark => "embark",
            System::Redis => "redis",
            System::Echo => "grpc-echo",
            System::Raw => "raw-stream",
        }
    }
}

async fn connect(system: System, target: &str) -> anyhow::Result<Conn> {
    Ok(match system {
        System::Embark | System::Echo => {
            Conn::Grpc(EmbArkClient::new(channel(target).await?).max_decoding_message_size(256 << 20))
        }
        System::Redis => {
            let url = match target.strip_prefix("unix:") {
                Some(p) => format!("redis+unix://{p}"),
                None => format!("redis://{target}/"),
            };
            Conn::Redis(redis::Client::open(url)?.get_multiplexed_async_connection().await?)
        }
        System::Raw => match target.strip_prefix("unix:") {
            Some(p) => Conn::RawUnix(tokio::net::UnixStream::connect(p).await?, Vec::new()),
            None => {
                let s = tokio::net::TcpStream::connect(target).await?;
                s.set_nodelay(true)?;
                Conn::RawTcp(s, Vec::new())
            }
        },
    })
}

/// One request of `keys`; returns the bytes received.
async fn call(conn: &mut Conn, keys: Vec<String>, row: usize, vector_type: VectorType) -> anyhow::Result<usize> {
    let n = keys.len();
    let got = match conn {
        Conn::Grpc(c) => {
            let request =
                LookupRequest { model: MODEL.into(), keys, vector_type: vector_type as i32, ..Default::default() };
            let r = c.lookup(request).await?.into_inner();
            r.vectors.len()
        }
        Conn::Redis(c) => {
            let rows: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(&keys).query_async(c).await?;
            rows.iter().map(|r| r.as_ref().map_or(0, Vec::len)).sum()
        }
        Conn::RawTcp(s, buf) => {
            s.write_all(&(n as u32).to_le_bytes()).await?;
            buf.resize(n * row, 0);
            s.read_exact(buf).await?;
            buf.len()
        }
        Conn::RawUnix(s, buf) => {
            s.write_all(&(n as u32).to_le_bytes()).await?;
            buf.resize(n * row, 0);
            s.read_exact(buf).await?;
            buf.len()
        }
    };
    if got != n * row {
        bail!("got {got} bytes for {n} rows of {row}");
    }
    Ok(got)
}

#[derive(Debug, Clone)]
struct Run {
    requests: u64,
    secs: f64,
    hist: Histogram<u64>,
    /// CPU seconds the server process used in the measured window, when it
    /// is a process of its own (EmbArk, Redis; the echo and the raw stream
    /// run inside this program).
    server_cpu_s: Option<f64>,
    /// CPU seconds this program (the load generator) used in that window.
    client_cpu_s: f64,
}

impl Run {
    fn req_per_s(&self) -> f64 {
        self.requests as f64 / self.secs
    }
    /// Keys answered per CPU-second of the server: its cost per key,
    /// whatever share of the cores the load generator took.
    fn keys_per_server_cpu_s(&self, batch: usize) -> Option<f64> {
        self.server_cpu_s.filter(|&c| c > 0.0).map(|c| self.requests as f64 * batch as f64 / c)
    }
    fn us(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64
    }
}

struct KeyPicker {
    zipf: Option<Zipf<f64>>,
    n: usize,
}

impl KeyPicker {
    fn pick(&self, rng: &mut SmallRng, b: usize) -> Vec<String> {
        (0..b)
            .map(|_| match &self.zipf {
                Some(z) => key((z.sample(rng) as usize).saturating_sub(1).min(self.n - 1)),
                None => key(rng.random_range(0..self.n)),
            })
            .collect()
    }
}

/// C clients for `secs` after `warmup`; `rate` = None is closed loop (the
/// peak), Some(r) is open loop at r requests/s in all, latency measured from
/// each request's scheduled time. The CPU time of `server_pid` and of this
/// program is read at the start and the end of the measured window.
#[allow(clippy::too_many_arguments)]
async fn drive(
    system: System,
    target: &str,
    server_pid: Option<u32>,
    args: &Args,
    picker: Arc<KeyPicker>,
    rate: Option<f64>,
    secs: f64,
    warmup: f64,
) -> anyhow::Result<Run> {
    drive_as(system, target, server_pid, args, picker, rate, secs, warmup, VectorType::F32).await
}

/// [`drive`] with EmbArk's rows asked in `vector_type`.
#[allow(clippy::too_many_arguments)]
async fn drive_as(
    system: System,
    target: &str,
    server_pid: Option<u32>,
    args: &Args,
    picker: Arc<KeyPicker>,
    rate: Option<f64>,
    secs: f64,
    warmup: f64,
    vector_type: VectorType,
) -> anyhow::Result<Run> {
    let row = args.dim * vectors::value_bytes(vector_type);
    let mut tasks = Vec::new();
    let start = Instant::now() + Duration::from_millis(200);
    let measure_from = start + Duration::from_secs_f64(warmup);
    let end = measure_from + Duration::from_secs_f64(secs);
    for c in 0..args.clients {
        let mut conn = connect(system, target).await?;
        let picker = picker.clone();
        let batch = args.batch;
        let clients = args.clients.max(1) as f64;
        let period = rate.map(|r| Duration::from_secs_f64(args.clients as f64 / r));
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(c as u64 * 7919 + 1);
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut requests = 0u64;
            // Spread the clients' schedules over one period.
            let mut next = start + period.map_or(Duration::ZERO, |p| p.mul_f64(c as f64 / clients));
            tokio::time::sleep_until(start.into()).await;
            loop {
                let scheduled = match period {
                    Some(p) => {
                        let s = next;
                        next += p;
                        if s > Instant::now() {
                            tokio::time::sleep_until(s.into()).await;
                        }
                        s
                    }
                    None => Instant::now(),
                };
                if scheduled >= end {
                    break;
                }
                let keys = picker.pick(&mut rng, batch);
                call(&mut conn, keys, row, vector_type).await?;
                if scheduled >= measure_from {
                    let us = scheduled.elapsed().as_micros().max(1) as u64;
                    hist.saturating_record(us);
                    requests += 1;
                }
            }
            anyhow::Ok((requests, hist))
        }));
    }
    let own_pid = std::process::id();
    let cpu = tokio::spawn(async move {
        let sample = || -> anyhow::Result<(Option<f64>, f64)> {
            Ok((server_pid.map(cpu_seconds).transpose()?, cpu_seconds(own_pid)?))
        };
        tokio::time::sleep_until(measure_from.into()).await;
        let before = sample()?;
        tokio::time::sleep_until(end.into()).await;
        let after = sample()?;
        anyhow::Ok((after.0.zip(before.0).map(|(a, b)| a - b), after.1 - before.1))
    });
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut requests = 0;
    for t in tasks {
        let (r, h) = t.await??;
        requests += r;
        hist.add(h)?;
    }
    let (server_cpu_s, client_cpu_s) = cpu.await??;
    Ok(Run { requests, secs, hist, server_cpu_s, client_cpu_s })
}

/// An `embark serve` on the store in `data`, its tier large enough for
/// every key, Similar off, on `grpc_port`, with `extra` flags.
fn spawn_embark(
    bin_dir: &Path,
    data: &Path,
    grpc_port: u16,
    args: &Args,
    extra: &[&str],
) -> anyhow::Result<KillOnDrop> {
    let cache_bytes = format!("{}", (args.keys as u64) * (args.dim as u64 * 4 + 256) + (64 << 20));
    Ok(KillOnDrop(
        Command::new(bin_dir.join("embark"))
            .args(["serve", "--models", MODEL, "--cache-bytes", &cache_bytes, "--embedded-cache-bytes", "8MiB"])
            .arg("--data-dir")
            .arg(data)
            .args(extra)
            .args([
                "--listen",
                &format!("127.0.0.1:{grpc_port}"),
                "--metrics-listen",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .args(["--concurrency-per-connection", "1024", "--store-deadline-ms", "10000"])
            // A Lookup replica without Similar: with it, each server spends
            // its first minutes building an HNSW index of every stored
            // vector on one of the two cores the measurement shares.
            .args(["--similar-max-vectors", "0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("starting embark")?,
    ))
}

/// Two passes of Lookups over every key: the first reads the store into
/// the tier, the second checks all are cached. With `pid`, returns the RSS
/// at the half-way point of the first pass: the slope between it and the
/// end is the marginal cost of an entry, free of start-up and allocator
/// warm-up.
async fn warm(client: &mut EmbArkClient<Channel>, n: usize, pid: Option<u32>) -> anyhow::Result<u64> {
    let mut rss_half = 0;
    for pass in 0..2 {
        let mut cached = 0;
        for (c, chunk) in (0..n).collect::<Vec<_>>().chunks(1024).enumerate() {
            if let Some(pid) = pid
                && pass == 0
                && c == n / 2048
            {
                tokio::time::sleep(Duration::from_millis(300)).await;
                rss_half = rss_bytes(pid)?;
            }
            let keys: Vec<String> = chunk.iter().map(|&i| key(i)).collect();
            let r =
                client.lookup(LookupRequest { model: MODEL.into(), keys, ..Default::default() }).await?.into_inner();
            cached += r.sources.iter().filter(|s| **s == Source::Cache as i32).count();
            if pass == 0 {
                anyhow::ensure!(
                    r.sources.iter().all(|s| *s == Source::Store as i32),
                    "preloaded keys come from the store"
                );
            }
        }
        if pass == 1 {
            anyhow::ensure!(cached == n, "only {cached} of {n} keys in the tier");
        }
    }
    Ok(rss_half)
}

/// EmbArk over TLS and over plaintext TCP, measured back to back at their
/// peaks: a second server on `tls_data` with a development certificate.
async fn tls_cost(
    args: &Args,
    bin_dir: &Path,
    tls_data: &Path,
    work: &Path,
    plain_target: &str,
    plain_pid: u32,
    picker: Arc<KeyPicker>,
) -> anyhow::Result<serde_json::Value> {
    let certs = work.join("certs");
    let out = Command::new(bin_dir.join("embark"))
        .arg("dev-certs")
        .arg("--out")
        .arg(&certs)
        .args(["--server", "embark"])
        .output()?;
    anyhow::ensure!(out.status.success(), "dev-certs: {}", String::from_utf8_lossy(&out.stderr));
    let _ = TLS_CA.set(std::fs::read(certs.join("ca.pem"))?);
    let (cert, key) = (certs.join("embark.pem"), certs.join("embark.key"));
    let port = free_port();
    let tls_flags = ["--tls-cert", cert.to_str().context("utf-8")?, "--tls-key", key.to_str().context("utf-8")?];
    let server = spawn_embark(bin_dir, tls_data, port, args, &tls_flags)?;
    let tls_pid = server.0.id();
    let target = format!("tls:127.0.0.1:{port}");
    wait_for("embark over TLS", Duration::from_secs(60), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        .await?;
    let mut client = EmbArkClient::new(channel(&target).await?).max_decoding_message_size(256 << 20);
    warm(&mut client, args.keys, None).await?;
    println!(
        "tls (a second embark serve, rustls, ECDSA P-256, TLS 1.3; clients: tonic's stock TLS, then rustls \
         reading through a 256 KiB buffer):"
    );
    let plain =
        drive(System::Embark, plain_target, Some(plain_pid), args, picker.clone(), None, args.seconds, args.warmup)
            .await?;
    let tls =
        drive(System::Embark, &target, Some(tls_pid), args, picker.clone(), None, args.seconds, args.warmup).await?;
    let buffered = format!("tls-buffered:127.0.0.1:{port}");
    let tls_buffered =
        drive(System::Embark, &buffered, Some(tls_pid), args, picker, None, args.seconds, args.warmup).await?;
    let keys = |r: &Run| r.req_per_s() * args.batch as f64;
    let per_cpu = |r: &Run| r.keys_per_server_cpu_s(args.batch).unwrap_or(f64::NAN);
    for (name, run) in [("plaintext", &plain), ("tls (stock)", &tls), ("tls", &tls_buffered)] {
        println!(
            "  {name:<11} {:>10.0} req/s {:>12.0} keys/s   p50 {:.0} us  p99 {:.0} us   server {:.2} CPU-s, \
             {:.0} keys per server CPU-s; load generator {:.2} CPU-s",
            run.req_per_s(),
            keys(run),
            run.us(0.5),
            run.us(0.99),
            run.server_cpu_s.unwrap_or(f64::NAN),
            per_cpu(run),
            run.client_cpu_s,
        );
    }
    let stock_ratio = keys(&tls) / keys(&plain);
    let (tls, tls_stock) = (tls_buffered, tls);
    let ratio = keys(&tls) / keys(&plain);
    let cpu_ratio = per_cpu(&tls) / per_cpu(&plain);
    println!(
        "  tls/plaintext {ratio:.3}x keys/s (TLS costs {:.1}%), {cpu_ratio:.3}x keys per server CPU-s \
         (the server pays {:.1}% more CPU per key)\n",
        (1.0 - ratio) * 100.0,
        (1.0 / cpu_ratio - 1.0) * 100.0
    );
    Ok(json!({
        "plaintext_keys_s": keys(&plain), "tls_keys_s": keys(&tls), "tls_over_plaintext": ratio,
        "plaintext_p99_us": plain.us(0.99), "tls_p99_us": tls.us(0.99),
        "plaintext_server_cpu_s": plain.server_cpu_s, "tls_server_cpu_s": tls.server_cpu_s,
        "plaintext_client_cpu_s": plain.client_cpu_s, "tls_client_cpu_s": tls.client_cpu_s,
        "plaintext_keys_per_server_cpu_s": per_cpu(&plain), "tls_keys_per_server_cpu_s": per_cpu(&tls),
        "tls_over_plaintext_per_server_cpu": cpu_ratio,
        "tls_stock_client_keys_s": keys(&tls_stock), "tls_stock_client_over_plaintext": stock_ratio,
        "tls_stock_client_keys_per_server_cpu_s": per_cpu(&tls_stock),
        "tls_stock_client_cpu_s": tls_stock.client_cpu_s,
    }))
}

/// A store copy and its server per compact type, made ready before the
/// measured runs start.
struct TypedServer {
    vector_type: VectorType,
    target: String,
    server: KillOnDrop,
    /// Resident bytes per cached entry at the margin (the second half of
    /// the first warm-up pass), as for the f32 server.
    marginal_bytes: f64,
}

/// For each of `types`: `embark serve --tier-type MODEL=<type>` on a copy
/// of the store in `data`, warmed, its memory per entry measured.
async fn typed_servers(
    args: &Args,
    bin_dir: &Path,
    data: &Path,
    work: &Path,
    types: &[VectorType],
) -> anyhow::Result<Vec<TypedServer>> {
    let mut out = Vec::new();
    for &t in types {
        let name = vectors::type_name(t);
        let dir = work.join(format!("embark-{name}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(data.join("embark.redb"), dir.join("embark.redb"))?;
        let port = free_port();
        let flag = format!("{MODEL}={name}");
        let server = spawn_embark(bin_dir, &dir, port, args, &["--tier-type", &flag])?;
        let target = format!("127.0.0.1:{port}");
        wait_for(name, Duration::from_secs(60), || std::net::TcpStream::connect(&target).is_ok()).await?;
        let pid = server.0.id();
        let mut client = EmbArkClient::new(channel(&target).await?).max_decoding_message_size(256 << 20);
        let half = warm(&mut client, args.keys, Some(pid)).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_bytes(pid)?;
        let half_keys = (args.keys / 2048 * 1024) as f64;
        let marginal_bytes = after.saturating_sub(half) as f64 / (args.keys as f64 - half_keys);
        out.push(TypedServer { vector_type: t, target, server, marginal_bytes });
    }
    Ok(out)
}

/// f32 from the first server and each compact type from its own, back to
/// back at their peaks over TCP.
async fn type_costs(
    args: &Args,
    typed: &[TypedServer],
    f32_target: &str,
    f32_pid: u32,
    f32_marginal: f64,
    picker: Arc<KeyPicker>,
) -> anyhow::Result<serde_json::Value> {
    if typed.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    println!("row types (tier and answer in the type, TCP; each against f32 measured just before it):");
    let keys = |r: &Run| r.req_per_s() * args.batch as f64;
    let per_cpu = |r: &Run| r.keys_per_server_cpu_s(args.batch).unwrap_or(f64::NAN);
    let mut out = Vec::new();
    for t in typed {
        let name = vectors::type_name(t.vector_type);
        let base =
            drive(System::Embark, f32_target, Some(f32_pid), args, picker.clone(), None, args.seconds, args.warmup)
                .await?;
        let run = drive_as(
            System::Embark,
            &t.target,
            Some(t.server.0.id()),
            args,
            picker.clone(),
            None,
            args.seconds,
            args.warmup,
            t.vector_type,
        )
        .await?;
        let stored = vectors::packed_row_bytes(t.vector_type, args.dim) as f64;
        println!(
            "  {name:<5} {:>12.0} keys/s = {:.2}x f32's {:.0}; p99 {:.0} us (f32 {:.0}); {:.0} keys per server CPU-s              ({:.2}x f32); {:.0} B per cached entry = {:.3}x its {stored:.0} B row, {:.3}x f32's entry",
            keys(&run),
            keys(&run) / keys(&base),
            keys(&base),
            run.us(0.99),
            base.us(0.99),
            per_cpu(&run),
            per_cpu(&run) / per_cpu(&base),
            t.marginal_bytes,
            t.marginal_bytes / stored,
            t.marginal_bytes / f32_marginal,
        );
        out.push(json!({
            "vector_type": name, "keys_s": keys(&run), "f32_keys_s": keys(&base),
            "over_f32": keys(&run) / keys(&base),
            "p99_us": run.us(0.99), "f32_p99_us": base.us(0.99),
            "keys_per_server_cpu_s": per_cpu(&run), "f32_keys_per_server_cpu_s": per_cpu(&base),
            "marginal_bytes_per_entry": t.marginal_bytes, "row_bytes": stored,
            "entry_over_row": t.marginal_bytes / stored, "entry_over_f32_entry": t.marginal_bytes / f32_marginal,
        }));
    }
    println!();
    Ok(json!(out))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().context("exe dir")?.to_path_buf(),
    };
    std::fs::create_dir_all(&args.out)?;
    let work = tempfile::tempdir()?;
    let row = args.dim * 4;
    let n = args.keys;
    anyhow::ensure!(args.dim == 1280, "the preloaded model is efficientnet-lite0: --dim must be 1280");
    eprintln!("preloading {n} keys x {} B into EmbArk's store and Redis", row);

    // EmbArk: vectors in the embedded store, then into the tier.
    let data = work.path().join("embark");
    std::fs::create_dir_all(&data)?;
    {
        let store = EmbeddedStore::open(&data.join("embark.redb"))?;
        for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
            store
                .put_vectors(
                    &embark_tests::stored_as(MODEL),
                    chunk.iter().map(|&i| (key(i), vector(i, args.dim))).collect(),
                )
                .await?;
        }
    }
    let tls_data = work.path().join("embark-tls");
    if args.tls {
        // Copied before the first server opens it: an identical store.
        std::fs::create_dir_all(&tls_data)?;
        std::fs::copy(data.join("embark.redb"), tls_data.join("embark.redb"))?;
    }
    let types: Vec<VectorType> = args
        .vector_types
        .iter()
        .filter(|t| !t.is_empty())
        .map(|t| vectors::parse_type(t).with_context(|| format!("--vector-types: {t:?} is not f16, bf16 or i8")))
        .collect::<anyhow::Result<_>>()?;
    let typed = typed_servers(&args, &bin_dir, &data, work.path(), &types).await?;
    let grpc_port = free_port();
    let uds_path = work.path().join("embark.sock");
    let uds_flag = uds_path.to_str().context("utf-8 path")?.to_owned();
    let embark = spawn_embark(&bin_dir, &data, grpc_port, &args, &["--uds", &uds_flag])?;
    let embark_tcp = format!("127.0.0.1:{grpc_port}");
    let embark_uds = format!("unix:{}", uds_path.display());
    wait_for("embark", Duration::from_secs(60), || {
        std::net::TcpStream::connect(&embark_tcp).is_ok() && uds_path.exists()
    })
    .await?;
    let pid = embark.0.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_bytes(pid)?;
    let mut client = EmbArkClient::new(channel(&embark_tcp).await?).max_decoding_message_size(256 << 20);
    let rss_half = warm(&mut client, n, Some(pid)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_bytes(pid)?;
    let per_entry = (rss_after.saturating_sub(rss_before)) as f64 / n as f64;
    let half_keys = (n / 2048 * 1024) as f64;
    let marginal = (rss_after.saturating_sub(rss_half)) as f64 / (n as f64 - half_keys);
    eprintln!(
        "embark RSS {:.0} MiB -> {:.0} MiB: {per_entry:.0} B per cached entry for {row} B of vector ({:.3}x)",
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0,
        per_entry / row as f64
    );
    eprintln!("marginal: {marginal:.0} B per entry ({:.3}x of the vector)", marginal / row as f64);

    // Redis, same bytes, TCP and UDS, no persistence.
    let redis_port = free_port();
    let redis_sock = work.path().join("redis.sock");
    let redis = KillOnDrop(
        Command::new(&args.redis_server)
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(&redis_sock)
            .args(["--unixsocketperm", "700", "--protected-mode", "no", "--io-threads", "1"])
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| {
                format!("starting {} (scripts/bench-lookup.sh installs it)", args.redis_server.display())
            })?,
    );
    let redis_tcp = format!("127.0.0.1:{redis_port}");
    wait_for("redis", Duration::from_secs(20), || std::net::TcpStream::connect(&redis_tcp).is_ok()).await?;
    let mut rc = redis::Client::open(format!("redis://{redis_tcp}/"))?.get_multiplexed_async_connection().await?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(2000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let v = vector(i, args.dim);
            pipe.cmd("SET").arg(key(i)).arg(bytemuck::cast_slice::<f32, u8>(&v)).ignore();
        }
        pipe.query_async::<()>(&mut rc).await?;
    }
    let info: String = redis::cmd("INFO").arg("memory").query_async(&mut rc).await?;
    let redis_used: f64 =
        info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0);

    let (echo_tcp, echo_uds) = start_echo(&args, work.path()).await?;
    let (raw_tcp, raw_uds) = start_raw(&args, work.path()).await?;
    let picker =
        Arc::new(KeyPicker { zipf: if args.dist == "uniform" { None } else { Some(Zipf::new(n as f64, 1.0)?) }, n });

    let mut results = Vec::new();
    let mut curves = Vec::new();
    println!(
        "\n{} keys x {} B, {} clients, batch {}, {} keys, {:.0} s per peak\n",
        n, row, args.clients, args.batch, args.dist, args.seconds
    );
    for transport in &args.transports {
        let targets: [(System, String); 4] = match transport.as_str() {
            "tcp" => [
                (System::Embark, embark_tcp.clone()),
                (System::Redis, redis_tcp.clone()),
                (System::Echo, echo_tcp.clone()),
                (System::Raw, raw_tcp.clone()),
            ],
            "uds" => [
                (System::Embark, embark_uds.clone()),
                (System::Redis, format!("unix:{}", redis_sock.display())),
                (System::Echo, echo_uds.clone()),
                (System::Raw, raw_uds.clone()),
            ],
            "" => continue,
            t => bail!("unknown transport {t:?} (tcp, uds)"),
        };
        println!("{transport}:");
        println!(
            "  {:<11} {:>10} {:>12} {:>10} {:>9} {:>9} {:>9} {:>10} {:>15}",
            "system", "req/s", "keys/s", "MiB/s", "p50 us", "p99 us", "p999 us", "srv CPU-s", "keys/srv-CPU-s"
        );
        let redis_pid = redis.0.id();
        let server_pid = |s: System| match s {
            System::Embark => Some(pid),
            System::Redis => Some(redis_pid),
            System::Echo | System::Raw => None,
        };
        let mut peaks = Vec::new();
        for (system, target) in &targets {
            let server_pid = server_pid(*system);
            let run =
                drive(*system, target, server_pid, &args, picker.clone(), None, args.seconds, args.warmup).await?;
            let keys_s = run.req_per_s() * args.batch as f64;
            println!(
                "  {:<11} {:>10.0} {:>12.0} {:>10.1} {:>9.0} {:>9.0} {:>9.0} {:>10.2} {:>15.0}",
                system.name(),
                run.req_per_s(),
                keys_s,
                keys_s * row as f64 / 1048576.0,
                run.us(0.5),
                run.us(0.99),
                run.us(0.999),
                run.server_cpu_s.unwrap_or(f64::NAN),
                run.keys_per_server_cpu_s(args.batch).unwrap_or(f64::NAN),
            );
            peaks.push((*system, run));
        }
        let get = |s: System| peaks.iter().find(|(x, _)| *x == s).map(|(_, r)| r.req_per_s()).unwrap_or(f64::NAN);
        let (e, r, ec, raw) = (get(System::Embark), get(System::Redis), get(System::Echo), get(System::Raw));
        println!(
            "  embark/redis {:.2}x   embark/echo {:.2}x   embark/raw {:.2}x   echo/redis {:.2}x\n",
            e / r,
            e / ec,
            e / raw,
            ec / r
        );

        // Latency vs offered load, each system at fractions of its own peak.
        for (system, target) in &targets {
            let peak = get(*system);
            let mut points = Vec::new();
            for f in &args.sweep {
                let run = drive(*system, target, None, &args, picker.clone(), Some(peak * f), args.sweep_seconds, 0.5)
                    .await?;
                points.push(json!({
                    "fraction": f, "offered_req_s": peak * f, "req_s": run.req_per_s(),
                    "keys_s": run.req_per_s() * args.batch as f64,
                    "p50_us": run.us(0.5), "p99_us": run.us(0.99), "p999_us": run.us(0.999),
                }));
                if *system == System::Embark {
                    println!(
                        "  embark at {:>3.0}% of peak ({:.0} req/s): p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us",
                        f * 100.0,
                        peak * f,
                        run.us(0.5),
                        run.us(0.99),
                        run.us(0.999)
                    );
                }
            }
            curves.push(json!({"transport": transport, "system": system.name(), "points": points}));
        }
        for (system, run) in &peaks {
            results.push(json!({
                "transport": transport, "system": system.name(), "req_s": run.req_per_s(),
                "keys_s": run.req_per_s() * args.batch as f64,
                "bytes_s": run.req_per_s() * (args.batch * row) as f64,
                "p50_us": run.us(0.5), "p99_us": run.us(0.99), "p999_us": run.us(0.999),
                "server_cpu_s": run.server_cpu_s, "client_cpu_s": run.client_cpu_s,
                "keys_per_server_cpu_s": run.keys_per_server_cpu_s(args.batch),
            }));
        }
        results.push(json!({
            "transport": transport, "embark_over_redis": e / r, "embark_over_echo": e / ec,
            "embark_over_raw": e / raw, "echo_over_redis": ec / r,
        }));
        println!();
    }

    let types = type_costs(&args, &typed, &embark_tcp, pid, marginal, picker.clone()).await?;
    drop(typed);
    let tls = match args.tls {
        true => tls_cost(&args, &bin_dir, &tls_data, work.path(), &embark_tcp, pid, picker.clone()).await?,
        false => serde_json::Value::Null,
    };
    let report = json!({
        "keys": n, "dim": args.dim, "clients": args.clients, "batch": args.batch, "dist": args.dist,
        "seconds": args.seconds, "cpus": std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0),
        "memory": {
            "embark_rss_before_warm": rss_before, "embark_rss_after_warm": rss_after,
            "embark_bytes_per_entry": per_entry, "vector_bytes": row,
            "embark_rss_half_warm": rss_half, "embark_marginal_bytes_per_entry": marginal,
            "embark_marginal_ratio_to_raw": marginal / row as f64,
            "embark_ratio_to_raw": per_entry / row as f64,
            "redis_used_memory_per_key": redis_used / n as f64,
        },
        "peaks": results, "curves": curves, "tls": tls, "vector_types": types,
    });
    let json_path = args.out.join("lookup-bench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    let png_path = args.out.join("lookup-bench.png");
    embark_bench::plot::latency_curves(&report, &png_path)?;
    println!(
        "memory: {marginal:.0} B per cached entry at the margin ({:.3}x of {row} B), {per_entry:.0} B on average \
         ({:.3}x); Redis used_memory {:.0} B per key",
        marginal / row as f64,
        per_entry / row as f64,
        redis_used / n as f64
    );
    println!("wrote {} and {}", json_path.display(), png_path.display());
    Ok(())
}
