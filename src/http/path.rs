//! Request-target validation: nothing may escape its route's prefix.
//!
//! A path is refused when any of its segments is `.` or `..`, literally or percent-encoded
//! (`%2e%2e`), including when an encoded slash or backslash (`%2f`, `%5c`) hides the segment
//! boundary (`/a/..%2fetc`), and through double encoding (`%252e`): upstream servers and
//! frameworks differ in how many times and where they decode, so the proxy refuses anything
//! that any of them could read as a dot segment (RFC 3986 §3.3, §5.2.4). A segment is read
//! the way the laxest common server reads it: up to its first `;` (Java servlet containers
//! drop path parameters before normalising, so `/base/..;/x` is `/x` to Tomcat) and without
//! trailing spaces or tabs (Windows drops them); IIS's `%u002e` and overlong UTF-8
//! (`%c0%ae`), which old servers decode to `.` or `/`, are refused outright.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

/// Why a path was refused; shown to the client in the 400 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotOriginForm,
    DotSegment,
    EncodedNul,
    /// `%uXXXX` or an overlong UTF-8 sequence: an encoding only a lax decoder reads, and
    /// then possibly as `.` or `/`.
    LaxEncoding,
}

impl PathError {
    pub fn message(self) -> &'static str {
        match self {
            PathError::NotOriginForm => "the request target must be a path starting with /",
            PathError::DotSegment => {
                "the path contains a . or .. segment (also when percent-encoded)"
            }
            PathError::EncodedNul => "the path contains an encoded NUL byte",
            PathError::LaxEncoding => "the path contains a %u escape or an overlong UTF-8 sequence",
        }
    }
}

/// How many rounds of percent-decoding are inspected (plain, encoded, double-encoded).
const DECODE_ROUNDS: usize = 3;

pub fn validate(path: &str) -> Result<(), PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    let mut current: Cow<'_, str> = Cow::Borrowed(path);
    for _ in 0..DECODE_ROUNDS {
        if has_dot_segment(&current) {
            return Err(PathError::DotSegment);
        }
        if !current.contains('%') {
            return Ok(());
        }
        if current
            .as_bytes()
            .windows(2)
            .any(|w| w[0] == b'%' && w[1].eq_ignore_ascii_case(&b'u'))
        {
            return Err(PathError::LaxEncoding);
        }
        let decoded = percent_decode_str(&current).collect::<Vec<u8>>();
        if decoded.contains(&0) {
            return Err(PathError::EncodedNul);
        }
        if overlong(&decoded) {
            return Err(PathError::LaxEncoding);
        }
        let next = String::from_utf8_lossy(&decoded).into_owned();
        if next == *current {
            return Ok(());
        }
        current = Cow::Owned(next);
    }
    if has_dot_segment(&current) {
        return Err(PathError::DotSegment);
    }
    Ok(())
}

/// True when a `/`- or `\\`-separated segment is `.` or `..` as a lax server reads it: up to
/// its first `;` (path parameters), `?` or `#` (a server that decodes, then splits), without
/// whitespace or control characters around it (`trim()` in Java, Python, .NET), and with
/// fullwidth dots (`．`, which NFKC and IIS's best-fit mapping make `.`) as dots.
pub fn has_dot_segment(path: &str) -> bool {
    path.split(['/', '\\']).any(|segment| {
        let name = segment.split([';', '?', '#']).next().unwrap_or(segment);
        let name = name.trim_matches(|c: char| c.is_whitespace() || c.is_control());
        let mut dots = 0;
        for c in name.chars() {
            if c != '.' && c != '\u{FF0E}' {
                return false;
            }
            dots += 1;
        }
        dots == 1 || dots == 2
    })
}

/// The start of an overlong UTF-8 sequence (RFC 3629 §3 forbids them): `C0`/`C1`, `E0`
/// before `80`–`9F`, `F0` before `80`–`8F`. The only way to spell `.` or `/` in more than
/// one byte.
fn overlong(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|w| {
        matches!(
            w,
            [0xC0 | 0xC1, _] | [0xE0, 0x80..=0x9F] | [0xF0, 0x80..=0x8F]
        )
    }) || matches!(bytes.last(), Some(0xC0 | 0xC1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_dot_segments_in_every_spelling() {
        for bad in [
            "/a/../b",
            "/a/./b",
            "/..",
            "/a/..",
            "/a/%2e%2e/b",
            "/a/%2E%2e",
            "/a/.%2e/b",
            "/a/..%2fetc",
            "/a/..%2Fetc",
            "/a/%2e%2e%2fetc",
            "/a/..%5cetc",
            "/a\\..\\b",
            "/a/%252e%252e/b",
            "/a/%25252e%25252e/b",
            "/a/..;/b",
            "/a/.;/b",
            "/a/..;jsessionid=x/b",
            "/a/%2e%2e;/b",
            "/a/..%3b/b",
            "/a/..%20/b",
            "/a/..%09/b",
            "/a/.. ",
            "/a/..%0a/b",
            "/a/%20../b",
            "/a/..%c2%a0/b",
            "/a/..%e3%80%80/b",
            "/a/%ef%bc%8e%ef%bc%8e/b",
            "/a/.%ef%bc%8e/b",
            "/a/..%3f/b",
            "/a/..%23/b",
        ] {
            assert_eq!(validate(bad), Err(PathError::DotSegment), "{bad}");
        }
        assert_eq!(validate("*"), Err(PathError::NotOriginForm));
        assert_eq!(validate("/a%00b"), Err(PathError::EncodedNul));
        for lax in [
            "/a/%u002e%u002e/b",
            "/a/%U002E",
            "/a/%u",
            "/a/%c0%ae%c0%ae/b",
            "/a/%c0%af",
            "/a/%e0%80%ae",
            "/a/%f0%80%80%ae",
            "/a/%25c0%25ae",
        ] {
            assert_eq!(validate(lax), Err(PathError::LaxEncoding), "{lax}");
        }
    }

    #[test]
    fn accepts_ordinary_paths() {
        for good in [
            "/",
            "/a/b",
            "/a/...",
            "/a/.b",
            "/a/b.",
            "/a/%20x",
            "/a/%2fb",
            "/%e2%82%ac",
            "/a/..b",
            "/%zz",
            "/a;v=1/b",
            "/a/;/b",
            "/a/...;x",
            "/a/%c3%a9",
            "/a/%e2%80%ae",
            "/a/%f0%9f%98%80",
        ] {
            assert_eq!(validate(good), Ok(()), "{good}");
        }
    }
}
