//! TLS to the upstream: a verifying connector, with `sslmode` from the URL and extra
//! roots from `ca_file`. A TLS-terminating proxy stands in for Materialize's TLS.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{TestEngine, TestGateway, WAIT};

/// A CA in PEM, and a server config presenting a `localhost` certificate it signed.
fn pki() -> (String, rustls::ServerConfig) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key")).expect("ca");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf");
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).expect("key der");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], key)
    .expect("server config");
    (ca.pem(), config)
}

/// Answers Postgres' SSLRequest with `S`, terminates TLS, and forwards in plain text.
async fn tls_proxy(upstream: std::net::SocketAddr, config: rustls::ServerConfig) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 8];
                if client.read_exact(&mut request).await.is_err()
                    || request != [0, 0, 0, 8, 4, 210, 22, 47]
                {
                    return;
                }
                if client.write_all(b"S").await.is_err() {
                    return;
                }
                let Ok(mut tls) = acceptor.accept(client).await else {
                    return;
                };
                let Ok(mut server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstream_is_verified_against_the_configured_roots() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let engine = TestEngine::start(
        "CREATE TABLE t (a int);\nINSERT INTO t VALUES (1);\n",
        std::time::Duration::from_secs(600),
        std::time::Duration::from_millis(200),
    )
    .await;
    let (ca_pem, server) = pki();
    let port = tls_proxy(engine.addr, server).await;
    let url = format!("postgres://materialize@localhost:{port}/materialize?sslmode=require");

    let trusted = TestGateway::start(
        &format!(
            "[upstream]\nurl = \"{url}\"\nca_file = \"ca.pem\"\n[[streams]]\npath = \"/t\"\nview = \"t\"\n"
        ),
        &[("ca.pem", &ca_pem)],
    )
    .await;
    let mut ok = trusted.sse("/t").await;
    let e = ok.next_data_event(WAIT).await;
    assert_eq!(e.event, "snapshot");
    assert!(e.data.contains("{\"a\":1}"), "{}", e.data);

    // Without the CA, the certificate does not verify and the stream says so.
    let untrusted = TestGateway::start(
        &format!("[upstream]\nurl = \"{url}\"\n[[streams]]\npath = \"/t\"\nview = \"t\"\n"),
        &[],
    )
    .await;
    let mut bad = untrusted.sse("/t").await;
    bad.status_event("certificate", WAIT).await;
}
