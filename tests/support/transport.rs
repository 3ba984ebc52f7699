//! Every inbound transport, for tests that run one body on each (as linkerd2-proxy's
//! `http1_tests!` does): the HTTP/1.1 fast path, hyper's HTTP/1.1 (a connection the fast
//! path handed over), h2c by prior knowledge, and h2 over TLS by ALPN.

use super::tls::TestCa;
use super::{client_app_profile, route, TestProxy, TokenServer, Upstream};

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
        let tls = match self.transport {
            Transport::TlsH2 => format!(
                "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                self.cert.0, self.cert.1
            ),
            _ => String::new(),
        };
        format!("[server]\nlisten = \"127.0.0.1:0\"\n{tls}[admin]\nlisten = \"127.0.0.1:0\"\n")
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

    pub fn client(&self) -> reqwest::Client {
        let builder = reqwest::Client::builder().no_proxy();
        let builder = match self.transport {
            Transport::FastH1 => builder.http1_only(),
            Transport::HyperH1 => {
                let mut headers = http::HeaderMap::new();
                headers.insert("expect", http::HeaderValue::from_static("100-continue"));
                builder.http1_only().default_headers(headers)
            }
            Transport::H2c => builder.http2_prior_knowledge(),
            Transport::TlsH2 => {
                let ca = reqwest::Certificate::from_pem(self.ca.ca.pem().as_bytes()).unwrap();
                builder.add_root_certificate(ca)
            }
        };
        builder.build().unwrap()
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
