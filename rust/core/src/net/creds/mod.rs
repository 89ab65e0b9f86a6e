//! Credential substitution: the sandbox holds placeholders, the egress proxy puts the real
//! values into the requests bound for each credential's hosts.
//!
//! With credentials in the spec every HTTP request leaving the sandbox is read whole by the
//! supervisor: absolute-URI requests to the proxy, CONNECT tunnels and direct connections
//! (TLS is terminated with the sandbox's own CA, see `mitm.rs`). For each request:
//! - a credential whose hosts match the request's host (and whose `methods`, when set, list its
//!   method) has its placeholder replaced by the value in the request headers (only `header`
//!   when set), and in the URL query and the body when opted in (`Content-Length` follows);
//! - `Authorization: Basic` credentials are decoded, substituted and re-encoded (git and pip
//!   put a token in the password of basic auth);
//! - a placeholder left anywhere in the request toward a host its credential is not bound to
//!   is a leak, also when encoded: every form the output redactor knows (hex, base64 and
//!   base64url at each byte alignment, base32, percent-, JSON- and UTF-16 escapes; see
//!   `redact::encoded_forms`) of the placeholder in upper, lower or its own case, matched
//!   ignoring ASCII case, in the request as sent and with its `%XX` escapes decoded (up to
//!   [`DECODE_ROUNDS`] times, so any mix of escaped and plain characters is seen). It the request is never forwarded, the refusal is reported as a
//!   [`Violation::Credential`], and `on_leak` decides the rest (403, kill the sandbox, or close
//!   the connection without an answer);
//! - a placeholder toward its own host with a method it is not allowed is forwarded as the
//!   placeholder (the host sees no secret).
//!
//! Responses are relayed as framed (`Content-Length`, chunked, or up to the upstream's close).
//! Plain HTTP requests go upstream on a connection of their own with `Connection: close`.
//! Intercepted HTTPS requests are kept alive upstream: after a framed response the TLS
//! connection goes to the sandbox's own pool ([`Broker`] is per sandbox, so a connection is
//! never shared between sandboxes), keyed by host (which is also the SNI) and port, at most
//! [`POOL_MAX`] idle for at most [`POOL_IDLE`]; the next request to that host from any of the
//! sandbox's connections reuses it instead of a new TLS handshake (the policy is checked again
//! as for a new connection). A pooled connection the server closed meanwhile is retried once
//! on a new one.
//! Traffic that is neither TLS nor HTTP is relayed, and cut when a placeholder goes by toward
//! a host its credential is not bound to.

mod http;
mod pool;

use super::allow::{Allowlist, Host};
use super::mitm::Tls;
use super::pump::{self, Refusal};
use super::sys::{self, Wait};
use super::{Shared, Slot};
use crate::report::Violation;
use crate::spec::{CredentialsSpec, OnCredentialLeak};
use crate::{Error, Result};
use aho_corasick::AhoCorasick;
use base64::Engine as _;
pub use http::MAX_BODY;
use http::{find, read_request, Buffered, ReadErr, Request, MAX_HEAD};
use pool::{Pool, Upstream};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How many times `%XX` escapes are decoded before a request is scanned again (a placeholder
/// escaped twice is still found).
const DECODE_ROUNDS: usize = 3;
/// At most this many idle upstream TLS connections are kept per sandbox.
pub const POOL_MAX: usize = 8;
/// An idle upstream connection is closed after this long unused.
pub const POOL_IDLE: Duration = Duration::from_secs(20);
/// How long the sandbox may take to send the first byte of a tunnel.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);

/// Headers of one hop, never forwarded (the proxy frames each request itself).
const DROPPED: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "content-length",
    "upgrade",
    "expect",
];

struct Cred {
    name: String,
    hosts: Allowlist,
    methods: Option<Vec<String>>,
    header: Option<String>,
    in_query: bool,
    in_body: bool,
}

