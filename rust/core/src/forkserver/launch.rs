//! Starting a fork server: a socket pair, a fork of the supervisor that execs the fork server's
//! program with the socket at [`CONTROL_FD`], a minimal environment and a parent-death signal, then
//! the fork server's hello.

use super::{serve, wire, Forkserver, CONTROL_FD, START_LIMIT};
use crate::fdpass;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

fn control_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let pair = fdpass::seqpacket_pair()?;
    for fd in [&pair.0, &pair.1] {
        let size = wire::SOCKET_BUFFER as libc::c_int;
        for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            // SAFETY: setsockopt with an int option value on a socket we own. The kernel caps
            // the size at its maximum; a request that does not fit takes the direct clone.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
    Ok(pair)
}

/// Starts the fork server process and waits for its hello.
pub(super) fn launch(argv: &[CString]) -> std::io::Result<Forkserver> {
    let (ours, theirs) = control_pair()?;
    // SAFETY: open(2) of a static path.
    let devnull = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if devnull < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let devnull = unsafe { OwnedFd::from_raw_fd(devnull) };
    // Only what the dynamic loader may need: the caller's environment (API keys among it) must
    // not be copied into the fork server, whose memory every PID 1 starts from.
    let envp: Vec<CString> = ["LD_LIBRARY_PATH"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
        .filter_map(|kv| CString::new(kv).ok())
        .collect();
    let argv_ptrs = crate::child::CStringArray::new(argv.to_vec());
    let envp_ptrs = crate::child::CStringArray::new(envp);
    // SAFETY: getpid has no side effects.
    let parent = unsafe { libc::getpid() };
    let (null, sock) = (devnull.as_raw_fd(), theirs.as_raw_fd());
    let child = || {
        // SAFETY: in the forked child of a multithreaded process: raw syscalls on fds and
        // buffers prepared above, then execve (or _exit).
        unsafe {
            let empty: libc::sigset_t = std::mem::zeroed();
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if sock == CONTROL_FD {
                libc::fcntl(sock, libc::F_SETFD, 0);
            } else {
                libc::dup2(sock, CONTROL_FD);
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            libc::syscall(libc::SYS_close_range, CONTROL_FD + 1, u32::MAX, 0);
            libc::execve(*argv_ptrs.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr());
            libc::_exit(127);
        }
    };
    let (_, pidfd) = crate::spawn::clone_with(0, child)?;
    drop(theirs);
    let z = Forkserver {
        sock: ours,
        pidfd,
        owner: std::process::id(),
        plans: Vec::new(),
        next_slot: 0,
    };
    if !crate::spawn::wait_readable(&z.sock, Instant::now() + START_LIMIT) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the fork server did not start",
        ));
    }
    let mut hello = [0u8; 64];
    let (n, _) = fdpass::recv_msg(z.sock.as_fd(), &mut hello)?;
    if hello[..n] != *serve::HELLO {
        return Err(std::io::Error::other("the fork server did not say hello"));
    }
    Ok(z)
}
