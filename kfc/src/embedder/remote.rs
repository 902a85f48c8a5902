//! Retina over gRPC, balanced across every replica.
//!
//! `--retina http://retina:50061` names a service, not a process: behind
//! Docker's (or Kubernetes' headless) DNS the name resolves to one address
//! per replica. [`RemoteRetina`] resolves each configured URL again every
//! `resolve_every`, and feeds the differences to tonic's balanced channel
//! (tower's power-of-two-choices over pending requests), so
//! `--scale retina=3` spreads work with no restart of KFC.
//!
//! `https://` URLs are called over TLS, verified against `tls.ca` for the
//! URL's host name (not the resolved address), with a client certificate
//! when the replicas require mTLS; a bearer token, if set, goes with every
//! call. The CA, the client certificate and the token are re-read when
//! their files change (checked every `tls_reload_every`) or on SIGHUP:
//! the new token goes with the next call; a new certificate serves every
//! replica's connection from the next resolve on (each replica's endpoint
//! is replaced, the old connection finishing the calls it carries), so a
//! rotation, followed even by a restart of Retina with a new CA, needs no
//! restart of KFC.
//!
//! Each call has its own deadline. A call that fails as a whole
//! (unreachable, overloaded, deadline) is an [`EmbedError`]: the fill loop
//! retries its inputs later with backoff. Retina reports bad inputs one by
//! one, so they never fail a whole call.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use embark_ops::{
    auth::BearerToken,
    reload::{self, Reloadable},
    tls::ClientTlsFiles,
};
use embark_proto::retina::v1::{EmbedRequest, FailureCode, retina_client::RetinaClient};
use tokio_util::sync::CancellationToken;
use tonic::{
    Code,
    service::interceptor::InterceptedService,
    transport::{Channel, ClientTlsConfig, Endpoint, channel::Change},
};

use super::{EmbedError, EmbedOutcome, Embedder};

/// Retina's default gRPC address (`retina --listen`).
pub const DEFAULT_RETINA_URL: &str = "http://127.0.0.1:50061";

#[derive(Debug, Clone)]
pub struct RetinaClientConfig {
    /// `http://host:port` of each Retina service (each may resolve to many
    /// replicas).
    pub urls: Vec<String>,
    /// Deadline of one Embed call (fetching an image can take seconds).
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// How often the names are resolved again.
    pub resolve_every: Duration,
    /// The CA (and client certificate) for `https://` URLs.
    pub tls: ClientTlsFiles,
    /// Sent with every call when Retina requires principals.
    pub token: BearerToken,
    /// How often the TLS files and the token file are checked for a change.
    pub tls_reload_every: Duration,
}

impl Default for RetinaClientConfig {
    fn default() -> Self {
        Self {
            urls: vec![DEFAULT_RETINA_URL.into()],
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            resolve_every: Duration::from_secs(5),
            tls: ClientTlsFiles::default(),
            token: BearerToken::default(),
            tls_reload_every: reload::DEFAULT_RELOAD_EVERY,
        }
    }
}

/// How a client proves itself to a Retina that requires TLS, mTLS or
/// principals: the flags `kfc` and `embark backfill` share.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RetinaTlsArgs {
    /// The CA that signed Retina's certificate (PEM), for https:// URLs.
    #[arg(long, env = "KFC_RETINA_CA")]
    pub retina_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for a Retina that requires mTLS.
    #[arg(long, env = "KFC_RETINA_CERT", requires = "retina_key")]
    pub retina_cert: Option<std::path::PathBuf>,
    /// The key of --retina-cert (PEM).
    #[arg(long, env = "KFC_RETINA_KEY", requires = "retina_cert")]
    pub retina_key: Option<std::path::PathBuf>,
    /// A file holding the bearer token for a Retina that requires principals.
    #[arg(long, env = "KFC_RETINA_TOKEN_FILE")]
    pub retina_token_file: Option<std::path::PathBuf>,
    /// How often, in seconds, the files above are checked for a change
    /// (SIGHUP re-reads them at once).
    #[arg(long, env = "KFC_RETINA_TLS_RELOAD_SECS", default_value_t = reload::DEFAULT_RELOAD_EVERY.as_secs())]
    pub retina_tls_reload_secs: u64,
}

impl RetinaTlsArgs {
    /// `config` with these files and token.
    pub fn apply(&self, config: RetinaClientConfig) -> Result<RetinaClientConfig, embark_ops::auth::TokenError> {
        let token = match &self.retina_token_file {
            Some(path) => BearerToken::from_file(path)?,
            None => BearerToken::default(),
        };
        let tls =
            ClientTlsFiles { ca: self.retina_ca.clone(), cert: self.retina_cert.clone(), key: self.retina_key.clone() };
        let tls_reload_every = Duration::from_secs(self.retina_tls_reload_secs.max(1));
        Ok(RetinaClientConfig { tls, token, tls_reload_every, ..config })
    }
}

