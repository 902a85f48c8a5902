//! Retina over gRPC, balanced across every replica.
//!
//! `--retina http://retina:50061` names a service, not a process: behind
//! Docker's (or Kubernetes' headless) DNS the name resolves to one address
//! per replica. [`RemoteRetina`] resolves each configured URL again every
//! `resolve_every`, and feeds the differences to tonic's balanced channel
//! (tower's power-of-two-choices over pending requests), so
//! `--scale retina=3` spreads work with no restart of KFC.
//!
//! Each call has its own deadline. A call that fails as a whole
//! (unreachable, overloaded, deadline) is an [`EmbedError`]: the fill loop
//! retries its inputs later with backoff. Retina reports bad inputs one by
//! one, so they never fail a whole call.

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use async_trait::async_trait;
use embark_proto::retina::v1::{EmbedRequest, FailureCode, retina_client::RetinaClient};
use tokio_util::sync::CancellationToken;
use tonic::{
    Code,
    transport::{Channel, Endpoint, channel::Change},
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
}

impl Default for RetinaClientConfig {
    fn default() -> Self {
        Self {
            urls: vec![DEFAULT_RETINA_URL.into()],
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            resolve_every: Duration::from_secs(5),
        }
    }
}

/// An [`Embedder`] that calls Retina replicas over gRPC.
#[derive(Debug, Clone)]
pub struct RemoteRetina {
    client: RetinaClient<Channel>,
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
        let (channel, changes) = Channel::balance_channel::<SocketAddr>(64);
        let endpoint_for = {
            let config = config.clone();
            move |addr: SocketAddr| -> Result<Endpoint, tonic::transport::Error> {
                Ok(Endpoint::from_shared(format!("http://{addr}"))?
                    .connect_timeout(config.connect_timeout)
                    .timeout(config.timeout)
                    .tcp_nodelay(true)
                    .http2_adaptive_window(true))
            }
        };
        tokio::spawn(async move {
            let mut known: HashSet<SocketAddr> = HashSet::new();
            let mut tick = tokio::time::interval(config.resolve_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let mut now: HashSet<SocketAddr> = HashSet::new();
                for target in &targets {
                    match tokio::net::lookup_host(target.as_str()).await {
                        Ok(addrs) => now.extend(addrs),
                        // Keep the last known addresses of a name that does
                        // not resolve right now.
                        Err(e) => {
                            tracing::warn!(%target, error = %e, "cannot resolve Retina");
                            now.extend(known.iter().copied().filter(|a| target_port(target) == Some(a.port())));
                        }
                    }
                }
                for gone in known.difference(&now).copied().collect::<Vec<_>>() {
                    tracing::info!(addr = %gone, "Retina replica gone");
                    known.remove(&gone);
                    if changes.send(Change::Remove(gone)).await.is_err() {
                        return;
                    }
                }
                for new in now.difference(&known).copied().collect::<Vec<_>>() {
                    match endpoint_for(new) {
                        Ok(endpoint) => {
                            tracing::info!(addr = %new, "Retina replica found");
                            known.insert(new);
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
        Ok(Self { client: RetinaClient::new(channel).max_decoding_message_size(256 << 20), timeout: config.timeout })
    }
}

/// `http://host:port` -> `host:port` (the form `lookup_host` takes).
fn parse_target(url: &str) -> Result<String, EmbedError> {
    let bad = |why: &str| EmbedError::Config(format!("Retina URL {url:?}: {why} (expected http://host:port)"));
    let rest = url.strip_prefix("http://").ok_or_else(|| bad("only http:// is supported"))?;
    let hostport = rest.trim_end_matches('/');
    if hostport.is_empty() || hostport.contains('/') {
        return Err(bad("no host, or a path"));
    }
    if target_port(hostport).is_none() {
        return Err(bad("no port"));
    }
    Ok(hostport.to_owned())
}

fn target_port(hostport: &str) -> Option<u16> {
    hostport.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

#[async_trait]
impl Embedder for RemoteRetina {
    async fn embed(&self, model: &str, inputs: Vec<String>) -> Result<Vec<EmbedOutcome>, EmbedError> {
        let n = inputs.len();
        let mut request = tonic::Request::new(EmbedRequest { model: model.to_owned(), inputs });
        request.set_timeout(self.timeout);
        let mut client = self.client.clone();
        let call = tokio::time::timeout(self.timeout + Duration::from_millis(500), client.embed(request));
        let reply = match call.await {
            Err(_) => return Err(EmbedError::Timeout(self.timeout)),
            Ok(Ok(reply)) => reply.into_inner(),
            // The request itself is wrong for Retina (a model it does not
            // serve, too many inputs): retrying cannot help, so every input
            // gets a permanent failure record.
            Ok(Err(status)) if matches!(status.code(), Code::NotFound | Code::InvalidArgument) => {
                let reason = format!("Retina refused the request: {}", status.message());
                return Ok((0..n)
                    .map(|_| EmbedOutcome::Failed {
                        code: FailureCode::InvalidInput as i32,
                        reason: reason.clone(),
                        transient: false,
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
        assert_eq!(parse_target("http://retina:50061").expect("valid"), "retina:50061");
        assert_eq!(parse_target("http://127.0.0.1:1/").expect("valid"), "127.0.0.1:1");
        assert!(parse_target("retina:50061").is_err());
        assert!(parse_target("http://retina").is_err());
        assert!(parse_target("https://retina:1").is_err());
    }
}
