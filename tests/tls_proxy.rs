//! TLS and proxies as a corporate network has them (`docs/configuration.md`):
//! the provider is reached over HTTPS with a certificate from a CA that only
//! the host's trust store knows (`SSL_CERT_FILE`), through a CONNECT proxy
//! named by `HTTPS_PROXY`; `NO_PROXY` sends the calls around it.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::Harness;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TLS front for the emulator on loopback, its certificate for
/// `localhost` issued by a fresh test CA. Returns its address and the CA
/// as PEM.
async fn tls_front(emulator: SocketAddr) -> (SocketAddr, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Ends with the test's runtime.
    #[allow(clippy::disallowed_methods)]
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            conns.spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = TcpStream::connect(emulator).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (addr, ca.pem())
}

/// Where the harness's emulator listens.
fn emulator_addr(h: &Harness) -> SocketAddr {
    h.emulator
        .url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

/// A CONNECT proxy on loopback that records each tunnel's target.
async fn connect_proxy() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tunnels = Arc::new(Mutex::new(Vec::new()));
    let seen = tunnels.clone();
    // Ends with the test's runtime.
    #[allow(clippy::disallowed_methods)]
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut client, _)) = listener.accept().await {
            let seen = seen.clone();
            conns.spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let mut words = text.split_whitespace();
                if words.next() != Some("CONNECT") {
                    let _ = client
                        .write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let target = words.next().unwrap_or_default().to_string();
                seen.lock().unwrap().push(target.clone());
                let Ok(mut server) =
                    TcpStream::connect(target.replace("localhost", "127.0.0.1")).await
                else {
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    (addr, tunnels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_through_a_connect_proxy_with_the_hosts_trust_store() {
    let mut h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    let emulator = emulator_addr(&h);
    let (front, ca_pem) = tls_front(emulator).await;
    let (proxy, tunnels) = connect_proxy().await;
    let ca_file = h.path("corporate-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let https = format!("https://localhost:{}", front.port());
    h.env = vec![
        ("HARVESTD_BRIGHTDATA_URL".into(), https.clone()),
        ("SSL_CERT_FILE".into(), ca_file.display().to_string()),
        ("HTTPS_PROXY".into(), format!("http://{proxy}")),
    ];
    h.write_inputs("in.csv", 4);
    h.write_job(
        "tls.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_tls000001\"\ninputs_file = \"in.csv\"\nchunk_size = 2\n",
    );
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(h.ledger().len(), 2, "both chunks triggered over TLS");
    let through = tunnels.lock().unwrap().clone();
    assert!(
        !through.is_empty()
            && through
                .iter()
                .all(|t| *t == format!("localhost:{}", front.port())),
        "every call went through the proxy: {through:?}"
    );

    // NO_PROXY: the same calls go straight to the provider.
    let before = through.len();
    h.env.push(("NO_PROXY".into(), "localhost".into()));
    h.write_inputs("in.csv", 6);
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(h.ledger().len(), 5, "the new run triggered");
    assert_eq!(
        tunnels.lock().unwrap().len(),
        before,
        "no tunnel for a host NO_PROXY names"
    );
}

/// The same provider without the CA in the trust store: the calls fail
/// with the certificate named, and nothing is triggered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_the_host_does_not_trust_is_refused() {
    let mut h = Harness::new("[defaults]\nbuild_time = \"50ms\"\n").await;
    let emulator = emulator_addr(&h);
    let (front, _) = tls_front(emulator).await;
    h.env = vec![(
        "HARVESTD_BRIGHTDATA_URL".into(),
        format!("https://localhost:{}", front.port()),
    )];
    h.write_inputs("in.csv", 2);
    h.write_job(
        "tls.toml",
        "provider = \"scraper_studio\"\ncollector = \"c_tls000001\"\ninputs_file = \"in.csv\"\nchunk_size = 2\n",
    );
    let mut d = h.start_daemon().await;
    let line = d.wait_for_line("certificate").await;
    assert!(line.to_lowercase().contains("certificate"), "{line}");
    assert!(h.ledger().is_empty(), "nothing triggered");
    d.signal(15);
    assert_eq!(d.wait().await, 0);
}

/// A trust store with nothing usable in it (`SSL_CERT_FILE` naming a file
/// without a certificate that parses): refused at start with exit 78 and
/// the variable named, not a failure at the first call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_trust_store_is_a_configuration_error() {
    let mut h = Harness::new("").await;
    let bad = h.path("broken-ca.pem");
    std::fs::write(
        &bad,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    h.env = vec![("SSL_CERT_FILE".into(), bad.display().to_string())];
    let (code, _, stderr) = h.run_once().await;
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("SSL_CERT_FILE"), "{stderr}");
    assert!(h.ledger().is_empty());
}
