//! Passing file descriptors over a unix socket (SCM_RIGHTS): how a child hands the supervisor
//! what it created inside the sandbox (a seccomp listener, a call's pidfd, network sockets).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Most fds one message carries.
pub const MAX_FDS: usize = 24;

/// Control-message buffer, aligned for `cmsghdr`, large enough for MAX_FDS fds.
#[repr(C, align(8))]
struct CmsgBuf([u8; 128]);

/// A connected pair of unix `SOCK_SEQPACKET` sockets, close-on-exec: messages keep their
/// boundaries and carry fds.
pub fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned by us.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends `fd` over the unix socket `sock`. Async-signal-safe: no allocation (for children).
pub fn send_fd(sock: libc::c_int, fd: libc::c_int) -> Result<(), libc::c_int> {
    send_fds(sock, &[fd])
}

/// Sends up to [`MAX_FDS`] fds in one message. Async-signal-safe.
pub fn send_fds(sock: libc::c_int, fds: &[libc::c_int]) -> Result<(), libc::c_int> {
    if fds.is_empty() {
        return Err(libc::EINVAL);
    }
    send_msg(sock, &[0u8], fds)
}

/// Sends `data` (not empty) with up to [`MAX_FDS`] fds (maybe none) as one message.
/// Async-signal-safe: no allocation.
pub fn send_msg(sock: libc::c_int, data: &[u8], fds: &[libc::c_int]) -> Result<(), libc::c_int> {
    if data.is_empty() || fds.len() > MAX_FDS {
        return Err(libc::EINVAL);
    }
    let bytes = std::mem::size_of_val(fds) as u32;
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut buf = CmsgBuf([0; 128]);
    // SAFETY: msghdr/cmsghdr are built in stack buffers large and aligned enough for MAX_FDS
    // fds; CMSG_* compute offsets inside `buf`; the kernel only reads `data` through the iovec.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let space = libc::CMSG_SPACE(bytes) as usize;
            msg.msg_control = buf.0.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(bytes) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                bytes as usize,
            );
        }
        loop {
            if libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) >= 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if e != libc::EINTR {
                return Err(e);
            }
        }
    }
}

/// Receives one fd sent by [`send_fd`] (blocking). EOF or a message without an fd is an error.
pub fn recv_fd(sock: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    recv_fds(sock)?.into_iter().next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no descriptor received")
    })
}

/// Receives the fds of one message sent by [`send_fds`] (blocking).
pub fn recv_fds(sock: BorrowedFd<'_>) -> std::io::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    let (n, fds) = recv_msg(sock, &mut byte)?;
    if n == 0 || fds.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "no descriptor received",
        ));
    }
    Ok(fds)
}

/// Receives one message into `data` and the fds it carries (blocking): (bytes, fds). 0 bytes
/// is EOF. A message longer than `data` is an error (its fds are closed).
pub fn recv_msg(sock: BorrowedFd<'_>, data: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut buf = CmsgBuf([0; 128]);
    // SAFETY: as in send_msg; every received fd is owned by the returned OwnedFds.
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
        let mut fds = Vec::new();
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if !cmsg.is_null()
            && (*cmsg).cmsg_level == libc::SOL_SOCKET
            && (*cmsg).cmsg_type == libc::SCM_RIGHTS
        {
            let data_len = (*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize;
            let count = (data_len / std::mem::size_of::<libc::c_int>()).min(MAX_FDS);
            let mut raw = [-1 as libc::c_int; MAX_FDS];
            std::ptr::copy_nonoverlapping(
                libc::CMSG_DATA(cmsg),
                raw.as_mut_ptr().cast::<u8>(),
                count * 4,
            );
            fds = raw[..count]
                .iter()
                .map(|&fd| OwnedFd::from_raw_fd(fd))
                .collect();
        }
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "message truncated",
            ));
        }
        Ok((n as usize, fds))
    }
}
