//! Relaying: an HTTP response from upstream to the sandbox with credential values masked,
//! and traffic that is neither TLS nor HTTP scanned for placeholders on its way upstream.

use super::broker::Broker;
use super::http::{find, Buffered, ReadErr, MAX_HEAD};
use crate::net::allow::Host;
use crate::net::pump;
use crate::net::Shared;
use crate::spec::OnCredentialLeak;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;

/// How one request's response went.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Relayed {
    /// Relayed whole; `keep`: it was framed and neither side asked to close.
    Done { keep: bool },
    /// The request could not be sent, or nothing came back (nothing reached the sandbox).
    Unanswered,
    /// The response broke off midway.
    Broken,
}

/// Sends `request` on `up` and relays its response to the sandbox, values masked.
pub(super) fn relay<U: Read + Write, S: Read + Write>(
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
pub(super) struct Masked<'a, W: Write> {
    pub(super) broker: &'a Broker,
    pub(super) out: &'a mut W,
    pub(super) pending: Vec<u8>,
    /// Bytes taken so far.
    pub(super) total: usize,
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

    pub(super) fn finish(&mut self) -> io::Result<()> {
        self.out.write_all(&self.pending)?;
        self.pending.clear();
        self.out.flush()
    }
}

/// Relays one response (interim 1xx responses included) from `up` into `sink`, reading no
/// further than its end when it is framed. Returns whether `up` can carry another request.
pub(super) fn relay_response<U: Read, W: Write>(
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
pub(super) fn scan_relay(
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
            .stack_size(crate::net::THREAD_STACK)
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