/// The credentials of one sandbox, its CA, and what a leak does.
pub struct Broker {
    creds: Vec<Cred>,
    values: Vec<Vec<u8>>,
    /// Every placeholder, pattern i = credential i.
    finder: AhoCorasick,
    /// Every encoded form of every placeholder (ASCII case ignored).
    encoded: AhoCorasick,
    /// Pattern of `encoded` -> credential index.
    encoded_cred: Vec<usize>,
    /// Every value, masked in responses (a bound host echoing a value hands it to nobody).
    value_finder: AhoCorasick,
    on_leak: OnCredentialLeak,
    tls: Tls,
    /// Idle upstream TLS connections of this sandbox.
    pool: Pool<Upstream>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("credentials", &self.creds.len())
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Checks the credentials and makes the sandbox's CA.
    pub fn new(spec: &CredentialsSpec) -> Result<Broker> {
        let mut creds = Vec::new();
        let mut values = Vec::new();
        let mut placeholders = Vec::new();
        for c in &spec.list {
            let bad = |why: &str| Error::Credential(format!("credential {:?}: {why}", c.name));
            if c.value.is_empty() {
                return Err(bad("empty value"));
            }
            if c.value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                // It goes into header lines: a line break would add headers of its own.
                return Err(bad("the value holds a line break or NUL"));
            }
            if c.placeholder.len() < 16
                || !c
                    .placeholder
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(bad("the placeholder must be 16+ letters, digits or _"));
            }
            if c.value.contains(&c.placeholder) || c.placeholder.contains(&c.value) {
                return Err(bad("the value and the placeholder overlap"));
            }
            if c.hosts.is_empty() {
                return Err(bad("no hosts"));
            }
            let hosts = Allowlist::parse(&c.hosts).map_err(|e| bad(&e.to_string()))?;
            creds.push(Cred {
                name: c.name.clone(),
                hosts,
                methods: c.methods.clone(),
                header: c.header.as_ref().map(|h| h.to_ascii_lowercase()),
                in_query: c.in_query,
                in_body: c.in_body,
            });
            values.push(c.value.clone().into_bytes());
            placeholders.push(c.placeholder.clone().into_bytes());
        }
        let finder =
            AhoCorasick::new(&placeholders).map_err(|e| Error::Credential(e.to_string()))?;
        let (encoded, encoded_cred) = encoded_finder(&placeholders)?;
        let value_finder =
            AhoCorasick::new(&values).map_err(|e| Error::Credential(e.to_string()))?;
        Ok(Broker {
            creds,
            values,
            finder,
            encoded,
            encoded_cred,
            value_finder,
            on_leak: spec.on_leak,
            tls: Tls::new(spec.tls_ca_bundle.as_deref())?,
            pool: Pool::new(POOL_MAX, POOL_IDLE),
        })
    }

    /// The sandbox's CA certificate (PEM), to add to the trust store inside.
    pub fn ca_pem(&self) -> String {
        self.tls.ca_pem()
    }

    /// Whether credential `i` may be substituted into `method` toward `host:port`.
    fn bound(&self, i: usize, host: &Host, port: u16, method: &str) -> bool {
        let c = &self.creds[i];
        c.hosts.allows_host(host, port)
            && c.methods
                .as_ref()
                .is_none_or(|m| m.iter().any(|x| x == method))
    }

    /// Replaces the placeholders of `which` credentials in `data`.
    fn substitute(&self, data: &[u8], which: &[bool]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len());
        let mut last = 0;
        for m in self.finder.find_iter(data) {
            let i = m.pattern().as_usize();
            if which[i] {
                out.extend_from_slice(&data[last..m.start()]);
                out.extend_from_slice(&self.values[i]);
                last = m.end();
            }
        }
        out.extend_from_slice(&data[last..]);
        out
    }

    /// Overwrites every credential value in `data` with `*` (same length: framing holds).
    fn mask_values(&self, data: &mut [u8]) {
        let spans: Vec<(usize, usize)> = self
            .value_finder
            .find_iter(&*data)
            .map(|m| (m.start(), m.end()))
            .collect();
        for (a, b) in spans {
            data[a..b].fill(b'*');
        }
    }

    /// The first credential whose placeholder is in `data`, plain or encoded, but which is
    /// not bound to `host:port` at all (whatever the method).
    fn leaked(&self, data: &[u8], host: &Host, port: u16) -> Option<usize> {
        let unbound = |i: &usize| !self.creds[*i].hosts.allows_host(host, port);
        if let Some(i) = self
            .finder
            .find_iter(data)
            .map(|m| m.pattern().as_usize())
            .find(unbound)
        {
            return Some(i);
        }
        let mut text = std::borrow::Cow::Borrowed(data);
        for _ in 0..=DECODE_ROUNDS {
            // Overlapping: a bound credential's form must not hide an unbound one's.
            if let Some(i) = self
                .encoded
                .find_overlapping_iter(&*text)
                .map(|m| self.encoded_cred[m.pattern().as_usize()])
                .find(unbound)
            {
                return Some(i);
            }
            match percent_decode(&text) {
                Some(decoded) => text = std::borrow::Cow::Owned(decoded),
                None => break,
            }
        }
        None
    }

    /// How much of a relayed stream is kept to find a placeholder split between reads.
    fn scan_tail(&self) -> usize {
        // A form fully percent-escaped is three times as long.
        (3 * self.encoded.max_pattern_len()).max(self.finder.max_pattern_len())
    }

    /// `Authorization: Basic` with the placeholders of `which` replaced inside the decoded
    /// credentials and encoded again; `None` when the value is not basic auth or holds none.
    fn substitute_basic(&self, value: &[u8], which: &[bool]) -> Option<Vec<u8>> {
        let text = std::str::from_utf8(value).ok()?.trim();
        let (scheme, rest) = text.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = BASIC.decode(rest.trim()).ok()?;
        let replaced = self.substitute(&decoded, which);
        if replaced == decoded {
            return None;
        }
        let mut out = format!("{scheme} ").into_bytes();
        out.extend_from_slice(
            base64::engine::general_purpose::STANDARD
                .encode(replaced)
                .as_bytes(),
        );
        Some(out)
    }

    /// The bytes to send upstream for `req` toward `host:port`, or the leaked credential.
    /// `host_header`: the `Host` to send (absolute-URI requests), else the client's is kept.
    fn prepare(
        &self,
        req: &Request,
        host: &Host,
        port: u16,
        target: &str,
        host_header: Option<&str>,
        keep_alive: bool,
    ) -> std::result::Result<Vec<u8>, usize> {
        let bound: Vec<bool> = (0..self.creds.len())
            .map(|i| self.bound(i, host, port, &req.method))
            .collect();
        let only = |pick: &dyn Fn(&Cred) -> bool| -> Vec<bool> {
            bound
                .iter()
                .zip(&self.creds)
                .map(|(b, c)| *b && pick(c))
                .collect()
        };
        let target = match target.split_once('?') {
            Some((path, query)) => {
                let q = self.substitute(query.as_bytes(), &only(&|c| c.in_query));
                format!("{path}?{}", String::from_utf8_lossy(&q))
            }
            None => target.to_string(),
        };
        let mut out = format!("{} {target} HTTP/1.1\r\n", req.method).into_bytes();
        if let Some(h) = host_header {
            out.extend_from_slice(format!("Host: {h}\r\n").as_bytes());
        }
        for (name, value) in &req.headers {
            let lname = name.to_ascii_lowercase();
            if DROPPED.contains(&lname.as_str()) || (host_header.is_some() && lname == "host") {
                continue;
            }
            let which = only(&|c| c.header.as_ref().is_none_or(|h| *h == lname));
            let value = match lname.as_str() {
                "authorization" => self
                    .substitute_basic(value, &which)
                    .unwrap_or_else(|| self.substitute(value, &which)),
                _ => self.substitute(value, &which),
            };
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(&value);
            out.extend_from_slice(b"\r\n");
        }
        let body = self.substitute(&req.body, &only(&|c| c.in_body));
        if !body.is_empty() || matches!(req.method.as_str(), "POST" | "PUT" | "PATCH") {
            out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        }
        if !keep_alive {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        match self.leaked(&out, host, port) {
            Some(i) => Err(i),
            None => Ok(out),
        }
    }
}

