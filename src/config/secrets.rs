//! `${VAR}` / `${VAR:-default}` interpolation, `*_file` secrets, and a `Secret` type that never
//! prints.

use std::fmt;

use sha2::{Digest, Sha256};

/// A credential (client secret, API key). `Debug` and `Display` print `[redacted]`, so a secret
/// can sit in any struct that derives `Debug` without reaching a log line by accident.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The only way to read the value; grep for it when auditing where secrets go.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A client secret: written in the config, or kept in a file that is read again before every
/// token request, so a rotated secret (Kubernetes and Vault agents swap a `..data` symlink)
/// is used from the next request on, without a reload. Two profiles with the same file are
/// the same secret, whatever the file holds now.
#[derive(Clone)]
pub enum ClientSecret {
    Inline(Secret),
    File {
        path: std::path::PathBuf,
        current: std::sync::Arc<arc_swap::ArcSwap<Secret>>,
    },
}

impl ClientSecret {
    /// Reads `path` now (the config's check: a missing or empty file is an error).
    pub fn from_file(path: std::path::PathBuf) -> Result<ClientSecret, String> {
        let secret = read_secret_file(&path)?;
        Ok(ClientSecret::File {
            path,
            current: std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(secret)),
        })
    }

    /// The secret as last read.
    pub fn current(&self) -> Secret {
        match self {
            ClientSecret::Inline(s) => s.clone(),
            ClientSecret::File { current, .. } => (**current.load()).clone(),
        }
    }

    /// The file now holds another secret than the one in use (read quietly: a file that
    /// cannot be read says nothing). Always false for an inline secret.
    pub fn changed_on_disk(&self) -> bool {
        let ClientSecret::File { path, current } = self else {
            return false;
        };
        read_secret_file(path).is_ok_and(|fresh| fresh != **current.load())
    }

    /// Reads the file again (following symlinks, so a `..data` swap is seen). Returns true
    /// when the secret changed. A file that cannot be read (mid-swap, removed) keeps the last
    /// secret, with a warning.
    pub fn reread(&self) -> bool {
        let ClientSecret::File { path, current } = self else {
            return false;
        };
        match read_secret_file(path) {
            Ok(fresh) if fresh != **current.load() => {
                tracing::info!(
                    file = %path.display(),
                    secret = %fingerprint(fresh.expose().as_bytes()),
                    "client secret file changed: using the new secret from this token request on"
                );
                current.store(std::sync::Arc::new(fresh));
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the client secret file; keeping the last secret");
                false
            }
        }
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientSecret::Inline(_) => f.write_str("ClientSecret([redacted])"),
            ClientSecret::File { path, .. } => write!(f, "ClientSecret(file {})", path.display()),
        }
    }
}

impl PartialEq for ClientSecret {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ClientSecret::Inline(a), ClientSecret::Inline(b)) => a == b,
            (ClientSecret::File { path: a, .. }, ClientSecret::File { path: b, .. }) => a == b,
            _ => false,
        }
    }
}

impl Eq for ClientSecret {}

impl std::hash::Hash for ClientSecret {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match self {
            ClientSecret::Inline(s) => s.hash(state),
            ClientSecret::File { path, .. } => path.hash(state),
        }
    }
}

