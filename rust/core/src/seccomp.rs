//! Seccomp: install a compiled BPF filter in the child, and answer its refusals in the supervisor.
//!
//! The filter comes from Python (libseccomp), already compiled for this architecture: refused
//! calls return `SECCOMP_RET_USER_NOTIF`. The child installs it with
//! `SECCOMP_FILTER_FLAG_NEW_LISTENER` as its last step before `execve` and hands the listener fd
//! to the supervisor over a unix socket. The supervisor's [`Listener`] receives each refused
//! call, answers `EPERM` (or leaves it unanswered until the run is killed, for
//! `on_violation = "kill"`) and counts it per syscall name.
//!
//! If the listener is closed, pending and later refused calls fail with `ENOSYS` (kernel rule).

use crate::error::errno;
use crate::report::Violation;
use crate::spec::OnViolation;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;

/// Size of one `struct sock_filter` instruction.
const INSN_LEN: usize = std::mem::size_of::<libc::sock_filter>();
/// The kernel's limit on a classic BPF program (BPF_MAXINSNS).
pub const MAX_INSNS: usize = 4096;
/// Room past the structs we know, in case the running kernel's versions are larger.
const SPARE: usize = 64;

/// A validated classic-BPF program, prepared in the parent before fork.
#[derive(Clone)]
pub struct Program {
    insns: Vec<libc::sock_filter>,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Program({} instructions)", self.insns.len())
    }
}

impl Program {
    /// Validates length (multiple of 8, 1..=4096 instructions) and decodes the instructions
    /// (native byte order, as libseccomp exports them).
    pub fn from_bytes(bpf: &[u8]) -> Result<Program> {
        if !bpf.chunks_exact(INSN_LEN).remainder().is_empty() {
            return Err(Error::Seccomp(format!(
                "BPF program of {} bytes is not a whole number of {INSN_LEN}-byte instructions",
                bpf.len()
            )));
        }
        let n = bpf.len() / INSN_LEN;
        if !(1..=MAX_INSNS).contains(&n) {
            return Err(Error::Seccomp(format!(
                "BPF program has {n} instructions (1..={MAX_INSNS} allowed)"
            )));
        }
        let insns = bpf
            .chunks_exact(INSN_LEN)
            .map(|c| libc::sock_filter {
                code: u16::from_ne_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        Ok(Program { insns })
    }

    /// The decoded instructions.
    pub fn insns(&self) -> &[libc::sock_filter] {
        &self.insns
    }

    /// The program in the form [`Program::from_bytes`] reads.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.insns.len() * INSN_LEN);
        for i in &self.insns {
            out.extend_from_slice(&i.code.to_ne_bytes());
            out.extend_from_slice(&[i.jt, i.jf]);
            out.extend_from_slice(&i.k.to_ne_bytes());
        }
        out
    }
}

/// Called in the forked child as the very last step before execve, after PR_SET_NO_NEW_PRIVS.
/// Async-signal-safe: raw syscalls only, no allocation. Installs the filter with
/// SECCOMP_FILTER_FLAG_NEW_LISTENER and returns the listener fd (close-on-exec) or an errno.
/// `insns` comes from a [`Program`] (at most MAX_INSNS instructions).
pub fn install(insns: &[libc::sock_filter]) -> Result<libc::c_int, libc::c_int> {
    let fprog = libc::sock_fprog {
        // from_bytes bounds the length to MAX_INSNS, which fits.
        len: insns.len() as libc::c_ushort,
        filter: insns.as_ptr().cast_mut(),
    };
    // SAFETY: fprog points at the instructions, alive for the call; the kernel copies them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER as libc::c_ulong,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc < 0 {
        Err(errno())
    } else {
        Ok(rc as libc::c_int)
    }
}

/// Supervisor side: answers notifications with EPERM and counts them per syscall name.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    names: crate::spec::SyscallNames,
    counts: BTreeMap<String, u64>,
    on_violation: OnViolation,
    closed: bool,
}

impl Listener {
    /// A listener answering EPERM. `names` maps syscall numbers to the names reported.
    pub fn new(fd: OwnedFd, names: crate::spec::SyscallNames) -> Listener {
        Listener {
            fd,
            names,
            counts: BTreeMap::new(),
            on_violation: OnViolation::Errno,
            closed: false,
        }
    }

