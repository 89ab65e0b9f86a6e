//! Exposed ports: a listener on the host forwarded into a session's network namespace.
//!
//! A socket belongs to the network namespace it was created in, and the supervisor cannot join
//! the sandbox's (unprivileged, that needs its user namespace, which a threaded process cannot
//! enter). So a small helper, the socket factory, is forked from the supervisor: it joins the
//! sandbox's network namespace (and, unprivileged, its user namespace) and does nothing but
//! create unconnected TCP sockets on request and pass them back over a socketpair. The
//! supervisor connects each to `127.0.0.1:port` there and relays bytes with `splice`. The
//! factory joins neither the sandbox's pid nor its mount namespace: nothing inside can see or
//! reach it, and it runs no code of the sandbox's.

use super::sys::{self, Stop};
use crate::error::{Error, Result};
use crate::spawn::{self, Holder};
use std::collections::HashMap;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Most concurrent connections through one exposed port; more are reset.
const MAX_CONNECTIONS: usize = 256;
/// How long connecting to the port inside may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the factory may take to die when the port is closed.
const FACTORY_GRACE: Duration = Duration::from_secs(2);

/// One port of a session forwarded from a host address; stopped (listener closed, connections
/// cut, factory ended) when dropped.
#[derive(Debug)]
pub struct Exposed {
    port: u16,
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    port: u16,
    stop: Stop,
    factory: Factory,
    /// Open connections (both sockets), cut at stop.
    conns: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    next: AtomicU64,
    live: AtomicUsize,
}

