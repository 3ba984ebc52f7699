//! Upstream connections through an egress proxy (contract §12). One `CONNECT` handshake
//! (RFC 9110 §9.3.6) serves both upstream clients — the fast path's pool (`connect`) and
//! hyper's (`EgressConnector`) — for `https://` and `http://` upstreams alike: every
//! connection is a tunnel to the real host, and TLS, when there is any, runs end to end
//! inside it, verified against the upstream's own name. Whether a route uses a proxy, and
//! which, is decided once at config time (`crate::config::egress::decide`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::deferred::DeferWriteErrors;
use crate::config::EgressProxy;
use crate::BoxError;

/// The largest answer head accepted from a proxy for a `CONNECT`.
const MAX_ANSWER_HEAD: usize = 8 * 1024;

/// A TCP connection to `host:port` (`host` as in a URL: an IPv6 literal in brackets): direct,
/// or a tunnel through `proxy`. `timeout` bounds all of it, the `CONNECT` exchange included.
pub async fn connect(
    host: &str,
    port: u16,
    proxy: Option<&EgressProxy>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let Some(proxy) = proxy else {
        return super::pool::connect(host, port, timeout).await;
    };
    let tunnel = async {
        let mut stream = super::pool::connect(proxy.host(), proxy.port(), timeout)
            .await
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot connect to the egress proxy {proxy}: {e}"),
                )
            })?;
        handshake(&mut stream, proxy, host, port).await?;
        Ok(stream)
    };
    match tokio::time::timeout(timeout, tunnel).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no tunnel through the egress proxy {proxy} to {host}:{port} within {}",
                humantime::format_duration(timeout)
            ),
        )),
    }
}

/// Asks `proxy`, on `stream`, for a tunnel to `host:port`; on success the stream carries the
/// upstream's bytes. Any 2xx answer opens the tunnel (RFC 9110 §9.3.6); anything else is an
/// error that names the proxy (password as `***`) and its answer.
async fn handshake(
    stream: &mut TcpStream,
    proxy: &EgressProxy,
    host: &str,
    port: u16,
) -> io::Result<()> {
    let target = format!("{host}:{port}");
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
    if let Some(auth) = proxy.authorization() {
        request.extend_from_slice(b"Proxy-Authorization: ");
        request.extend_from_slice(auth.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    let failed = |what: String| io::Error::other(format!("the egress proxy {proxy} {what}"));
    stream
        .write_all(&request)
        .await
        .map_err(|e| failed(format!("failed while sending CONNECT {target}: {e}")))?;

    let mut answer = Vec::with_capacity(512);
    loop {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut head = httparse::Response::new(&mut fields);
        let head_len = match head.parse(&answer) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                if answer.len() >= MAX_ANSWER_HEAD {
                    return Err(failed(format!(
                        "sent an answer head over {MAX_ANSWER_HEAD} bytes to CONNECT {target}"
                    )));
                }
                let n = stream
                    .read_buf(&mut answer)
                    .await
                    .map_err(|e| failed(format!("failed while answering CONNECT {target}: {e}")))?;
                if n == 0 {
                    return Err(failed(format!(
                        "closed the connection without answering CONNECT {target}"
                    )));
                }
                continue;
            }
            Err(e) => {
                return Err(failed(format!(
                    "sent an invalid answer to CONNECT {target}: {e}"
                )))
            }
        };
        let status = head.code.unwrap_or(0);
        if (100..200).contains(&status) {
            // An interim answer (RFC 9110 §15.2: a client must take any before the final
            // one); the final answer follows, perhaps already here.
            answer.drain(..head_len);
            continue;
        }
        if (200..300).contains(&status) {
            // The upstream speaks only after we do (TLS ClientHello, or the request): bytes
            // already here did not come from it.
            if answer.len() > head_len {
                return Err(failed(format!(
                    "sent bytes after its answer to CONNECT {target}, before the upstream was spoken to"
                )));
            }
            return Ok(());
        }
        let reason: String = head
            .reason
            .unwrap_or("")
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(60)
            .collect();
        // 407 is the proxy's own "who are you" (RFC 9110 §15.5.8); some proxies (tinyproxy)
        // answer a CONNECT with wrong credentials 401 instead, which here can only be the
        // proxy speaking too: no tunnel, so no upstream, has answered yet.
        let hint = match (status, proxy.has_credentials()) {
            (401 | 407, true) => {
                " (the proxy did not accept the credentials in the egress proxy URL)"
            }
            (407, false) => {
                " (the proxy requires credentials: give them as http://user:password@host:port)"
            }
            _ => "",
        };
        return Err(failed(format!(
            "refused CONNECT {target}: {status} {}{hint}",
            reason.trim()
        )));
    }
}

