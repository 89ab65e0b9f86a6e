//! Thin syscall helpers of the supervisor side: a stop signal every wait can watch, polling,
//! original destinations of redirected connections, cancellable connects.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`: where a redirected connection was going.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// A one-way stop signal: a flag plus a pipe whose read end becomes readable for good, so any
/// `poll` can wait for "data or stop" at once.
pub(crate) struct Stop {
    flag: AtomicBool,
    read: OwnedFd,
    write: OwnedFd,
}

impl Stop {
    /// A fresh, unset stop signal.
    pub(crate) fn new() -> io::Result<Stop> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array we own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Stop {
            flag: AtomicBool::new(false),
            read,
            write,
        })
    }

    /// Raises the signal (idempotent).
    pub(crate) fn set(&self) {
        if !self.flag.swap(true, Ordering::SeqCst) {
            // SAFETY: writes one byte from a local to a pipe we own; failure only means it is full.
            unsafe { libc::write(self.write.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        }
    }

    /// Whether the signal was raised.
    pub(crate) fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The fd that turns readable once the signal is raised.
    pub(crate) fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

impl std::fmt::Debug for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stop").field("set", &self.is_set()).finish()
    }
}

/// Outcome of waiting on one fd.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// The fd is ready.
    Ready,
    /// The stop signal was raised.
    Stopped,
    /// The timeout passed.
    TimedOut,
}

/// Waits until `fd` has `events` (POLLIN / POLLOUT), the stop signal is raised, or `timeout` passes.
pub(crate) fn wait(
    fd: RawFd,
    events: libc::c_short,
    stop: &Stop,
    timeout: Duration,
) -> io::Result<Wait> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = [
            libc::pollfd {
                fd: stop.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd,
                events,
                revents: 0,
            },
        ];
        let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: poll reads and writes the two pollfds of the local array.
        let n = unsafe { libc::poll(pfd.as_mut_ptr(), 2, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if pfd[0].revents != 0 || stop.is_set() {
            return Ok(Wait::Stopped);
        }
        if pfd[1].revents != 0 {
            return Ok(Wait::Ready);
        }
        if n == 0 && left.is_zero() {
            return Ok(Wait::TimedOut);
        }
    }
}

/// Waits on many fds (and the stop signal) with no timeout; returns the `revents` of each.
/// `Ok(None)` means the stop signal was raised.
pub(crate) fn poll_all(fds: &[RawFd], stop: &Stop) -> io::Result<Option<Vec<libc::c_short>>> {
    let mut pfd: Vec<libc::pollfd> = std::iter::once(stop.fd())
        .chain(fds.iter().copied())
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: poll reads and writes the pollfds of the local vector, whose length we pass.
        let n = unsafe { libc::poll(pfd.as_mut_ptr(), pfd.len() as libc::nfds_t, -1) };
        if n >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if pfd[0].revents != 0 || stop.is_set() {
        return Ok(None);
    }
    Ok(Some(pfd[1..].iter().map(|p| p.revents).collect()))
}

/// The destination a connection had before the sandbox's nftables redirected it.
pub(crate) fn original_dst(fd: RawFd) -> io::Result<SocketAddr> {
    if sockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)? == libc::AF_INET {
        let sa = getsockopt_addr::<libc::sockaddr_in>(fd, libc::SOL_IP)?;
        let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
        return Ok(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(sa.sin_port),
        )));
    }
    let sa = getsockopt_addr::<libc::sockaddr_in6>(fd, libc::SOL_IPV6)?;
    let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
    Ok(SocketAddr::V6(SocketAddrV6::new(
        ip,
        u16::from_be(sa.sin6_port),
        0,
        sa.sin6_scope_id,
    )))
}

fn getsockopt_addr<T>(fd: RawFd, level: libc::c_int) -> io::Result<T> {
    // SAFETY: sockaddr structs are plain data; all-zero is a valid value.
    let mut sa: T = unsafe { zeroed() };
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `sa`, which we own.
    let r = unsafe {
        libc::getsockopt(
            fd,
            level,
            SO_ORIGINAL_DST,
            (&mut sa as *mut T).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sa)
}

/// An integer socket option (`SO_DOMAIN`, `SO_TYPE`, `SO_PROTOCOL`, ...).
pub(crate) fn sockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into the local int.
    let r = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// Makes the next `close` of this socket send a RST instead of a FIN (a refused connection).
pub(crate) fn set_reset_on_close(fd: RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: passes a local linger struct of the size we state.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// Connects to `addr` from the supervisor's own network namespace, giving up after `timeout`
/// or when the stop signal is raised. The returned stream is blocking.
pub(crate) fn connect(addr: SocketAddr, stop: &Stop, timeout: Duration) -> io::Result<TcpStream> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket creation.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    connect_socket(sock, addr, stop, timeout)
}

/// [`connect`] with a socket the caller created (e.g. in another network namespace): it is
/// made non-blocking for the connect and returned blocking.
pub(crate) fn connect_socket(
    sock: OwnedFd,
    addr: SocketAddr,
    stop: &Stop,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let fd = sock.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let (storage, len) = sockaddr_of(addr);
    // SAFETY: storage holds a sockaddr of `len` bytes.
    let r = unsafe { libc::connect(fd, (&storage as *const libc::sockaddr_storage).cast(), len) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        match wait(fd, libc::POLLOUT, stop, timeout)? {
            Wait::Ready => {}
            Wait::Stopped => return Err(io::Error::new(io::ErrorKind::Interrupted, "stopped")),
            Wait::TimedOut => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
            }
        }
        let err = sockopt_int(fd, libc::SOL_SOCKET, libc::SO_ERROR)?;
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
    }
    let stream = TcpStream::from(sock);
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn sockaddr_of(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}
