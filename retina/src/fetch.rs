//! Downloading images from URLs that anyone on the internet controls.
//!
//! - http and https only; every other scheme is refused.
//! - Every address a host resolves to, on the first request and on each
//!   redirect, must be public: loopback, private, link-local, shared
//!   (CGNAT), multicast, broadcast, documentation and unspecified
//!   addresses are refused unless `allow` lists them. Resolution goes
//!   through [`GuardedResolver`], and reqwest connects only to the
//!   addresses it returns, so a DNS answer cannot change between the check
//!   and the connect (no rebinding).
//! - Redirects are followed here, not by reqwest, so each hop's URL is
//!   checked again, up to `max_redirects`.
//! - Connect, first-byte and total timeouts.
//! - The body limit is enforced while streaming; Content-Length is only
//!   used to refuse early, never trusted to be true.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use reqwest::{
    Url,
    dns::{Addrs, Name, Resolve, Resolving},
    redirect::Policy,
};

#[derive(Debug, Clone)]
pub struct FetchConfig {
    pub connect_timeout: Duration,
    /// Until the response headers arrive.
    pub first_byte_timeout: Duration,
    /// The whole download, redirects and body included.
    pub total_timeout: Duration,
    pub max_bytes: usize,
    pub max_redirects: usize,
    /// Networks allowed despite being non-public (e.g. 127.0.0.0/8 in tests).
    pub allow: Vec<IpNet>,
    /// Ports a URL may name (its scheme's default when it names none). A
    /// URL whose host is an address literal inside `allow` may use any.
    pub allow_ports: Vec<u16>,
}

/// The ports image URLs may use by default: the web's.
pub const DEFAULT_ALLOW_PORTS: [u16; 4] = [80, 443, 8080, 8443];

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            first_byte_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(15),
            max_bytes: 16 << 20,
            max_redirects: 5,
            allow: Vec::new(),
            allow_ports: DEFAULT_ALLOW_PORTS.to_vec(),
        }
    }
}

/// Why a download failed. `is_transient` says whether retrying may help.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FetchError {
    #[error("bad URL: {0}")]
    BadUrl(String),
    #[error("blocked address: {0}")]
    Blocked(String),
    #[error("HTTP {status}: {url}")]
    NotFound { status: u16, url: String },
    #[error("HTTP {status}: {url}")]
    ClientError { status: u16, url: String },
    #[error("HTTP {status}: {url}")]
    ServerError { status: u16, url: String },
    #[error("body over the limit of {limit} bytes{}", .declared.map(|d| format!(" (declared {d})")).unwrap_or_default())]
    TooLarge { limit: usize, declared: Option<u64> },
    #[error("more than {0} redirects")]
    TooManyRedirects(usize),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The host name does not exist (NXDOMAIN): permanent, unlike a
    /// resolver that does not answer.
    #[error("unknown host: {0}")]
    UnknownHost(String),
}

impl FetchError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::ServerError { .. } | Self::Timeout(_) | Self::Unreachable(_))
            || matches!(self, Self::ClientError { status: 429 | 408, .. })
    }
}

/// True for addresses that name something on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_unspecified()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 shared (CGNAT)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 protocol assignments
                || (o[0] == 192 && o[1] == 88 && o[2] == 99) // 192.88.99.0/24 6to4 relays
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
                || o == [168, 63, 129, 16] // Azure's host endpoint (wireserver)
                || o[0] >= 240) // reserved
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            // Forms that carry an IPv4 address: judge that address.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let embedded = || std::net::Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
            if s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
                return is_public(IpAddr::V4(embedded())); // IPv4-compatible ::a.b.c.d
            }
            if s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0 {
                return is_public(IpAddr::V4(embedded())); // IPv4-translated ::ffff:0:a.b.c.d
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated, still routed inside some sites)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x2001 && s[1] == 0) // Teredo: tunnels to any IPv4 address
                || s[0] == 0x2002 // 6to4: tunnels to any IPv4 address
                || (s[0] == 0x2001 && s[1] == 2 && s[2] == 0) // benchmarking
                || (s[0] == 0x0100 && s[1..4] == [0; 3]) // discard-only
                || (s[0] == 0x64 && s[1] == 0xff9b)) // NAT64, well-known and local (may reach private v4)
        }
    }
}

#[derive(Debug, Clone)]
struct AddressPolicy {
    allow: Arc<Vec<IpNet>>,
    ports: Arc<Vec<u16>>,
}

impl AddressPolicy {
    fn permits(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.allow.iter().any(|n| n.contains(&ip))
    }
}

