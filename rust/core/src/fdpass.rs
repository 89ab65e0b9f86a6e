//! Passing file descriptors over a unix socket (SCM_RIGHTS): how a child hands the supervisor
//! what it created inside the sandbox (a seccomp listener, a call's pidfd, network sockets).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Control-message buffer, aligned for `cmsghdr`, large enough for one fd.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// Sends `fd` over the unix socket `sock`. Async-signal-safe: no allocation (for children).
pub fn send_fd(sock: libc::c_int, fd: libc::c_int) -> Result<(), libc::c_int> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let mut buf = CmsgBuf([0; 64]);
    // SAFETY: msghdr/cmsghdr are built in stack buffers large and aligned enough for one fd;
    // CMSG_* compute offsets inside `buf`.
    unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as usize;
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = buf.0.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
        std::ptr::copy_nonoverlapping((&fd as *const libc::c_int).cast::<u8>(), libc::CMSG_DATA(cmsg), 4);
        loop {
            if libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) >= 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
            if e != libc::EINTR {
                return Err(e);
            }
        }
    }
}

/// Receives one fd sent by [`send_fd`] (blocking). EOF or a message without an fd is an error.
pub fn recv_fd(sock: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let mut buf = CmsgBuf([0; 64]);
    // SAFETY: as in send_fd; the received fd, if any, is owned by the returned OwnedFd.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = buf.0.as_mut_ptr().cast();
        msg.msg_controllen = buf.0.len();
        let n = loop {
            let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break n;
            }
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if n == 0 || cmsg.is_null() || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no descriptor received"));
        }
        let mut fd: libc::c_int = -1;
        std::ptr::copy_nonoverlapping(libc::CMSG_DATA(cmsg), (&mut fd as *mut libc::c_int).cast::<u8>(), 4);
        Ok(OwnedFd::from_raw_fd(fd))
    }
}
