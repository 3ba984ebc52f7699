//! Every inbound transport, for tests that run one body on each (as linkerd2-proxy's
//! `http1_tests!` does): the HTTP/1.1 fast path, hyper's HTTP/1.1 (a connection the fast
//! path handed over), h2c by prior knowledge, and h2 over TLS by ALPN.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use super::tls::TestCa;
use super::{client_app_profile, raw, route, AbortOnDrop, TestProxy, TokenServer, Upstream};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A client connection on one transport (`On::connect`).
pub enum Conn {
    H1(raw::Client),
    H2 {
        send: h2::client::SendRequest<Bytes>,
        ended: tokio::sync::oneshot::Receiver<()>,
        _task: AbortOnDrop,
    },
}

impl Conn {
    /// A GET of `path` on this connection; the answer's status.
    pub async fn get(&mut self, path: &str) -> u16 {
        match self {
            Conn::H1(client) => {
                let (head, _) = client.get(path).await;
                head[9..12].parse().unwrap()
            }
            Conn::H2 { send, .. } => {
                let request = http::Request::get(format!("http://app{path}"))
                    .body(())
                    .unwrap();
                let mut send = send.clone().ready().await.unwrap();
                let (response, _) = send.send_request(request, true).unwrap();
                let response = response.await.unwrap();
                let status = response.status().as_u16();
                let mut body = response.into_body();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.unwrap();
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
                status
            }
        }
    }

    /// Sends a GET of `path` on this h2 connection and returns its answer's body unread (its
    /// window stays where the client's settings put it).
    pub async fn get_unread(&mut self, path: &str) -> h2::RecvStream {
        let Conn::H2 { send, .. } = self else {
            panic!("get_unread needs an h2 connection");
        };
        let request = http::Request::get(format!("http://app{path}"))
            .body(())
            .unwrap();
        let mut send = send.clone().ready().await.unwrap();
        let (response, _) = send.send_request(request, true).unwrap();
        response.await.unwrap().into_body()
    }

    /// Whether the proxy ends the connection within `limit`.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        match self {
            Conn::H1(client) => {
                use tokio::io::AsyncReadExt;
                let mut rest = Vec::new();
                let read = client.stream.read_to_end(&mut rest);
                tokio::time::timeout(limit, read).await.is_ok()
            }
            Conn::H2 { ended, .. } => tokio::time::timeout(limit, ended).await.is_ok(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    FastH1,
    /// Every request carries `Expect: 100-continue`, which the fast path hands to hyper; the
    /// pipeline drops `Expect`, so the upstream sees what the fast path would have sent.
    HyperH1,
    H2c,
    TlsH2,
}

pub const TRANSPORTS: [Transport; 4] = [
    Transport::FastH1,
    Transport::HyperH1,
    Transport::H2c,
    Transport::TlsH2,
];

/// A transport with what it needs: for TLS, a CA and the proxy's certificate.
pub struct On {
    pub transport: Transport,
    ca: TestCa,
    cert: (String, String),
}

impl On {
    pub fn new(transport: Transport) -> On {
        let ca = TestCa::new();
        let cert = ca.leaf("proxy");
        On {
            transport,
            ca,
            cert,
        }
    }

    /// The CA that signed the proxy's certificate (TLS transports).
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// `[server]` (with `[server.tls]` for TLS) and `[admin]` on ephemeral loopback ports.
    /// Further `[server]` keys cannot follow it; tables can.
    pub fn head(&self) -> String {
        self.head_with("")
    }

    /// As `head`, with `server_keys` (whole `key = value` lines) in `[server]`.
    pub fn head_with(&self, server_keys: &str) -> String {
        let tls = match self.transport {
            Transport::TlsH2 => format!(
                "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                self.cert.0, self.cert.1
            ),
            _ => String::new(),
        };
        format!("[server]\nlisten = \"127.0.0.1:0\"\n{server_keys}{tls}[admin]\nlisten = \"127.0.0.1:0\"\n")
    }

    /// TLS to the proxy over `tcp`, trusting `ca()`, offering `alpn` alone.
    pub async fn tls(
        &self,
        tcp: tokio::net::TcpStream,
        alpn: &[u8],
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(
                self.ca.ca.der().to_vec(),
            ))
            .unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap()
    }

