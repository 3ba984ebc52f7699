//! Inbound access control (`[server.access]`): a client-address allow-list and API keys.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName};
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AccessConfig;
use crate::error::ProxyError;

#[derive(Debug)]
pub struct Access {
    /// SHA-256 of each key: comparing fixed-size digests in constant time leaks neither the
    /// keys' contents nor their lengths through timing.
    key_digests: Vec<[u8; 32]>,
    header: HeaderName,
    allow: Vec<IpNet>,
}

impl Access {
    pub fn new(config: &AccessConfig) -> Self {
        Access {
            key_digests: config
                .api_keys
                .iter()
                .map(|k| Sha256::digest(k.expose().as_bytes()).into())
                .collect(),
            header: config.api_key_header.clone(),
            allow: config.allow.clone(),
        }
    }

    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// 403 when the address is not allowed, else 401 when a key is required and missing or
    /// wrong. The address is checked first, so an outsider learns nothing about keys.
    pub fn check(&self, client: IpAddr, headers: &HeaderMap) -> Result<(), ProxyError> {
        self.check_key(client, headers.get(&self.header).map(|v| v.as_bytes()))
    }

    /// As `check`, given the value of the API key header (if the request had one).
    pub fn check_key(&self, client: IpAddr, presented: Option<&[u8]>) -> Result<(), ProxyError> {
        if !self.allow.is_empty() {
            let client = client.to_canonical();
            if !self.allow.iter().any(|net| net.contains(&client)) {
                return Err(ProxyError::Forbidden);
            }
        }
        if self.key_digests.is_empty() {
            return Ok(());
        }
        let presented = presented.map(Sha256::digest);
        if let Some(presented) = presented {
            let mut ok = subtle::Choice::from(0u8);
            for key in &self.key_digests {
                ok |= key.ct_eq(presented.as_slice());
            }
            if bool::from(ok) {
                return Ok(());
            }
        }
        Err(ProxyError::ProxyAuthRequired(self.header.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn access(keys: &[&str], allow: &[&str]) -> Access {
        Access::new(&AccessConfig {
            api_keys: keys.iter().map(|k| Secret::new(*k)).collect(),
            api_key_header: HeaderName::from_static("x-proxy-key"),
            allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
        })
    }

    #[test]
    fn keys_and_allow_list() {
        let a = access(
            &["k1-aaaaaaaaaaaaaaaa", "k2-bbbbbbbbbbbbbbbb"],
            &["10.0.0.0/8"],
        );
        let mut h = HeaderMap::new();
        let inside: IpAddr = "10.1.2.3".parse().unwrap();
        let outside: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(matches!(a.check(outside, &h), Err(ProxyError::Forbidden)));
        assert!(matches!(
            a.check(inside, &h),
            Err(ProxyError::ProxyAuthRequired(_))
        ));
        h.insert("x-proxy-key", "wrong".parse().unwrap());
        assert!(matches!(
            a.check(inside, &h),
            Err(ProxyError::ProxyAuthRequired(_))
        ));
        h.insert("x-proxy-key", "k2-bbbbbbbbbbbbbbbb".parse().unwrap());
        assert!(a.check(inside, &h).is_ok());
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert!(a.check(mapped, &h).is_ok());
        assert!(access(&[], &["127.0.0.1/32"])
            .check("127.0.0.1".parse().unwrap(), &HeaderMap::new())
            .is_ok());
    }
}