/// Base64 as clients write basic auth: the standard alphabet, padding optional.
const BASIC: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// The automaton over every encoded form of every placeholder, in its own, upper and lower
/// case (the placeholder alphabet has letters), and the credential of each pattern.
fn encoded_finder(placeholders: &[Vec<u8>]) -> Result<(AhoCorasick, Vec<usize>)> {
    let mut patterns = Vec::new();
    let mut owner = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, p) in placeholders.iter().enumerate() {
        for variant in [p.clone(), p.to_ascii_uppercase(), p.to_ascii_lowercase()] {
            for form in crate::redact::encoded_forms(&variant) {
                // Matching ignores ASCII case: one pattern per folded form.
                if seen.insert((i, form.to_ascii_lowercase())) {
                    patterns.push(form);
                    owner.push(i);
                }
            }
        }
    }
    let ac = AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build(&patterns)
        .map_err(|e| Error::Credential(e.to_string()))?;
    Ok((ac, owner))
}

/// `data` with its `%XX` escapes decoded (other bytes kept), or `None` when there is none.
fn percent_decode(data: &[u8]) -> Option<Vec<u8>> {
    let hexval = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(data.len());
    let mut changed = false;
    let mut i = 0;
    while i < data.len() {
        if data[i] == b'%' && i + 2 < data.len() {
            if let (Some(h), Some(l)) = (hexval(data[i + 1]), hexval(data[i + 2])) {
                out.push(h << 4 | l);
                changed = true;
                i += 3;
                continue;
            }
        }
        out.push(data[i]);
        i += 1;
    }
    changed.then_some(out)
}

