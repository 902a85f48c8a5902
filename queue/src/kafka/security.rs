//! How every Kafka client of EmbArk authenticates and encrypts: the
//! `--kafka-security-protocol`, `--kafka-sasl-*` and `--kafka-ssl-ca` flags
//! (shared by `embark` and `kfc`), mapped to librdkafka's properties and
//! checked at start, before any client is made.

use std::path::PathBuf;

/// librdkafka's `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SecurityProtocol {
    /// No TLS, no SASL (the default).
    #[value(name = "plaintext")]
    Plaintext,
    /// TLS, no SASL.
    #[value(name = "ssl")]
    Ssl,
    /// SASL without TLS: with PLAIN the password crosses the network in
    /// the clear.
    #[value(name = "sasl_plaintext")]
    SaslPlaintext,
    /// SASL over TLS.
    #[value(name = "sasl_ssl")]
    SaslSsl,
}

impl SecurityProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    fn sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }

    fn tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }
}

/// librdkafka's `sasl.mechanisms`, of those EmbArk supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SaslMechanism {
    #[value(name = "PLAIN")]
    Plain,
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// The Kafka security flags. `Debug` never shows the password.
#[derive(Clone, Default, clap::Args)]
pub struct KafkaSecurityArgs {
    /// How clients reach the brokers: plaintext, ssl, sasl_plaintext or
    /// sasl_ssl (librdkafka's security.protocol; default plaintext).
    #[arg(long, env = "EMBARK_KAFKA_SECURITY_PROTOCOL", value_enum, ignore_case = true)]
    pub kafka_security_protocol: Option<SecurityProtocol>,
    /// SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (needs a sasl_*
    /// protocol).
    #[arg(long, env = "EMBARK_KAFKA_SASL_MECHANISM", value_enum, ignore_case = true)]
    pub kafka_sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name.
    #[arg(long, env = "EMBARK_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,
    /// SASL password. Prefer --kafka-sasl-password-file: a flag shows in `ps`.
    #[arg(
        long,
        env = "EMBARK_KAFKA_SASL_PASSWORD",
        hide_env_values = true,
        conflicts_with = "kafka_sasl_password_file"
    )]
    pub kafka_sasl_password: Option<String>,
    /// A file holding the SASL password (one trailing newline is ignored).
    #[arg(long, env = "EMBARK_KAFKA_SASL_PASSWORD_FILE")]
    pub kafka_sasl_password_file: Option<PathBuf>,
    /// PEM file of the CA(s) the brokers' certificates must chain to (needs
    /// ssl or sasl_ssl); without it, the system's trust store.
    #[arg(long, env = "EMBARK_KAFKA_SSL_CA")]
    pub kafka_ssl_ca: Option<PathBuf>,
}

impl std::fmt::Debug for KafkaSecurityArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSecurityArgs")
            .field("kafka_security_protocol", &self.kafka_security_protocol)
            .field("kafka_sasl_mechanism", &self.kafka_sasl_mechanism)
            .field("kafka_sasl_username", &self.kafka_sasl_username)
            .field("kafka_sasl_password", &self.kafka_sasl_password.as_ref().map(|_| "<redacted>"))
            .field("kafka_sasl_password_file", &self.kafka_sasl_password_file)
            .field("kafka_ssl_ca", &self.kafka_ssl_ca)
            .finish()
    }
}

