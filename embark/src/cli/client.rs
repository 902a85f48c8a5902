//! The client verbs on the `embark` binary, against a running server:
//! `get`, `similar`, `invalidate`, `models`. They speak the same gRPC API
//! as a ranker (so no grpcurl is needed), print a table or, with `--json`,
//! one JSON document on stdout, and take the same TLS and token settings
//! as the Python client.
//!
//! Every call is retried on `UNAVAILABLE` (a server restarting) and
//! `RESOURCE_EXHAUSTED` (load shedding, the Invalidate rate; not a batch
//! over `--max-batch-keys`) with exponential backoff; other errors are final and printed with a hint at
//! their usual cause. Long key lists are sent in batches of
//! `--batch-keys`, under the server's `--max-batch-keys`.

use std::{
    io::BufRead,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use backon::{ExponentialBuilder, Retryable};
use clap::Args;
use embark::models::{kind_name, source_name};
use embark_ops::{
    auth::BearerToken,
    tls::{ClientTlsFiles, client_tls},
};
use embark_proto::embark::v1::{
    InvalidateRequest, LookupRequest, LookupResponse, ModelsRequest, SimilarRequest, Source, VectorType,
    emb_ark_client::EmbArkClient, similar_request::Query,
};
use serde::Serialize;
use tonic::{Code, Status, service::interceptor::InterceptedService, transport::Channel};

/// Where the server is and how to reach it.
#[derive(Debug, Args)]
pub(crate) struct Connection {
    /// The EmbArk to ask: http://HOST:PORT, https://HOST:PORT (TLS, needs
    /// --ca) or unix:///PATH (its --uds socket).
    #[arg(long, env = "EMBARK_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// PEM CA that signed the server's certificate (for https://).
    #[arg(long, env = "EMBARK_CA")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate, for a server that requires mTLS.
    #[arg(long, env = "EMBARK_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// PEM key of --client-cert.
    #[arg(long, env = "EMBARK_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the host of
    /// --addr).
    #[arg(long, env = "EMBARK_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// File holding the bearer token (preferred to $EMBARK_TOKEN, which
    /// other users of the machine may see in the environment).
    #[arg(long, env = "EMBARK_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// How long one call may take, in milliseconds.
    #[arg(long, env = "EMBARK_TIMEOUT_MS", default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Attempts per call when the server is unavailable or sheds load.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub attempts: u32,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `embark get`: the vectors of keys.
#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// The model, as `embark models` lists it.
    #[arg(long, short, env = "EMBARK_MODEL")]
    pub model: String,
    /// The model version (default: the current one).
    #[arg(long, env = "EMBARK_MODEL_VERSION", default_value = "")]
    pub version: String,
    /// Keys (image URLs or texts); `-` reads one per line from stdin.
    #[arg(required = true)]
    pub keys: Vec<String>,
    /// Ask again, up to this many seconds, while a key is OOV_PENDING or
    /// OOV_UNAVAILABLE; exit 2 if one still is.
    #[arg(long, default_value_t = 0.0)]
    pub wait: f64,
    /// Keys per Lookup (at most the server's --max-batch-keys).
    #[arg(long, default_value_t = DEFAULT_BATCH_KEYS, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_keys: u32,
    /// Components of each vector the table shows (JSON has them all).
    #[arg(long, default_value_t = 4)]
    pub show: usize,
    /// The rows' type on the wire: f32, f16, bf16 or i8 (shown as floats).
    #[arg(long, default_value = "f32", value_parser = parse_vector_type)]
    pub vector_type: VectorType,
}

fn parse_vector_type(name: &str) -> Result<VectorType, String> {
    embark_proto::vectors::parse_type(name).ok_or_else(|| format!("{name:?} is not one of f32, f16, bf16, i8"))
}

/// `embark similar`: stored keys nearest a key or a vector.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("query").required(true).args(["key", "vector"])))]
pub(crate) struct SimilarArgs {
    #[command(flatten)]
    pub conn: Connection,
    #[arg(long, short, env = "EMBARK_MODEL")]
    pub model: String,
    /// The model version whose vectors are searched (default: the current one).
    #[arg(long, env = "EMBARK_MODEL_VERSION", default_value = "")]
    pub version: String,
    /// A key with a stored vector (left out of the answer).
    #[arg(long)]
    pub key: Option<String>,
    /// A query vector of the model's dim: comma-separated numbers.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub vector: Option<Vec<f32>>,
    /// How many neighbours.
    #[arg(long, short, default_value_t = 10)]
    pub k: u32,
    /// Only neighbours with at least this cosine score.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub min_score: f32,
}

/// `embark invalidate`: forget keys' vectors and queue them again.
#[derive(Debug, Args)]
pub(crate) struct InvalidateArgs {
    #[command(flatten)]
    pub conn: Connection,
    #[arg(long, short, env = "EMBARK_MODEL")]
    pub model: String,
    /// Keys; `-` reads one per line from stdin.
    #[arg(required = true)]
    pub keys: Vec<String>,
    /// Keys per Invalidate (at most the server's --max-batch-keys).
    #[arg(long, default_value_t = DEFAULT_BATCH_KEYS, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_keys: u32,
}

/// `embark models`: what the server serves.
#[derive(Debug, Args)]
pub(crate) struct ModelsArgs {
    #[command(flatten)]
    pub conn: Connection,
}

/// Keys per call unless told: well under the server's default
/// `--max-batch-keys` (4096), and an f32 answer of a 1280-d model stays
/// ~1.3 MiB.
const DEFAULT_BATCH_KEYS: u32 = 256;

/// Largest answer accepted (a 4096-key batch of a 4096-d model is 64 MiB).
const MAX_DECODING_BYTES: usize = 256 << 20;

/// Exit status of `get --wait` when keys are still pending at its end.
const EXIT_STILL_PENDING: i32 = 2;

type Client = EmbArkClient<InterceptedService<Channel, BearerToken>>;

/// A connected client with the retry policy of [`Connection`].
struct Api {
    client: Client,
    attempts: u32,
}

impl Connection {
    async fn connect(&self) -> anyhow::Result<Api> {
        let timeout = Duration::from_millis(self.timeout_ms);
        let (token, has_token) = match &self.token_file {
            Some(path) => (BearerToken::from_file(path)?, true),
            None => match std::env::var("EMBARK_TOKEN") {
                Ok(t) if !t.trim().is_empty() => (BearerToken::new(&t)?, true),
                _ => (BearerToken::default(), false),
            },
        };
        let channel = if let Some(path) = self.addr.strip_prefix("unix://") {
            let path = PathBuf::from(path);
            // The URI is a placeholder: the connector ignores it.
            tonic::transport::Endpoint::from_static("http://uds.invalid")
                .connect_timeout(timeout)
                .timeout(timeout)
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .with_context(|| format!("connecting to {}", self.addr))?
        } else {
            let uri: tonic::transport::Uri =
                self.addr.parse().with_context(|| format!("--addr {:?} is not a URL", self.addr))?;
            let mut endpoint = tonic::transport::Endpoint::from(uri.clone()).connect_timeout(timeout).timeout(timeout);
            match uri.scheme_str() {
                Some("https") => {
                    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
                    let name = self.tls_server_name.as_deref().unwrap_or(host);
                    let files = ClientTlsFiles {
                        ca: self.ca.clone(),
                        cert: self.client_cert.clone(),
                        key: self.client_key.clone(),
                    };
                    endpoint = endpoint.tls_config(client_tls(&files, name)?)?;
                }
                Some("http") => {
                    if self.ca.is_some() || self.client_cert.is_some() {
                        bail!("--ca and --client-cert are for an https:// --addr; {} is plaintext", self.addr);
                    }
                    if has_token {
                        tracing::warn!("sending the token over a plaintext channel (use an https:// --addr)");
                    }
                }
                _ => bail!("--addr {:?}: use http://, https:// or unix://", self.addr),
            }
            endpoint.connect().await.with_context(|| format!("connecting to {}", self.addr))?
        };
        let client = EmbArkClient::with_interceptor(channel, token).max_decoding_message_size(MAX_DECODING_BYTES);
        Ok(Api { client, attempts: self.attempts })
    }
}

impl Api {
    /// Runs `call` until it succeeds, fails for good, or has had its attempts.
    async fn call<T, F, Fut>(&self, what: &str, call: F) -> anyhow::Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(self.attempts.saturating_sub(1) as usize)
            .with_jitter();
        (|| call(self.client.clone()))
            .retry(backoff)
            .when(retryable)
            .notify(|s: &Status, after: Duration| tracing::info!(code = ?s.code(), ?after, "{what}: retrying"))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| anyhow::anyhow!("{what}: {}", explain(&s)))
    }
}