/// What the sandbox's connection is for.
#[derive(Clone)]
enum Mode {
    /// Requests to the proxy with absolute URIs, each naming its host.
    Absolute,
    /// A connection to one host (a tunnel or a direct connection), TLS or not.
    Origin { host: Host, port: u16, tls: bool },
}

/// A name for an address the DNS stub handed out (as `pump::open` decides).
fn canonical(shared: &Shared, host: &Host) -> Host {
    match host {
        Host::Ip(ip) => match super::lock(&shared.synthetic).name_of(*ip) {
            Some(name) => Host::Name(name.to_string()),
            None => host.clone(),
        },
        Host::Name(_) => host.clone(),
    }
}

/// Reads ahead of a tunnel's first bytes, so they can be looked at and replayed.
struct Prefixed {
    pre: Vec<u8>,
    s: TcpStream,
}

impl Read for Prefixed {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if !self.pre.is_empty() {
            let n = out.len().min(self.pre.len());
            out[..n].copy_from_slice(&self.pre[..n]);
            self.pre.drain(..n);
            return Ok(n);
        }
        self.s.read(out)
    }
}

impl Write for Prefixed {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.s.write(data)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.s.flush()
    }
}

/// Serves the rest of an absolute-URI proxy connection (`pending`: bytes read so far,
/// the first request's head included).
pub(crate) fn serve_proxy(
    shared: &Arc<Shared>,
    broker: &Broker,
    client: TcpStream,
    pending: Vec<u8>,
    slot: Slot,
) {
    let Some(id) = shared.register_one(&client) else {
        return;
    };
    if let Ok(sock) = client.try_clone() {
        let mut conn = Buffered::new(sock, pending);
        serve_http(shared, broker, &mut conn, &client, Mode::Absolute, None);
    }
    shared.unregister(id);
    drop(slot);
}

/// Serves a connection to one host (a CONNECT tunnel after its 200, or a direct connection),
/// `first` being bytes already read from the sandbox and `upstream` the connection opened.
#[allow(clippy::too_many_arguments)]
pub(crate) fn serve_tunnel(
    shared: &Arc<Shared>,
    broker: &Broker,
    client: TcpStream,
    first: Vec<u8>,
    host: &Host,
    port: u16,
    upstream: TcpStream,
    slot: Slot,
) {
    let host = canonical(shared, host);
    let Some(id) = shared.register(&client, &upstream) else {
        return;
    };
    let mut first = first;
    if first.is_empty() {
        let ready = sys::wait(
            client.as_raw_fd(),
            libc::POLLIN,
            &shared.stop,
            FIRST_BYTE_TIMEOUT,
        );
        let mut b = [0u8; 1];
        if ready.ok() == Some(Wait::Ready) {
            if let Ok(1) = (&client).read(&mut b) {
                first.push(b[0]);
            }
        }
    }
    let is_http = first.iter().take_while(|b| b.is_ascii_uppercase()).count() > 0;
    match (first.first(), client.try_clone()) {
        (None, _) | (_, Err(_)) => {}
        (Some(0x16), Ok(sock)) => {
            let raw = Prefixed {
                pre: first,
                s: sock,
            };
            match broker.tls.accept(&host, raw) {
                Ok(tls) => {
                    let mut conn = Buffered::new(tls, Vec::new());
                    let mode = Mode::Origin {
                        host: host.clone(),
                        port,
                        tls: true,
                    };
                    serve_http(shared, broker, &mut conn, &client, mode, Some(upstream));
                }
                // The sandbox's client did not trust the CA, or spoke no TLS we know.
                Err(_) => {
                    let _ = client.shutdown(Shutdown::Both);
                }
            }
        }
        (Some(_), Ok(sock)) if is_http => {
            let mut conn = Buffered::new(sock, first);
            let mode = Mode::Origin {
                host: host.clone(),
                port,
                tls: false,
            };
            serve_http(shared, broker, &mut conn, &client, mode, Some(upstream));
        }
        (Some(_), Ok(_)) => scan_relay(shared, broker, &client, &upstream, first, &host, port),
    }
    shared.unregister(id);
    drop(slot);
}