/// First 8 hex characters of the SHA-256 of `value`: enough to tell two tokens apart in logs,
/// useless for reconstructing either.
pub fn fingerprint(value: &[u8]) -> String {
    let digest = Sha256::digest(value);
    let mut out = String::with_capacity(8);
    for byte in &digest[..4] {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// Expands `${VAR}` and `${VAR:-default}` in `input` from `lookup`. `$$` is a literal `$`.
/// An unset variable without a default is an error naming it.
///
/// ```
/// use egain_proxy::config::secrets::interpolate;
/// let env = |name: &str| (name == "TENANT").then(|| "T1".to_owned());
/// assert_eq!(interpolate("https://x/${TENANT}-U/${PORT:-443}", &env).unwrap(), "https://x/T1-U/443");
/// assert!(interpolate("${SECRET}", &env).unwrap_err().contains("SECRET is not set"));
/// ```
pub fn interpolate(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if !input.contains('$') {
        return Ok(input.to_owned());
    }
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unterminated `${{` in {input:?}"))?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (expr, None),
            };
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("invalid variable name {name:?} in `${{{expr}}}`"));
            }
            match (lookup(name), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err(format!("environment variable {name} is not set"));
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Reads a secret file, dropping one trailing newline (as written by `echo` or most secret
/// stores) but nothing else: a secret may legitimately contain spaces.
pub fn read_secret_file(path: &std::path::Path) -> Result<Secret, String> {
    let raw = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let value = raw
        .strip_suffix("\r\n")
        .or_else(|| raw.strip_suffix('\n'))
        .unwrap_or(&raw);
    if value.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Secret::new(value))
}

/// A 32-byte key file (`[token_cache] encryption_key_file`): exactly 32 bytes are the raw key;
/// anything else is base64 (surrounding whitespace ignored) that must decode to 32 bytes.
/// Errors never quote the file's content.
pub fn read_key_file(path: &std::path::Path) -> Result<[u8; 32], String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) {
        return Ok(key);
    }
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use base64::Engine;
    let text = String::from_utf8_lossy(&bytes);
    let text = text.trim();
    // Base64 as tools write it: padded or not, the standard alphabet or the URL-safe one.
    let decoded = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
        .ok_or_else(|| {
            format!(
                "{} holds {} bytes: neither a raw 32-byte key nor base64 \
                 (make one with `head -c 32 /dev/urandom | base64`)",
                path.display(),
                bytes.len()
            )
        })?;
    if decoded.len() != 32 && text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{} holds 64 hex digits; the key file takes base64 (`openssl rand -base64 32`) or 32 raw bytes",
            path.display()
        ));
    }
    <[u8; 32]>::try_from(decoded.as_slice()).map_err(|_| {
        format!(
            "{} decodes to {} bytes; the key must be 32 bytes \
             (make one with `head -c 32 /dev/urandom | base64`)",
            path.display(),
            decoded.len()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "A" => Some("alpha".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_and_defaults() {
        assert_eq!(interpolate("x${A}y", &env).unwrap(), "xalphay");
        assert_eq!(interpolate("${B:-dflt}", &env).unwrap(), "dflt");
        assert_eq!(interpolate("${A:-dflt}", &env).unwrap(), "alpha");
        assert_eq!(interpolate("${EMPTY:-d}", &env).unwrap(), "");
        assert_eq!(interpolate("$$ {A} $x", &env).unwrap(), "$ {A} $x");
    }

    #[test]
    fn unset_variable_is_named() {
        let err = interpolate("${EGAIN_SECRET}", &env).unwrap_err();
        assert_eq!(err, "environment variable EGAIN_SECRET is not set");
        assert!(interpolate("${A", &env).is_err());
        assert!(interpolate("${A B}", &env).is_err());
    }

    #[test]
    fn key_files_are_raw_32_bytes_or_base64_of_32() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, [7u8; 32]).unwrap();
        assert_eq!(read_key_file(&path).unwrap(), [7u8; 32]);
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        std::fs::write(&path, format!("  {b64}\n")).unwrap();
        assert_eq!(read_key_file(&path).unwrap(), [9u8; 32]);
        // Unpadded and URL-safe, as other tools write it.
        let key: Vec<u8> = (0..32).map(|i| (i * 8 + 250) as u8).collect();
        for engine in [
            base64::engine::general_purpose::STANDARD_NO_PAD,
            base64::engine::general_purpose::URL_SAFE,
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ] {
            std::fs::write(&path, engine.encode(&key)).unwrap();
            assert_eq!(read_key_file(&path).unwrap().to_vec(), key);
        }
        std::fs::write(&path, "ab".repeat(32)).unwrap();
        assert!(read_key_file(&path).unwrap_err().contains("64 hex digits"));
        std::fs::write(&path, "not base64 at all, and a secret-looking value").unwrap();
        let err = read_key_file(&path).unwrap_err();
        assert!(
            err.contains("neither a raw 32-byte key nor base64"),
            "{err}"
        );
        assert!(!err.contains("secret-looking"), "{err}");
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        std::fs::write(&path, short).unwrap();
        assert!(read_key_file(&path)
            .unwrap_err()
            .contains("decodes to 16 bytes"));
        assert!(read_key_file(&dir.path().join("missing"))
            .unwrap_err()
            .contains("cannot read"));
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        assert_eq!(fingerprint(b"abc"), "ba7816bf");
    }
}
