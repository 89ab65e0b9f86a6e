//! Opening the upstream connection (the one check every path shares) and streaming bytes
//! between the sandbox and the outside with `splice`, so data never enters user space.

use super::allow::Host;
use super::resolve;
use super::{Shared, Slot};
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long one upstream connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pipe size asked for each direction (fewer splice calls; the kernel may give less).
const PIPE_SIZE: libc::c_int = 1 << 20;

/// Why no upstream connection was opened (already reported as a violation).
#[derive(Debug)]
pub(crate) struct Refusal {
    /// The violation's reason.
    pub(crate) reason: String,
    /// True when the policy refused (HTTP 403), false when the network failed (HTTP 502).
    pub(crate) policy: bool,
}

/// Checks `host:port` against the allowlist and the address policy, then connects to a
/// vetted address. Every refusal is reported; every success is counted.
pub(crate) fn open(shared: &Shared, host: &Host, port: u16) -> Result<TcpStream, Refusal> {
    let host = match host {
        Host::Ip(ip) => match super::lock(&shared.synthetic).name_of(*ip) {
            Some(name) => Host::Name(name.to_string()),
            None => host.clone(),
        },
        Host::Name(_) => host.clone(),
    };
    let refuse = |reason: &str, policy: bool| {
        shared.refuse(&host.to_string(), port, reason);
        Refusal {
            reason: reason.to_string(),
            policy,
        }
    };
    let allow = shared.allow();
    if !allow.allows_host(&host, port) {
        return Err(refuse("not allowed", true));
    }
    let ips = match &host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => shared
            .resolver
            .lookup(name, &shared.stop)
            .ok_or_else(|| refuse("unresolvable", false))?,
    };
    let ips = resolve::vet(&ips, Some(port), &allow).map_err(|reason| refuse(&reason, true))?;
    for addr in resolve::with_port(&ips, port) {
        if shared.stop.is_set() {
            break;
        }
        if let Ok(stream) = super::sys::connect(addr, &shared.stop, CONNECT_TIMEOUT) {
            shared.connections.fetch_add(1, Ordering::Relaxed);
            shared.dialled(&stream, &host, port);
            return Ok(stream);
        }
    }
    Err(refuse("unreachable", false))
}

/// Streams between `client` (inside) and `upstream` (outside) until both directions end,
/// sending `first` upstream before anything else. The sockets are registered so `finish`
/// can cut them; `slot` (the connection's place in the per-run cap) is held until the end.
pub(crate) fn relay(
    shared: &Shared,
    client: TcpStream,
    upstream: TcpStream,
    first: &[u8],
    slot: Slot,
) {
    let Some(id) = shared.register(&client, &upstream) else {
        return;
    };
    let mut upstream_w = &upstream;
    if upstream_w.write_all(first).is_ok() {
        shared
            .bytes_out
            .fetch_add(first.len() as u64, Ordering::Relaxed);
        std::thread::scope(|scope| {
            let back = std::thread::Builder::new()
                .name("cb-net-pump".into())
                .stack_size(super::THREAD_STACK)
                .spawn_scoped(scope, || copy(&upstream, &client, &shared.bytes_in));
            match back {
                Ok(_) => copy(&client, &upstream, &shared.bytes_out),
                Err(_) => {
                    let _ = client.shutdown(Shutdown::Both);
                }
            }
        });
    }
    shared.unregister(id);
    drop(slot);
}

/// Copies `from` -> `to` until EOF or an error, then half-closes `to` (on EOF) or cuts both
/// (on error, so the other direction ends too).
pub(crate) fn copy(from: &TcpStream, to: &TcpStream, counter: &AtomicU64) {
    let result = match Pipe::new() {
        Ok(pipe) => splice_all(from.as_raw_fd(), to.as_raw_fd(), &pipe, counter),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {
            let _ = to.shutdown(Shutdown::Write);
        }
        Err(_) => {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        }
    }
}

/// A pipe used as the kernel-side buffer of one direction.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the local array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are owned by nobody else.
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // SAFETY: F_SETPIPE_SZ on our pipe; a refusal just keeps the default size.
        unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(pipe)
    }
}

fn splice_all(from: RawFd, to: RawFd, pipe: &Pipe, counter: &AtomicU64) -> io::Result<()> {
    // No SPLICE_F_MORE: it corks the socket and delays small replies by up to 200 ms.
    let flags = libc::SPLICE_F_MOVE;
    loop {
        let n = splice(from, pipe.write.as_raw_fd(), PIPE_SIZE as usize, flags)?;
        if n == 0 {
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            let m = splice(pipe.read.as_raw_fd(), to, left, flags)?;
            if m == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            left -= m;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn splice(from: RawFd, to: RawFd, len: usize, flags: libc::c_uint) -> io::Result<usize> {
    loop {
        // SAFETY: splice between fds we hold, no user memory involved.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                flags,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