/// Resolves names and drops addresses the policy refuses; fails when none
/// is left, naming what was refused.
#[derive(Debug, Clone)]
struct GuardedResolver {
    policy: AddressPolicy,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BlockedAddress(String);

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NoSuchHost(String);

/// Whether a getaddrinfo failure says the name does not exist (EAI_NONAME,
/// EAI_NODATA), rather than that resolution failed for now (EAI_AGAIN).
fn is_no_such_host(e: &std::io::Error) -> bool {
    let text = e.to_string();
    text.contains("Name or service not known") || text.contains("No address associated with hostname")
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), 0)).await {
                Ok(addrs) => addrs.collect(),
                Err(e) if is_no_such_host(&e) => {
                    return Err(
                        Box::new(NoSuchHost(name.as_str().to_owned())) as Box<dyn std::error::Error + Send + Sync>
                    );
                }
                Err(e) => return Err(Box::new(e)),
            };
            let (ok, refused): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|a| policy.permits(a.ip()));
            if ok.is_empty() {
                // The addresses stay in this process's logs: a failure
                // reason travels to dead letters and clients, and must not
                // map the internal network for whoever chose the URL.
                let list: Vec<String> = refused.iter().map(|a| a.ip().to_string()).collect();
                tracing::debug!(host, refused = ?list, "a URL's host resolves only to non-public addresses");
                return Err(Box::new(BlockedAddress(format!("{host} resolves only to non-public addresses")))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(ok.into_iter()) as Addrs)
        })
    }
}

#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    policy: AddressPolicy,
    config: FetchConfig,
}

impl Fetcher {
    pub fn new(config: FetchConfig) -> Result<Self, FetchError> {
        let policy =
            AddressPolicy { allow: Arc::new(config.allow.clone()), ports: Arc::new(config.allow_ports.clone()) };
        let client = reqwest::Client::builder()
            .redirect(Policy::none())
            .dns_resolver(Arc::new(GuardedResolver { policy: policy.clone() }))
            .connect_timeout(config.connect_timeout)
            .no_proxy()
            .user_agent(concat!("embark-retina/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FetchError::Unreachable(format!("building the HTTP client: {e}")))?;
        Ok(Self { client, policy, config })
    }

    /// Downloads `url`, following redirects, within every limit.
    pub async fn fetch(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let deadline = Instant::now() + self.config.total_timeout;
        match tokio::time::timeout(self.config.total_timeout, self.fetch_inner(url, deadline)).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout(format!("download over {:?}", self.config.total_timeout))),
        }
    }

