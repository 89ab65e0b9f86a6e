//! The HTTP proxy inside the sandbox (127.0.0.1:3128), announced through `HTTP(S)_PROXY`.
//!
//! `CONNECT host:port` opens a tunnel; an absolute-URI request (`GET http://host/path`) is
//! forwarded once in origin form with `Connection: close`, so every request starts a new
//! client connection and passes the allowlist check again. Refusals answer 403, unreachable or
//! unresolvable targets 502, a full connection table 503.

use super::allow::Host;
use super::pump::{self, Refusal};
use super::sys::{self, Wait};
use super::{Shared, Slot};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest request head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// What the client asked the proxy for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Request {
    /// A tunnel to `host:port`.
    Connect { host: Host, port: u16 },
    /// A plain HTTP request to forward; `head` is the rewritten head to send upstream.
    Forward {
        host: Host,
        port: u16,
        head: Vec<u8>,
    },
}

/// Headers that concern only one hop and are not forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "host",
    "upgrade",
];

/// Parses a request head (everything up to and including the blank line).
pub(crate) fn parse_head(head: &[u8]) -> Result<Request, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "request head is not text")?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().ok_or("empty request")?;
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && v.starts_with("HTTP/1.") => (m, t, v),
        _ => return Err("bad request line"),
    };
    if method == "CONNECT" {
        let (host, port) = authority(target, None)?;
        return Ok(Request::Connect { host, port });
    }
    let scheme_len = "http://".len();
    if target.len() < scheme_len || !target[..scheme_len].eq_ignore_ascii_case("http://") {
        return Err("only http:// absolute URIs and CONNECT are proxied");
    }
    let rest = &target[scheme_len..];
    let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (auth, path) = rest.split_at(split);
    let (host, port) = authority(auth, Some(80))?;
    let path = match path {
        "" => "/".to_string(),
        p if p.starts_with('/') => p.to_string(),
        p => format!("/{p}"),
    };
    let mut upgrade = false;
    let mut kept = Vec::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        if line.starts_with([' ', '\t']) {
            return Err("folded header lines are not supported");
        }
        let (name, value) = line.split_once(':').ok_or("bad header line")?;
        let lname = name.trim().to_ascii_lowercase();
        if lname == "connection"
            && value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        {
            upgrade = true;
        }
        if lname == "upgrade" {
            kept.push(("upgrade", line));
        } else if !HOP_BY_HOP.contains(&lname.as_str()) {
            kept.push(("", line));
        }
    }
    let mut out = format!("{method} {path} {version}\r\nHost: {auth}\r\n");
    for (kind, line) in kept {
        if kind != "upgrade" || upgrade {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str(if upgrade {
        "Connection: upgrade\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    Ok(Request::Forward {
        host,
        port,
        head: out.into_bytes(),
    })
}

/// `host:port` (port required unless `default_port`), with `[v6]` hosts; no user info.
pub(crate) fn authority(
    auth: &str,
    default_port: Option<u16>,
) -> Result<(Host, u16), &'static str> {
    if auth.contains('@') {
        return Err("user info in the URI is not supported");
    }
    let (host, port) = if auth.starts_with('[') {
        let end = auth.find(']').ok_or("bad IPv6 host")?;
        (&auth[..=end], auth[end + 1..].strip_prefix(':'))
    } else {
        match auth.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (auth, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or("bad port")?,
        None => default_port.ok_or("CONNECT needs host:port")?,
    };
    Ok((Host::parse(host).ok_or("bad host")?, port))
}

/// Serves one proxy client connection.
pub(crate) fn handle(shared: &Arc<Shared>, mut client: TcpStream, slot: Slot) {
    let (buf, head_len) = match read_head(shared, &client) {
        Some(x) => x,
        None => return,
    };
    let request = match parse_head(&buf[..head_len]) {
        Ok(r) => r,
        Err(why) => return respond(&mut client, 400, "Bad Request", why),
    };
    let broker = shared.broker.clone();
    if let (Some(b), Request::Forward { .. }) = (&broker, &request) {
        // With credentials every request is read whole (see `creds/serve.rs`).
        return super::creds::serve_proxy(shared, b, client, buf, slot);
    }
    let leftover = &buf[head_len..];
    let (host, port) = match &request {
        Request::Connect { host, port } | Request::Forward { host, port, .. } => {
            (host.clone(), *port)
        }
    };
    let upstream = match pump::open(shared, &host, port) {
        Ok(u) => u,
        Err(Refusal { reason, policy }) => {
            let (code, text) = if policy {
                (403, "Forbidden")
            } else {
                (502, "Bad Gateway")
            };
            return respond(
                &mut client,
                code,
                text,
                &format!("cellblock: {host}:{port} refused: {reason}"),
            );
        }
    };
    match request {
        Request::Connect { .. } => {
            if client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .is_ok()
            {
                match &broker {
                    Some(b) => super::creds::serve_tunnel(
                        shared,
                        b,
                        client,
                        leftover.to_vec(),
                        &host,
                        port,
                        upstream,
                        slot,
                    ),
                    None => pump::relay(shared, client, upstream, leftover, slot),
                }
            }
        }
        Request::Forward { mut head, .. } => {
            head.extend_from_slice(leftover);
            pump::relay(shared, client, upstream, &head, slot);
        }
    }
}

/// Reads until the end of the request head; returns the bytes read and the head's length.
fn read_head(shared: &Shared, mut client: &TcpStream) -> Option<(Vec<u8>, usize)> {
    let deadline = Instant::now() + HEAD_TIMEOUT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if sys::wait(client.as_raw_fd(), libc::POLLIN, &shared.stop, left).ok()? != Wait::Ready {
            return None;
        }
        let n = client.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            return Some((buf, from + p + 4));
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
    }
}

