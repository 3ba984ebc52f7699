//! Response bodies on the HTTP/1.1 fast path: an incremental scanner for the chunked coding that finds where the
//! body ends while its bytes pass through unchanged.

pub use crate::http::{list_items, parse_length, Framing};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Scans a chunked body (RFC 9112 §7.1) as it streams by: how much of each piece belongs to
/// the body, and whether the last chunk and trailer section have been seen.
#[derive(Debug)]
pub struct ChunkedScanner {
    state: State,
    remaining: u64,
    digits: u8,
}

#[derive(Debug, thiserror::Error)]
#[error("malformed chunked body")]
pub struct ChunkError;

impl Default for ChunkedScanner {
    fn default() -> Self {
        ChunkedScanner {
            state: State::Size,
            remaining: 0,
            digits: 0,
        }
    }
}

impl ChunkedScanner {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes bytes of `input` up to the end of the body; returns how many belong to it
    /// (all of `input` unless the body ends inside it).
    pub fn scan(&mut self, input: &[u8]) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() && self.state != State::Done {
            let b = input[i];
            match self.state {
                State::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        // 15 hex digits: far beyond any real chunk, far from overflow.
                        if self.digits == 15 {
                            return Err(ChunkError);
                        }
                        self.digits += 1;
                        let d = (b as char).to_digit(16).unwrap_or(0);
                        self.remaining = self.remaining * 16 + u64::from(d);
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => self.state = State::Extension,
                    b'\r' if self.digits > 0 => self.state = State::SizeLf,
                    _ => return Err(ChunkError),
                },
                State::Extension => match b {
                    b'\r' => self.state = State::SizeLf,
                    _ if is_text(b) => {}
                    _ => return Err(ChunkError),
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.digits = 0;
                    self.state = if self.remaining == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let available = (input.len() - i) as u64;
                    let take = self.remaining.min(available);
                    self.remaining -= take;
                    i += take as usize;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr if b == b'\r' => self.state = State::DataLf,
                State::DataLf if b == b'\n' => self.state = State::Size,
                State::DataCr | State::DataLf => return Err(ChunkError),
                // The body passes to the client byte for byte, so it must be framed exactly:
                // CRLF only (a bare LF would end a line for a lenient client and not for us,
                // RFC 9112 §2.2, §11.2) and no control bytes in extensions or trailers.
                State::TrailerStart => {
                    self.state = match b {
                        b'\r' => State::EndLf,
                        _ if is_text(b) && b != b' ' && b != b'\t' => State::TrailerLine,
                        _ => return Err(ChunkError),
                    }
                }
                State::TrailerLine => match b {
                    b'\r' => self.state = State::TrailerLf,
                    _ if is_text(b) => {}
                    _ => return Err(ChunkError),
                },
                State::TrailerLf | State::EndLf if b != b'\n' => return Err(ChunkError),
                State::TrailerLf => self.state = State::TrailerStart,
                State::EndLf => self.state = State::Done,
                State::Done => break,
            }
            i += 1;
        }
        Ok(i)
    }
}

/// Visible ASCII, SP, HTAB and obs-text: what a field line or chunk extension may hold.
fn is_text(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

/// Appends `data` as one chunk of the chunked coding.
pub fn write_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Ends a response head for the client: the proxy's own framing field for what it will
/// send (`Content-Length`, or chunked for chunked and close-delimited bodies, so the client
/// connection can stay open), `connection: close` when it closes after, the blank line.
pub fn end_head(out: &mut Vec<u8>, framing: Framing, close: bool) {
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked | Framing::Close => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        Framing::Empty => {}
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chunked_scanner_finds_the_end_and_rejects_garbage() {
        let body = b"5;ext=1\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let mut s = ChunkedScanner::default();
        assert_eq!(s.scan(body).unwrap(), body.len() - 4);
        assert!(s.is_done());
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"\r\n",
            b"5\nhello",
            b"fffffffffffffffff\r\n",
            b"0\r\n\nHTTP/1.1 302 Found\r\n\r\n",
            b"0\r\nx-t: 1\nHTTP/1.1 302 Found\r\n\r\n",
            b"2;a=\x01\r\nhi\r\n",
            b"0\r\n x-folded: 1\r\n\r\n",
        ] {
            assert!(ChunkedScanner::default().scan(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        /// However the body is encoded and split into reads, the scanner stops exactly at its
        /// end.
        #[test]
        fn chunked_scanner_stops_exactly_at_the_end(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8),
            trailers in proptest::bool::ANY,
            cuts in proptest::collection::vec(1usize..64, 1..40),
        ) {
            let mut body = Vec::new();
            for c in &chunks {
                write_chunk(&mut body, c);
            }
            if trailers {
                body.extend_from_slice(b"0\r\nx-sum: 1\r\n\r\n");
            } else {
                body.extend_from_slice(LAST_CHUNK);
            }
            let end = body.len();
            body.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let mut scanner = ChunkedScanner::default();
            let mut at = 0;
            let mut cuts = cuts.into_iter().cycle();
            while !scanner.is_done() && at < body.len() {
                let next = (at + cuts.next().unwrap_or(1)).min(body.len());
                at += scanner.scan(&body[at..next]).unwrap();
                prop_assert!(at <= end);
            }
            prop_assert!(scanner.is_done());
            prop_assert_eq!(at, end);
        }
    }
}
