//! Load bench: a minimal hyper upstream, the proxy (the release binary, as a child process, with
//! the embedded mock eGain as its token server) and a load generator with N keep-alive
//! connections for D seconds. Runs direct-to-upstream and through-proxy in the same process
//! and prints requests/s, p50/p99/p99.9, the proxy/direct ratio, the token requests made and
//! the proxy's peak RSS. Optionally holds many idle keep-alive connections, streams a large
//! upload, or holds many requests at once on TLS connections to an HTTPS upstream, and
//! reports the proxy's RSS meanwhile.
//!
//!   cargo bench --bench load
//!   cargo bench --bench load -- --connections 64 --duration 10 --body-size 128 --h2
//!   cargo bench --bench load -- --idle 1000 --upload-mib 1024 --tls-pool 1000
//!
//! On Linux with `taskset`, the proxy is pinned to CPU 0 and this process (upstream, mock,
//! load generator) to CPU 1 (`--no-pin` to disable).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use egain_proxy::mock::{MockEgain, MockOptions};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone)]
struct Options {
    connections: usize,
    duration: Duration,
    body_size: usize,
    h2: bool,
    idle: usize,
    upload_mib: u64,
    tls_pool: usize,
    pin: bool,
}

fn options() -> Options {
    let mut o = Options {
        connections: 64,
        duration: Duration::from_secs(10),
        body_size: 128,
        h2: false,
        idle: 1000,
        upload_mib: 0,
        tls_pool: 0,
        pin: true,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let value = |i: usize| -> u64 {
        args.get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{} needs a number", args[i]))
    };
    while i < args.len() {
        match args[i].as_str() {
            "--connections" => o.connections = value(i) as usize,
            "--duration" => o.duration = Duration::from_secs(value(i)),
            "--body-size" => o.body_size = value(i) as usize,
            "--idle" => o.idle = value(i) as usize,
            "--upload-mib" => o.upload_mib = value(i),
            "--tls-pool" => o.tls_pool = value(i) as usize,
            "--h2" => {
                o.h2 = true;
                i += 1;
                continue;
            }
            "--no-pin" => {
                o.pin = false;
                i += 1;
                continue;
            }
            // `cargo bench` passes `--bench`; ignore anything else unknown.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

fn main() {
    let o = options();
    let pinned = o.pin && taskset(&["-p", "-c", "1", &std::process::id().to_string()]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(o, pinned));
}

fn taskset(args: &[&str]) -> bool {
    Command::new("taskset")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn upstream(body_size: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    let body = Bytes::from(vec![b'x'; body_size]);
    tokio::spawn(async move {
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let body = body.clone();
                    async move {
                        // Drain uploads so they can be measured end to end.
                        let mut incoming = req.into_body();
                        while let Some(frame) = incoming.frame().await {
                            if frame.is_err() {
                                break;
                            }
                        }
                        Ok::<_, Infallible>(http::Response::new(Full::new(body)))
                    }
                });
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
    _dir: std::path::PathBuf,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

impl ProxyProcess {
    fn rss_kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(field))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0)
    }
}

/// An HTTPS upstream (HTTP/1.1 only, a private CA written to `dir`) whose every request waits
/// until `release` turns true: `arrived` counts the requests waiting.
struct HoldingUpstream {
    addr: SocketAddr,
    ca_file: std::path::PathBuf,
    arrived: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    release: tokio::sync::watch::Sender<bool>,
}

async fn holding_upstream(dir: &std::path::Path) -> HoldingUpstream {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    std::fs::create_dir_all(dir).expect("temp dir");
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("leaf");
    let (ca_file, cert_file, key_file) = (
        dir.join("ca.pem"),
        dir.join("up.pem"),
        dir.join("up-key.pem"),
    );
    std::fs::write(&ca_file, ca.pem()).expect("write");
    std::fs::write(&cert_file, leaf.pem()).expect("write");
    std::fs::write(&key_file, key.serialize_pem()).expect("write");
    let mut config =
        (*egain_proxy::tls::server_config(&cert_file, &key_file).expect("TLS")).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let arrived = Arc::new(AtomicUsize::new(0));
    let (release, released) = tokio::sync::watch::channel(false);
    let counter = Arc::clone(&arrived);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, counter, released) =
                (acceptor.clone(), Arc::clone(&counter), released.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (counter, mut released) = (Arc::clone(&counter), released.clone());
                    async move {
                        if req.uri().path().ends_with("/hold") {
                            counter.fetch_add(1, Ordering::SeqCst);
                            let _ = released.wait_for(|r| *r).await;
                        }
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            b"{}",
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    HoldingUpstream {
        addr,
        ca_file,
        arrived,
        release,
    }
}

async fn start_proxy(
    mock: &MockEgain,
    upstream: SocketAddr,
    tls_upstream: Option<&HoldingUpstream>,
    pin: bool,
) -> ProxyProcess {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = std::env::temp_dir().join(format!("egain-proxy-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nmax_connections = 20000\n[log]\nlevel = \"warn\"\n\
         [profiles.portal]\nkind = \"client_app\"\ntoken_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nscopes = [\"knowledge.portalmgr.manage\"]\n\
         {}[[routes]]\npath_prefix = \"/\"\nupstream = \"http://{upstream}\"\nprofile = \"portal\"\n",
        mock.client_app_token_url(),
        mock.options().client_app.0,
        mock.options().client_app.1,
        tls_upstream.map_or(String::new(), |t| format!(
            "[[routes]]\npath_prefix = \"/tls/\"\nupstream = \"https://{}\"\nprofile = \"portal\"\nca_file = \"{}\"\n",
            t.addr,
            t.ca_file.display()
        )),
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config).expect("write config");
    let bin = env!("CARGO_BIN_EXE_egain-proxy");
    let mut cmd = if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", bin]);
        c
    } else {
        Command::new(bin)
    };
    let child = cmd
        .args(["run", "--config", path.to_str().expect("utf-8 path")])
        // Loopback only: no egress proxy from the environment.
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the proxy");
    let proxy = ProxyProcess {
        child,
        addr: ([127, 0, 0, 1], port).into(),
        _dir: dir,
    };
    // Ready when a request succeeds (the token has arrived).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if one_request(proxy.addr).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the proxy did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy
}

async fn one_request(addr: SocketAddr) -> Result<(), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("/ready")
        .header("host", "bench")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let res = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status();
    let _ = res.into_body().collect().await;
    if status == 200 {
        Ok(())
    } else {
        Err(status.to_string())
    }
}

struct Outcome {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
}

/// `connections` keep-alive connections, each sending requests back to back for `duration`.
async fn load(addr: SocketAddr, o: &Options) -> Outcome {
    let started = Instant::now();
    let deadline = started + o.duration;
    let mut tasks = Vec::new();
    for _ in 0..o.connections {
        let h2 = o.h2;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            let Ok(stream) = TcpStream::connect(addr).await else {
                return (latencies, 1);
            };
            let _ = stream.set_nodelay(true);
            let io = TokioIo::new(stream);
            if h2 {
                let Ok((mut send, conn)) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await
                else {
                    return (latencies, 1);
                };
                tokio::spawn(conn);
                while Instant::now() < deadline {
                    let req = http::Request::builder()
                        .uri(format!("http://{addr}/bench"))
                        .body(Empty::<Bytes>::new())
                        .expect("request");
                    let t = Instant::now();
                    match send.send_request(req).await {
                        Ok(res) if res.status() == 200 => {
                            let _ = res.into_body().collect().await;
                            latencies.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        }
                        _ => errors += 1,
                    }
                }
            } else {
                let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(io).await else {
                    return (latencies, 1);
                };
                tokio::spawn(conn);
                while Instant::now() < deadline {
                    let req = http::Request::builder()
                        .uri("/bench")
                        .header("host", "bench")
                        .body(Empty::<Bytes>::new())
                        .expect("request");
                    let t = Instant::now();
                    match send.send_request(req).await {
                        Ok(res) if res.status() == 200 => {
                            let _ = res.into_body().collect().await;
                            latencies.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        }
                        _ => {
                            errors += 1;
                            break;
                        }
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    let elapsed = started.elapsed();
    all.sort_unstable();
    Outcome {
        requests: all.len() as u64,
        errors,
        elapsed,
        latencies_us: all,
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

fn report(name: &str, o: &Outcome) -> f64 {
    let rps = o.requests as f64 / o.elapsed.as_secs_f64();
    println!(
        "{name:<8} {rps:>12.0} {:>9.3} {:>9.3} {:>9.3} {:>8}",
        percentile(&o.latencies_us, 0.50),
        percentile(&o.latencies_us, 0.99),
        percentile(&o.latencies_us, 0.999),
        o.errors
    );
    rps
}

async fn run(o: Options, pinned: bool) {
    let upstream = upstream(o.body_size).await;
    let mock = MockEgain::start(([127, 0, 0, 1], 0).into(), MockOptions::default())
        .await
        .expect("mock eGain");
    let tls_dir = std::env::temp_dir().join(format!("egain-proxy-load-tls-{}", std::process::id()));
    let tls_upstream = if o.tls_pool > 0 {
        Some(holding_upstream(&tls_dir).await)
    } else {
        None
    };
    let proxy = start_proxy(&mock, upstream, tls_upstream.as_ref(), pinned).await;
    println!(
        "load bench: {} connections, {}s, {}-byte responses, {}, {}",
        o.connections,
        o.duration.as_secs(),
        o.body_size,
        if o.h2 {
            "h2c client->proxy"
        } else {
            "HTTP/1.1"
        },
        if pinned {
            "proxy on CPU 0, upstream+load generator on CPU 1"
        } else {
            "no CPU pinning"
        }
    );
    println!(
        "{:<8} {:>12} {:>9} {:>9} {:>9} {:>8}",
        "target", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "errors"
    );
    // Direct is run without the proxy in the way but also without h2 when the upstream is h1.
    let direct_opts = Options {
        h2: false,
        ..o.clone()
    };
    let direct = report("direct", &load(upstream, &direct_opts).await);
    let tokens_before = mock.token_requests();
    let proxied = report("proxy", &load(proxy.addr, &o).await);
    println!("ratio proxy/direct: {:.3}", proxied / direct);
    println!(
        "token requests during the proxy run: {}",
        mock.token_requests() - tokens_before
    );
    println!(
        "proxy peak RSS: {:.1} MiB",
        proxy.rss_kib("VmHWM:") as f64 / 1024.0
    );

    if o.idle > 0 {
        let mut held = Vec::new();
        for _ in 0..o.idle {
            let Ok(stream) = TcpStream::connect(proxy.addr).await else {
                break;
            };
            let Ok((mut send, conn)) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
            else {
                break;
            };
            tokio::spawn(conn);
            let req = http::Request::builder()
                .uri("/idle")
                .header("host", "bench")
                .body(Empty::<Bytes>::new())
                .expect("request");
            if let Ok(res) = send.send_request(req).await {
                let _ = res.into_body().collect().await;
            }
            held.push(send);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        println!(
            "with {} idle keep-alive connections open: proxy RSS {:.1} MiB (peak {:.1} MiB)",
            held.len(),
            proxy.rss_kib("VmRSS:") as f64 / 1024.0,
            proxy.rss_kib("VmHWM:") as f64 / 1024.0
        );
        drop(held);
    }

    if let Some(tls) = &tls_upstream {
        hold_on_tls(&proxy, tls, o.tls_pool).await;
        let _ = std::fs::remove_dir_all(&tls_dir);
    }

    if o.upload_mib > 0 {
        let (before, peak_before) = (proxy.rss_kib("VmRSS:"), proxy.rss_kib("VmHWM:"));
        let chunk = Bytes::from(vec![7u8; 1024 * 1024]);
        let total = o.upload_mib;
        let stream = futures_util::stream::iter(
            (0..total).map(move |_| Ok::<_, Infallible>(http_body::Frame::data(chunk.clone()))),
        );
        let stream_io = TcpStream::connect(proxy.addr).await.expect("connect");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream_io))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method("PUT")
            .uri("/upload")
            .header("host", "bench")
            .header("content-length", (total * 1024 * 1024).to_string())
            .body(StreamBody::new(stream))
            .expect("request");
        let t = Instant::now();
        let res = send.send_request(req).await.expect("upload");
        let status = res.status();
        let elapsed = t.elapsed();
        println!(
            "{} MiB streamed upload: HTTP {status} in {:.1}s ({:.0} MiB/s); proxy RSS {:.1} -> {:.1} MiB, peak {:.1} -> {:.1} MiB",
            total,
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64(),
            before as f64 / 1024.0,
            proxy.rss_kib("VmRSS:") as f64 / 1024.0,
            peak_before as f64 / 1024.0,
            proxy.rss_kib("VmHWM:") as f64 / 1024.0,
        );
    }
}

/// `n` client connections, each with a request the HTTPS upstream holds: the proxy has `n` TLS
/// connections to it open at once. Reports the proxy's RSS while they are held and after they
/// are answered (the client connections still open, the TLS connections back in the pool).
async fn hold_on_tls(proxy: &ProxyProcess, tls: &HoldingUpstream, n: usize) {
    use std::sync::atomic::Ordering;
    let request = |path: &'static str| {
        http::Request::builder()
            .uri(path)
            .header("host", "bench")
            .body(Empty::<Bytes>::new())
            .expect("request")
    };
    // The first answer tells the proxy the upstream speaks HTTP/1.1 (its fast path then
    // keeps TLS connections of its own).
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let warm = send
        .send_request(request("/tls/warm"))
        .await
        .expect("warm-up");
    assert_eq!(
        warm.status(),
        200,
        "the HTTPS upstream did not answer through the proxy"
    );
    let base = (proxy.rss_kib("VmRSS:"), proxy.rss_kib("VmHWM:"));
    let mut senders = Vec::new();
    let mut waiting = Vec::new();
    for _ in 0..n {
        let stream = TcpStream::connect(proxy.addr).await.expect("connect");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let answer = send.send_request(request("/tls/hold"));
        waiting.push(tokio::spawn(answer));
        senders.push(send);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while tls.arrived.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} requests reached the upstream",
            tls.arrived.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = proxy.rss_kib("VmRSS:");
    let _ = tls.release.send(true);
    let mut ok = 0;
    for w in waiting {
        if let Ok(Ok(r)) = w.await {
            ok += usize::from(r.status() == 200);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!(
        "{n} requests held on {n} TLS upstream connections: proxy RSS {:.1} -> {:.1} MiB \
         ({:.1} KiB per client + TLS upstream connection pair); after {ok} answers, with the \
         client connections open and the TLS connections back in the pool: {:.1} MiB (peak {:.1}, \
         {:.1} before)",
        base.0 as f64 / 1024.0,
        held as f64 / 1024.0,
        held.saturating_sub(base.0) as f64 / n as f64,
        proxy.rss_kib("VmRSS:") as f64 / 1024.0,
        proxy.rss_kib("VmHWM:") as f64 / 1024.0,
        base.1 as f64 / 1024.0,
    );
    drop(senders);
}
