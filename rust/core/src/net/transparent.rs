//! The transparent path: TCP connections the sandbox makes without the proxy, redirected by
//! its nftables rules to the supervisor's listener.
//!
//! The target is decided from the original destination (`SO_ORIGINAL_DST`):
//! 1. a synthetic address handed out by the DNS stub stands for its name;
//! 2. an address the allowlist lists is itself the target;
//! 3. otherwise the first bytes the client sends are read: the TLS ClientHello's SNI or the
//!    HTTP `Host` header names the target (and are replayed upstream); failing that, the
//!    original address is the target, and is refused.
//!
//! A name is always dialled at the address the supervisor resolved and vetted, never at the
//! address the client picked.

use super::allow::Host;
use super::sys::{self, Wait};
use super::{pump, Shared, Slot};
use std::io::Read;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the client may take to send the bytes that name its target.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this much is read to find the name (a ClientHello fits in one 16 KiB record).
const SNIFF_MAX: usize = 16 * 1024 + 5;

/// Result of looking for a target name in the first bytes of a connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sniff {
    /// Not enough bytes yet.
    More,
    /// The named host.
    Name(Host),
    /// These bytes name no host.
    Nothing,
}

/// The server name of a TLS ClientHello (SNI extension), from the start of a connection.
pub(crate) fn tls_sni(buf: &[u8]) -> Sniff {
    // Record header: type 22 (handshake), version, length.
    if buf.len() < 5 {
        return if matches!(buf.first(), None | Some(0x16)) {
            Sniff::More
        } else {
            Sniff::Nothing
        };
    }
    if buf[0] != 0x16 {
        return Sniff::Nothing;
    }
    let rec_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf.len() < 5 + rec_len {
        return Sniff::More;
    }
    client_hello_sni(&buf[5..5 + rec_len]).map_or(Sniff::Nothing, Sniff::Name)
}

/// A cursor over a byte slice that fails (None) instead of panicking.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

fn client_hello_sni(handshake: &[u8]) -> Option<Host> {
    let mut c = Cursor(handshake);
    if c.u8()? != 1 {
        return None;
    }
    let len = c.take(3)?;
    let len = (usize::from(len[0]) << 16) | (usize::from(len[1]) << 8) | usize::from(len[2]);
    // A ClientHello split over several records is not reassembled: such a client is refused.
    let mut c = Cursor(c.take(len)?);
    c.take(2 + 32)?; // version, random
    c.vec8()?; // session id
    c.vec16()?; // cipher suites
    c.vec8()?; // compression methods
    let mut exts = Cursor(c.vec16()?);
    while !exts.0.is_empty() {
        let ext_type = exts.u16()?;
        let data = exts.vec16()?;
        if ext_type != 0 {
            continue;
        }
        let mut list = Cursor(Cursor(data).vec16()?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type == 0 {
                return match Host::parse(std::str::from_utf8(name).ok()?)? {
                    h @ Host::Name(_) => Some(h),
                    Host::Ip(_) => None,
                };
            }
        }
    }
    None
}

