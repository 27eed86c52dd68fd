//! The command line's database connections: URL parsing (passwords never shown), TLS with
//! rustls and libpq's `sslmode` values, and time bounds on every connection (`--db-timeout`,
//! TCP keepalives), so a database that stops answering is reported instead of waited on forever.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::time::Instant;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{usage, Failure};
use crate::{ErrorChain, Relay};

/// TCP keepalive defaults (unless the URL sets `keepalives_*`): a peer that vanished without
/// closing (network partition, host down) is noticed after about 15 s + 3 x 5 s of silence.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

/// libpq's `sslmode` values (`allow` is taken as `prefer`: it connects in the same cases).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl TlsMode {
    fn parse(s: &str) -> Option<TlsMode> {
        Some(match s {
            "disable" => TlsMode::Disable,
            "allow" | "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }
}

/// Where trusted CA certificates come from.
enum Roots {
    /// `--pg-ca-file` or `sslrootcert=<file>`: only these certificates.
    File { path: PathBuf, flag: &'static str },
    /// `sslrootcert=system`: the operating system's roots.
    System,
}

/// A database to connect to: its parsed URL (keepalives and connect timeout set), the TLS
/// connector its `sslmode` asks for, and the time bound for connecting and for admin commands.
pub struct Db {
    pub config: tokio_postgres::Config,
    /// The libpq `sslmode` of the URL (default `prefer`).
    pub mode: TlsMode,
    tls: Option<MakeRustlsConnect>,
    timeout: Duration,
}

impl Db {
    /// Parses the URL and sets up TLS as libpq would for its `sslmode`:
    /// `disable` plain; `prefer` (the default) TLS when the server offers it, else plain;
    /// `require` TLS; both without verifying the certificate, except that `require` with a CA
    /// file verifies the chain (as libpq does when it finds a root certificate);
    /// `verify-ca` TLS with the chain verified against the CA file, not the host name;
    /// `verify-full` chain and host name, against the CA file or else the system roots.
    /// `timeout` bounds connecting, pooled connections and each admin command.
    pub fn new(
        url: Option<&str>,
        ca_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<Db, Failure> {
        let url =
            url.ok_or_else(|| usage("no database: set DATABASE_URL or pass --database-url"))?;
        if timeout.is_zero() {
            return Err(usage("--db-timeout must be greater than 0"));
        }
        let invalid = |e: &dyn std::fmt::Display| {
            // Never the URL itself, not even redacted: a password may hold a comma, a quote or
            // a space that defeats redaction of a string that does not parse.
            usage(format!(
                "invalid database URL (--database-url / DATABASE_URL): {e}"
            ))
        };
        let (rest, params) = split_conninfo(url).map_err(|e| invalid(&e))?;
        let mut config = rest
            .parse::<tokio_postgres::Config>()
            .map_err(|e| invalid(&e))?;
        let mode = match params.get("sslmode") {
            None => TlsMode::Prefer,
            Some(m) => TlsMode::parse(m).ok_or_else(|| {
                invalid(&format!(
                    "sslmode {m:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ))
            })?,
        };
        let roots = match (ca_file, params.get("sslrootcert")) {
            (Some(_), Some(_)) => {
                return Err(usage(
                    "give the CA either as --pg-ca-file or as sslrootcert in the URL, not both",
                ))
            }
            (Some(path), None) => Some(Roots::File {
                path: path.to_owned(),
                flag: "--pg-ca-file",
            }),
            (None, Some("system")) => Some(Roots::System),
            (None, Some(path)) => Some(Roots::File {
                path: PathBuf::from(path),
                flag: "sslrootcert",
            }),
            (None, None) => None,
        };
        let tls = tls_connector(mode, roots.as_ref())?;
        config.ssl_mode(match mode {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
        });
        // What the URL sets wins; otherwise bound the TCP connect and notice dead peers.
        if !params.has("connect_timeout") {
            config.connect_timeout(timeout);
        }
        if !params.has("keepalives") {
            config.keepalives(true);
        }
        if !params.has("keepalives_idle") {
            config.keepalives_idle(KEEPALIVE_IDLE);
        }
        if !params.has("keepalives_interval") {
            config.keepalives_interval(KEEPALIVE_INTERVAL);
        }
        if !params.has("keepalives_retries") {
            config.keepalives_retries(KEEPALIVE_RETRIES);
        }
        Ok(Db {
            config,
            mode,
            tls,
            timeout,
        })
    }

    /// Runs one admin command: connects, sets `statement_timeout`, and runs `work`, all within
    /// `--db-timeout` (the client gives up even when a frozen server would never time out).
    pub async fn admin<T>(
        &self,
        work: impl AsyncFnOnce(&mut tokio_postgres::Client) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let deadline = Instant::now() + self.timeout;
        let mut client = tokio::time::timeout_at(deadline, self.connect())
            .await
            .map_err(|_| self.no_answer())??;
        // The server cancels a statement that outlives the command, so a migration cut short
        // by the client is also rolled back by the server.
        // The setting's maximum is i32::MAX ms (about 24 days).
        let ms = self.timeout.as_millis().min(i32::MAX as u128);
        let set = format!("SET statement_timeout = {ms}");
        tokio::time::timeout_at(deadline, client.batch_execute(&set))
            .await
            .map_err(|_| self.no_answer())??;
        tokio::time::timeout_at(deadline, work(&mut client))
            .await
            .map_err(|_| Failure {
                code: 1,
                message: format!(
                    "the database work did not finish within {} (--db-timeout)",
                    show(self.timeout)
                ),
            })?
    }

    /// One connection, driven on the runtime (not time-bounded beyond the TCP connect; callers
    /// bound it).
    async fn connect(&self) -> Result<tokio_postgres::Client, Failure> {
        let failed = |e: tokio_postgres::Error| self.cannot_connect(&e);
        let closed =
            |e: tokio_postgres::Error| tracing::warn!(error = %e, "database connection closed");
        match &self.tls {
            None => {
                let (client, conn) = self
                    .config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(failed)?;
                tokio::spawn(async move { conn.await.map_err(closed) });
                Ok(client)
            }
            Some(tls) => {
                let (client, conn) = self.config.connect(tls.clone()).await.map_err(failed)?;
                tokio::spawn(async move { conn.await.map_err(closed) });
                Ok(client)
            }
        }
    }

    /// A pool of `size` connections; creating a connection, waiting for a free one and
    /// recycling one are each bounded by `--db-timeout`.
    pub fn pool(&self, size: usize) -> Result<deadpool_postgres::Pool, Failure> {
        let cfg = || deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        };
        let manager = match &self.tls {
            None => deadpool_postgres::Manager::from_config(
                self.config.clone(),
                tokio_postgres::NoTls,
                cfg(),
            ),
            Some(tls) => {
                deadpool_postgres::Manager::from_config(self.config.clone(), tls.clone(), cfg())
            }
        };
        deadpool_postgres::Pool::builder(manager)
            .max_size(size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(self.timeout))
            .wait_timeout(Some(self.timeout))
            .recycle_timeout(Some(self.timeout))
            .build()
            .map_err(|e| usage(format!("cannot build the database pool: {e}")))
    }

    /// Waits for the pool's first connection, so that a relay which cannot reach the database
    /// says why (and names --db-timeout) before it starts.
    pub async fn first_connection(&self, pool: &deadpool_postgres::Pool) -> Result<(), Failure> {
        match pool.get().await {
            Ok(_) => Ok(()),
            Err(deadpool_postgres::PoolError::Timeout(_)) => Err(self.no_answer()),
            Err(deadpool_postgres::PoolError::Backend(e)) => Err(self.cannot_connect(&e)),
            Err(e) => Err(e.into()),
        }
    }

    fn no_answer(&self) -> Failure {
        Failure {
            code: 1,
            message: format!(
                "the database did not answer within {} (--db-timeout)",
                show(self.timeout)
            ),
        }
    }

    fn cannot_connect(&self, e: &tokio_postgres::Error) -> Failure {
        Failure {
            code: 1,
            message: format!(
                "cannot connect to the database (sslmode={}): {}",
                self.mode.name(),
                ErrorChain(e)
            ),
        }
    }

    /// Gives the relay its LISTEN connection, with the same TLS, keepalives and connect timeout.
    pub fn with_listener(&self, relay: Relay) -> Relay {
        match &self.tls {
            None => relay.with_listener(self.config.clone(), tokio_postgres::NoTls),
            Some(tls) => relay.with_listener(self.config.clone(), tls.clone()),
        }
    }
}

/// `2s`, `1500ms`: a duration as the flag takes it.
fn show(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The TLS parameters taken out of a URL or conninfo string, and which keys it set.
#[derive(Debug, Default)]
struct Params {
    taken: Vec<(String, String)>,
    keys: Vec<String>,
}

impl Params {
    fn get(&self, key: &str) -> Option<&str> {
        self.taken
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn has(&self, key: &str) -> bool {
        self.keys.iter().any(|k| k == key)
    }
}

/// Keys Tidings handles itself, removed before tokio-postgres parses the rest (its parser knows
/// only `disable`, `prefer` and `require`).
const TAKEN: [&str; 2] = ["sslmode", "sslrootcert"];
/// libpq keys for client certificates and revocation lists, which Tidings does not support.
const UNSUPPORTED: [&str; 5] = ["sslcert", "sslkey", "sslpassword", "sslcrl", "sslcrldir"];

/// Splits `sslmode` and `sslrootcert` out of a `postgres://` URL or a `key=value` conninfo
/// string; returns the rest, for tokio-postgres to parse.
fn split_conninfo(s: &str) -> Result<(String, Params), String> {
    let mut params = Params::default();
    let mut keep = |key: String, value: String| -> Result<bool, String> {
        if UNSUPPORTED.contains(&key.as_str()) {
            return Err(format!("{key} is not supported (no client certificates)"));
        }
        params.keys.push(key.clone());
        if TAKEN.contains(&key.as_str()) {
            params.taken.push((key, value));
            return Ok(false);
        }
        Ok(true)
    };
    let rest = if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        match s.split_once('?') {
            None => s.to_owned(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if keep(percent_decode(k)?, percent_decode(v)?)? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for (k, v) in conninfo_pairs(s)? {
            if keep(k.clone(), v.clone())? {
                let v = v.replace('\\', "\\\\").replace('\'', "\\'");
                kept.push(format!("{k}='{v}'"));
            }
        }
        kept.join(" ")
    };
    Ok((rest, params))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "bad percent-encoding in the query string".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the query string is not UTF-8 once decoded".to_owned())
}

/// `key=value` pairs of a libpq conninfo string (values bare or single-quoted, `\` escapes).
fn conninfo_pairs(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| c.is_alphanumeric() || *c == '_') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if key.is_empty() || chars.next() != Some('=') {
            // Never the rest of the string: it may hold a password.
            let after = pairs
                .last()
                .map_or("", |(k, _): &(String, String)| k.as_str());
            return Err(format!("expected key=value after {after:?}"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(format!("unterminated quoted value for {key}")),
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// The rustls connector for `mode` (none for `disable`).
fn tls_connector(
    mode: TlsMode,
    roots: Option<&Roots>,
) -> Result<Option<MakeRustlsConnect>, Failure> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let unverified =
        || -> Arc<dyn ServerCertVerifier> { Arc::new(NoVerification(provider.clone())) };
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
        (TlsMode::Disable | TlsMode::Prefer, Some(_)) => {
            return Err(usage(
                "--pg-ca-file (or sslrootcert) needs sslmode=require, verify-ca or verify-full in the database URL",
            ))
        }
        (TlsMode::Disable, None) => return Ok(None),
        (TlsMode::Prefer | TlsMode::Require, None) => unverified(),
        (TlsMode::Require | TlsMode::VerifyCa, Some(Roots::System)) => {
            return Err(usage(
                "sslrootcert=system needs sslmode=verify-full (any public certificate would pass otherwise)",
            ))
        }
        (TlsMode::VerifyCa, None) => {
            return Err(usage(
                "sslmode=verify-ca needs a CA certificate: pass --pg-ca-file (or sslrootcert in the URL)",
            ))
        }
        (TlsMode::Require | TlsMode::VerifyCa, Some(roots)) => {
            Arc::new(ChainOnly(webpki(load_roots(Some(roots))?, &provider)?))
        }
        (TlsMode::VerifyFull, roots) => webpki(load_roots(roots)?, &provider)?,
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| usage(format!("cannot set up TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(MakeRustlsConnect::new(config)))
}

fn webpki(
    roots: rustls::RootCertStore,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, Failure> {
    let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| usage(format!("cannot set up TLS certificate verification: {e}")))?;
    Ok(v)
}

/// The CA file's certificates, or the system roots (`sslrootcert=system`, or `verify-full`
/// without a CA file).
fn load_roots(roots: Option<&Roots>) -> Result<rustls::RootCertStore, Failure> {
    use rustls::pki_types::pem::PemObject;
    let mut store = rustls::RootCertStore::empty();
    match roots {
        None | Some(Roots::System) => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = store.add(cert);
            }
        }
        Some(Roots::File { path, flag }) => {
            let p = path.display();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| usage(format!("cannot read {flag} {p}: {e}")))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| usage(format!("bad certificate in {flag} {p}: {e}")))?;
                store
                    .add(cert)
                    .map_err(|e| usage(format!("unusable certificate in {flag} {p}: {e}")))?;
            }
            if store.is_empty() {
                return Err(usage(format!("{flag} {p} holds no PEM certificate")));
            }
        }
    }
    Ok(store)
}

/// `prefer` and `require` without a CA, as in libpq: encrypt, but accept any certificate. The
/// handshake signatures are still checked (the server holds the key of the certificate it
/// shows), so channel binding works; who the server is is not checked.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` (and `require` with a CA): the chain must lead to a trusted CA, but the host name
/// is not checked. WebPkiServerVerifier checks the chain (and expiry) before the name, so a
/// name error means everything else passed.
#[derive(Debug)]
struct ChainOnly(Arc<dyn ServerCertVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings_tests::TestDb;

    const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

    fn db(url: &str, ca: Option<&str>) -> Result<Db, String> {
        Db::new(Some(url), ca.map(Path::new), Duration::from_secs(10)).map_err(|f| f.message)
    }

    /// Whether the session `url` opens through the binary's code is encrypted (pg_stat_ssl).
    async fn uses_tls(url: &str, ca: Option<&str>) -> Result<bool, String> {
        db(url, ca)?
            .admin(async |c| {
                let row = c
                    .query_one(
                        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                        &[],
                    )
                    .await?;
                Ok(row.get::<_, bool>(0))
            })
            .await
            .map_err(|f| f.message)
    }

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_urls_and_conninfo() {
        let (rest, p) = split_conninfo(
            "postgres://u:p%3F@h:5/d?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p%3F@h:5/d?application_name=x");
        assert_eq!(p.get("sslmode"), Some("verify-full"));
        assert_eq!(p.get("sslrootcert"), Some("/tmp/ca.pem"));
        assert!(p.has("application_name") && !p.has("keepalives_idle"));

        let (rest, p) = split_conninfo("postgres://h/d?sslmode=require").unwrap();
        assert_eq!(
            (rest.as_str(), p.get("sslmode")),
            ("postgres://h/d", Some("require"))
        );

        let (rest, p) = split_conninfo(
            r"host=h  sslmode = verify-ca password='it\'s' sslrootcert='/a b/c.pem' dbname=d\ x keepalives_idle=7",
        )
        .unwrap();
        assert_eq!(p.get("sslmode"), Some("verify-ca"));
        assert_eq!(p.get("sslrootcert"), Some("/a b/c.pem"));
        assert!(p.has("keepalives_idle"));
        let config = rest.parse::<tokio_postgres::Config>().unwrap();
        assert_eq!(config.get_dbname(), Some("d x"));
        assert_eq!(config.get_password(), Some(&b"it's"[..]));

        assert!(split_conninfo("postgres://h/d?sslcert=/c.pem")
            .unwrap_err()
            .contains("sslcert is not supported"));
        assert!(split_conninfo("host='h")
            .unwrap_err()
            .contains("unterminated"));
        // Errors never echo the string: it may hold a password.
        let e = split_conninfo("host=h password=s3cret =x").unwrap_err();
        assert!(
            e.contains("after \"password\"") && !e.contains("s3cret"),
            "{e}"
        );
        let e = split_conninfo("postgres://h/d?password=s3cret%zz").unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn url_settings_win_over_the_timeout_and_keepalive_defaults() {
        let d = db("postgres://h/d", None).unwrap();
        assert_eq!(d.mode, TlsMode::Prefer);
        assert_eq!(
            d.config.get_connect_timeout(),
            Some(&Duration::from_secs(10))
        );
        assert_eq!(d.config.get_keepalives_idle(), KEEPALIVE_IDLE);
        assert_eq!(d.config.get_keepalives_retries(), Some(KEEPALIVE_RETRIES));
        let d = db("postgres://h/d?connect_timeout=3&keepalives_idle=60", None).unwrap();
        assert_eq!(
            d.config.get_connect_timeout(),
            Some(&Duration::from_secs(3))
        );
        assert_eq!(d.config.get_keepalives_idle(), Duration::from_secs(60));
        assert_eq!(d.config.get_keepalives_interval(), Some(KEEPALIVE_INTERVAL));
        let e = db("postgres://h/d?sslmode=bogus", None).err().unwrap();
        assert!(e.contains("sslmode \"bogus\" is not one of"), "{e}");
    }

    #[tokio::test]
    async fn each_sslmode_encrypts_as_libpq_would_against_a_self_signed_server() {
        let t = TestDb::empty().await;
        let u = |mode: &str| format!("{}?sslmode={mode}", t.url);
        // The server's certificate is self-signed (snakeoil): prefer and require encrypt
        // without verifying it, as libpq does; the default is prefer.
        assert_eq!(uses_tls(&t.url, None).await, Ok(true));
        assert_eq!(uses_tls(&u("prefer"), None).await, Ok(true));
        assert_eq!(uses_tls(&u("allow"), None).await, Ok(true));
        assert_eq!(uses_tls(&u("require"), None).await, Ok(true));
        assert_eq!(uses_tls(&u("disable"), None).await, Ok(false));
        // verify-ca checks the chain, not the name (the certificate is for localhost).
        assert_eq!(uses_tls(&u("verify-ca"), Some(SNAKEOIL)).await, Ok(true));
        let ca_url = format!("{}&sslrootcert={SNAKEOIL}", u("verify-ca"));
        assert_eq!(uses_tls(&ca_url, None).await, Ok(true));
        // require with a CA verifies the chain, like libpq with a root certificate.
        assert_eq!(uses_tls(&u("require"), Some(SNAKEOIL)).await, Ok(true));
        let other_ca = "/etc/ssl/certs/ISRG_Root_X1.pem";
        let e = uses_tls(&u("require"), Some(other_ca)).await.unwrap_err();
        assert!(e.contains("UnknownIssuer"), "{e}");
        let e = uses_tls(&u("verify-ca"), Some(other_ca)).await.unwrap_err();
        assert!(e.contains("UnknownIssuer"), "{e}");
        // verify-full checks the name too: 127.0.0.1 is not in the certificate, localhost is.
        let e = uses_tls(&u("verify-full"), Some(SNAKEOIL))
            .await
            .unwrap_err();
        assert!(
            e.starts_with("cannot connect to the database (sslmode=verify-full)")
                && e.contains("not valid for name \"127.0.0.1\""),
            "{e}"
        );
        let by_name = u("verify-full").replace("127.0.0.1", "localhost");
        assert_eq!(uses_tls(&by_name, Some(SNAKEOIL)).await, Ok(true));
    }
}
