//! The per-sandbox pool of idle upstream TLS connections (see the module above).

use super::super::allow::Host;
use std::io;
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// An upstream TLS connection.
pub(super) type Upstream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A connection over a TCP socket (looked at to tell whether an idle one is still usable).
pub(super) trait OverTcp {
    fn tcp(&self) -> &TcpStream;
}

impl OverTcp for Upstream {
    fn tcp(&self) -> &TcpStream {
        &self.sock
    }
}

/// Idle kept-alive connections by host and port: at most `max`, each for at most `ttl`.
pub(super) struct Pool<C> {
    idle: Mutex<Vec<(Host, u16, C, Instant)>>,
    max: usize,
    ttl: Duration,
}

impl<C: OverTcp> Pool<C> {
    pub(super) fn new(max: usize, ttl: Duration) -> Self {
        Pool {
            idle: Mutex::new(Vec::new()),
            max,
            ttl,
        }
    }

    /// An idle connection to `host:port` still open, if any (newest first).
    pub(super) fn take(&self, host: &Host, port: u16) -> Option<C> {
        let mut idle = super::super::lock(&self.idle);
        idle.retain(|i| i.3.elapsed() < self.ttl);
        while let Some(at) = idle.iter().rposition(|i| i.0 == *host && i.1 == port) {
            let (.., c, _) = idle.remove(at);
            if quiet(c.tcp()) {
                return Some(c);
            }
        }
        None
    }

    /// Keeps `c` for the next request to `host:port` (the oldest idle one goes when full).
    pub(super) fn put(&self, host: &Host, port: u16, c: C) {
        let mut idle = super::super::lock(&self.idle);
        idle.retain(|i| i.3.elapsed() < self.ttl);
        if idle.len() >= self.max {
            idle.remove(0);
        }
        idle.push((host.clone(), port, c, Instant::now()));
    }
}

/// Whether an idle connection has nothing to read (an upstream that closed it, or sent
/// something unasked, makes it unusable).
fn quiet(sock: &TcpStream) -> bool {
    if sock.set_nonblocking(true).is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    let idle = matches!(sock.peek(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    sock.set_nonblocking(false).is_ok() && idle
}