/// Answers the sandbox with a short plain-text response.
fn answer<S: Write>(client: &mut S, code: u16, body: &str) {
    let text = match code {
        400 => "Bad Request",
        403 => "Forbidden",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        _ => "Error",
    };
    let msg = format!(
        "HTTP/1.1 {code} {text}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        body.len() + 1
    );
    let _ = client.write_all(msg.as_bytes());
    let _ = client.flush();
}

/// The request/response loop of one sandbox connection.
fn serve_http<S: Read + Write>(
    shared: &Arc<Shared>,
    broker: &Broker,
    conn: &mut Buffered<S>,
    client: &TcpStream,
    mode: Mode,
    mut first_upstream: Option<TcpStream>,
) {
    loop {
        let mut go_on = |s: &mut S| {
            let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
            let _ = s.flush();
        };
        let req = match read_request(conn, &mut go_on) {
            Ok(r) => r,
            Err(ReadErr::Closed) => return,
            Err(ReadErr::Bad(code, why)) => return answer(&mut conn.s, code, why),
        };
        let (host, port, target, host_header, tls) = match &mode {
            Mode::Origin { host, port, tls } => {
                (host.clone(), *port, req.target.clone(), None, *tls)
            }
            Mode::Absolute => match absolute(&req.target) {
                Ok((host, port, auth, path)) => {
                    (canonical(shared, &host), port, path, Some(auth), false)
                }
                Err(why) => return answer(&mut conn.s, 400, why),
            },
        };
        // Only intercepted HTTPS is kept alive upstream (pooled).
        let out = match broker.prepare(&req, &host, port, &target, host_header.as_deref(), tls) {
            Ok(out) => out,
            Err(i) => {
                let name = &broker.creds[i].name;
                shared.refuse_credential(name, &host.to_string(), port, &req.method);
                match broker.on_leak {
                    OnCredentialLeak::Block => answer(
                        &mut conn.s,
                        403,
                        &format!("cellblock: credential {name} is not bound to {host}:{port}"),
                    ),
                    OnCredentialLeak::Kill => shared.kill_sandbox(),
                    OnCredentialLeak::Log => {}
                }
                return;
            }
        };
        let head_only = req.method == "HEAD";
        let keep = if tls {
            let mut ex = Exchange {
                shared,
                broker,
                client,
                host: &host,
                port,
            };
            ex.https(conn, &out, head_only, &mut first_upstream)
        } else {
            let upstream = match first_upstream.take() {
                Some(u) => u,
                None => match pump::open(shared, &host, port) {
                    Ok(u) => u,
                    Err(Refusal { reason, policy }) => {
                        let code = if policy { 403 } else { 502 };
                        return answer(
                            &mut conn.s,
                            code,
                            &format!("cellblock: {host}:{port} refused: {reason}"),
                        );
                    }
                },
            };
            let Some(id) = shared.register(client, &upstream) else {
                return;
            };
            let _ = upstream.set_nodelay(true);
            let mut up = Buffered::new(upstream, Vec::new());
            let relayed = relay(shared, broker, &mut up, conn, &out, head_only);
            shared.unregister(id);
            match relayed {
                Relayed::Done { keep } => keep,
                Relayed::Unanswered => {
                    answer(&mut conn.s, 502, "cellblock: upstream closed");
                    false
                }
                Relayed::Broken => false,
            }
        };
        if !keep || req.close {
            return;
        }
    }
}

/// One intercepted HTTPS request's way upstream.
struct Exchange<'a> {
    shared: &'a Arc<Shared>,
    broker: &'a Broker,
    client: &'a TcpStream,
    host: &'a Host,
    port: u16,
}