    fn check_url(&self, url: &Url) -> Result<(), FetchError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(FetchError::BadUrl(format!("scheme {:?} (only http and https)", url.scheme())));
        }
        let ip = match url.host() {
            None => return Err(FetchError::BadUrl("no host".into())),
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            Some(url::Host::Domain(_)) => None, // checked by the resolver
        };
        if let Some(ip) = ip
            && !self.policy.permits(ip)
        {
            return Err(FetchError::Blocked(format!("{ip} is not a public address")));
        }
        let port = url.port_or_known_default().unwrap_or(0);
        let allowed_literal = ip.is_some_and(|ip| self.policy.allow.iter().any(|n| n.contains(&ip)));
        if !allowed_literal && !self.policy.ports.contains(&port) {
            return Err(FetchError::Blocked(format!(
                "port {port} is not one image URLs may use ({:?}, --fetch-allow-ports)",
                self.policy.ports
            )));
        }
        Ok(())
    }

    async fn fetch_inner(&self, url: &str, deadline: Instant) -> Result<Vec<u8>, FetchError> {
        let mut url = Url::parse(url).map_err(|e| FetchError::BadUrl(format!("{url:?}: {e}")))?;
        for hop in 0..=self.config.max_redirects {
            self.check_url(&url)?;
            let left = deadline.saturating_duration_since(Instant::now());
            let send = self.client.get(url.clone()).send();
            let response = match tokio::time::timeout(self.config.first_byte_timeout.min(left), send).await {
                Err(_) => {
                    return Err(FetchError::Timeout(format!(
                        "no response within {:?}",
                        self.config.first_byte_timeout
                    )));
                }
                Ok(Err(e)) => return Err(classify(e)),
                Ok(Ok(r)) => r,
            };
            let status = response.status();
            if status.is_redirection() {
                if hop == self.config.max_redirects {
                    return Err(FetchError::TooManyRedirects(self.config.max_redirects));
                }
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| FetchError::BadUrl(format!("HTTP {} without a Location", status.as_u16())))?;
                url = url.join(location).map_err(|e| FetchError::BadUrl(format!("redirect to {location:?}: {e}")))?;
                continue;
            }
            let code = status.as_u16();
            let here = url.to_string();
            match code {
                200..=299 => return self.read_body(response).await,
                404 | 410 => return Err(FetchError::NotFound { status: code, url: here }),
                400..=499 => return Err(FetchError::ClientError { status: code, url: here }),
                _ => return Err(FetchError::ServerError { status: code, url: here }),
            }
        }
        Err(FetchError::TooManyRedirects(self.config.max_redirects))
    }

    async fn read_body(&self, mut response: reqwest::Response) -> Result<Vec<u8>, FetchError> {
        let limit = self.config.max_bytes;
        let declared = response.content_length();
        if declared.is_some_and(|d| d > limit as u64) {
            return Err(FetchError::TooLarge { limit, declared });
        }
        // Reserve what the server declares (bounded), grow otherwise.
        let mut body = Vec::with_capacity(declared.unwrap_or(64 << 10).min(limit as u64) as usize);
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > limit {
                return Err(FetchError::TooLarge { limit, declared });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// Maps a reqwest error to a failure class, finding our resolver's refusal
/// in the source chain.
fn classify(e: reqwest::Error) -> FetchError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if let Some(b) = s.downcast_ref::<BlockedAddress>() {
            return FetchError::Blocked(b.0.clone());
        }
        if let Some(n) = s.downcast_ref::<NoSuchHost>() {
            return FetchError::UnknownHost(n.0.clone());
        }
        source = s.source();
    }
    if e.is_timeout() {
        FetchError::Timeout(e.to_string())
    } else {
        let mut text = e.to_string();
        let mut s = std::error::Error::source(&e);
        while let Some(inner) = s {
            text = format!("{text}: {inner}");
            s = inner.source();
        }
        FetchError::Unreachable(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_pass() {
        for blocked in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "ff02::1",
            // Defect 11.12: forms that reach IPv4 or internal sites.
            "::127.0.0.1",
            "::10.0.0.1",
            "::ffff:0:127.0.0.1",
            "::ffff:0:a9fe:a9fe",
            "2002:7f00:1::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "fec0::1",
            "168.63.129.16",
            "192.88.99.1",
            "64:ff9b:1::a00:1",
        ] {
            assert!(!is_public(blocked.parse().expect("ip")), "{blocked} must be blocked");
        }
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(public.parse().expect("ip")), "{public} is public");
        }
    }

    /// Defect 11.12: any port was reachable on a public host (an internal
    /// admin port behind a public address, a mail server).
    #[tokio::test]
    async fn ssrf_gaps() {
        let f = Fetcher::new(FetchConfig::default()).expect("client");
        for url in ["http://8.8.8.8:22/x.jpg", "http://8.8.8.8:6379/", "https://[2606:4700::1]:25/"] {
            let e = f.fetch(url).await.expect_err("refused");
            assert!(matches!(&e, FetchError::Blocked(m) if m.contains("port")), "{url}: {e}");
        }
        assert!(matches!(f.fetch("http://[::127.0.0.1]/x.jpg").await, Err(FetchError::Blocked(_))));
        // An allowed network's literal may use any port (local test servers).
        let local =
            Fetcher::new(FetchConfig { allow: vec!["127.0.0.0/8".parse().expect("net")], ..FetchConfig::default() })
                .expect("client");
        let e = local.fetch("http://127.0.0.1:9/x.jpg").await.expect_err("nothing listens");
        assert!(!matches!(e, FetchError::Blocked(_)), "{e}");
    }

    #[tokio::test]
    async fn literal_private_hosts_and_other_schemes_are_refused_without_a_request() {
        let f = Fetcher::new(FetchConfig::default()).expect("client");
        assert!(matches!(f.fetch("http://127.0.0.1:9/x.jpg").await, Err(FetchError::Blocked(_))));
        assert!(matches!(f.fetch("http://[::1]/x.jpg").await, Err(FetchError::Blocked(_))));
        assert!(matches!(f.fetch("http://169.254.169.254/latest/meta-data").await, Err(FetchError::Blocked(_))));
        assert!(matches!(f.fetch("file:///etc/passwd").await, Err(FetchError::BadUrl(_))));
        assert!(matches!(f.fetch("not a url").await, Err(FetchError::BadUrl(_))));
        // A name that resolves to loopback is refused by the resolver, and
        // (defect 11.16) the reason does not say what it resolved to.
        let e = f.fetch("http://localhost/x.jpg").await.expect_err("blocked");
        assert!(matches!(&e, FetchError::Blocked(m) if !m.contains("127.0.0.1") && !m.contains("::1")), "{e}");
        // Defect 11.10: a name that does not exist was retried as transient.
        let e = f.fetch("http://no-such-host.invalid/x.jpg").await.expect_err("NXDOMAIN");
        assert!(matches!(e, FetchError::UnknownHost(_)) && !e.is_transient(), "{e:?}");
    }
}
