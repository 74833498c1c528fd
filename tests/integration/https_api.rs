//! A local HTTPS API for egress tests and the egress benchmark: a certificate for the given IP
//! addresses from a CA of its own (`ca.pem` in the given directory), answering every request
//! with `the API says hello` and recording its `Host`, path and `Authorization` header. The same
//! API over plain HTTP too.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A request the API received: the `Host` it named, its path and query, and its `Authorization`
/// header.
#[derive(Debug, Clone)]
pub struct Seen {
    #[allow(dead_code)] // read by the tests, not by the egress benchmark
    pub host: String,
    pub path: String,
    pub authorization: Option<String>,
}

type Requests = Arc<Mutex<Vec<Seen>>>;

/// Answers every request, recording it in `seen`.
fn app(seen: Requests) -> axum::Router {
    axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap| {
            let seen = seen.clone();
            async move {
                let text = |name: &str| {
                    headers
                        .get(name)
                        .map(|v| v.to_str().unwrap_or("<binary>").to_owned())
                };
                seen.lock().expect("lock").push(Seen {
                    host: text("host").unwrap_or_default(),
                    path: uri.to_string(),
                    authorization: text("authorization"),
                });
                "the API says hello"
            }
        },
    )
}

/// The API over plain HTTP on `ip` (port chosen by the system).
#[allow(dead_code)] // used by the tests, not by the egress benchmark
pub async fn serve_http(ip: &str) -> (SocketAddr, Requests) {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Requests::default();
    let app = app(seen.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, seen)
}

/// Listens on `ip` (port chosen by the system) with a certificate for `names`.
pub async fn serve(ip: &str, names: &[&str], dir: &Path) -> (SocketAddr, Requests) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "egress test API CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let cert = rcgen::CertificateParams::new(names)
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("leaf");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("server config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let seen = Requests::default();
    let app = app(seen.clone());
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(tls),
                        hyper_util::service::TowerToHyperService::new(app),
                    )
                    .await;
            });
        }
    });
    (addr, seen)
}
