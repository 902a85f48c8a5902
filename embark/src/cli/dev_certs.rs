//! `embark dev-certs`: a development CA, server and client certificates,
//! and bearer tokens with their principals file, so TLS and roles can be
//! turned on in a compose stack or a test without OpenSSL recipes.
//!
//! Run again on the same directory, it keeps what is there (the CA, each
//! certificate, each token) and adds only what is missing, then rewrites
//! `tokens.toml` from the tokens present; `--force` starts over. Not for
//! production: the CA key sits beside the certificates it signs.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use clap::Args;
use embark_ops::auth::Role;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, Args)]
pub(crate) struct DevCertsArgs {
    /// Directory to write into (created if needed).
    #[arg(long)]
    out: PathBuf,
    /// A server certificate NAME.pem/NAME.key, valid for NAME, localhost,
    /// 127.0.0.1 and ::1. Repeat for several.
    #[arg(long = "server")]
    servers: Vec<String>,
    /// A client certificate NAME.pem/NAME.key (for mTLS), listed in
    /// tokens.toml as a principal of ROLE (`NAME` or `NAME=ROLE`; read by
    /// default). Repeat for several.
    #[arg(long = "client")]
    clients: Vec<String>,
    /// A random bearer token in NAME.token, listed in tokens.toml as a
    /// principal of ROLE (`NAME=ROLE`). Repeat for several.
    #[arg(long = "token")]
    tokens: Vec<String>,
    /// Replace everything in --out, the CA included.
    #[arg(long)]
    force: bool,
}

const CA_NAME: &str = "EmbArk development CA";

/// `NAME` or `NAME=ROLE`.
fn name_role(s: &str, default: Option<Role>) -> anyhow::Result<(String, Role)> {
    let (name, role) = match (s.split_once('='), default) {
        (Some((n, r)), _) => (n, parse_role(r)?),
        (None, Some(role)) => (s, role),
        (None, None) => bail!("{s:?}: expected NAME=ROLE (read or admin)"),
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        bail!("{name:?}: a name is letters, digits, '-', '_' and '.'");
    }
    Ok((name.to_owned(), role))
}

fn parse_role(s: &str) -> anyhow::Result<Role> {
    match s {
        "read" => Ok(Role::Read),
        "admin" => Ok(Role::Admin),
        _ => bail!("role {s:?}: expected read or admin"),
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Read => "read",
        Role::Admin => "admin",
    }
}

/// Writes `bytes` to `path`, readable by the owner only when `secret`.
fn write(path: &Path, bytes: &[u8], secret: bool) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, if secret { 0o600 } else { 0o644 });
    let mut file = options.open(path).with_context(|| format!("writing {}", path.display()))?;
    file.write_all(bytes).with_context(|| format!("writing {}", path.display()))
}

/// Validity from the start of this year to the start of the year `years`
/// on: dates, not seconds, are enough for development certificates.
fn validity(params: &mut CertificateParams, years: i32) {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let year = 1970 + (secs / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, 10);
    Ok(params)
}

/// The CA in `dir`, made if missing. Issued certificates name it by its
/// subject and key, both rebuilt from `ca.key`, so an existing CA signs
/// new certificates without its certificate being parsed.
fn ca(dir: &Path, made: &mut Vec<PathBuf>) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert_path.is_file() && key_path.is_file() {
        let pem = std::fs::read_to_string(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
        let key = KeyPair::from_pem(&pem).with_context(|| format!("{} is not a private key", key_path.display()))?;
        return Ok(Issuer::new(ca_params()?, key));
    }
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    write(&key_path, key.serialize_pem().as_bytes(), true)?;
    write(&cert_path, cert.pem().as_bytes(), false)?;
    made.push(cert_path);
    Ok(Issuer::new(ca_params()?, key))
}

fn leaf(
    dir: &Path,
    name: &str,
    names: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    ca: &Issuer<'_, KeyPair>,
    made: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    if cert_path.is_file() && key_path.is_file() {
        return Ok(());
    }
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    validity(&mut params, 2);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    write(&key_path, key.serialize_pem().as_bytes(), true)?;
    write(&cert_path, cert.pem().as_bytes(), false)?;
    made.push(cert_path);
    Ok(())
}