/// hyper's connector for one upstream client: straight to the upstream through
/// `HttpConnector`, or a tunnel through the egress proxy (`connect`). TLS is layered on top
/// by `hyper_rustls`, so it verifies the upstream's name, never the proxy's. Its streams read
/// on past a failed write (`super::deferred`).
#[derive(Clone)]
pub struct EgressConnector {
    direct: HttpConnector,
    proxy: Option<Arc<EgressProxy>>,
    timeout: Duration,
}

impl EgressConnector {
    pub fn new(direct: HttpConnector, proxy: Option<Arc<EgressProxy>>, timeout: Duration) -> Self {
        EgressConnector {
            direct,
            proxy,
            timeout,
        }
    }
}

type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<DeferWriteErrors>, BoxError>> + Send>>;

impl tower_service::Service<Uri> for EgressConnector {
    type Response = TokioIo<DeferWriteErrors>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Connecting {
        let Some(proxy) = &self.proxy else {
            let connecting = self.direct.call(dst);
            return Box::pin(async move {
                let stream = connecting.await?.into_inner();
                Ok(TokioIo::new(DeferWriteErrors::new(stream)))
            });
        };
        let proxy = Arc::clone(proxy);
        let timeout = self.timeout;
        Box::pin(async move {
            let host = dst.host().ok_or("the upstream URL has no host")?;
            let default_port = if dst.scheme() == Some(&http::uri::Scheme::HTTPS) {
                443
            } else {
                80
            };
            let port = dst.port_u16().unwrap_or(default_port);
            let stream = connect(host, port, Some(&proxy), timeout).await?;
            Ok(TokioIo::new(DeferWriteErrors::new(stream)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A one-connection proxy that records the request head and answers with `answer`.
    async fn fake_proxy(answer: &'static [u8]) -> (EgressProxy, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8];
                if s.read(&mut byte).await.unwrap() == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            s.write_all(answer).await.unwrap();
            String::from_utf8(head).unwrap()
        });
        let url = format!("http://us%3Fer:pa%40ss@{addr}");
        (EgressProxy::parse(&url, false).unwrap(), task)
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn connect_sends_the_target_and_basic_credentials() {
        let (proxy, seen) = fake_proxy(b"HTTP/1.1 200 Connection established\r\n\r\n").await;
        connect("[::1]", 8443, Some(&proxy), T).await.unwrap();
        let head = seen.await.unwrap();
        // base64("us?er:pa@ss")
        assert_eq!(
            head,
            "CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\n\
             Proxy-Authorization: Basic dXM/ZXI6cGFAc3M=\r\n\r\n"
        );
    }

    /// Interim answers before the final one are passed over (RFC 9110 §15.2), whether the
    /// final one comes with them or after.
    #[tokio::test]
    async fn interim_answers_come_before_the_tunnel() {
        for answer in [
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 Connection established\r\n\r\n"[..],
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nX: y\r\n\r\nHTTP/1.0 200 OK\r\n\r\n",
        ] {
            let (proxy, _seen) = fake_proxy(answer).await;
            connect("h", 443, Some(&proxy), T).await.unwrap();
        }
        let (proxy, _seen) =
            fake_proxy(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\n\r\n").await;
        let e = connect("h", 443, Some(&proxy), T)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("refused CONNECT h:443: 403 Forbidden"), "{e}");
    }

    #[tokio::test]
    async fn refusals_name_the_proxy_and_status_without_the_password() {
        for (answer, want) in [
            (
                &b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"[..],
                "refused CONNECT h:443: 407 Proxy Authentication Required (the proxy did not accept the credentials",
            ),
            (&b"HTTP/1.0 403 Access violation\r\n\r\n"[..], "refused CONNECT h:443: 403 Access violation"),
            (&b"HTTP/1.1 200 OK\r\n\r\nearly"[..], "sent bytes after its answer"),
            (&b"garbage\r\n\r\n"[..], "invalid answer"),
            (&b""[..], "closed the connection without answering"),
        ] {
            let (proxy, _seen) = fake_proxy(answer).await;
            let e = connect("h", 443, Some(&proxy), T).await.unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(e.contains("the egress proxy http://us%3Fer:***@127.0.0.1:"), "{e}");
            assert!(!e.contains("pa@ss") && !e.contains("pa%40ss"), "{e}");
        }
    }
}