    /// With [`OnViolation::Kill`], refused calls are counted but never answered: the caller stays
    /// blocked in the call until the supervisor kills the run (see [`Listener::kill_requested`]).
    pub fn on_violation(mut self, on_violation: OnViolation) -> Listener {
        self.on_violation = on_violation;
        self
    }

    /// The listener fd: poll it for POLLIN. It reports POLLHUP for good once no process uses the
    /// filter any more (possibly before the last one can be reaped): stop polling it when
    /// [`Listener::is_closed`] says so, or the poll loop spins.
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Receive and answer every pending notification (non-blocking); returns how many were handled.
    /// A process that died before it could be answered is not an error (it is still counted).
    pub fn drain(&mut self) -> io::Result<usize> {
        let (notif_size, resp_size) = notif_sizes()?;
        if notif_size > std::mem::size_of::<NotifBuf>()
            || resp_size > std::mem::size_of::<RespBuf>()
        {
            return Err(io::Error::other(
                "the kernel's seccomp notification structs are larger than expected",
            ));
        }
        let mut handled = 0;
        while self.pending()? {
            // SAFETY: all-zero is a valid value of these plain structs (and RECV requires zeroes).
            let mut req: NotifBuf = unsafe { std::mem::zeroed() };
            // SAFETY: req is a writable buffer at least as large as the kernel's seccomp_notif.
            if unsafe {
                libc::ioctl(
                    self.fd.as_raw_fd(),
                    libc::SECCOMP_IOCTL_NOTIF_RECV,
                    &mut req,
                )
            } < 0
            {
                match errno() {
                    // ENOENT: the caller was killed between poll and receive.
                    libc::EINTR | libc::ENOENT => continue,
                    e => return Err(io::Error::from_raw_os_error(e)),
                }
            }
            handled += 1;
            let nr = req.notif.data.nr;
            let name = u32::try_from(nr)
                .ok()
                .and_then(|nr| self.names.get(&nr).cloned())
                .unwrap_or_else(|| format!("syscall_{nr}"));
            *self.counts.entry(name).or_insert(0) += 1;
            if self.on_violation == OnViolation::Errno {
                self.answer_eperm(req.notif.id)?;
            }
        }
        Ok(handled)
    }

    /// `Violation::Seccomp { syscall, count }` per syscall name, sorted by name.
    pub fn violations(&self) -> Vec<Violation> {
        self.counts
            .iter()
            .map(|(name, &count)| Violation::Seccomp {
                syscall: name.clone(),
                count,
            })
            .collect()
    }

    /// True once no process uses the filter any more (seen by the last [`Listener::drain`]).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// True when `on_violation` is kill and a refused call was seen: the run must be killed.
    pub fn kill_requested(&self) -> bool {
        self.on_violation == OnViolation::Kill && !self.counts.is_empty()
    }

    /// Whether a notification waits to be received (never blocks).
    fn pending(&mut self) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd, zero timeout.
            let n = unsafe { libc::poll(&mut pfd, 1, 0) };
            if n >= 0 {
                self.closed |= pfd.revents & libc::POLLHUP != 0;
                return Ok(n > 0 && pfd.revents & libc::POLLIN != 0);
            }
            if errno() != libc::EINTR {
                return Err(io::Error::last_os_error());
            }
        }
    }

    fn answer_eperm(&self, id: u64) -> io::Result<()> {
        // SAFETY: all-zero is a valid value of this plain struct.
        let mut resp: RespBuf = unsafe { std::mem::zeroed() };
        resp.resp.id = id;
        resp.resp.error = -libc::EPERM;
        loop {
            // SAFETY: resp is readable and at least as large as the kernel's seccomp_notif_resp.
            if unsafe {
                libc::ioctl(
                    self.fd.as_raw_fd(),
                    libc::SECCOMP_IOCTL_NOTIF_SEND,
                    &mut resp,
                )
            } >= 0
            {
                return Ok(());
            }
            match errno() {
                libc::EINTR => continue,
                // The caller died (or was interrupted by a signal) before the answer.
                libc::ENOENT => return Ok(()),
                e => return Err(io::Error::from_raw_os_error(e)),
            }
        }
    }
}