pub(crate) fn run(args: DevCertsArgs) -> anyhow::Result<()> {
    let dir = &args.out;
    let clients = args.clients.iter().map(|c| name_role(c, Some(Role::Read))).collect::<anyhow::Result<Vec<_>>>()?;
    let tokens = args.tokens.iter().map(|t| name_role(t, None)).collect::<anyhow::Result<Vec<_>>>()?;
    let servers = args
        .servers
        .iter()
        .map(|s| name_role(s, Some(Role::Read)).map(|(n, _)| n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.force && dir.exists() {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let ours = path.extension().is_some_and(|e| e == "pem" || e == "key" || e == "token")
                || path.file_name().is_some_and(|n| n == "tokens.toml");
            if ours {
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut made = Vec::new();
    let ca = ca(dir, &mut made)?;
    for name in &servers {
        let names = vec![name.clone(), "localhost".into(), "127.0.0.1".into(), "::1".into()];
        leaf(dir, name, names, ExtendedKeyUsagePurpose::ServerAuth, &ca, &mut made)?;
    }
    for (name, _) in &clients {
        leaf(dir, name, vec![name.clone()], ExtendedKeyUsagePurpose::ClientAuth, &ca, &mut made)?;
    }
    let mut toml = String::from("# Written by `embark dev-certs`: the principals of --auth-tokens.\n");
    for (name, role) in &tokens {
        let path = dir.join(format!("{name}.token"));
        let token = match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
            _ => {
                let bytes: [u8; 32] = rand::random();
                let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                write(&path, token.as_bytes(), true)?;
                made.push(path);
                token
            }
        };
        let digest = embark_ops::auth::token_sha256(&token);
        toml.push_str(&format!(
            "\n[[principal]]\nname = {name:?}\nrole = \"{}\"\ntoken_sha256 = \"{digest}\"\n",
            role_name(*role)
        ));
    }
    for (name, role) in &clients {
        toml.push_str(&format!(
            "\n[[principal]]\nname = {name:?}\nrole = \"{}\"\nclient_cert = {name:?}\n",
            role_name(*role)
        ));
    }
    if !tokens.is_empty() || !clients.is_empty() {
        write(&dir.join("tokens.toml"), toml.as_bytes(), false)?;
    }
    if made.is_empty() {
        println!("{}: everything asked for is in place", dir.display());
    }
    for path in made {
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_run_keeps_the_ca_and_adds_what_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = |servers: &[&str], tokens: &[&str]| DevCertsArgs {
            out: dir.path().into(),
            servers: servers.iter().map(|s| s.to_string()).collect(),
            clients: vec!["kfc".into()],
            tokens: tokens.iter().map(|s| s.to_string()).collect(),
            force: false,
        };
        run(args(&["embark"], &["ranker=read"])).expect("first run");
        let ca = std::fs::read(dir.path().join("ca.pem")).expect("ca");
        let token = std::fs::read(dir.path().join("ranker.token")).expect("token");
        run(args(&["embark", "retina"], &["ranker=read", "ops=admin"])).expect("second run");
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).expect("ca"), ca, "the CA is kept");
        assert_eq!(std::fs::read(dir.path().join("ranker.token")).expect("token"), token, "tokens are kept");
        // The new server certificate chains to the kept CA.
        let tls = embark_ops::tls::TlsFiles {
            cert: dir.path().join("retina.pem"),
            key: dir.path().join("retina.key"),
            client_ca: Some(dir.path().join("ca.pem")),
        };
        tls.load().expect("a usable server configuration");
        let principals = embark_ops::auth::Principals::from_file(&dir.path().join("tokens.toml")).expect("principals");
        let ops = std::fs::read_to_string(dir.path().join("ops.token")).expect("token");
        assert_eq!(principals.by_token(ops.as_bytes()).map(|p| p.role), Some(Role::Admin));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("ca.key")).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "keys are the owner's alone");
        }
        assert!(name_role("x", None).is_err() && name_role("a/b=read", None).is_err());
    }
}
