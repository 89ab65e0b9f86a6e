//! Terminals: a run with [`crate::spec::TtySize`] gets a pseudo-terminal of the sandbox's own
//! devpts instance (see [`crate::fs::DEVPTS_OPTIONS`]) as stdin, stdout and stderr, and is the
//! session leader with it as its controlling terminal.
//!
//! The command's process opens the pty itself, after the sandbox's root is built and before it
//! sheds its privileges: so the pty belongs to the sandbox's devpts instance whatever path
//! (root or unprivileged, one-shot or session call) built it. It hands the master to the
//! supervisor over the fd-passing socket ([`crate::fdpass`]), where it replaces the stdout pipe
//! (the output is the terminal's, stdout and stderr merged, redacted and capped like any) and
//! the stdin pipe (input is typed into the terminal). The caller's own terminal is never passed
//! in: the command's stdio are pipes or this pty, and `setsid` leaves it no other controlling
//! terminal, so TIOCSTI cannot reach the caller (cf. bubblewrap's CVE-2017-5226).

use crate::error::{errno, Error, Result};
use crate::spec::TtySize;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The ptmx of the sandbox's devpts instance, as seen inside.
const PTMX: &std::ffi::CStr = c"/dev/pts/ptmx";

/// Refuses a window size a terminal cannot have.
pub(crate) fn validate(tty: Option<&TtySize>) -> Result<()> {
    match tty {
        Some(t) if t.rows == 0 || t.cols == 0 => Err(Error::InvalidSpec(format!(
            "tty: a window of {} rows and {} columns is empty (both must be at least 1)",
            t.rows, t.cols
        ))),
        _ => Ok(()),
    }
}

fn winsize(rows: u16, cols: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// In the command's process, after setsid and with stdio already on 0, 1 and 2: opens a pty of
/// the sandbox's devpts instance, sends its master to the supervisor on `fdsock`, and makes the
/// slave the controlling terminal and fds 0, 1 and 2. Raw syscalls only (no allocation); on
/// failure returns (step, errno).
pub(crate) fn attach_in_child(
    rows: u16,
    cols: u16,
    fdsock: libc::c_int,
) -> std::result::Result<(), (u32, i32)> {
    // SAFETY: open/ioctl/dup2/close on descriptors this process owns; the ioctl arguments are
    // stack values of the types the kernel expects.
    unsafe {
        let master = libc::open(
            PTMX.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if master < 0 {
            return Err((0, errno()));
        }
        let fail = |step: u32| {
            let e = errno();
            libc::close(master);
            Err((step, e))
        };
        let unlock: libc::c_int = 0;
        if libc::ioctl(master, libc::TIOCSPTLCK, &unlock) < 0 {
            return fail(1);
        }
        let ws = winsize(rows, cols);
        if libc::ioctl(master, libc::TIOCSWINSZ, &ws) < 0 {
            return fail(2);
        }
        // The slave straight from the master: no path lookup another process could race.
        let slave = libc::ioctl(master, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY);
        if slave < 0 {
            return fail(3);
        }
        if let Err(e) = crate::fdpass::send_fd(fdsock, master) {
            libc::close(slave);
            libc::close(master);
            return Err((4, e));
        }
        libc::close(master);
        if libc::ioctl(slave, libc::TIOCSCTTY, 0) < 0 {
            let e = errno();
            libc::close(slave);
            return Err((5, e));
        }
        for fd in 0..3 {
            if libc::dup2(slave, fd) < 0 {
                let e = errno();
                libc::close(slave);
                return Err((6, e));
            }
        }
        libc::close(slave);
    }
    Ok(())
}

/// Sets the window size of a run's terminal (its master, held by the supervisor); the
/// kernel sends SIGWINCH to the terminal's foreground process group when it changes.
pub fn set_window(master: BorrowedFd<'_>, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = winsize(rows, cols);
    // SAFETY: TIOCSWINSZ reads a winsize from our stack.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `fd` is a terminal (the master of a tty run).
pub fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: isatty only queries the descriptor.
    unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_windows_are_refused() {
        assert!(validate(None).is_ok());
        assert!(validate(Some(&TtySize { rows: 24, cols: 80 })).is_ok());
        for (rows, cols) in [(0, 80), (24, 0)] {
            let e = validate(Some(&TtySize { rows, cols }));
            assert!(matches!(e, Err(Error::InvalidSpec(m)) if m.contains("tty")));
        }
    }
}
