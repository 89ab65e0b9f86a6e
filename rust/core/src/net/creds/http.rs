//! Reading requests from the sandbox: head (httparse), then the body framed by
//! `Content-Length` or chunked encoding.

use std::io::{self, Read};

/// Longest request head read.
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// Largest request body the proxy buffers (bigger ones get 413).
pub const MAX_BODY: usize = 32 << 20;

/// One request read from the sandbox (body de-chunked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub(super) method: String,
    pub(super) target: String,
    pub(super) headers: Vec<(String, Vec<u8>)>,
    pub(super) body: Vec<u8>,
    /// The client ends the connection after this request (`Connection: close`, or HTTP/1.0
    /// without keep-alive).
    pub(super) close: bool,
}

/// Why no request was read.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReadErr {
    /// The client closed (or the connection broke) between requests.
    Closed,
    /// A malformed or oversized request: the status and a reason.
    Bad(u16, &'static str),
}

impl From<io::Error> for ReadErr {
    fn from(_: io::Error) -> ReadErr {
        ReadErr::Closed
    }
}

/// A stream with the bytes read ahead of what was consumed.
pub(crate) struct Buffered<S> {
    pub(super) s: S,
    pub(super) buf: Vec<u8>,
}

impl<S: Read> Buffered<S> {
    pub(super) fn new(s: S, pending: Vec<u8>) -> Self {
        Buffered { s, buf: pending }
    }

    /// Reads more; Ok(0) at EOF.
    pub(super) fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.s.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A TLS peer that closes without close_notify: the same as EOF here.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes exactly `n` bytes.
    pub(super) fn take(&mut self, n: usize) -> std::result::Result<Vec<u8>, ReadErr> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(ReadErr::Closed);
            }
        }
        let rest = self.buf.split_off(n);
        Ok(std::mem::replace(&mut self.buf, rest))
    }

    /// Takes one CRLF-terminated line (without the CRLF), at most `max` bytes.
    pub(super) fn line(&mut self, max: usize) -> std::result::Result<Vec<u8>, ReadErr> {
        loop {
            if let Some(p) = find(&self.buf, b"\r\n") {
                let mut line = self.take(p + 2)?;
                line.truncate(p);
                return Ok(line);
            }
            if self.buf.len() > max {
                return Err(ReadErr::Bad(400, "line too long"));
            }
            if self.fill()? == 0 {
                return Err(ReadErr::Closed);
            }
        }
    }
}

pub(super) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one request: head, then the body framed by `Content-Length` or chunked encoding.
/// `go_on` is called before reading a body the client waits to be asked for
/// (`Expect: 100-continue`; the header itself is not forwarded).
pub(super) fn read_request<S: Read>(
    r: &mut Buffered<S>,
    go_on: &mut dyn FnMut(&mut S),
) -> std::result::Result<Request, ReadErr> {
    let head_len = loop {
        if let Some(p) = find(&r.buf, b"\r\n\r\n") {
            break p + 4;
        }
        if r.buf.len() > MAX_HEAD {
            return Err(ReadErr::Bad(431, "request head too large"));
        }
        if r.fill()? == 0 {
            return Err(ReadErr::Closed);
        }
    };
    let head = r.take(head_len)?;
    let mut slots = [httparse::EMPTY_HEADER; 128];
    let mut parsed = httparse::Request::new(&mut slots);
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(ReadErr::Bad(400, "malformed request")),
    }
    let (Some(method), Some(target)) = (parsed.method, parsed.path) else {
        return Err(ReadErr::Bad(400, "malformed request"));
    };
    let headers: Vec<(String, Vec<u8>)> = parsed
        .headers
        .iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect();
    let values = |name: &str| -> Vec<String> {
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).trim().to_ascii_lowercase())
            .collect()
    };
    let connection = values("connection");
    let has = |token: &str| {
        connection
            .iter()
            .any(|v| v.split(',').any(|t| t.trim() == token))
    };
    let close = has("close") || (parsed.version == Some(0) && !has("keep-alive"));
    let te = values("transfer-encoding");
    let cl = values("content-length");
    let has_body = !te.is_empty() || cl.first().is_some_and(|v| v != "0");
    if has_body && r.buf.is_empty() && values("expect").iter().any(|v| v == "100-continue") {
        go_on(&mut r.s);
    }
    let body = if !te.is_empty() {
        let last = te.last().and_then(|v| v.rsplit(',').next()).map(str::trim);
        if last != Some("chunked") || !cl.is_empty() {
            return Err(ReadErr::Bad(400, "unsupported transfer encoding"));
        }
        read_chunked(r)?
    } else if let Some(first) = cl.first() {
        if cl.iter().any(|v| v != first) {
            return Err(ReadErr::Bad(400, "conflicting Content-Length"));
        }
        let n: usize = first
            .parse()
            .map_err(|_| ReadErr::Bad(400, "bad Content-Length"))?;
        if n > MAX_BODY {
            return Err(ReadErr::Bad(413, "request body too large"));
        }
        r.take(n)?
    } else {
        Vec::new()
    };
    Ok(Request {
        method: method.to_string(),
        target: target.to_string(),
        headers,
        body,
        close,
    })
}

pub(super) fn read_chunked<S: Read>(r: &mut Buffered<S>) -> std::result::Result<Vec<u8>, ReadErr> {
    let mut body = Vec::new();
    loop {
        let line = r.line(4096)?;
        let text = String::from_utf8_lossy(&line);
        let size = text.split(';').next().unwrap_or("").trim();
        let n = usize::from_str_radix(size, 16).map_err(|_| ReadErr::Bad(400, "bad chunk"))?;
        if n == 0 {
            // Trailers are read and dropped.
            while !r.line(MAX_HEAD)?.is_empty() {}
            return Ok(body);
        }
        if body.len().saturating_add(n) > MAX_BODY {
            return Err(ReadErr::Bad(413, "request body too large"));
        }
        body.extend_from_slice(&r.take(n)?);
        if !r.line(2)?.is_empty() {
            return Err(ReadErr::Bad(400, "bad chunk"));
        }
    }
}
