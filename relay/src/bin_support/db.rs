//! The binary's database connections: URL parsing (passwords never shown), and TLS with rustls
//! when the URL asks for it with `sslmode=require`.

use std::path::Path;

use tidings_relay::{redact_url, ErrorChain, Relay};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{usage, Failure};

/// A database to connect to: its parsed URL and, when `sslmode=require`, the TLS connector.
pub struct Db {
    pub config: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
}

impl Db {
    /// Parses the URL and sets up TLS. `sslmode=require` means TLS with the server certificate
    /// verified against the system roots plus `ca_file` (stricter than libpq's `require`, which
    /// does not verify); `disable` and `prefer` (the default) connect without TLS.
    pub fn new(url: Option<&str>, ca_file: Option<&Path>) -> Result<Db, Failure> {
        let url =
            url.ok_or_else(|| usage("no database: set DATABASE_URL or pass --database-url"))?;
        let config = url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| usage(format!("invalid database URL {}: {e}", redact_url(url))))?;
        let tls = match config.get_ssl_mode() {
            SslMode::Require => Some(rustls_connector(ca_file)?),
            _ => {
                if ca_file.is_some() {
                    return Err(usage(
                        "--pg-ca-file needs sslmode=require in the database URL",
                    ));
                }
                None
            }
        };
        Ok(Db { config, tls })
    }

    /// One connection, driven on the runtime.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, Failure> {
        let failed = |e: tokio_postgres::Error| Failure {
            code: 1,
            message: format!("cannot connect to the database: {}", ErrorChain(&e)),
        };
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

    /// A pool of `size` connections.
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
            .build()
            .map_err(|e| usage(format!("cannot build the database pool: {e}")))
    }

    /// Gives the relay its LISTEN connection, with the same TLS.
    pub fn with_listener(&self, relay: Relay) -> Relay {
        match &self.tls {
            None => relay.with_listener(self.config.clone(), tokio_postgres::NoTls),
            Some(tls) => relay.with_listener(self.config.clone(), tls.clone()),
        }
    }
}

fn rustls_connector(ca_file: Option<&Path>) -> Result<MakeRustlsConnect, Failure> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| usage(format!("cannot read --pg-ca-file {}: {e}", path.display())))?;
        for cert in certs {
            let cert =
                cert.map_err(|e| usage(format!("bad certificate in {}: {e}", path.display())))?;
            roots
                .add(cert)
                .map_err(|e| usage(format!("unusable certificate in {}: {e}", path.display())))?;
        }
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}
