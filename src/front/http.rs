//! Just enough HTTP/1.1 to find where each request of a connection begins and ends, and
//! to set the two headers only the front may set. Anything ambiguous about a request's
//! length (both `Content-Length` and `Transfer-Encoding`, two different lengths, a coding
//! other than `chunked`) is refused: where the front and Rocket could disagree about
//! where a request ends, a second request could be smuggled past the front's limits.

use std::net::IpAddr;

use super::{PEER_HEADER, PROTO_HEADER};

/// Longest request head accepted (request line and headers). Browsers send 1-2 KiB.
pub const MAX_HEAD: usize = 16 * 1024;
/// Longest chunk-size line of a chunked body (size, extensions).
pub const MAX_CHUNK_LINE: usize = 1024;

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
}

/// A request head, parsed and rewritten for Rocket.
#[derive(Debug)]
pub struct Head {
    /// The head as Rocket receives it.
    pub bytes: Vec<u8>,
    pub body: Body,
    /// The client asked to close after this request (or spoke HTTP/1.0 without keep-alive).
    pub close: bool,
}

/// Why a head was refused; each becomes the front's own error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// 431: longer than [`MAX_HEAD`].
    TooLarge,
    /// 400: not an HTTP/1.x request head.
    Malformed,
    /// 400: the body's length is ambiguous or in a coding we do not accept.
    AmbiguousLength,
}

/// Where the head ends in `buf` (the index after its blank line), if it is complete.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Who the client is and which scheme it used, by the trust rule (see `front`).
pub struct Trust<'a> {
    /// The header a trusted proxy puts the client's address in; `None`: trust no header.
    pub proxy_ip_header: Option<&'a str>,
    /// TLS is configured (`PUBLIC_ORIGIN` is https): every request used it.
    pub https_origin: bool,
}

/// Parses the head `raw` (which ends with its blank line) of a request from `peer`, and
/// rewrites it: the front's own headers are removed wherever they came from and set anew.
pub fn parse(raw: &[u8], peer: IpAddr, trust: &Trust<'_>) -> Result<Head, HeadError> {
    if raw.len() > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let text = std::str::from_utf8(raw).map_err(|_| HeadError::Malformed)?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().ok_or(HeadError::Malformed)?;
    let version = parse_request_line(request_line)?;
    let mut out = Vec::with_capacity(raw.len() + 64);
    out.extend_from_slice(request_line.as_bytes());
    out.extend_from_slice(b"\r\n");

    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = version == "HTTP/1.0";
    let mut client_ip: Option<IpAddr> = None;
    let mut forwarded_https = None;
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or(HeadError::Malformed)?;
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(HeadError::Malformed);
        }
        let value = value.trim_matches(|c| c == ' ' || c == '\t');
        if name.eq_ignore_ascii_case(PEER_HEADER) || name.eq_ignore_ascii_case(PROTO_HEADER) {
            continue;
        }
        if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value.parse().map_err(|_| HeadError::AmbiguousLength)?;
            if !value.bytes().all(|b| b.is_ascii_digit()) || length.is_some_and(|l| l != n) {
                return Err(HeadError::AmbiguousLength);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !value.eq_ignore_ascii_case("chunked") {
                return Err(HeadError::AmbiguousLength);
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && version == "HTTP/1.0" {
                    close = false;
                }
            }
        }
        if let Some(header) = trust.proxy_ip_header {
            if name.eq_ignore_ascii_case(header) {
                // X-Forwarded-For lists every hop; the right-most is the one our proxy
                // appended, the only one it vouches for. A repeated header: the last wins.
                client_ip = value.rsplit(',').map(str::trim).find(|v| !v.is_empty()).and_then(|v| v.parse().ok());
            } else if name.eq_ignore_ascii_case("x-forwarded-proto") {
                let last = value.rsplit(',').map(str::trim).next().unwrap_or("");
                forwarded_https = Some(last.eq_ignore_ascii_case("https"));
            }
        }
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let body = match (length, chunked) {
        (Some(_), true) => return Err(HeadError::AmbiguousLength),
        (Some(0) | None, false) => Body::None,
        (Some(n), false) => Body::Length(n),
        (None, true) => Body::Chunked,
    };
    let ip = client_ip.unwrap_or(peer);
    let https = trust.https_origin || forwarded_https == Some(true);
    out.extend_from_slice(format!("{PEER_HEADER}: {ip}\r\n").as_bytes());
    out.extend_from_slice(format!("{PROTO_HEADER}: {}\r\n\r\n", if https { "https" } else { "http" }).as_bytes());
    Ok(Head { bytes: out, body, close })
}

