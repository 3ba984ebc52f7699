//! Request-target validation: nothing may escape its route's prefix.
//!
//! A path is refused when any of its segments is `.` or `..`, literally or percent-encoded
//! (`%2e%2e`), including when an encoded slash or backslash (`%2f`, `%5c`) hides the segment
//! boundary (`/a/..%2fetc`), and through double encoding (`%252e`): upstream servers and
//! frameworks differ in how many times and where they decode, so the proxy refuses anything
//! that any of them could read as a dot segment (RFC 3986 §3.3, §5.2.4).

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

/// Why a path was refused; shown to the client in the 400 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotOriginForm,
    DotSegment,
    EncodedNul,
}

impl PathError {
    pub fn message(self) -> &'static str {
        match self {
            PathError::NotOriginForm => "the request target must be a path starting with /",
            PathError::DotSegment => {
                "the path contains a . or .. segment (also when percent-encoded)"
            }
            PathError::EncodedNul => "the path contains an encoded NUL byte",
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
        let decoded = percent_decode_str(&current).collect::<Vec<u8>>();
        if decoded.contains(&0) {
            return Err(PathError::EncodedNul);
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

/// True when a `/`- or `\`-separated segment is exactly `.` or `..`.
pub fn has_dot_segment(path: &str) -> bool {
    path.split(['/', '\\']).any(|seg| seg == "." || seg == "..")
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
        ] {
            assert_eq!(validate(bad), Err(PathError::DotSegment), "{bad}");
        }
        assert_eq!(validate("*"), Err(PathError::NotOriginForm));
        assert_eq!(validate("/a%00b"), Err(PathError::EncodedNul));
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
        ] {
            assert_eq!(validate(good), Ok(()), "{good}");
        }
    }
}
