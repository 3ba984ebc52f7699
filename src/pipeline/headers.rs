//! The response side of the field rules on a `HeaderMap` (hyper's client): hop-by-hop fields
//! and those the upstream's `Connection` names do not reach the client
//! (`plan::response_field_passes`, which the fast path applies to raw bytes).

use http::header::{self, HeaderMap, HeaderName};

use super::plan::response_field_passes;

/// Removes what of a response does not pass to the client.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named = |name: &[u8]| {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| crate::http::list_items(v.as_bytes()))
            .any(|t| t.eq_ignore_ascii_case(name))
    };
    let gone: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let bytes = name.as_str().as_bytes();
            !response_field_passes(bytes, || named(bytes))
        })
        .cloned()
        .collect();
    for name in gone {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    #[test]
    fn removes_hop_by_hop_and_connection_listed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("close, X-Secret-Hop, Content-Length"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        h.insert("content-length", HeaderValue::from_static("2"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(h.contains_key("x-keep"));
        // Connection cannot take the framing away.
        assert!(h.contains_key("content-length"));
    }
}