impl Exchange<'_> {
    /// Sends `out` on a pooled connection, or else on a new one (`first`, the tunnel's own,
    /// when there is one), and relays the response. Returns whether the sandbox's connection
    /// can carry another request.
    fn https<S: Read + Write>(
        &mut self,
        conn: &mut Buffered<S>,
        out: &[u8],
        head_only: bool,
        first: &mut Option<TcpStream>,
    ) -> bool {
        if let Some(up) = self.broker.pool.take(self.host, self.port) {
            // The tunnel's own connection is not needed (its server waits for a handshake).
            // Shut, not only dropped: the registry holds a clone of it.
            if let Some(unused) = first.take() {
                let _ = unused.shutdown(Shutdown::Both);
            }
            // The policy is checked again as for a new connection.
            self.shared.dialled(&up.sock, self.host, self.port);
            // Unanswered: the server closed it while idle; a new connection is tried.
            if let Some(keep) = self.send_on(up, conn, out, head_only) {
                return keep;
            }
        }
        let (host, port) = (self.host, self.port);
        let tcp = match first.take() {
            Some(u) => u,
            None => match pump::open(self.shared, host, port) {
                Ok(u) => u,
                Err(Refusal { reason, policy }) => {
                    let code = if policy { 403 } else { 502 };
                    answer(
                        &mut conn.s,
                        code,
                        &format!("cellblock: {host}:{port} refused: {reason}"),
                    );
                    return false;
                }
            },
        };
        // A TLS handshake's last flight and the request are separate small writes: Nagle would
        // hold the second until the first is acknowledged.
        let _ = tcp.set_nodelay(true);
        let Some(id) = self.shared.register(self.client, &tcp) else {
            return false;
        };
        let up = self.broker.tls.connect(host, tcp);
        self.shared.unregister(id);
        match up {
            Ok(up) => self.send_on(up, conn, out, head_only).unwrap_or_else(|| {
                answer(&mut conn.s, 502, "cellblock: upstream closed");
                false
            }),
            Err(why) => {
                self.shared
                    .refuse(&host.to_string(), port, &format!("upstream TLS: {why}"));
                answer(&mut conn.s, 502, &format!("cellblock: upstream TLS: {why}"));
                false
            }
        }
    }

    /// Relays one request on `up`, which goes back to the pool when it can carry another.
    /// `None`: the upstream answered nothing (and the sandbox got nothing).
    fn send_on<S: Read + Write>(
        &mut self,
        up: Upstream,
        conn: &mut Buffered<S>,
        out: &[u8],
        head_only: bool,
    ) -> Option<bool> {
        let id = self.shared.register(self.client, &up.sock)?;
        let mut up = Buffered::new(up, Vec::new());
        let relayed = relay(self.shared, self.broker, &mut up, conn, out, head_only);
        self.shared.unregister(id);
        match relayed {
            Relayed::Unanswered => None,
            Relayed::Broken => Some(false),
            Relayed::Done { keep } => {
                if keep && up.buf.is_empty() {
                    self.broker.pool.put(self.host, self.port, up.s);
                }
                Some(keep)
            }
        }
    }
}

/// `http://host[:port]/path?query` -> (host, port, authority, origin-form target).
fn absolute(target: &str) -> std::result::Result<(Host, u16, String, String), &'static str> {
    let scheme = "http://";
    if target.len() < scheme.len() || !target[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return Err("only http:// absolute URIs and CONNECT are proxied");
    }
    let rest = &target[scheme.len()..];
    let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (auth, path) = rest.split_at(split);
    let (host, port) = super::proxy::authority(auth, Some(80))?;
    let path = match path {
        "" => "/".to_string(),
        p if p.starts_with('/') => p.to_string(),
        p => format!("/{p}"),
    };
    Ok((host, port, auth.to_string(), path))
}

/// How one request's response went.
#[derive(Debug, PartialEq, Eq)]
enum Relayed {
    /// Relayed whole; `keep`: it was framed and neither side asked to close.
    Done { keep: bool },
    /// The request could not be sent, or nothing came back (nothing reached the sandbox).
    Unanswered,
    /// The response broke off midway.
    Broken,
}

