//! Opening one upstream connection: target resolution, the password, and TLS.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{PasswordSource, StreamPath, UpstreamConfig, UpstreamTarget};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("password variable {0} is not set")]
    MissingEnv(String),
    #[error("cannot read password file {path}")]
    PasswordFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read CA file {path}")]
    CaFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid upstream url")]
    Url(#[source] tokio_postgres::Error),
    #[error("connecting to the upstream failed")]
    Connect(#[source] tokio_postgres::Error),
    #[error("connecting to the upstream timed out")]
    Timeout,
}

/// Where and how to connect, resolved once per config.
#[derive(Clone)]
pub struct Target {
    config: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
    password: Option<PasswordSource>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("hosts", &self.config.get_hosts())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Target {
    /// Resolves the configured upstream; `embedded` is the engine's loopback address.
    pub fn new(
        upstream: &UpstreamConfig,
        embedded: Option<SocketAddr>,
    ) -> Result<Target, ConnectError> {
        let (config, tls) = match (&upstream.target, embedded) {
            (UpstreamTarget::Url(url), _) => {
                let config: tokio_postgres::Config = url.parse().map_err(ConnectError::Url)?;
                let tls = match config.get_ssl_mode() {
                    SslMode::Disable => None,
                    _ => Some(tls_connector(upstream)?),
                };
                (config, tls)
            }
            (UpstreamTarget::Embedded, addr) => {
                let addr = addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 6875)));
                let mut config = tokio_postgres::Config::new();
                config
                    .host(addr.ip().to_string())
                    .port(addr.port())
                    .user("materialize")
                    .dbname("materialize")
                    .ssl_mode(SslMode::Disable);
                (config, None)
            }
        };
        Ok(Target {
            config,
            tls,
            password: upstream.password.clone(),
        })
    }

    /// Opens a connection for `stream` and spawns its connection task. The task's
    /// handle resolves when the link is gone.
    pub async fn connect(
        &self,
        stream: &StreamPath,
        timeout: std::time::Duration,
    ) -> Result<(Client, tokio::task::JoinHandle<()>), ConnectError> {
        let mut config = self.config.clone();
        config.application_name(format!("tailgate {stream}"));
        config.keepalives(true);
        config.keepalives_idle(std::time::Duration::from_secs(30));
        match &self.password {
            Some(PasswordSource::Env(var)) => {
                let pw = std::env::var(var).map_err(|_| ConnectError::MissingEnv(var.clone()))?;
                config.password(pw);
            }
            Some(PasswordSource::File(path)) => {
                let pw =
                    std::fs::read_to_string(path).map_err(|source| ConnectError::PasswordFile {
                        path: path.display().to_string(),
                        source,
                    })?;
                config.password(pw.trim_end_matches(['\r', '\n']));
            }
            None => {}
        }
        let connect = async {
            let (client, conn) = match &self.tls {
                Some(tls) => {
                    let (client, conn) = config.connect(tls.clone()).await?;
                    (client, spawn_connection(conn))
                }
                None => {
                    let (client, conn) = config.connect(NoTls).await?;
                    (client, spawn_connection(conn))
                }
            };
            Ok((client, conn))
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| ConnectError::Timeout)?
            .map_err(ConnectError::Connect)
    }
}

/// Drives a connection in its own task; the handle resolves when the link is gone.
fn spawn_connection<F>(conn: F) -> tokio::task::JoinHandle<()>
where
    F: std::future::Future + Send + 'static,
{
    tokio::spawn(async move {
        let _ = conn.await;
    })
}

/// A verifying rustls connector: the web roots plus an optional CA file.
fn tls_connector(upstream: &UpstreamConfig) -> Result<MakeRustlsConnect, ConnectError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &upstream.ca_file {
        use rustls::pki_types::pem::PemObject;
        let ca_err = |source| ConnectError::CaFile {
            path: path.display().to_string(),
            source,
        };
        let pem = std::fs::read(path).map_err(ca_err)?;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| ca_err(std::io::Error::other(e.to_string())))?;
            roots
                .add(cert)
                .map_err(|e| ca_err(std::io::Error::other(e.to_string())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectError::CaFile {
            path: String::new(),
            source: std::io::Error::other(e.to_string()),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}
