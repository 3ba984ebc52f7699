//! Criterion micro-benchmarks of the per-request hot path: route matching, header rewriting
//! (hyper's header map, and the HTTP/1.1 fast path's in-place version), and token holder reads
//! under a concurrent writer.
//!
//!   cargo bench --bench micro

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use egain_proxy::config::{ClientAuth, Config, ProfileKind, Secret, TokenSettings};
use egain_proxy::metrics::Metrics;
use egain_proxy::routes::RouteTable;
use egain_proxy::token::{AccessToken, TokenHolder};
use http::{HeaderMap, HeaderValue, Method};

fn table(n: usize) -> RouteTable {
    let mut text = String::from(
        "[profiles.p]\nkind = \"client_app\"\ntoken_url = \"http://127.0.0.1:1/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n",
    );
    for i in 0..n {
        text.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\npath_prefix = \"/api{i}/v4/\"\nupstream = \"http://127.0.0.1:1\"\nprofile = \"p\"\n"
        ));
    }
    let config = Config::parse(&text, std::path::Path::new("."), &|_| None).expect("bench config");
    RouteTable::new(&config.routes)
}

fn route_matching(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_match");
    for n in [1usize, 10, 100] {
        let t = table(n);
        // The worst case for first-match: the last route.
        let path = format!("/api{}/v4/portals/PROD-1000/articles", n - 1);
        group.bench_with_input(BenchmarkId::new("last_of", n), &path, |b, path| {
            b.iter(|| {
                black_box(
                    t.find(&Method::GET, Some("127.0.0.1:8080"), black_box(path))
                        .is_some(),
                )
            })
        });
        group.bench_with_input(BenchmarkId::new("miss_of", n), &"/nowhere/x", |b, path| {
            b.iter(|| black_box(t.find(&Method::GET, None, black_box(path)).is_none()))
        });
    }
    group.finish();
}

fn typical_request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "127.0.0.1:8080"),
        ("user-agent", "legacy-app/1.0"),
        ("accept", "application/json"),
        ("accept-language", "en-US"),
        ("connection", "keep-alive"),
        ("authorization", "Basic dXNlcjpwYXNz"),
        ("x-forwarded-for", "203.0.113.9"),
        ("content-type", "application/json"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h
}

/// hyper's path: the plan's fields onto a HeaderMap from the client's.
fn header_rewriting(c: &mut Criterion) {
    let template = typical_request_headers();
    let t = table(1);
    let route = t
        .find(&Method::GET, None, "/api0/v4/portals")
        .expect("route")
        .1;
    c.bench_function("rewrite_request_headers", |b| {
        b.iter(|| {
            let request_id = egain_proxy::http::request_id(&template);
            let plan = egain_proxy::pipeline::plan::Plan {
                route,
                conn: egain_proxy::pipeline::ConnInfo {
                    peer: ([127, 0, 0, 1], 50000).into(),
                    tls: false,
                },
                request_id: &request_id,
                key_header: None,
            };
            let host = template.get(http::header::HOST);
            black_box(plan.encode_headers(black_box(&template), host, None))
        })
    });
}

/// The fast path's version of the same work, from raw bytes: parse the head, take a request
/// id, write the upstream request head with the token.
fn h1_head_rewriting(c: &mut Criterion) {
    let raw = b"GET /api0/v4/portals/PROD-1000/articles?lang=en HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: legacy-app/1.0\r\nAccept: application/json\r\nAccept-Language: en-US\r\nConnection: keep-alive\r\nAuthorization: Basic dXNlcjpwYXNz\r\nX-Forwarded-For: 203.0.113.9\r\nContent-Type: application/json\r\n\r\n";
    let t = table(1);
    let route = t
        .find(&Method::GET, None, "/api0/v4/portals")
        .expect("route")
        .1;
    let token = AccessToken::new(
        "eyJhbGciOiJSUzI1NiJ9.a-typical-token-of-some-length.signature",
        Duration::from_secs(3600),
        Instant::now(),
        None,
    )
    .expect("token");
    let mut out = Vec::with_capacity(1024);
    c.bench_function("h1_parse_and_rewrite_head", |b| {
        b.iter(|| {
            black_box(egain_proxy::transport::h1::rewrite_head(
                black_box(raw),
                route,
                Some(&token),
                &mut out,
            ))
        })
    });
}

fn settings() -> TokenSettings {
    TokenSettings {
        kind: ProfileKind::ClientApp,
        token_url: "http://127.0.0.1:1/t".into(),
        client_id: "i".into(),
        client_secret: egain_proxy::config::secrets::ClientSecret::Inline(Secret::new("s")),
        scopes: vec![],
        client_auth: ClientAuth::Body,
        timeout: Duration::from_secs(1),
        ca_file: None,
        extra_params: vec![],
        extra_headers: vec![],
        default_ttl: Duration::from_secs(300),
        egress: None,
    }
}

fn token_reads(c: &mut Criterion) {
    let holder =
        TokenHolder::new(settings(), vec!["p".into()], Arc::new(Metrics::new())).expect("holder");
    let token = |n: u64| {
        AccessToken::new(
            &format!("token-{n}"),
            Duration::from_secs(3600),
            Instant::now(),
            None,
        )
        .expect("token")
    };
    holder.install(token(0));
    let mut group = c.benchmark_group("token_read_while_swapping");
    for threads in [1usize, 2, 8] {
        group.bench_function(BenchmarkId::from_parameter(threads), |b| {
            b.iter_custom(|iters| {
                let stop = Arc::new(AtomicBool::new(false));
                let writer = {
                    let (holder, stop) = (Arc::clone(&holder), Arc::clone(&stop));
                    std::thread::spawn(move || {
                        let mut n = 1;
                        while !stop.load(Ordering::Relaxed) {
                            holder.install(token(n));
                            n += 1;
                            std::thread::sleep(Duration::from_micros(50));
                        }
                    })
                };
                let per_thread = iters.div_ceil(threads as u64);
                let started = Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..threads {
                        s.spawn(|| {
                            for _ in 0..per_thread {
                                black_box(holder.usable().is_some());
                            }
                        });
                    }
                });
                let elapsed = started.elapsed();
                stop.store(true, Ordering::Relaxed);
                let _ = writer.join();
                // Time per read as seen by one thread (all threads read at once).
                elapsed
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    route_matching,
    header_rewriting,
    h1_head_rewriting,
    token_reads
);
criterion_main!(benches);