/// Kafka security settings that cannot be used as given.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSecurityError {
    #[error("{0} needs --kafka-security-protocol sasl_plaintext or sasl_ssl")]
    SaslFlagWithoutSasl(&'static str),
    #[error("--kafka-ssl-ca needs --kafka-security-protocol ssl or sasl_ssl")]
    CaWithoutTls,
    #[error("--kafka-security-protocol {0} needs --kafka-sasl-mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")]
    NoMechanism(&'static str),
    #[error("--kafka-security-protocol {0} needs --kafka-sasl-username")]
    NoUsername(&'static str),
    #[error("--kafka-security-protocol {0} needs --kafka-sasl-password-file (or --kafka-sasl-password)")]
    NoPassword(&'static str),
    #[error("reading --kafka-sasl-password-file {path}: {source}")]
    PasswordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A flag and a `--kafka-property` both set one property.
    #[error("--kafka-property {key}=... and {flag} both set {key}: give it once")]
    SetTwice { key: String, flag: &'static str },
    #[error(transparent)]
    BadProperty(#[from] super::BadProperty),
    /// This build's librdkafka lacks what the settings need.
    #[error("{what} needs librdkafka built with {feature}, which this build's is not (it has: {builtin})")]
    Unsupported { what: String, feature: &'static str, builtin: String },
    #[error("reading librdkafka's builtin.features: {0}")]
    Librdkafka(#[from] rdkafka::error::KafkaError),
}

/// The properties a flag sets, with the flag named in errors.
const FLAGS: [(&str, &str); 5] = [
    ("security.protocol", "--kafka-security-protocol"),
    ("sasl.mechanisms", "--kafka-sasl-mechanism"),
    ("sasl.username", "--kafka-sasl-username"),
    ("sasl.password", "--kafka-sasl-password"),
    ("ssl.ca.location", "--kafka-ssl-ca"),
];

impl KafkaSecurityArgs {
    /// The librdkafka properties of these flags, after checking that they
    /// fit together (no SASL flag without a SASL protocol, no CA without
    /// TLS, a SASL protocol with its mechanism, user and password).
    pub fn properties(&self) -> Result<Vec<(String, String)>, KafkaSecurityError> {
        let password_given = self.kafka_sasl_password.is_some() || self.kafka_sasl_password_file.is_some();
        let protocol = self.kafka_security_protocol.unwrap_or(SecurityProtocol::Plaintext);
        if !protocol.sasl() {
            let given = [
                ("--kafka-sasl-mechanism", self.kafka_sasl_mechanism.is_some()),
                ("--kafka-sasl-username", self.kafka_sasl_username.is_some()),
                ("--kafka-sasl-password(-file)", password_given),
            ];
            if let Some((flag, _)) = given.into_iter().find(|(_, set)| *set) {
                return Err(KafkaSecurityError::SaslFlagWithoutSasl(flag));
            }
        }
        if !protocol.tls() && self.kafka_ssl_ca.is_some() {
            return Err(KafkaSecurityError::CaWithoutTls);
        }
        let mut props = Vec::new();
        if let Some(p) = self.kafka_security_protocol {
            props.push(("security.protocol".to_owned(), p.as_str().to_owned()));
        }
        if protocol.sasl() {
            let name = protocol.as_str();
            let mechanism = self.kafka_sasl_mechanism.ok_or(KafkaSecurityError::NoMechanism(name))?;
            let user = self.kafka_sasl_username.clone().ok_or(KafkaSecurityError::NoUsername(name))?;
            let password = match (&self.kafka_sasl_password, &self.kafka_sasl_password_file) {
                (Some(p), _) => p.clone(),
                (None, Some(path)) => read_password(path)
                    .map_err(|source| KafkaSecurityError::PasswordFile { path: path.clone(), source })?,
                (None, None) => return Err(KafkaSecurityError::NoPassword(name)),
            };
            if protocol == SecurityProtocol::SaslPlaintext && mechanism == SaslMechanism::Plain {
                tracing::warn!("SASL PLAIN without TLS: the Kafka password crosses the network in the clear");
            }
            props.push(("sasl.mechanisms".to_owned(), mechanism.as_str().to_owned()));
            props.push(("sasl.username".to_owned(), user));
            props.push(("sasl.password".to_owned(), password));
        }
        if let Some(ca) = &self.kafka_ssl_ca {
            props.push(("ssl.ca.location".to_owned(), ca.display().to_string()));
        }
        Ok(props)
    }
}

fn read_password(path: &std::path::Path) -> std::io::Result<String> {
    let mut s = std::fs::read_to_string(path)?;
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    if s.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty"));
    }
    Ok(s)
}

/// Every Kafka client's extra properties: those of the security flags,
/// then the `--kafka-property` list (`key=value`); a property set by both
/// is refused. Checks that this build's librdkafka supports the resulting
/// security protocol and SASL mechanism, so a deployment that cannot work
/// fails at start with the reason.
pub fn client_properties(
    security: &KafkaSecurityArgs,
    extra: &[String],
) -> Result<Vec<(String, String)>, KafkaSecurityError> {
    let mut props = security.properties()?;
    let extra = super::parse_properties(extra)?;
    for (key, _) in &extra {
        if props.iter().any(|(k, _)| k == key)
            && let Some((_, flag)) = FLAGS.iter().find(|(k, _)| k == key)
        {
            return Err(KafkaSecurityError::SetTwice { key: key.clone(), flag });
        }
    }
    props.extend(extra);
    check_supported(&props)?;
    Ok(props)
}

/// Refuses settings this librdkafka cannot honour: TLS without OpenSSL,
/// SCRAM without OpenSSL, GSSAPI without Cyrus SASL, as listed by its
/// `builtin.features`.
fn check_supported(props: &[(String, String)]) -> Result<(), KafkaSecurityError> {
    let get = |key: &str| props.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.to_ascii_lowercase());
    let protocol = get("security.protocol").unwrap_or_default();
    let mut needs = Vec::new();
    if protocol == "ssl" || protocol == "sasl_ssl" {
        needs.push((format!("security.protocol {protocol}"), "ssl"));
    }
    if protocol.starts_with("sasl") {
        for mechanism in get("sasl.mechanisms").unwrap_or_else(|| "gssapi".into()).split(',') {
            let feature = match mechanism.trim() {
                "plain" => "sasl_plain",
                m if m.starts_with("scram-") => "sasl_scram",
                "gssapi" => "sasl_gssapi",
                "oauthbearer" => "sasl_oauthbearer",
                _ => continue,
            };
            needs.push((format!("sasl.mechanisms {}", mechanism.trim().to_ascii_uppercase()), feature));
        }
    }
    if needs.is_empty() {
        return Ok(());
    }
    let builtin = builtin_features()?;
    for (what, feature) in needs {
        if !builtin.split(',').any(|f| f == feature) {
            return Err(KafkaSecurityError::Unsupported { what, feature, builtin });
        }
    }
    Ok(())
}

/// librdkafka's `builtin.features` (e.g. `ssl,sasl,sasl_plain,sasl_scram,...`).
pub fn builtin_features() -> Result<String, rdkafka::error::KafkaError> {
    rdkafka::ClientConfig::new().create_native_config()?.get("builtin.features")
}

/// Shows librdkafka properties with the values of secret ones (passwords,
/// keys, JAAS configurations) replaced by `<redacted>`.
pub(crate) struct Redacted<'a>(pub(crate) &'a [(String, String)]);

impl std::fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, v)| {
                let secret = ["password", "secret", "jaas", "key.pem", "token"].iter().any(|s| k.contains(s));
                (k.as_str(), if secret { "<redacted>" } else { v.as_str() })
            }))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        security: KafkaSecurityArgs,
        #[arg(long)]
        kafka_property: Vec<String>,
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
    }

    fn props(args: &[&str]) -> Result<Vec<(String, String)>, KafkaSecurityError> {
        let cli = parse(args).expect("flags parse");
        client_properties(&cli.security, &cli.kafka_property)
    }

    fn get<'a>(props: &'a [(String, String)], key: &str) -> Option<&'a str> {
        props.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Without the `kafka-tls` feature, TLS and SCRAM are refused at start,
    /// naming what is missing, rather than failing at the first connection.
    #[cfg(not(feature = "kafka-tls"))]
    #[test]
    fn tls_and_scram_are_refused_at_start_without_openssl() {
        let err = props(&["--kafka-security-protocol", "ssl"]).expect_err("no OpenSSL");
        assert!(matches!(err, KafkaSecurityError::Unsupported { feature: "ssl", .. }), "{err}");
        let scram = [
            "--kafka-security-protocol",
            "sasl_plaintext",
            "--kafka-sasl-mechanism",
            "SCRAM-SHA-512",
            "--kafka-sasl-username",
            "u",
            "--kafka-sasl-password",
            "p",
        ];
        let err = props(&scram).expect_err("no OpenSSL");
        assert!(matches!(err, KafkaSecurityError::Unsupported { feature: "sasl_scram", .. }), "{err}");
        let plain = ["--kafka-security-protocol", "sasl_plaintext", "--kafka-sasl-mechanism", "PLAIN"];
        let plain: Vec<&str> =
            plain.iter().copied().chain(["--kafka-sasl-username", "u", "--kafka-sasl-password", "p"]).collect();
        assert!(props(&plain).is_ok(), "PLAIN needs no OpenSSL");
    }

    #[cfg(feature = "kafka-tls")]
    #[test]
    fn this_librdkafka_has_tls_and_every_sasl_mechanism_we_offer() {
        let builtin = builtin_features().expect("builtin.features");
        for feature in ["ssl", "sasl_plain", "sasl_scram"] {
            assert!(builtin.split(',').any(|f| f == feature), "{feature} missing from {builtin}");
        }
    }

    #[cfg(feature = "kafka-tls")]
    #[test]
    fn sasl_ssl_with_scram_maps_to_librdkafka_properties() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").expect("write");
        let p = props(&[
            "--kafka-security-protocol",
            "SASL_SSL",
            "--kafka-sasl-mechanism",
            "scram-sha-512",
            "--kafka-sasl-username",
            "kfc",
            "--kafka-sasl-password-file",
            file.to_str().expect("utf-8"),
            "--kafka-ssl-ca",
            "/etc/kafka/ca.pem",
        ])
        .expect("settings");
        assert_eq!(get(&p, "security.protocol"), Some("sasl_ssl"));
        assert_eq!(get(&p, "sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(get(&p, "sasl.username"), Some("kfc"));
        assert_eq!(get(&p, "sasl.password"), Some("s3cret"));
        assert_eq!(get(&p, "ssl.ca.location"), Some("/etc/kafka/ca.pem"));
        assert!(!format!("{:?}", Redacted(&p)).contains("s3cret"), "{:?}", Redacted(&p));

        let cli = parse(&["--kafka-security-protocol", "sasl_plaintext", "--kafka-sasl-password", "on-the-line"])
            .expect("flags");
        assert!(!format!("{cli:?}").contains("on-the-line"), "{cli:?}");
        assert!(props(&[]).expect("nothing set").is_empty());
        let p = props(&["--kafka-security-protocol", "ssl"]).expect("TLS alone");
        assert_eq!(p, vec![("security.protocol".to_owned(), "ssl".to_owned())]);
    }

    #[test]
    fn combinations_that_cannot_work_are_refused_with_the_flag_named() {
        let refused = |args: &[&str], want: &str| {
            let e = props(args).expect_err("refused");
            assert!(e.to_string().contains(want), "{args:?}: {e}");
        };
        refused(&["--kafka-sasl-username", "u"], "--kafka-sasl-username needs --kafka-security-protocol sasl_");
        refused(&["--kafka-security-protocol", "ssl", "--kafka-sasl-mechanism", "PLAIN"], "--kafka-sasl-mechanism");
        refused(&["--kafka-ssl-ca", "/ca.pem"], "--kafka-ssl-ca needs");
        refused(&["--kafka-security-protocol", "sasl_plaintext", "--kafka-ssl-ca", "/ca.pem"], "--kafka-ssl-ca");
        refused(&["--kafka-security-protocol", "sasl_ssl"], "needs --kafka-sasl-mechanism");
        refused(&["--kafka-security-protocol", "sasl_ssl", "--kafka-sasl-mechanism", "PLAIN"], "--kafka-sasl-username");
        refused(
            &["--kafka-security-protocol", "sasl_ssl", "--kafka-sasl-mechanism", "PLAIN", "--kafka-sasl-username", "u"],
            "--kafka-sasl-password-file",
        );
        refused(
            &["--kafka-security-protocol", "ssl", "--kafka-property", "security.protocol=plaintext"],
            "both set security.protocol",
        );
        // librdkafka's default mechanism, GSSAPI, is not built in.
        refused(&["--kafka-property", "security.protocol=sasl_plaintext"], "sasl_gssapi");
        let e = parse(&["--kafka-sasl-mechanism", "GSSAPI"]).expect_err("not offered");
        assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue, "{e}");
        let e = parse(&["--kafka-sasl-password", "a", "--kafka-sasl-password-file", "/f"]).expect_err("one or other");
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict, "{e}");
        // Properties the flags do not set still pass through.
        let p = props(&["--kafka-security-protocol", "plaintext", "--kafka-property", "socket.keepalive.enable=true"])
            .expect("settings");
        assert_eq!(get(&p, "socket.keepalive.enable"), Some("true"));
    }

    #[cfg(feature = "kafka-tls")]
    #[test]
    fn librdkafka_takes_the_properties_and_loads_the_ca_when_the_client_is_made() {
        use rdkafka::producer::BaseProducer;
        let dir = tempfile::tempdir().expect("tempdir");
        let args = |ca: &std::path::Path| {
            let ca = ca.to_str().expect("utf-8").to_owned();
            let flags = [
                "--kafka-security-protocol",
                "sasl_ssl",
                "--kafka-sasl-mechanism",
                "SCRAM-SHA-256",
                "--kafka-sasl-username",
                "u",
                "--kafka-sasl-password",
                "p",
                "--kafka-ssl-ca",
            ];
            let mut all: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
            all.push(ca);
            all
        };
        let client = |ca: &std::path::Path| {
            let all = args(ca);
            let p = props(&all.iter().map(String::as_str).collect::<Vec<_>>()).expect("settings");
            super::super::client_config("127.0.0.1:1", &p, &[]).create::<BaseProducer>().map(|_| ())
        };
        let missing = client(&dir.path().join("missing.pem")).expect_err("no CA file");
        assert!(missing.to_string().contains("ssl.ca.location"), "{missing}");
        // A real CA (any PEM certificate) is accepted.
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["embark test CA".to_owned()]).expect("certificate");
        std::fs::write(&ca, cert.cert.pem()).expect("write");
        client(&ca).expect("librdkafka accepts sasl_ssl with SCRAM and the CA");
    }
}