/// Writes a short plain-text response and lets the connection close.
pub(crate) fn respond(client: &mut TcpStream, code: u16, text: &str, body: &str) {
    let msg = format!(
        "HTTP/1.1 {code} {text}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        body.len() + 1
    );
    // The client may already be gone; nothing else to tell it.
    let _ = client.write_all(msg.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Host {
        Host::parse(s).unwrap_or_else(|| panic!("bad test host {s}"))
    }

    #[test]
    fn connect_requests() {
        let r = parse_head(b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n");
        assert_eq!(
            r,
            Ok(Request::Connect {
                host: host("pypi.org"),
                port: 443
            })
        );
        let r = parse_head(b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n");
        assert_eq!(
            r,
            Ok(Request::Connect {
                host: host("::1"),
                port: 8443
            })
        );
        assert!(parse_head(b"CONNECT pypi.org HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_head(b"CONNECT pypi.org:0 HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_head(b"CONNECT pypi.org:99999 HTTP/1.1\r\n\r\n").is_err());
    }

    #[test]
    fn forwards_absolute_uris_in_origin_form() {
        let head = b"GET http://Example.com:8080/a/b?c=d HTTP/1.1\r\nHost: wrong\r\nProxy-Connection: keep-alive\r\n\
                     Connection: keep-alive\r\nAccept: */*\r\nProxy-Authorization: Basic eA==\r\n\r\n";
        let Ok(Request::Forward {
            host: h,
            port,
            head,
        }) = parse_head(head)
        else {
            panic!("not a forward")
        };
        assert_eq!((h, port), (host("example.com"), 8080));
        assert_eq!(
            String::from_utf8_lossy(&head),
            "GET /a/b?c=d HTTP/1.1\r\nHost: Example.com:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let Ok(Request::Forward { port, head, .. }) =
            parse_head(b"GET http://x.org HTTP/1.0\r\n\r\n")
        else {
            panic!("not a forward")
        };
        assert_eq!(port, 80);
        assert!(head.starts_with(b"GET / HTTP/1.0\r\nHost: x.org\r\n"));
    }

    #[test]
    fn keeps_websocket_upgrades() {
        let head =
            b"GET http://ws.org/s HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let Ok(Request::Forward { head, .. }) = parse_head(head) else {
            panic!("not a forward")
        };
        let text = String::from_utf8_lossy(&head);
        assert!(
            text.contains("Upgrade: websocket\r\n")
                && text.ends_with("Connection: upgrade\r\n\r\n"),
            "{text}"
        );
    }

    #[test]
    fn rejects_what_it_cannot_proxy() {
        for bad in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET https://x.org/ HTTP/1.1\r\n\r\n",
            b"GET ftp://x.org/ HTTP/1.1\r\n\r\n",
            b"GET http://user:pw@x.org/ HTTP/1.1\r\n\r\n",
            b"GET http://x.org/ SPDY/3\r\n\r\n",
            b"GET http://x.org/ HTTP/1.1\r\nno-colon\r\n\r\n",
            b"GET http://x.org/ HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
            b"GET http://bad host/ HTTP/1.1\r\n\r\n",
            b"\xff\xfe",
        ] {
            assert!(parse_head(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
