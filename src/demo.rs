//! `egain-proxy demo`: the embedded mock eGain plus a proxy in front of it, configured from a
//! TOML text like any user's.

use crate::mock::{self, MockEgain};

/// The demo's `proxy.toml`, pointing at `mock`.
pub fn config_text(mock: &MockEgain, port: u16) -> String {
    let o = mock.options();
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "5s"

[admin]
listen = "127.0.0.1:0"

[log]
level = "info"

[profiles.portal]
kind = "client_app"
token_url = "{token_url}"
client_id = "{app_id}"
client_secret = "{app_secret}"
scopes = ["knowledge.portalmgr.manage"]
egress_proxy = "none"              # all loopback: never through a corporate HTTPS_PROXY

[profiles.customer]
kind = "anonymous_customer"
tenant = "{tenant}"
token_url = "{anon_url}"
client_id = "{anon_id}"
client_secret = "{anon_secret}"
scopes = ["knowledge.portalmgr.read"]
egress_proxy = "none"

[[routes]]
name = "portal"
path_prefix = "/knowledge/"
upstream = "{base}"
profile = "portal"
egress_proxy = "none"

[[routes]]
name = "customer"
path_prefix = "/customer/"
strip_prefix = true
upstream = "{base}"
profile = "customer"
egress_proxy = "none"
"#,
        token_url = mock.client_app_token_url(),
        anon_url = mock.anonymous_token_url(),
        tenant = o.tenant,
        app_id = o.client_app.0,
        app_secret = o.client_app.1,
        anon_id = o.anonymous.0,
        anon_secret = o.anonymous.1,
        base = mock.base_url(),
    )
}

pub fn banner(
    proxy: std::net::SocketAddr,
    admin: Option<std::net::SocketAddr>,
    mock: &MockEgain,
) -> String {
    let mut out = format!(
        "\negain-proxy demo: mock eGain on {mock_addr}, proxy on http://{proxy}\n\
         Try these (the proxy adds the bearer token; the mock API rejects requests without one):\n\n\
         \x20 curl -s http://{proxy}/knowledge/portalmgr/v4/portals\n\
         \x20 curl -s 'http://{proxy}/customer/knowledge/portalmgr/v4/articles/search?q=reset%20password'\n\
         \x20 curl -s -X POST -H 'content-type: application/json' -d '{{\"q\":\"hi\"}}' http://{proxy}/knowledge/contentmgr/v4/articles   # 403 403-197: the portal profile lacks a contentmgr scope\n\
         \x20 curl -s http://{proxy}/nowhere          # 404 no_route from the proxy itself\n\
         \x20 curl -s {mock_base}/knowledge/portalmgr/v4/portals   # straight to the mock: 401, no token\n",
        mock_addr = mock.addr(),
        mock_base = mock.base_url(),
    );
    if let Some(admin) = admin {
        out.push_str(&format!(
            "\x20 curl -s http://{admin}/status\n\x20 curl -s http://{admin}/metrics\n\n\
             Admin page (token state, routes, latency): open http://{admin}/ in a browser\n"
        ));
    }
    out.push_str(&format!(
        "\nMock credentials: client app {} / {}, anonymous {} / {}, tenant {}.\nCtrl-C stops.\n",
        mock::DEMO_CLIENT_ID,
        mock::DEMO_CLIENT_SECRET,
        mock::DEMO_ANON_CLIENT_ID,
        mock::DEMO_ANON_CLIENT_SECRET,
        mock::DEMO_TENANT
    ));
    out
}