impl Exposed {
    /// Binds `bind` on the host and forwards every connection to `127.0.0.1:port` inside the
    /// network namespace of `holder`'s sandbox.
    pub(crate) fn start(holder: &Holder, port: u16, bind: SocketAddr) -> Result<Exposed> {
        let listener = TcpListener::bind(bind)
            .map_err(|e| Error::Network(format!("expose {port}: cannot listen on {bind}: {e}")))?;
        let addr = listener.local_addr()?;
        let factory = Factory::start(holder)?;
        let shared = Arc::new(Shared {
            port,
            stop: Stop::new()?,
            factory,
            conns: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            live: AtomicUsize::new(0),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name(format!("cb-expose-{port}"))
            .stack_size(super::THREAD_STACK)
            .spawn(move || accept_loop(&s, &listener))?;
        Ok(Exposed {
            port,
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The port inside the sandbox.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host address that reaches it.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Exposed {
    fn drop(&mut self) {
        self.shared.stop.set();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        if let Ok(conns) = self.shared.conns.lock() {
            for (a, b) in conns.values() {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
        }
        self.shared.factory.end();
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    loop {
        match sys::poll_all(&[listener.as_raw_fd()], &shared.stop) {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
        let Ok((client, _)) = listener.accept() else {
            continue;
        };
        if shared.live.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.live.fetch_sub(1, Ordering::SeqCst);
            sys::set_reset_on_close(client.as_raw_fd());
            continue;
        }
        let s = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("cb-expose-conn".into())
            .stack_size(super::THREAD_STACK)
            .spawn(move || {
                serve(&s, client);
                s.live.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            shared.live.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Connects one host connection to the port inside and relays until both sides end.
fn serve(shared: &Shared, client: TcpStream) {
    let inside = SocketAddr::from((Ipv4Addr::LOCALHOST, shared.port));
    let upstream = shared
        .factory
        .socket()
        .and_then(|s| sys::connect_socket(s, inside, &shared.stop, CONNECT_TIMEOUT));
    let upstream = match upstream {
        Ok(u) => u,
        Err(_) => {
            // Nothing listens inside (or the sandbox is gone): the client sees a reset, as
            // for a refused connection.
            sys::set_reset_on_close(client.as_raw_fd());
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let id = shared.next.fetch_add(1, Ordering::SeqCst);
    match (
        client.try_clone(),
        upstream.try_clone(),
        shared.conns.lock(),
    ) {
        (Ok(a), Ok(b), Ok(mut conns)) => {
            if shared.stop.is_set() {
                return;
            }
            conns.insert(id, (a, b));
        }
        _ => return,
    }
    let counter = AtomicU64::new(0);
    std::thread::scope(|scope| {
        let back = std::thread::Builder::new()
            .name("cb-expose-pump".into())
            .stack_size(super::THREAD_STACK)
            .spawn_scoped(scope, || super::pump::copy(&upstream, &client, &counter));
        match back {
            Ok(_) => super::pump::copy(&client, &upstream, &counter),
            Err(_) => {
                let _ = client.shutdown(Shutdown::Both);
            }
        }
    });
    if let Ok(mut conns) = shared.conns.lock() {
        conns.remove(&id);
    }
}

/// The socket factory: a child of the supervisor inside the sandbox's network namespace.
#[derive(Debug)]
struct Factory {
    pidfd: OwnedFd,
    /// Our end of the socketpair; None once ended (the factory exits on EOF).
    sock: Mutex<Option<OwnedFd>>,
}

impl Factory {
    fn start(holder: &Holder) -> Result<Factory> {
        let (ours, theirs) = crate::fdpass::seqpacket_pair().map_err(|e| Error::Setup {
            stage: "socketpair",
            source: e,
        })?;
        let plan = FactoryPlan {
            holder: holder.pidfd.as_raw_fd(),
            root: holder.root,
            sock: theirs.as_raw_fd(),
        };
        let (_, pidfd) =
            spawn::clone_with(0, || factory_main(&plan)).map_err(|e| Error::Setup {
                stage: "start the port forwarder",
                source: e,
            })?;
        drop(theirs);
        let f = Factory {
            pidfd,
            sock: Mutex::new(Some(ours)),
        };
        // The first socket proves the factory joined the namespace (or says why not).
        f.socket().map_err(|e| {
            f.end();
            Error::Network(format!("cannot reach the sandbox's network namespace: {e}"))
        })?;
        Ok(f)
    }

    /// A fresh TCP socket of the sandbox's network namespace.
    fn socket(&self) -> std::io::Result<OwnedFd> {
        let guard = self
            .sock
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        let sock = guard
            .as_ref()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))?;
        // SAFETY: one byte from a local buffer to our socket.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                [1u8].as_ptr().cast(),
                1,
                libc::MSG_NOSIGNAL,
            )
        };
        if n != 1 {
            return Err(std::io::Error::last_os_error());
        }
        crate::fdpass::recv_fd(sock.as_fd())
    }

    /// Closes the socketpair (the factory exits on EOF) and reaps it, killing it if late.
    fn end(&self) {
        if let Ok(mut s) = self.sock.lock() {
            s.take();
        }
        let deadline = std::time::Instant::now() + FACTORY_GRACE;
        let mut pfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        while std::time::Instant::now() < deadline {
            // SAFETY: polling our own child's pidfd.
            if unsafe { libc::poll(&mut pfd, 1, 100) } > 0 {
                break;
            }
        }
        spawn::kill_and_reap_within(&self.pidfd, FACTORY_GRACE);
    }
}

impl Drop for Factory {
    fn drop(&mut self) {
        let ended = self.sock.lock().map_or(true, |s| s.is_none());
        if !ended {
            self.end();
        }
    }
}

/// What the factory needs, prepared before the clone.
struct FactoryPlan {
    holder: libc::c_int,
    root: bool,
    sock: libc::c_int,
}

/// The factory's whole life: join the network namespace, then answer each request byte with a
/// socket (or with nothing, which the supervisor reads as a failure) until EOF. Raw syscalls
/// only: it runs between clone and exit of a copy of a threaded process.
fn factory_main(plan: &FactoryPlan) -> ! {
    crate::child::close_other_fds(&[plan.holder, plan.sock]);
    // SAFETY: prctl, setns through a pidfd we hold, socket, recv/send on our socketpair.
    unsafe {
        // Not dumpable: nothing of the sandbox's user namespace may ptrace it.
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        let ns = if plan.root {
            // Root built the network namespace in the initial user namespace.
            libc::CLONE_NEWNET
        } else {
            libc::CLONE_NEWUSER | libc::CLONE_NEWNET
        };
        if libc::setns(plan.holder, ns) < 0 {
            libc::_exit(1);
        }
        libc::close(plan.holder);
        let mut b = [0u8; 1];
        loop {
            let n = libc::recv(plan.sock, b.as_mut_ptr().cast(), 1, 0);
            if n == 0 {
                libc::_exit(0);
            }
            if n < 0 {
                if crate::error::errno() == libc::EINTR {
                    continue;
                }
                libc::_exit(1);
            }
            let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if s < 0 {
                // A message without a descriptor: the supervisor's recv_fd fails.
                libc::send(plan.sock, b.as_ptr().cast(), 1, libc::MSG_NOSIGNAL);
                continue;
            }
            let _ = crate::fdpass::send_fd(plan.sock, s);
            libc::close(s);
        }
    }
}
