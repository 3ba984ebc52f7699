//! One logical request, every transport: the upstream must see the same head (but for what
//! names the transport itself: the proxy's address, `X-Forwarded-Proto` on TLS, the token's
//! value) and the client the same answer (contract §9).

mod support;

use support::transport::{On, TRANSPORTS};
use support::*;

/// What one transport made of the requests: per request, the upstream's view (method,
/// target, sorted fields, body) and the client's (status, content type, body).
type Observed = Vec<(
    Option<(String, String, Vec<(String, String)>, Vec<u8>)>,
    (u16, String, String),
)>;

async fn observe(on: &On) -> Observed {
    let tokens = TokenServer::healthy(3600).await;
    let upstream = Upstream::with(|seen| {
        let body = format!("{{\"saw\":\"{} {}\"}}", seen.method, seen.target);
        json_response(
            if seen.target.starts_with("/v4/created") {
                201
            } else {
                200
            },
            &body,
            &[("x-upstream", "1".into())],
        )
    })
    .await;
    let proxy = on
        .proxy(&format!(
            "{}{}{}",
            client_app_profile("p", &tokens, ""),
            route(
                "api",
                "/api",
                &format!("{}/v4", upstream.url()),
                "p",
                "strip_prefix = true\nset_headers = { \"x-team\" = \"blue\" }\nremove_headers = [\"cookie\"]",
            ),
            route("open", "/open", &upstream.url(), "none", "methods = [\"GET\"]"),
        ))
        .await;
    proxy.ready().await;
    let client = on.client();
    let big: Vec<u8> = (0..60 * 1024).map(|i| (i % 251) as u8).collect();
    let requests = vec![
        client
            .get(on.url(&proxy, "/api/portals/1?b=2&a=%20x"))
            .header("authorization", "Basic c2VjcmV0")
            .header("x-forwarded-for", "203.0.113.9")
            .header("cookie", "s=1")
            .header("x-team", "red")
            .header("accept", "application/json"),
        client
            .post(on.url(&proxy, "/api/created"))
            .header("content-type", "application/json")
            .body("{\"a\":1}"),
        client.put(on.url(&proxy, "/api/big")).body(big),
        client.get(on.url(&proxy, "/open/x")),
        client.post(on.url(&proxy, "/open/x")),
        client.get(on.url(&proxy, "/nowhere")),
        client.delete(on.url(&proxy, "/api/gone")),
    ];
    let mut observed = Vec::new();
    for (i, request) in requests.into_iter().enumerate() {
        let before = upstream.seen().len();
        let response = request
            .header("x-request-id", format!("rid-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), on.version());
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = response.text().await.unwrap();
        let seen = upstream.seen();
        assert!(seen.len() <= before + 1);
        let upstream_view = seen.get(before).map(|s| {
            let proxy_addr = proxy.addr.to_string();
            let mut fields: Vec<(String, String)> = s
                .headers
                .iter()
                .map(|(n, v)| {
                    let v = v
                        .to_str()
                        .unwrap_or("<bytes>")
                        .replace(&proxy_addr, "PROXY")
                        .replace(&upstream.addr.to_string(), "UPSTREAM");
                    let v = match n.as_str() {
                        "authorization" if tokens.is_live(Some(&v)) => "Bearer <live>".into(),
                        "x-forwarded-proto" if v == on.proto() => "<transport's>".into(),
                        _ => v,
                    };
                    (n.to_string(), v)
                })
                .collect();
            fields.sort();
            (s.method.clone(), s.target.clone(), fields, s.body.to_vec())
        });
        observed.push((upstream_view, (status, content_type, body)));
    }
    observed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transport_gives_the_upstream_the_same_head_and_the_client_the_same_answer() {
    let reference = observe(&On::new(TRANSPORTS[0])).await;
    // A sanity check of the reference itself: the rules were applied.
    let (first, answer) = &reference[0];
    let (_, target, fields, _) = first.as_ref().expect("forwarded");
    assert_eq!(target, "/v4/portals/1?b=2&a=%20x");
    assert!(
        fields.contains(&("authorization".into(), "Bearer <live>".into())),
        "{fields:?}"
    );
    assert!(
        fields.contains(&("x-team".into(), "blue".into())),
        "{fields:?}"
    );
    assert!(fields.contains(&("x-forwarded-for".into(), "203.0.113.9, 127.0.0.1".into())));
    assert!(!fields.iter().any(|(n, _)| n == "cookie"), "{fields:?}");
    assert_eq!(answer.0, 200);
    assert_eq!(reference[4].1 .0, 404, "{:?}", reference[4]);
    assert_eq!(reference[5].1 .0, 404);
    for transport in &TRANSPORTS[1..] {
        let observed = observe(&On::new(*transport)).await;
        assert_eq!(observed.len(), reference.len());
        for (i, (got, want)) in observed.iter().zip(&reference).enumerate() {
            assert_eq!(
                got.0, want.0,
                "{transport:?}, request {i}: what the upstream saw"
            );
            assert_eq!(
                got.1, want.1,
                "{transport:?}, request {i}: what the client got"
            );
        }
    }
}