/// A server restarting or shedding load is asked again; a batch over the
/// server's limit is not (it would be refused every time).
fn retryable(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable => true,
        Code::ResourceExhausted => !s.message().contains(embark::front::BATCH_LIMIT_FLAG),
        _ => false,
    }
}

/// A status as the user reads it: code, the server's message, and a hint
/// where the code has a usual cause.
fn explain(status: &Status) -> String {
    let hint = match status.code() {
        Code::Unauthenticated => " (no token, or one the server does not know: --token-file or $EMBARK_TOKEN)",
        Code::PermissionDenied => " (the token's role does not allow this call: Invalidate needs admin)",
        Code::Unavailable => " (is the server running at --addr?)",
        Code::DeadlineExceeded => " (raise --timeout-ms?)",
        _ => "",
    };
    format!("{:?}: {}{hint}", status.code(), status.message())
}

/// The keys of the command line, with `-` replaced by stdin's lines.
fn read_keys(args: &[String]) -> anyhow::Result<Vec<String>> {
    let mut keys = Vec::with_capacity(args.len());
    for arg in args {
        if arg == "-" {
            for line in std::io::stdin().lock().lines() {
                let line = line.context("reading keys from stdin")?;
                if !line.is_empty() {
                    keys.push(line);
                }
            }
        } else {
            keys.push(arg.clone());
        }
    }
    Ok(keys)
}