/// Sends `request` on `up` and relays its response to the sandbox, values masked.
fn relay<U: Read + Write, S: Read + Write>(
    shared: &Shared,
    broker: &Broker,
    up: &mut Buffered<U>,
    conn: &mut Buffered<S>,
    request: &[u8],
    head_only: bool,
) -> Relayed {
    if up.s.write_all(request).and_then(|()| up.s.flush()).is_err() {
        return Relayed::Unanswered;
    }
    shared
        .bytes_out
        .fetch_add(request.len() as u64, Ordering::Relaxed);
    let mut sink = Masked {
        broker,
        out: &mut conn.s,
        pending: Vec::new(),
        total: 0,
    };
    let result = relay_response(up, &mut sink, head_only);
    let flushed = sink.finish().is_ok();
    shared
        .bytes_in
        .fetch_add(sink.total as u64, Ordering::Relaxed);
    match result {
        Ok(keep) => Relayed::Done {
            keep: keep && flushed,
        },
        Err(_) if sink.total == 0 => Relayed::Unanswered,
        Err(_) => Relayed::Broken,
    }
}

/// A writer to the sandbox that masks credential values (a bound host echoing a value hands
/// it to nobody), holding back a tail so a value split between reads is still found whole.
struct Masked<'a, W: Write> {
    broker: &'a Broker,
    out: &'a mut W,
    pending: Vec<u8>,
    /// Bytes taken so far.
    total: usize,
}

impl<W: Write> Masked<'_, W> {
    fn push(&mut self, data: &[u8]) -> io::Result<()> {
        self.total += data.len();
        self.pending.extend_from_slice(data);
        self.broker.mask_values(&mut self.pending);
        let keep = self.broker.value_finder.max_pattern_len().saturating_sub(1);
        let ready = self.pending.len().saturating_sub(keep);
        self.out.write_all(&self.pending[..ready])?;
        self.pending.drain(..ready);
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        self.out.write_all(&self.pending)?;
        self.pending.clear();
        self.out.flush()
    }
}

/// Relays one response (interim 1xx responses included) from `up` into `sink`, reading no
/// further than its end when it is framed. Returns whether `up` can carry another request.
fn relay_response<U: Read, W: Write>(
    up: &mut Buffered<U>,
    sink: &mut Masked<'_, W>,
    head_only: bool,
) -> std::result::Result<bool, ReadErr> {
    let bad = ReadErr::Bad(502, "malformed response");
    loop {
        let head_len = loop {
            if let Some(p) = find(&up.buf, b"\r\n\r\n") {
                break p + 4;
            }
            if up.buf.len() > MAX_HEAD {
                return Err(bad);
            }
            if up.fill()? == 0 {
                return Err(ReadErr::Closed);
            }
        };
        let head = up.take(head_len)?;
        let mut slots = [httparse::EMPTY_HEADER; 128];
        let mut resp = httparse::Response::new(&mut slots);
        if !matches!(resp.parse(&head), Ok(httparse::Status::Complete(_))) {
            return Err(bad);
        }
        let code = resp.code.unwrap_or(0);
        let mut close = resp.version == Some(0);
        let mut length = None;
        let mut chunked = false;
        for h in resp.headers.iter() {
            let v = String::from_utf8_lossy(h.value).trim().to_ascii_lowercase();
            if h.name.eq_ignore_ascii_case("content-length") {
                length = Some(
                    v.parse::<u64>()
                        .map_err(|_| ReadErr::Bad(502, "bad length"))?,
                );
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.rsplit(',').next().map(str::trim) == Some("chunked");
            } else if h.name.eq_ignore_ascii_case("connection") {
                close |= v.split(',').any(|t| t.trim() == "close");
            }
        }
        sink.push(&head)?;
        match code {
            // Interim: the final response follows.
            100..=199 if code != 101 => continue,
            // Upgrade headers are never forwarded: a switch is not followed.
            101 => return Ok(false),
            204 | 304 => return Ok(!close),
            _ if head_only => return Ok(!close),
            _ => {}
        }
        if chunked {
            relay_chunked(up, sink)?;
        } else if let Some(n) = length {
            relay_exact(up, sink, n)?;
        } else {
            // Delimited by the upstream's close.
            let rest = std::mem::take(&mut up.buf);
            sink.push(&rest)?;
            while let Ok(n) = up.fill() {
                if n == 0 {
                    break;
                }
                let more = std::mem::take(&mut up.buf);
                sink.push(&more)?;
            }
            return Ok(false);
        }
        return Ok(!close);
    }
}