/// `METHOD target HTTP/1.x`; returns the version.
fn parse_request_line(line: &str) -> Result<&str, HeadError> {
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed);
    };
    let ok = !method.is_empty()
        && method.bytes().all(is_token_byte)
        && !target.is_empty()
        && target.bytes().all(|b| b.is_ascii_graphic())
        && (version == "HTTP/1.1" || version == "HTTP/1.0");
    ok.then_some(version).ok_or(HeadError::Malformed)
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Follows a chunked body through the bytes that pass, to know where it ends.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data: bytes left.
    Data(u64),
    /// The CRLF after a chunk's data: bytes left.
    DataEnd(u8),
    /// Trailer lines after the last chunk, until an empty one.
    Trailer,
    Done,
}

impl Chunked {
    /// Consumes bytes of the body from `input`; returns how many belong to it (fewer than
    /// `input.len()` once the body ends: the rest is the next request).
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, HeadError> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                ChunkState::Done => break,
                ChunkState::Data(left) => {
                    let take = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 { ChunkState::DataEnd(2) } else { ChunkState::Data(left) };
                }
                ChunkState::DataEnd(left) => {
                    let expected = if left == 2 { b'\r' } else { b'\n' };
                    if input[i] != expected {
                        return Err(HeadError::Malformed);
                    }
                    i += 1;
                    self.state = if left == 2 { ChunkState::DataEnd(1) } else { ChunkState::Size };
                }
                ChunkState::Size | ChunkState::Trailer => {
                    let byte = input[i];
                    i += 1;
                    self.line.push(byte);
                    if self.line.len() > MAX_CHUNK_LINE {
                        return Err(HeadError::TooLarge);
                    }
                    if byte == b'\n' {
                        let line = std::mem::take(&mut self.line);
                        self.state = self.end_of_line(&line)?;
                    }
                }
            }
        }
        Ok(i)
    }

    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    fn end_of_line(&self, line: &[u8]) -> Result<ChunkState, HeadError> {
        let line = line.strip_suffix(b"\r\n").ok_or(HeadError::Malformed)?;
        if self.state == ChunkState::Trailer {
            return Ok(if line.is_empty() { ChunkState::Done } else { ChunkState::Trailer });
        }
        let size = line.split(|&b| b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size).map_err(|_| HeadError::Malformed)?.trim_end_matches([' ', '\t']);
        if size.is_empty() || size.len() > 16 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(HeadError::Malformed);
        }
        let size = u64::from_str_radix(size, 16).map_err(|_| HeadError::Malformed)?;
        Ok(if size == 0 { ChunkState::Trailer } else { ChunkState::Data(size) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 7));

    fn direct() -> Trust<'static> {
        Trust { proxy_ip_header: None, https_origin: false }
    }

    fn text(head: &Head) -> String {
        String::from_utf8(head.bytes.clone()).unwrap()
    }

    #[test]
    fn the_front_sets_its_headers_and_a_clients_copies_are_dropped() {
        let raw = b"POST /login HTTP/1.1\r\nHost: x\r\nX-Drishya-Peer: 1.2.3.4\r\nx-drishya-proto: https\r\nX-Real-IP: 9.9.9.9\r\nContent-Length: 12\r\n\r\n";
        let head = parse(raw, PEER, &direct()).unwrap();
        let t = text(&head);
        assert!(t.starts_with("POST /login HTTP/1.1\r\nHost: x\r\n"), "{t}");
        assert!(t.ends_with("X-Drishya-Peer: 203.0.113.7\r\nX-Drishya-Proto: http\r\n\r\n"), "{t}");
        assert!(!t.contains("1.2.3.4") && t.matches("rishya-").count() == 2, "{t}");
        assert_eq!(head.body, Body::Length(12));
        assert!(!head.close);
    }

    #[test]
    fn a_trusted_proxys_header_names_the_client_and_its_scheme() {
        let trust = Trust { proxy_ip_header: Some("X-Forwarded-For"), https_origin: false };
        let raw = b"GET / HTTP/1.1\r\nX-Forwarded-For: 6.6.6.6, 198.51.100.2\r\nX-Forwarded-Proto: https\r\n\r\n";
        let t = text(&parse(raw, PEER, &trust).unwrap());
        assert!(t.contains("X-Drishya-Peer: 198.51.100.2\r\n") && t.contains("X-Drishya-Proto: https\r\n"), "{t}");
        // Untrusted, the same headers change nothing.
        let t = text(&parse(raw, PEER, &direct()).unwrap());
        assert!(t.contains("X-Drishya-Peer: 203.0.113.7\r\n") && t.contains("X-Drishya-Proto: http\r\n"), "{t}");
        // Garbage in the trusted header: the socket peer.
        let raw = b"GET / HTTP/1.1\r\nX-Forwarded-For: not-an-ip\r\n\r\n";
        assert!(text(&parse(raw, PEER, &trust).unwrap()).contains("X-Drishya-Peer: 203.0.113.7\r\n"));
        let https = Trust { proxy_ip_header: None, https_origin: true };
        assert!(text(&parse(b"GET / HTTP/1.1\r\n\r\n", PEER, &https).unwrap()).contains("Proto: https"));
    }

    #[test]
    fn ambiguous_lengths_and_non_http_heads_are_refused() {
        let bad = |raw: &[u8]| parse(raw, PEER, &direct()).unwrap_err();
        assert_eq!(
            bad(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            HeadError::AmbiguousLength
        );
        assert_eq!(
            bad(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            HeadError::AmbiguousLength
        );
        assert_eq!(bad(b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n"), HeadError::AmbiguousLength);
        assert_eq!(bad(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"), HeadError::AmbiguousLength);
        assert_eq!(bad(b"GET / HTTP/2.0\r\n\r\n"), HeadError::Malformed);
        assert_eq!(bad(b"GET /a b HTTP/1.1\r\n\r\n"), HeadError::Malformed);
        assert_eq!(bad(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n"), HeadError::Malformed);
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        huge.extend_from_slice(b"\r\n\r\n");
        assert_eq!(bad(&huge), HeadError::TooLarge);
        // Same length twice is one length; HTTP/1.0 closes unless asked not to.
        let head =
            parse(b"POST / HTTP/1.0\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n", PEER, &direct()).unwrap();
        assert_eq!((head.body, head.close), (Body::Length(3), true));
        let head = parse(b"GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n", PEER, &direct()).unwrap();
        assert!(head.close);
    }

    #[test]
    fn a_chunked_body_ends_where_its_last_chunk_and_trailers_end_whatever_the_split() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\n";
        let next = b"GET / HTTP/1.1\r\n\r\n";
        let stream = [&body[..], &next[..]].concat();
        for split in 0..stream.len() {
            let mut chunked = Chunked::default();
            let a = chunked.feed(&stream[..split]).unwrap();
            let b = if chunked.done() { 0 } else { chunked.feed(&stream[a..]).unwrap() };
            assert!(chunked.done(), "split at {split}");
            assert_eq!(a + b, body.len(), "split at {split}");
        }
        assert!(Chunked::default().feed(b"zz\r\n").is_err());
        assert!(Chunked::default().feed(b"3\r\nabcX").is_err(), "data not followed by CRLF");
    }
}