fn still_pending(source: i32) -> bool {
    source == Source::OovPending as i32 || source == Source::OovUnavailable as i32
}

/// Rows of a table, columns padded to their widest cell.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| if i == last { c.to_string() } else { format!("{c:<w$}", w = widths[i]) })
            .collect();
        println!("{}", text.join("  "));
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

#[derive(Debug, Serialize)]
struct GetRow {
    key: String,
    source: &'static str,
    vector: Vec<f32>,
}

#[derive(Debug, Serialize)]
struct GetOutput {
    model: String,
    dim: u32,
    rows: Vec<GetRow>,
}

pub(crate) async fn get(args: GetArgs) -> anyhow::Result<i32> {
    let keys = read_keys(&args.keys)?;
    let api = args.conn.connect().await?;
    let deadline = Instant::now() + Duration::from_secs_f64(args.wait.max(0.0));
    let mut dim = 0;
    let mut rows: Vec<GetRow> = Vec::with_capacity(keys.len());
    for batch in keys.chunks(args.batch_keys as usize) {
        let lookup = || {
            let request = LookupRequest {
                model: args.model.clone(),
                keys: batch.to_vec(),
                version: args.version.clone(),
                vector_type: args.vector_type as i32,
            };
            api.call("Lookup", move |mut c| {
                let request = request.clone();
                async move { c.lookup(request).await }
            })
        };
        let mut answer: LookupResponse = lookup().await?;
        while answer.sources.iter().any(|&s| still_pending(s)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            answer = lookup().await?;
        }
        dim = answer.dim;
        let width = answer.dim as usize;
        if answer.vector_type != args.vector_type as i32 {
            bail!(
                "asked for {} rows, the server answered type {} (a server before vector types answers f32 only)",
                embark_proto::vectors::type_name(args.vector_type),
                answer.vector_type
            );
        }
        let floats = embark_proto::vectors::decode_matrix(args.vector_type, &answer.vectors, &answer.scales, width)
            .filter(|f| answer.sources.len() == batch.len() && f.len() == batch.len() * width)
            .with_context(|| {
                format!(
                    "the server answered {} keys with {} sources and {} bytes of {width}-d {} rows",
                    batch.len(),
                    answer.sources.len(),
                    answer.vectors.len(),
                    embark_proto::vectors::type_name(args.vector_type)
                )
            })?;
        for ((key, source), vector) in batch.iter().zip(&answer.sources).zip(floats.chunks(width.max(1))) {
            rows.push(GetRow { key: key.clone(), source: source_name(*source), vector: vector.to_vec() });
        }
    }
    let pending = rows.iter().filter(|r| r.source == "OOV_PENDING" || r.source == "OOV_UNAVAILABLE").count();
    if args.conn.json {
        print_json(&GetOutput { model: args.model.clone(), dim, rows })?;
    } else {
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                let norm = r.vector.iter().map(|x| x * x).sum::<f32>().sqrt();
                let mut shown: Vec<String> = r.vector.iter().take(args.show).map(|x| format!("{x:.4}")).collect();
                if r.vector.len() > args.show {
                    shown.push("…".into());
                }
                vec![r.key.clone(), r.source.into(), format!("{norm:.4}"), format!("[{}]", shown.join(", "))]
            })
            .collect();
        print_table(&["KEY", "SOURCE", "NORM", &format!("VECTOR ({dim}-d)")], &table);
    }
    if args.wait > 0.0 && pending > 0 {
        eprintln!("{pending} keys still pending after {}s", args.wait);
        return Ok(EXIT_STILL_PENDING);
    }
    Ok(0)
}

#[derive(Debug, Serialize)]
struct Neighbour {
    key: String,
    score: f32,
}

#[derive(Debug, Serialize)]
struct SimilarOutput {
    model: String,
    exact: bool,
    neighbours: Vec<Neighbour>,
}