    /// One client connection to `proxy` on this transport, kept open between requests (for
    /// hyper's HTTP/1.1, its first request, answered, moved it there).
    pub async fn connect(&self, proxy: &TestProxy) -> Conn {
        let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let io: Box<dyn Io> = match self.transport {
            Transport::FastH1 => return Conn::H1(raw::Client::on(proxy, raw::Inbound::Fast).await),
            Transport::HyperH1 => {
                return Conn::H1(raw::Client::on(proxy, raw::Inbound::Hyper).await)
            }
            Transport::H2c => Box::new(tcp),
            Transport::TlsH2 => Box::new(self.tls(tcp, b"h2").await),
        };
        let (send, connection) = h2::client::handshake(io).await.unwrap();
        let (ended_tx, ended) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let _ = connection.await;
            let _ = ended_tx.send(());
        });
        Conn::H2 {
            send,
            ended,
            _task: AbortOnDrop(task),
        }
    }

    /// The proxy for `config` (everything after the head).
    pub async fn proxy(&self, config: &str) -> TestProxy {
        TestProxy::start(&format!("{}{config}", self.head())).await
    }

    /// The common case, as `support::proxy_for`.
    pub async fn proxy_for(
        &self,
        tokens: &TokenServer,
        upstream: &Upstream,
        profile_extra: &str,
        route_extra: &str,
    ) -> TestProxy {
        self.proxy(&format!(
            "{}{}",
            client_app_profile("portal", tokens, profile_extra),
            route("r", "/", &upstream.url(), "portal", route_extra)
        ))
        .await
    }

    /// The common case for an upstream of another kind (raw, TLS): every path to `url`.
    pub async fn proxy_to(&self, tokens: &TokenServer, url: &str) -> TestProxy {
        self.proxy(&format!(
            "{}{}",
            client_app_profile("portal", tokens, ""),
            route("r", "/", url, "portal", "")
        ))
        .await
    }

    pub fn client(&self) -> reqwest::Client {
        self.client_builder().build().unwrap()
    }

    /// A client whose requests to `http(s)://{name}/…` (no port) reach `proxy`: h2 names the host
    /// in `:authority`, which only the URL sets (certificates are not checked: the proxy's
    /// is for localhost).
    pub fn client_naming(&self, name: &str, proxy: &TestProxy) -> reqwest::Client {
        self.client_builder()
            .resolve(name, proxy.addr)
            .danger_accept_invalid_certs(true)
            .build()
            .unwrap()
    }

    fn client_builder(&self) -> reqwest::ClientBuilder {
        let builder = reqwest::Client::builder().no_proxy();
        match self.transport {
            Transport::FastH1 => builder.http1_only(),
            Transport::HyperH1 => {
                let mut headers = http::HeaderMap::new();
                headers.insert("expect", http::HeaderValue::from_static("100-continue"));
                builder.http1_only().default_headers(headers)
            }
            // Response heads up to the proxy's own limit (hyper's client takes 16 KiB).
            Transport::H2c => builder
                .http2_prior_knowledge()
                .http2_max_header_list_size(256 * 1024),
            Transport::TlsH2 => {
                let ca = reqwest::Certificate::from_pem(self.ca.ca.pem().as_bytes()).unwrap();
                builder
                    .add_root_certificate(ca)
                    .http2_max_header_list_size(256 * 1024)
            }
        }
    }

    pub fn url(&self, proxy: &TestProxy, path: &str) -> String {
        let scheme = match self.transport {
            Transport::TlsH2 => "https",
            _ => "http",
        };
        format!("{scheme}://{}{path}", proxy.addr)
    }

    /// What the proxy writes in `X-Forwarded-Proto` on this transport.
    pub fn proto(&self) -> &'static str {
        match self.transport {
            Transport::TlsH2 => "https",
            _ => "http",
        }
    }

    /// The HTTP version the client sees.
    pub fn version(&self) -> http::Version {
        match self.transport {
            Transport::FastH1 | Transport::HyperH1 => http::Version::HTTP_11,
            Transport::H2c | Transport::TlsH2 => http::Version::HTTP_2,
        }
    }
}

/// Runs each named `async fn NAME(on: On)` once per transport, as tests
/// `NAME::fast_h1`, `NAME::hyper_h1`, `NAME::h2c` and `NAME::tls_h2`.
#[macro_export]
macro_rules! on_every_transport {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use $crate::support::transport::{On, Transport};
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fast_h1() {
                super::$name(On::new(Transport::FastH1)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn hyper_h1() {
                super::$name(On::new(Transport::HyperH1)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn h2c() {
                super::$name(On::new(Transport::H2c)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tls_h2() {
                super::$name(On::new(Transport::TlsH2)).await
            }
        }
    )*};
}