/// The `Host` header of an HTTP/1 request head, from the start of a connection.
pub(crate) fn http_host(buf: &[u8]) -> Sniff {
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len == buf.len() && method_len < 16 {
        return Sniff::More;
    }
    if method_len == 0 || buf[method_len] != b' ' {
        return Sniff::Nothing;
    }
    let head_end = match buf.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(p) => p,
        None => return Sniff::More,
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    for line in head.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("host") {
                return host_without_port(value.trim()).map_or(Sniff::Nothing, Sniff::Name);
            }
        }
    }
    Sniff::Nothing
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` -> the host.
fn host_without_port(authority: &str) -> Option<Host> {
    let host = if authority.starts_with('[') {
        &authority[..=authority.find(']')?]
    } else {
        authority.split(':').next()?
    };
    Host::parse(host)
}

/// Serves one redirected connection.
pub(crate) fn handle(shared: &Arc<Shared>, client: TcpStream, slot: Slot) {
    let dst = match sys::original_dst(client.as_raw_fd()) {
        Ok(d) => d,
        // Someone connected to the listener itself: nothing was redirected, nothing to serve.
        Err(_) => return,
    };
    let synthetic = super::lock(&shared.synthetic)
        .name_of(dst.ip())
        .map(|n| Host::Name(n.to_string()));
    let mut first = Vec::new();
    let target = match synthetic {
        Some(name) => name,
        None if shared.allow().allows_ip(dst.ip(), dst.port()) => Host::Ip(dst.ip()),
        None => sniff(shared, &client, &mut first).unwrap_or(Host::Ip(dst.ip())),
    };
    match pump::open(shared, &target, dst.port()) {
        Ok(upstream) => match shared.broker.clone() {
            Some(b) => super::creds::serve_tunnel(
                shared,
                &b,
                client,
                first,
                &target,
                dst.port(),
                upstream,
                slot,
            ),
            None => pump::relay(shared, client, upstream, &first, slot),
        },
        Err(_) => sys::set_reset_on_close(client.as_raw_fd()),
    }
}

/// Reads the first bytes of `client` into `first` until they name a host (TLS SNI or HTTP
/// Host), name none, or the client goes quiet.
fn sniff(shared: &Shared, mut client: &TcpStream, first: &mut Vec<u8>) -> Option<Host> {
    let deadline = Instant::now() + SNIFF_TIMEOUT;
    let mut buf = [0u8; 4096];
    while first.len() < SNIFF_MAX {
        let left = deadline.saturating_duration_since(Instant::now());
        if sys::wait(client.as_raw_fd(), libc::POLLIN, &shared.stop, left).ok()? != Wait::Ready {
            return None;
        }
        let n = client
            .read(&mut buf[..(SNIFF_MAX - first.len()).min(4096)])
            .ok()?;
        if n == 0 {
            return None;
        }
        first.extend_from_slice(&buf[..n]);
        let found = if first[0] == 0x16 {
            tls_sni(first)
        } else {
            http_host(first)
        };
        match found {
            Sniff::More => continue,
            Sniff::Name(h) => return Some(h),
            Sniff::Nothing => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal TLS 1.2-style ClientHello with an SNI extension (and one other extension).
    pub(crate) fn client_hello(sni: &str) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut exts = Vec::new();
        exts.extend_from_slice(&[0x00, 0x0b, 0, 2, 1, 0]); // ec_point_formats
        let name = sni.as_bytes();
        let mut list = vec![0];
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name);
        let mut sni_ext = ((list.len()) as u16).to_be_bytes().to_vec();
        sni_ext.extend_from_slice(&list);
        exts.extend_from_slice(&[0, 0]);
        exts.extend_from_slice(&(sni_ext.len() as u16).to_be_bytes());
        exts.extend_from_slice(&sni_ext);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1, 0];
        hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn finds_sni() {
        let hello = client_hello("Pypi.Org");
        assert_eq!(tls_sni(&hello), Sniff::Name(Host::Name("pypi.org".into())));
        for cut in [0, 3, 5, hello.len() - 1] {
            assert_eq!(tls_sni(&hello[..cut]), Sniff::More, "cut at {cut}");
        }
    }

    #[test]
    fn garbage_is_not_tls() {
        assert_eq!(tls_sni(b"SSH-2.0-OpenSSH\r\n"), Sniff::Nothing);
        let mut hello = client_hello("a.example");
        hello[5] = 2; // not a ClientHello
        assert_eq!(tls_sni(&hello), Sniff::Nothing);
        let mut short = client_hello("a.example");
        let n = short.len();
        short[4] = short[4].wrapping_sub(10); // record shorter than the handshake claims
        short.truncate(n - 10);
        assert_eq!(tls_sni(&short), Sniff::Nothing);
        assert_eq!(
            tls_sni(&client_hello("10.0.0.1")),
            Sniff::Nothing,
            "an address is not a server name"
        );
    }

    #[test]
    fn finds_http_host() {
        let req = b"GET /x HTTP/1.1\r\nUser-Agent: t\r\nHOST: Files.Example:8080\r\n\r\n";
        assert_eq!(
            http_host(req),
            Sniff::Name(Host::Name("files.example".into()))
        );
        assert_eq!(http_host(&req[..20]), Sniff::More);
        assert_eq!(http_host(b"GE"), Sniff::More);
        assert_eq!(http_host(b"GET / HTTP/1.0\r\n\r\n"), Sniff::Nothing);
        assert_eq!(http_host(b"\x00\x01binary"), Sniff::Nothing);
        let v6 = b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n";
        assert_eq!(
            http_host(v6),
            Sniff::Name(Host::Ip(
                "::1"
                    .parse()
                    .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
            ))
        );
    }
}
