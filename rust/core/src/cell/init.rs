//! The child side of a pre-created cell: once the sandbox is built, PID 1 waits for one request
//! on its control socket and starts that command like any run's PID 1. Raw syscalls only.

use crate::child::{self, ChildFds, Stage, TargetView};
use crate::error::errno;

/// What a cell's PID 1 needs to receive one request; allocated by the parent before the clone.
#[derive(Debug)]
pub struct ServePlan {
    /// Receive buffer, 8-aligned, zero-filled, [`super::wire::REQUEST_CAP`] bytes.
    pub buf: *mut u8,
    /// Top of the stack the command's process runs on until execve.
    pub stack_top: *mut libc::c_void,
    /// Highest capability number of this kernel.
    pub last_cap: u32,
}

/// Blocks until the request arrives and returns it decoded. Exits when the control socket
/// closes first (the pool dropped the cell, or its owner is gone). Never allocates.
pub fn await_request(plan: &ServePlan, fds: &ChildFds) -> TargetView<'static> {
    let n = loop {
        // SAFETY: receiving into the buffer prepared for it, at most its size.
        let n = unsafe {
            libc::recv(
                fds.fdsock,
                plan.buf.cast(),
                super::wire::REQUEST_CAP,
                libc::MSG_TRUNC,
            )
        };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            // SAFETY: nothing to clean up: the kernel ends the namespaces with us.
            unsafe { libc::_exit(0) };
        }
        break n as usize;
    };
    // SAFETY: the buffer is REQUEST_CAP bytes and holds what was received (a longer message
    // was truncated: `n` then exceeds the cap and decode refuses it).
    match unsafe { super::wire::decode(plan.buf, n, plan.stack_top, plan.last_cap) } {
        Some(view) => view,
        None => child::fail(fds.err, Stage::Sync, 1, libc::EINVAL),
    }
}