/// Relays exactly `n` bytes.
fn relay_exact<U: Read, W: Write>(
    up: &mut Buffered<U>,
    sink: &mut Masked<'_, W>,
    n: u64,
) -> std::result::Result<(), ReadErr> {
    let mut left = n;
    while left > 0 {
        if up.buf.is_empty() && up.fill()? == 0 {
            return Err(ReadErr::Closed);
        }
        let k = usize::try_from(left)
            .unwrap_or(usize::MAX)
            .min(up.buf.len());
        sink.push(&up.buf[..k])?;
        up.buf.drain(..k);
        left -= k as u64;
    }
    Ok(())
}

/// Relays a chunked body, chunk lines and trailers as they came.
fn relay_chunked<U: Read, W: Write>(
    up: &mut Buffered<U>,
    sink: &mut Masked<'_, W>,
) -> std::result::Result<(), ReadErr> {
    loop {
        let line = up.line(4096)?;
        let text = String::from_utf8_lossy(&line);
        let size = text.split(';').next().unwrap_or("").trim();
        let n = u64::from_str_radix(size, 16).map_err(|_| ReadErr::Bad(502, "bad chunk"))?;
        sink.push(&line)?;
        sink.push(b"\r\n")?;
        if n == 0 {
            loop {
                let trailer = up.line(MAX_HEAD)?;
                sink.push(&trailer)?;
                sink.push(b"\r\n")?;
                if trailer.is_empty() {
                    return Ok(());
                }
            }
        }
        relay_exact(up, sink, n)?;
        if !up.line(2)?.is_empty() {
            return Err(ReadErr::Bad(502, "bad chunk"));
        }
        sink.push(b"\r\n")?;
    }
}

/// Relays a connection that is neither TLS nor HTTP, cutting it when the sandbox sends a
/// placeholder whose credential is not bound to `host:port` (the data before it is sent).
fn scan_relay(
    shared: &Shared,
    broker: &Broker,
    client: &TcpStream,
    upstream: &TcpStream,
    first: Vec<u8>,
    host: &Host,
    port: u16,
) {
    std::thread::scope(|scope| {
        let back = std::thread::Builder::new()
            .name("cb-net-pump".into())
            .stack_size(super::THREAD_STACK)
            .spawn_scoped(scope, || pump::copy(upstream, client, &shared.bytes_in));
        if back.is_err() {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        // The window searched: what arrived plus the tail of what came before, so that a
        // placeholder split between two reads is seen.
        let mut window = first;
        let tail = broker.scan_tail();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sent_upto = 0;
        loop {
            if let Some(i) = broker.leaked(&window, host, port) {
                shared.refuse_credential(&broker.creds[i].name, &host.to_string(), port, "");
                if broker.on_leak == OnCredentialLeak::Kill {
                    shared.kill_sandbox();
                }
                let _ = client.shutdown(Shutdown::Both);
                let _ = upstream.shutdown(Shutdown::Both);
                return;
            }
            if (&*upstream).write_all(&window[sent_upto..]).is_err() {
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            shared
                .bytes_out
                .fetch_add((window.len() - sent_upto) as u64, Ordering::Relaxed);
            let keep_from = window.len().saturating_sub(tail);
            window.drain(..keep_from);
            sent_upto = window.len();
            let n = match (&*client).read(&mut chunk) {
                Ok(0) | Err(_) => {
                    let _ = upstream.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => n,
            };
            window.extend_from_slice(&chunk[..n]);
        }
    });
}

impl Shared {
    /// Records a placeholder refused toward `host:port` (once per credential, host and port).
    pub(crate) fn refuse_credential(&self, name: &str, host: &str, port: u16, method: &str) {
        let reason = if method.is_empty() {
            format!("placeholder of {name} sent to a host it is not bound to")
        } else {
            format!("placeholder of {name} in a {method} request to a host it is not bound to")
        };
        self.record(
            (format!("credential:{name}:{host}"), port, String::new()),
            Violation::Credential {
                name: name.to_string(),
                host: host.to_string(),
                port,
                reason,
            },
        );
    }

    /// Kills the sandbox (`on_leak = kill`), once.
    pub(crate) fn kill_sandbox(&self) {
        self.credential_kill.store(true, Ordering::SeqCst);
        if let Some(fd) = super::lock(&self.kill_target).as_ref() {
            // SAFETY: pidfd_send_signal on a pidfd we own, no memory passed.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
        }
    }
}

#[cfg(test)]
mod tests;
