//! TLS for tests: a private CA with leaf certificates for 127.0.0.1, and an HTTPS server.

use std::convert::Infallible;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use super::AbortOnDrop;

pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub ca: rcgen::Certificate,
    pub ca_key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new() -> TestCa {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "egain-proxy test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        TestCa { dir, ca, ca_key }
    }

    pub fn ca_file(&self) -> String {
        self.dir.path().join("ca.pem").to_str().unwrap().to_owned()
    }

    /// Writes `<name>.pem` and `<name>-key.pem` for 127.0.0.1 and localhost; returns the paths.
    pub fn leaf(&self, name: &str) -> (String, String) {
        self.leaf_for(name, &["127.0.0.1", "localhost"])
    }

    /// As `leaf`, valid for exactly `hosts`.
    pub fn leaf_for(&self, name: &str, hosts: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let cert_path = self.dir.path().join(format!("{name}.pem"));
        let key_path = self.dir.path().join(format!("{name}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (
            cert_path.to_str().unwrap().to_owned(),
            key_path.to_str().unwrap().to_owned(),
        )
    }

    pub fn client(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.ca.pem().as_bytes()).unwrap();
        reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .unwrap()
    }
}

/// An HTTPS server (h2 and http/1.1 by ALPN) answering with `handler`.
pub async fn serve_tls<F, Fut>(
    cert: &str,
    key: &str,
    handler: F,
) -> (std::net::SocketAddr, AbortOnDrop)
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<egain_proxy::ProxyBody>> + Send + 'static,
{
    let config = egain_proxy::tls::server_config(cert.as_ref(), key.as_ref()).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let handler = handler.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, AbortOnDrop(task))
}

/// Profile `p` against `tokens` and one route `/` to the HTTPS upstream on loopback `port`,
/// trusted through `ca`.
pub fn https_route(tokens: &super::TokenServer, port: u16, ca: &TestCa) -> String {
    https_route_with(tokens, port, ca, "")
}

/// As `https_route`, with `extra` (whole `key = value` lines) on the route.
pub fn https_route_with(
    tokens: &super::TokenServer,
    port: u16,
    ca: &TestCa,
    extra: &str,
) -> String {
    format!(
        "{}{}",
        super::client_app_profile("p", tokens, ""),
        super::route(
            "up",
            "/",
            &format!("https://127.0.0.1:{port}"),
            "p",
            &format!("ca_file = \"{}\"\n{extra}", ca.ca_file())
        ),
    )
}
