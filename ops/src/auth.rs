//! Who may call what: principals from a file, roles per method, and the
//! tower layer that refuses a call before any service sees it.
//!
//! A principal proves itself with a bearer token (`authorization: Bearer
//! <token>` metadata) or, under mTLS, with its client certificate. The
//! file ([`AuthArgs::auth_tokens`]) holds each token's SHA-256, never the
//! token: a copy of the file lets no one in. Lookups compare the digest
//! against every entry in constant time, so the time taken says nothing
//! about how close a guess was.
//!
//! ```toml
//! [[principal]]
//! name = "ranker"            # logs, metrics, the Invalidate rate limit
//! role = "read"              # read: Lookup, Models, Similar, Embed; admin: all
//! token_sha256 = "9f86d08..." # printf %s "$TOKEN" | sha256sum
//!
//! [[principal]]
//! name = "kfc"
//! role = "read"
//! client_cert = "kfc"        # a client certificate valid for this DNS name
//! ```
//!
//! Without a principal a call is answered `UNAUTHENTICATED`; with too low
//! a role `PERMISSION_DENIED`. Health and reflection stay public (they can
//! be switched off instead: [`AuthArgs`]). A method no policy names needs
//! `admin`: a new method is closed until someone opens it.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls_pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tonic::{
    metadata::{AsciiMetadataValue, MetadataValue},
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};

use crate::reload::{self, Reloadable};

/// What a principal may do. `Admin` may do everything `Read` may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Admin,
}

/// Who is calling, as the request's extensions carry it past the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: Arc<str>,
    pub role: Role,
}

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health checks and reflection: no principal needed.
    Public,
    Requires(Role),
}

/// A server's roles per gRPC path (`/package.Service/Method`).
pub type AccessPolicy = fn(&str) -> Access;

/// Whether `path` is the standard health or reflection service, which
/// every policy leaves public.
pub fn is_public_path(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// The access flags every gRPC server shares.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthArgs {
    /// Principals file (TOML): when given, every call but health and
    /// reflection needs a bearer token or client certificate it lists.
    /// Reloaded when it changes or on SIGHUP.
    #[arg(long, env = "EMBARK_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,
    /// Do not serve gRPC reflection (it lists the API to anyone).
    #[arg(long, env = "EMBARK_DISABLE_REFLECTION")]
    pub disable_reflection: bool,
    /// Do not serve the gRPC health service (the operator port's /readyz
    /// stays).
    #[arg(long, env = "EMBARK_DISABLE_GRPC_HEALTH")]
    pub disable_grpc_health: bool,
}

impl AuthArgs {
    /// The layer for `policy`, with the file loaded now (a bad file stops
    /// the start) and watched until `stop`; `None` without --auth-tokens.
    pub fn start(
        &self,
        policy: AccessPolicy,
        reload_every: Duration,
        stop: &CancellationToken,
    ) -> Result<Option<AuthLayer>, PrincipalsError> {
        let Some(path) = self.auth_tokens.clone() else { return Ok(None) };
        let principals = Arc::new(Reloadable::new(Principals::from_file(&path)?));
        let watched = vec![path.clone()];
        reload::watch(
            "principals",
            watched,
            reload_every,
            principals.clone(),
            move || Principals::from_file(&path),
            stop.clone(),
        );
        Ok(Some(AuthLayer { principals, policy }))
    }
}