/// An [`Embedder`] that calls Retina replicas over gRPC.
#[derive(Debug, Clone)]
pub struct RemoteRetina {
    client: RetinaClient<InterceptedService<Channel, BearerToken>>,
    timeout: Duration,
}

impl RemoteRetina {
    /// Starts resolving `config.urls` (until `stop`) and returns a client
    /// balanced over what they resolve to. Calls made before the first
    /// address is known wait, within their deadline.
    pub fn start(config: RetinaClientConfig, stop: CancellationToken) -> Result<Self, EmbedError> {
        let targets = config.urls.iter().map(|u| parse_target(u)).collect::<Result<Vec<_>, _>>()?;
        if targets.is_empty() {
            return Err(EmbedError::Config("no Retina URL given".into()));
        }
        // TLS settings per target, checked now: a missing CA or key is a
        // start-up error, not a warning per resolved replica. Then re-read
        // on change; a change that fails to load keeps the settings in use.
        let tls = Arc::new(Reloadable::new(tls_per_target(&targets, &config.tls)?));
        if targets.iter().any(|t| t.tls) {
            let (targets, files) = (targets.clone(), config.tls.clone());
            let paths = [&files.ca, &files.cert, &files.key].into_iter().flatten().cloned().collect();
            reload::watch(
                "retina-tls",
                paths,
                config.tls_reload_every,
                tls.clone(),
                move || tls_per_target(&targets, &files),
                stop.clone(),
            );
        }
        config.token.watch(config.tls_reload_every, &stop);
        let (channel, changes) = Channel::balance_channel::<SocketAddr>(64);
        let endpoint_for = {
            let config = config.clone();
            move |addr: SocketAddr, tls: &Option<ClientTlsConfig>| -> Result<Endpoint, tonic::transport::Error> {
                let scheme = if tls.is_some() { "https" } else { "http" };
                let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
                    .connect_timeout(config.connect_timeout)
                    .timeout(config.timeout)
                    .tcp_nodelay(true)
                    .http2_adaptive_window(true);
                match tls {
                    Some(tls) => endpoint.tls_config(tls.clone()),
                    None => Ok(endpoint),
                }
            }
        };
        tokio::spawn(async move {
            let mut known: HashSet<SocketAddr> = HashSet::new();
            let mut tls_in_use = tls.current();
            let mut tick = tokio::time::interval(config.resolve_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                // Each address, with the target (and so the TLS name) it came from.
                let mut now: HashMap<SocketAddr, usize> = HashMap::new();
                for (i, target) in targets.iter().enumerate() {
                    match tokio::net::lookup_host(target.hostport.as_str()).await {
                        Ok(addrs) => now.extend(addrs.map(|a| (a, i))),
                        // Keep the last known addresses of a name that does
                        // not resolve right now.
                        Err(e) => {
                            tracing::warn!(target = %target.hostport, error = %e, "cannot resolve Retina");
                            let port = target_port(&target.hostport);
                            now.extend(known.iter().copied().filter(|a| port == Some(a.port())).map(|a| (a, i)));
                        }
                    }
                }
                let gone: Vec<SocketAddr> = known.iter().filter(|a| !now.contains_key(a)).copied().collect();
                for gone in gone {
                    tracing::info!(addr = %gone, "Retina replica gone");
                    known.remove(&gone);
                    if changes.send(Change::Remove(gone)).await.is_err() {
                        return;
                    }
                }
                // New TLS settings: every replica's endpoint anew. tower's
                // balancer swaps an endpoint inserted under a known address
                // in once its new connection is ready.
                let tls_now = tls.current();
                let renewed = !Arc::ptr_eq(&tls_now, &tls_in_use);
                if renewed {
                    tracing::info!("Retina TLS settings changed: reconnecting to every replica with them");
                    tls_in_use = tls_now;
                }
                let new: Vec<(SocketAddr, usize)> =
                    now.iter().filter(|(a, _)| renewed || !known.contains(a)).map(|(a, i)| (*a, *i)).collect();
                for (new, target) in new {
                    match endpoint_for(new, &tls_in_use[target]) {
                        Ok(endpoint) => {
                            if known.insert(new) {
                                tracing::info!(addr = %new, "Retina replica found");
                            }
                            if changes.send(Change::Insert(new, endpoint)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => tracing::warn!(addr = %new, error = %e, "bad Retina endpoint"),
                    }
                }
                metrics::gauge!("kfc_retina_replicas").set(known.len() as f64);
            }
        });
        let client = RetinaClient::with_interceptor(channel, config.token.clone()).max_decoding_message_size(256 << 20);
        Ok(Self { client, timeout: config.timeout })
    }
}

/// The TLS settings of each target (None for http://), from `files`.
fn tls_per_target(targets: &[Target], files: &ClientTlsFiles) -> Result<Vec<Option<ClientTlsConfig>>, EmbedError> {
    targets
        .iter()
        .map(|t| match t.tls {
            true => embark_ops::tls::client_tls(files, &t.host)
                .map(Some)
                .map_err(|e| EmbedError::Config(format!("Retina URL https://{}: {e}", t.hostport))),
            false if files.ca.is_some() => Err(EmbedError::Config(format!(
                "a Retina CA is given but http://{} is plaintext: use https://",
                t.hostport
            ))),
            false => Ok(None),
        })
        .collect()
}

/// A Retina service as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// `host:port`, the form `lookup_host` takes.
    hostport: String,
    /// The name the server's certificate must be valid for.
    host: String,
    tls: bool,
}

/// `http://host:port` or `https://host:port`.
fn parse_target(url: &str) -> Result<Target, EmbedError> {
    let bad = |why: &str| EmbedError::Config(format!("Retina URL {url:?}: {why} (expected http(s)://host:port)"));
    let (rest, tls) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ => return Err(bad("only http:// and https:// are supported")),
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.is_empty() || hostport.contains('/') {
        return Err(bad("no host, or a path"));
    }
    let Some((host, _)) = hostport.rsplit_once(':').filter(|_| target_port(hostport).is_some()) else {
        return Err(bad("no port"));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    Ok(Target { hostport: hostport.to_owned(), host, tls })
}

fn target_port(hostport: &str) -> Option<u16> {
    hostport.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

#[async_trait]
impl Embedder for RemoteRetina {
    async fn embed(&self, model: &str, version: &str, inputs: Vec<String>) -> Result<Vec<EmbedOutcome>, EmbedError> {
        let n = inputs.len();
        let mut request =
            tonic::Request::new(EmbedRequest { model: model.to_owned(), inputs, version: version.to_owned() });
        request.set_timeout(self.timeout);
        // Retina's spans join the trace of the fill that called it.
        embark_ops::traces::inject_metadata(request.metadata_mut());
        let mut client = self.client.clone();
        let call = tokio::time::timeout(self.timeout + Duration::from_millis(500), client.embed(request));
        let reply = match call.await {
            Err(_) => return Err(EmbedError::Timeout(self.timeout)),
            Ok(Ok(reply)) => reply.into_inner(),
            // The request itself is wrong for Retina (a model it does not
            // serve, too many inputs): retrying cannot help, so every input
            // gets a permanent failure record. A model version Retina does
            // not serve yet is the exception: during a rollout the fronts
            // may name it before every Retina loads it, so those inputs
            // are retried with backoff (and recorded only once their tries
            // run out).
            Ok(Err(status)) if matches!(status.code(), Code::NotFound | Code::InvalidArgument) => {
                let reason = format!("Retina refused the request: {}", status.message());
                let transient = status.code() == Code::NotFound && !version.is_empty();
                return Ok((0..n)
                    .map(|_| EmbedOutcome::Failed {
                        code: FailureCode::InvalidInput as i32,
                        reason: reason.clone(),
                        transient,
                    })
                    .collect());
            }
            Ok(Err(status)) => return Err(EmbedError::Remote(Box::new(status))),
        };
        let dim = reply.dim as usize;
        let values = embark_proto::f32_from_le(&reply.vectors)
            .filter(|v| v.len() == n * dim && dim > 0)
            .ok_or_else(|| EmbedError::BadReply(format!("{} bytes for {n} rows of dim {dim}", reply.vectors.len())))?;
        let mut out: Vec<EmbedOutcome> =
            values.chunks_exact(dim).map(|row| EmbedOutcome::Vector(row.to_vec())).collect();
        for f in reply.failures {
            let Some(slot) = out.get_mut(f.index as usize) else {
                return Err(EmbedError::BadReply(format!("a failure for input {} of {n}", f.index)));
            };
            *slot = EmbedOutcome::Failed { code: f.code, reason: f.reason, transient: f.transient };
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_target;

    #[test]
    fn retina_urls_parse() {
        let t = parse_target("http://retina:50061").expect("valid");
        assert_eq!((t.hostport.as_str(), t.host.as_str(), t.tls), ("retina:50061", "retina", false));
        assert_eq!(parse_target("http://127.0.0.1:1/").expect("valid").hostport, "127.0.0.1:1");
        let t = parse_target("https://retina.internal:1").expect("valid");
        assert_eq!((t.host.as_str(), t.tls), ("retina.internal", true));
        assert_eq!(parse_target("https://[::1]:1").expect("valid").host, "::1");
        assert!(parse_target("retina:50061").is_err());
        assert!(parse_target("http://retina").is_err());
        assert!(parse_target("ftp://retina:1").is_err());
    }
}
