//! Serving one sandbox connection with credentials: absolute-URI proxy requests, CONNECT
//! tunnels and direct connections, each HTTP request read whole, checked and rewritten by
//! the [`Broker`] before it goes upstream (intercepted HTTPS on pooled connections).

use super::broker::Broker;
use super::http::{read_request, Buffered, ReadErr};
use super::pool::Upstream;
use super::relay::{relay, scan_relay, Relayed};
use crate::net::allow::Host;
use crate::net::pump::{self, Refusal};
use crate::net::sys::{self, Wait};
use crate::net::{Shared, Slot};
use crate::spec::OnCredentialLeak;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

/// How long the sandbox may take to send the first byte of a tunnel.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);

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
        Host::Ip(ip) => match crate::net::lock(&shared.synthetic).name_of(*ip) {
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
pub(super) fn absolute(
    target: &str,
) -> std::result::Result<(Host, u16, String, String), &'static str> {
    let scheme = "http://";
    if target.len() < scheme.len() || !target[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return Err("only http:// absolute URIs and CONNECT are proxied");
    }
    let rest = &target[scheme.len()..];
    let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (auth, path) = rest.split_at(split);
    let (host, port) = crate::net::proxy::authority(auth, Some(80))?;
    let path = match path {
        "" => "/".to_string(),
        p if p.starts_with('/') => p.to_string(),
        p => format!("/{p}"),
    };
    Ok((host, port, auth.to_string(), path))
}