/// A principals file that cannot be used. Names the entry and the field.
#[derive(Debug, thiserror::Error)]
pub enum PrincipalsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}: principal {index} ({name:?}), field {field}: {reason}")]
    Entry { path: PathBuf, index: usize, name: String, field: &'static str, reason: String },
    #[error("{path} lists no principal: every call would be refused")]
    Empty { path: PathBuf },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalsFile {
    #[serde(default)]
    principal: Vec<PrincipalEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalEntry {
    name: String,
    role: Role,
    token_sha256: Option<String>,
    client_cert: Option<String>,
}

/// The principals of a file, ready to match tokens and certificates.
pub struct Principals {
    tokens: Vec<([u8; 32], Principal)>,
    certs: Vec<(ServerName<'static>, Principal)>,
}

impl std::fmt::Debug for Principals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: digests stay out of logs too.
        let names: Vec<_> =
            self.tokens.iter().map(|(_, p)| &p.name).chain(self.certs.iter().map(|(_, p)| &p.name)).collect();
        f.debug_struct("Principals").field("names", &names).finish()
    }
}

impl Principals {
    pub fn from_file(path: &Path) -> Result<Self, PrincipalsError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| PrincipalsError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parses the TOML text of `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, PrincipalsError> {
        let file: PrincipalsFile =
            toml::from_str(text).map_err(|source| PrincipalsError::Parse { path: path.into(), source })?;
        if file.principal.is_empty() {
            return Err(PrincipalsError::Empty { path: path.into() });
        }
        let mut out = Self { tokens: Vec::new(), certs: Vec::new() };
        let mut names = std::collections::HashSet::new();
        for (index, e) in file.principal.into_iter().enumerate() {
            let bad = |field, reason: &str| PrincipalsError::Entry {
                path: path.into(),
                index,
                name: e.name.clone(),
                field,
                reason: reason.into(),
            };
            if e.name.is_empty() || e.name.len() > 128 {
                return Err(bad("name", "must be 1 to 128 bytes"));
            }
            if !names.insert(e.name.clone()) {
                return Err(bad("name", "another principal has this name"));
            }
            let principal = Principal { name: e.name.as_str().into(), role: e.role };
            match (&e.token_sha256, &e.client_cert) {
                (Some(hex), None) => {
                    let digest = parse_sha256(hex).ok_or_else(|| bad("token_sha256", "expected 64 hex digits"))?;
                    out.tokens.push((digest, principal));
                }
                (None, Some(name)) => {
                    let name = ServerName::try_from(name.clone())
                        .map_err(|_| bad("client_cert", "expected a DNS name or IP address"))?;
                    out.certs.push((name, principal));
                }
                _ => return Err(bad("token_sha256", "give exactly one of token_sha256 and client_cert")),
            }
        }
        Ok(out)
    }

    /// The principal whose token this is. Every entry is compared, in
    /// constant time, whichever matches.
    pub fn by_token(&self, token: &[u8]) -> Option<&Principal> {
        let digest: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for (hash, principal) in &self.tokens {
            if bool::from(hash.ct_eq(&digest)) {
                found = Some(principal);
            }
        }
        found
    }

    /// The principal a client certificate (already verified against the
    /// client CA by the TLS handshake) is valid for.
    pub fn by_certificate(&self, der: &CertificateDer<'_>) -> Option<&Principal> {
        let cert = webpki::EndEntityCert::try_from(der).ok()?;
        self.certs.iter().find(|(name, _)| cert.verify_is_valid_for_subject_name(name).is_ok()).map(|(_, p)| p)
    }
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// The hex SHA-256 of a token: what the principals file holds.
pub fn token_sha256(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Refuses calls without a principal of the method's role (see the module
/// docs); admitted requests carry their [`Principal`] in their extensions.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    principals: Arc<Reloadable<Principals>>,
    policy: AccessPolicy,
}

impl AuthLayer {
    pub fn new(principals: Principals, policy: AccessPolicy) -> Self {
        Self { principals: Arc::new(Reloadable::new(principals)), policy }
    }

    /// The same principals (reloaded together) under another policy: for
    /// a second API over the same service, such as REST beside gRPC.
    pub fn with_policy(&self, policy: AccessPolicy) -> Self {
        Self { principals: self.principals.clone(), policy }
    }

    /// Who sent `request`, if its path needs anyone: its principal, or the
    /// status that refuses it (`UNAUTHENTICATED`: no known token or
    /// certificate; `PERMISSION_DENIED`: too low a role). Counted and
    /// logged without the token.
    pub fn admit<B>(&self, request: &http::Request<B>) -> Result<Option<Principal>, tonic::Status> {
        let Access::Requires(needed) = (self.policy)(request.uri().path()) else { return Ok(None) };
        let principals = self.principals.current();
        let principal = match request.headers().get(http::header::AUTHORIZATION) {
            Some(value) => {
                let token = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
                token.and_then(|t| principals.by_token(t.as_bytes())).cloned()
            }
            None => request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.peer_certs())
                .and_then(|certs| certs.first().and_then(|leaf| principals.by_certificate(leaf)).cloned()),
        };
        let Some(principal) = principal else {
            metrics::counter!("grpc_auth_refusals_total", "code" => "unauthenticated").increment(1);
            return Err(tonic::Status::unauthenticated(
                "a bearer token or client certificate of a known principal is needed",
            ));
        };
        if principal.role < needed {
            tracing::debug!(principal = %principal.name, path = request.uri().path(), "refused: role too low");
            metrics::counter!("grpc_auth_refusals_total", "code" => "permission_denied").increment(1);
            return Err(tonic::Status::permission_denied(format!(
                "principal {:?} has role {:?}; this call needs {:?}",
                principal.name, principal.role, needed
            )));
        }
        Ok(Some(principal))
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, layer: self.clone() }
    }
}

/// [`AuthLayer`]'s service.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S, B, RB> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<S::Future, std::future::Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.layer.admit(&request) {
            Ok(principal) => {
                if let Some(p) = principal {
                    request.extensions_mut().insert(p);
                }
                futures::future::Either::Left(self.inner.call(request))
            }
            Err(status) => futures::future::Either::Right(std::future::ready(Ok(status.into_http()))),
        }
    }
}

/// A client's bearer token, added to every call (a tonic interceptor).
/// Without a token it adds nothing, so one client type serves both. A
/// token read from a file can be [watched](Self::watch): the next call
/// after the file changes (or after SIGHUP) carries the new token, on the
/// connections already open too.
#[derive(Clone, Default)]
pub struct BearerToken {
    value: Arc<Reloadable<Option<AsciiMetadataValue>>>,
    file: Option<PathBuf>,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.value.current().is_some() { "BearerToken(<redacted>)" } else { "BearerToken(none)" })
    }
}

/// A token that cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading the token file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the token holds characters a gRPC header cannot carry")]
    NotAscii,
}

/// The `authorization` header value for `token`.
fn bearer_value(token: &str) -> Result<AsciiMetadataValue, TokenError> {
    let mut value: AsciiMetadataValue =
        MetadataValue::try_from(format!("Bearer {}", token.trim())).map_err(|_| TokenError::NotAscii)?;
    // Kept out of HPACK's tables and of Debug output.
    value.set_sensitive(true);
    Ok(value)
}

fn read_token_file(path: &Path) -> Result<AsciiMetadataValue, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read { path: path.into(), source })?;
    bearer_value(&text)
}

impl BearerToken {
    pub fn new(token: &str) -> Result<Self, TokenError> {
        Ok(Self { value: Arc::new(Reloadable::new(Some(bearer_value(token)?))), file: None })
    }

    /// The token in `path` (surrounding whitespace dropped).
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        Ok(Self { value: Arc::new(Reloadable::new(Some(read_token_file(path)?))), file: Some(path.into()) })
    }

    /// Re-reads the token's file when it changes (checked every `every`)
    /// or on SIGHUP, until `stop`, so a rotated token needs no restart. A
    /// file that cannot be read keeps the token in use (and is logged).
    /// Nothing to do for a token not read from a file.
    pub fn watch(&self, every: Duration, stop: &CancellationToken) {
        if let Some(path) = &self.file {
            let file = path.clone();
            reload::watch(
                "token",
                vec![path.clone()],
                every,
                self.value.clone(),
                move || read_token_file(&file).map(Some),
                stop.clone(),
            );
        }
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = self.value.current().as_ref() {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    fn file(tokens: &[(&str, &str, &str)]) -> String {
        tokens
            .iter()
            .map(|(name, role, token)| {
                format!("[[principal]]\nname = {name:?}\nrole = {role:?}\ntoken_sha256 = {:?}\n", token_sha256(token))
            })
            .collect()
    }

    fn policy(path: &str) -> Access {
        match path {
            "/t.T/Read" => Access::Requires(Role::Read),
            p if is_public_path(p) => Access::Public,
            _ => Access::Requires(Role::Admin),
        }
    }

    async fn call(layer: &AuthLayer, path: &str, token: Option<&str>) -> (Option<tonic::Code>, Option<Principal>) {
        let seen = Arc::new(std::sync::Mutex::new(None));
        let inner = {
            let seen = seen.clone();
            tower::service_fn(move |r: http::Request<()>| {
                *seen.lock().expect("lock") = Some(r.extensions().get::<Principal>().cloned());
                async { Ok::<_, std::convert::Infallible>(http::Response::new(())) }
            })
        };
        let mut request = http::Request::builder().uri(path);
        if let Some(t) = token {
            request = request.header("authorization", format!("Bearer {t}"));
        }
        let response = layer.layer(inner).ready().await.expect("ready").call(request.body(()).expect("request")).await;
        let response = response.expect("infallible");
        let code = tonic::Status::from_header_map(response.headers()).map(|s| s.code());
        let reached = seen.lock().expect("lock").clone();
        assert_eq!(code.is_none(), reached.is_some(), "a refused call never reaches the service");
        (code, reached.flatten())
    }

    #[tokio::test]
    async fn roles_decide_and_refusals_never_reach_the_service() {
        let text = file(&[("ranker", "read", "r-token"), ("ops", "admin", "a-token")]);
        let layer = AuthLayer::new(Principals::parse(&text, Path::new("p.toml")).expect("parse"), policy);
        assert_eq!(call(&layer, "/t.T/Read", None).await.0, Some(tonic::Code::Unauthenticated));
        assert_eq!(call(&layer, "/t.T/Read", Some("wrong")).await.0, Some(tonic::Code::Unauthenticated));
        let (code, who) = call(&layer, "/t.T/Read", Some("r-token")).await;
        assert_eq!((code, who.map(|p| p.name.to_string())), (None, Some("ranker".into())));
        assert_eq!(call(&layer, "/t.T/Invalidate", Some("r-token")).await.0, Some(tonic::Code::PermissionDenied));
        assert_eq!(call(&layer, "/t.T/Invalidate", Some("a-token")).await.0, None);
        assert_eq!(call(&layer, "/t.T/Unknown", Some("r-token")).await.0, Some(tonic::Code::PermissionDenied));
        let (code, who) = call(&layer, "/grpc.health.v1.Health/Check", None).await;
        assert_eq!((code, who), (None, None), "health stays public");
    }

    #[test]
    fn a_bad_file_names_the_entry_and_field() {
        let p = Path::new("p.toml");
        let err = |text: &str| Principals::parse(text, p).expect_err("refused").to_string();
        assert!(err("").contains("no principal"));
        let e = err("[[principal]]\nname = \"a\"\nrole = \"read\"\ntoken_sha256 = \"abc\"\n");
        assert!(e.contains("principal 0") && e.contains("token_sha256"), "{e}");
        let e = err("[[principal]]\nname = \"a\"\nrole = \"root\"\ntoken_sha256 = \"abc\"\n");
        assert!(e.contains("role") || e.contains("root"), "{e}");
        let twice = file(&[("a", "read", "x"), ("a", "admin", "y")]);
        assert!(err(&twice).contains("principal 1"), "{}", err(&twice));
        let e = err("[[principal]]\nname = \"a\"\nrole = \"read\"\n");
        assert!(e.contains("exactly one"), "{e}");
        let e = err("[[principal]]\nname = \"a\"\nrole = \"read\"\ntoken = \"plain\"\n");
        assert!(e.contains("token"), "an unknown field is refused: {e}");
    }

    #[test]
    fn a_client_certificate_maps_to_the_principal_of_its_name() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["kfc".into()]).expect("params").self_signed(&key).expect("cert");
        let text = "[[principal]]\nname = \"fill\"\nrole = \"read\"\nclient_cert = \"kfc\"\n\
                    [[principal]]\nname = \"other\"\nrole = \"admin\"\nclient_cert = \"ranker\"\n";
        let principals = Principals::parse(text, Path::new("p.toml")).expect("parse");
        let who = principals.by_certificate(cert.der()).expect("matched");
        assert_eq!((&*who.name, who.role), ("fill", Role::Read));
        assert!(principals.by_token(b"kfc").is_none());
    }

    #[test]
    fn the_token_stays_out_of_debug_output() {
        let token = BearerToken::new("s3cret").expect("token");
        assert!(!format!("{token:?}").contains("s3cret"));
        let principals = Principals::parse(&file(&[("a", "read", "s3cret")]), Path::new("p")).expect("parse");
        assert!(!format!("{principals:?}").contains(&token_sha256("s3cret")));
    }

    fn authorization(token: &mut BearerToken) -> Option<String> {
        use tonic::service::Interceptor;
        let request = token.call(tonic::Request::new(())).expect("intercepted");
        request.metadata().get("authorization").map(|v| v.to_str().expect("ascii").to_owned())
    }

    #[tokio::test]
    async fn a_watched_token_file_is_sent_anew_after_it_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kfc.token");
        std::fs::write(&path, "first\n").expect("write");
        let mut token = BearerToken::from_file(&path).expect("token");
        let stop = CancellationToken::new();
        token.watch(Duration::from_millis(100), &stop);
        // A clone made before the change (a client already built) follows it.
        let mut sent_by_a_clone = token.clone();
        assert_eq!(authorization(&mut token).as_deref(), Some("Bearer first"));
        std::fs::write(&path, "second").expect("write");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while authorization(&mut sent_by_a_clone).as_deref() != Some("Bearer second") {
            assert!(std::time::Instant::now() < deadline, "the new token was not picked up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A file that breaks keeps the token in use.
        std::fs::remove_file(&path).expect("remove");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(authorization(&mut token).as_deref(), Some("Bearer second"));
        stop.cancel();
    }

    #[test]
    fn no_token_adds_no_header() {
        assert_eq!(authorization(&mut BearerToken::default()), None);
    }
}