pub(crate) async fn similar(args: SimilarArgs) -> anyhow::Result<i32> {
    let query = match (&args.key, &args.vector) {
        (Some(key), _) => Query::Key(key.clone()),
        (None, Some(v)) => Query::Vector(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into()),
        (None, None) => bail!("give --key or --vector"),
    };
    let api = args.conn.connect().await?;
    let request = SimilarRequest {
        model: args.model.clone(),
        query: Some(query),
        k: args.k,
        min_score: args.min_score,
        version: args.version.clone(),
    };
    let answer = api
        .call("Similar", |mut c| {
            let request = request.clone();
            async move { c.similar(request).await }
        })
        .await?;
    let neighbours: Vec<Neighbour> =
        answer.keys.into_iter().zip(answer.scores).map(|(key, score)| Neighbour { key, score }).collect();
    if args.conn.json {
        print_json(&SimilarOutput { model: args.model, exact: answer.exact, neighbours })?;
    } else {
        let rows: Vec<Vec<String>> = neighbours
            .iter()
            .enumerate()
            .map(|(i, n)| vec![(i + 1).to_string(), format!("{:.4}", n.score), n.key.clone()])
            .collect();
        print_table(&["RANK", "SCORE", "KEY"], &rows);
        eprintln!(
            "{} neighbours, {} search",
            neighbours.len(),
            if answer.exact { "exact" } else { "approximate (HNSW)" }
        );
    }
    Ok(0)
}

#[derive(Debug, Serialize)]
struct InvalidateOutput {
    model: String,
    keys: usize,
    invalidated: u64,
}

pub(crate) async fn invalidate(args: InvalidateArgs) -> anyhow::Result<i32> {
    let keys = read_keys(&args.keys)?;
    let api = args.conn.connect().await?;
    let mut invalidated = 0u64;
    for batch in keys.chunks(args.batch_keys as usize) {
        let request = InvalidateRequest { model: args.model.clone(), keys: batch.to_vec() };
        let answer = api
            .call("Invalidate", |mut c| {
                let request = request.clone();
                async move { c.invalidate(request).await }
            })
            .await
            .with_context(|| format!("after {invalidated} keys invalidated"))?;
        invalidated += u64::from(answer.invalidated);
    }
    let output = InvalidateOutput { model: args.model, keys: keys.len(), invalidated };
    if args.conn.json {
        print_json(&output)?;
    } else {
        println!("invalidated {} of {} keys of {} (queued again)", output.invalidated, output.keys, output.model);
    }
    Ok(0)
}

#[derive(Debug, Serialize)]
struct ModelRow {
    name: String,
    kind: &'static str,
    dim: u32,
    version: String,
    current: bool,
    /// Coverage, as the server last counted it (`None`: not yet).
    stored_vectors: Option<u64>,
}

pub(crate) async fn models(args: ModelsArgs) -> anyhow::Result<i32> {
    let api = args.conn.connect().await?;
    let answer = api.call("Models", |mut c| async move { c.models(ModelsRequest {}).await }).await?;
    let models: Vec<ModelRow> = answer
        .models
        .into_iter()
        .map(|m| ModelRow {
            kind: kind_name(m.kind),
            name: m.name,
            dim: m.dim,
            version: m.version,
            current: m.current,
            stored_vectors: (m.stored_vectors_counted_at_unix_ms > 0).then_some(m.stored_vectors),
        })
        .collect();
    if args.conn.json {
        print_json(&models)?;
    } else {
        let rows: Vec<Vec<String>> = models
            .iter()
            .map(|m| {
                vec![
                    m.name.clone(),
                    m.kind.into(),
                    m.dim.to_string(),
                    m.version.clone(),
                    if m.current { "yes" } else { "" }.into(),
                    m.stored_vectors.map_or("-".into(), |n| n.to_string()),
                ]
            })
            .collect();
        print_table(&["NAME", "KIND", "DIM", "VERSION", "CURRENT", "STORED"], &rows);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_a_hint_at_their_usual_cause() {
        let text = explain(&Status::permission_denied("role read may not call Invalidate"));
        assert!(text.starts_with("PermissionDenied: role read"), "{text}");
        assert!(text.contains("needs admin"), "{text}");
        assert_eq!(explain(&Status::not_found("no model x")), "NotFound: no model x");
    }

    #[test]
    fn shedding_is_retried_an_oversized_batch_is_not() {
        assert!(retryable(&Status::unavailable("restarting")));
        assert!(retryable(&Status::resource_exhausted("too many requests in progress; retry with backoff")));
        assert!(!retryable(&Status::resource_exhausted(
            "5000 keys in one request; the limit is 4096 (--max-batch-keys): split the batch"
        )));
        assert!(!retryable(&Status::not_found("no model x")));
    }

    #[test]
    fn pending_means_ask_again() {
        assert!(still_pending(Source::OovPending as i32));
        assert!(still_pending(Source::OovUnavailable as i32));
        assert!(!still_pending(Source::OovFailed as i32));
        assert!(!still_pending(Source::Store as i32));
        assert_eq!(source_name(99), "SOURCE_UNSPECIFIED");
    }
}