/// A `seccomp_notif` with room for fields a newer kernel may append.
#[repr(C)]
struct NotifBuf {
    notif: libc::seccomp_notif,
    _spare: [u8; SPARE],
}

/// A `seccomp_notif_resp` with zeroed room for fields a newer kernel may append.
#[repr(C)]
struct RespBuf {
    resp: libc::seccomp_notif_resp,
    _spare: [u8; SPARE],
}

/// The kernel's sizes of `seccomp_notif` and `seccomp_notif_resp`, asked once.
fn notif_sizes() -> io::Result<(usize, usize)> {
    static SIZES: OnceLock<Result<(usize, usize), i32>> = OnceLock::new();
    let sizes = SIZES.get_or_init(|| {
        // SAFETY: all-zero is a valid value of this plain struct.
        let mut s: libc::seccomp_notif_sizes = unsafe { std::mem::zeroed() };
        // SAFETY: the kernel writes one seccomp_notif_sizes into s.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_GET_NOTIF_SIZES as libc::c_ulong,
                0,
                &mut s,
            )
        };
        if rc < 0 {
            Err(errno())
        } else {
            Ok((
                usize::from(s.seccomp_notif),
                usize::from(s.seccomp_notif_resp),
            ))
        }
    });
    sizes.map_err(io::Error::from_raw_os_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::fd::FromRawFd;

    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JEQ_K: u16 = 0x15;
    const BPF_RET_K: u16 = 0x06;

    fn insn(code: u16, jt: u8, jf: u8, k: u32) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..2].copy_from_slice(&code.to_ne_bytes());
        b[2] = jt;
        b[3] = jf;
        b[4..].copy_from_slice(&k.to_ne_bytes());
        b
    }

    /// A filter that sends `getppid` to the listener and allows everything else.
    fn notify_getppid() -> Program {
        let bytes: Vec<u8> = [
            insn(BPF_LD_W_ABS, 0, 0, 0), // A = seccomp_data.nr
            insn(BPF_JEQ_K, 0, 1, libc::SYS_getppid as u32),
            insn(BPF_RET_K, 0, 0, libc::SECCOMP_RET_USER_NOTIF),
            insn(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
        ]
        .concat();
        Program::from_bytes(&bytes).expect("valid program")
    }

    fn socketpair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two new descriptors, owned right after.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both fds were just created and are owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Forks a child that installs `notify_getppid`, sends the listener, and exits 0 iff
    /// getppid then fails with EPERM. Returns (pid, listener fd).
    fn spawn_getppid_child() -> (libc::pid_t, OwnedFd) {
        let prog = notify_getppid();
        let (parent_end, child_end) = socketpair();
        // SAFETY: the child only makes raw syscalls (async-signal-safe) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: raw syscalls in the forked child; no allocation, no locks.
            unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    libc::_exit(10);
                }
                let Ok(listener) = install(prog.insns()) else {
                    libc::_exit(11)
                };
                if crate::fdpass::send_fd(child_end.as_raw_fd(), listener).is_err() {
                    libc::_exit(12);
                }
                libc::close(listener);
                let r = libc::syscall(libc::SYS_getppid);
                libc::_exit(if r == -1 && errno() == libc::EPERM {
                    0
                } else {
                    13
                });
            }
        }
        drop(child_end);
        let listener =
            crate::fdpass::recv_fd(parent_end.as_fd()).expect("listener fd from the child");
        (pid, listener)
    }

    /// Answers notifications until no process uses the filter, then reaps the child.
    fn wait_answering(pid: libc::pid_t, listener: &mut Listener) -> libc::c_int {
        // Bounded safety net (not a timing assertion): 300 polls of at most 100 ms.
        for _ in 0..300 {
            let mut pfd = libc::pollfd {
                fd: listener.fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            listener.drain().expect("drain");
            if listener.is_closed() {
                let mut status = 0;
                // SAFETY: reaping our own child, which has left the filter (it is exiting).
                assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
                return status;
            }
        }
        kill_and_reap(pid);
        panic!("child did not finish");
    }

    fn kill_and_reap(pid: libc::pid_t) -> libc::c_int {
        let mut status = 0;
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, &mut status, 0);
        }
        status
    }

    #[test]
    fn program_length_is_validated() {
        assert!(Program::from_bytes(&[]).is_err());
        assert!(Program::from_bytes(&[0; 7]).is_err());
        assert!(Program::from_bytes(&[0; 8 * (MAX_INSNS + 1)]).is_err());
        assert_eq!(
            Program::from_bytes(&[0; 8 * MAX_INSNS])
                .map(|p| p.insns.len())
                .ok(),
            Some(MAX_INSNS)
        );
        let err = Program::from_bytes(&[0; 12]).expect_err("12 bytes is not a program");
        assert_eq!(err.kind(), "SeccompError");
    }

    #[test]
    fn program_decodes_instructions() {
        let p = notify_getppid();
        assert_eq!(p.insns.len(), 4);
        assert_eq!(p.insns[2].code, BPF_RET_K);
        assert_eq!(p.insns[2].k, libc::SECCOMP_RET_USER_NOTIF);
        assert_eq!(p.insns[1].jf, 1);
    }

    #[test]
    fn fd_passes_over_a_socket() {
        let (a, b) = socketpair();
        let mut p = [0; 2];
        // SAFETY: p has room for the pipe's two fds.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both pipe fds are fresh and owned here.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        crate::fdpass::send_fd(a.as_raw_fd(), w.as_raw_fd()).expect("send");
        drop(w);
        let w2 = crate::fdpass::recv_fd(b.as_fd()).expect("recv");
        // SAFETY: writing 2 bytes from a static buffer to our own pipe.
        assert_eq!(
            unsafe { libc::write(w2.as_raw_fd(), b"hi".as_ptr().cast(), 2) },
            2
        );
        let mut buf = [0u8; 2];
        // SAFETY: reading into a 2-byte buffer.
        assert_eq!(
            unsafe { libc::read(r.as_raw_fd(), buf.as_mut_ptr().cast(), 2) },
            2
        );
        assert_eq!(&buf, b"hi");
    }

    #[test]
    fn recv_fd_reports_a_peer_that_sent_nothing() {
        let (a, b) = socketpair();
        drop(a);
        let err = crate::fdpass::recv_fd(b.as_fd()).expect_err("nothing was sent");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn refused_call_gets_eperm_and_is_counted() {
        let (pid, fd) = spawn_getppid_child();
        let names = BTreeMap::from([(libc::SYS_getppid as u32, "getppid".to_string())]);
        let mut listener = Listener::new(fd, names.into());
        let status = wait_answering(pid, &mut listener);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "child saw something other than EPERM"
        );
        assert_eq!(
            listener.violations(),
            vec![Violation::Seccomp {
                syscall: "getppid".into(),
                count: 1
            }]
        );
        assert!(!listener.kill_requested());
    }

    #[test]
    fn unknown_numbers_are_named_by_number() {
        let (pid, fd) = spawn_getppid_child();
        let mut listener = Listener::new(fd, Default::default());
        wait_answering(pid, &mut listener);
        let expected = format!("syscall_{}", libc::SYS_getppid);
        assert_eq!(
            listener.violations(),
            vec![Violation::Seccomp {
                syscall: expected,
                count: 1
            }]
        );
    }

    #[test]
    fn kill_mode_leaves_the_call_unanswered() {
        let (pid, fd) = spawn_getppid_child();
        let mut listener = Listener::new(fd, Default::default()).on_violation(OnViolation::Kill);
        let mut pfd = libc::pollfd {
            fd: listener.fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; blocks until the child's getppid is pending.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 30_000) }, 1);
        assert_eq!(listener.drain().expect("drain"), 1);
        assert!(listener.kill_requested());
        let mut status = 0;
        // SAFETY: the child cannot have exited: its getppid is blocked until answered.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) }, 0);
        let status = kill_and_reap(pid);
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
        // Nothing left: the listener reports POLLHUP, not POLLIN, and drain does not block.
        assert_eq!(listener.drain().expect("drain after death"), 0);
        assert!(listener.is_closed());
    }

    #[test]
    fn a_caller_killed_before_the_answer_is_not_an_error() {
        let (pid, fd) = spawn_getppid_child();
        let mut listener = Listener::new(fd, Default::default());
        let mut pfd = libc::pollfd {
            fd: listener.fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; blocks until the child's getppid is pending.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 30_000) }, 1);
        kill_and_reap(pid);
        assert_eq!(listener.drain().expect("drain"), 0);
        assert!(listener.violations().is_empty());
    }
}
