//! Frames over the relay's socket, with the descriptors passed along them (SCM_RIGHTS).

use crate::error::{errno, Error, Result};
use crate::supervise;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Largest frame kept from the relay (results hold a capped repr). A larger one is read and
/// discarded as it arrives (never buffered), then reported as `Body::Dropped`.
pub(super) const MAX_FRAME: usize = 4 << 20;

/// What a frame carried.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Body {
    /// The payload, at most `MAX_FRAME` bytes.
    Data(Vec<u8>),
    /// The payload was over `MAX_FRAME`: its bytes were discarded; the size it announced.
    Dropped(usize),
}

/// A frame reader/writer over the relay's socket that also collects passed descriptors.
pub(super) struct Conn<'a> {
    pub(super) fd: BorrowedFd<'a>,
    buf: Vec<u8>,
    pub(super) fds: Vec<OwnedFd>,
    pub(super) eof: bool,
    /// An oversized frame being discarded: its kind, announced size, bytes still to come.
    skipping: Option<(u8, usize, usize)>,
}

impl<'a> Conn<'a> {
    pub(super) fn new(fd: BorrowedFd<'a>) -> Conn<'a> {
        supervise::set_nonblocking(&fd);
        Conn {
            fd,
            buf: Vec::new(),
            fds: Vec::new(),
            eof: false,
            skipping: None,
        }
    }

    /// Reads what is available (data and any descriptors). Ok(false): nothing now.
    pub(super) fn fill(&mut self) -> Result<bool> {
        let mut data = [0u8; 65536];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        #[repr(C, align(8))]
        struct Cmsg([u8; 256]);
        let mut cbuf = Cmsg([0; 256]);
        // SAFETY: msghdr built over our stack buffers; every received fd is owned below.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.0.as_mut_ptr().cast();
            msg.msg_controllen = cbuf.0.len();
            let n = libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n < 0 {
                return match errno() {
                    libc::EAGAIN | libc::EINTR => Ok(false),
                    e => {
                        self.eof = true;
                        Err(Error::Io(std::io::Error::from_raw_os_error(e)))
                    }
                };
            }
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let len = (*c).cmsg_len - libc::CMSG_LEN(0) as usize;
                    let data = libc::CMSG_DATA(c) as *const libc::c_int;
                    for i in 0..len / std::mem::size_of::<libc::c_int>() {
                        self.fds.push(OwnedFd::from_raw_fd(*data.add(i)));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
            if n == 0 {
                self.eof = true;
                return Ok(false);
            }
            self.buf.extend_from_slice(&data[..n as usize]);
        }
        Ok(true)
    }

    /// A complete frame from the buffer, if one is there.
    pub(super) fn frame(&mut self) -> Result<Option<(u8, Body)>> {
        if let Some((kind, size, left)) = self.skipping {
            let n = left.min(self.buf.len());
            self.buf.drain(..n);
            if n < left {
                self.skipping = Some((kind, size, left - n));
                return Ok(None);
            }
            self.skipping = None;
            return Ok(Some((kind, Body::Dropped(size))));
        }
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let size = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let size = size as usize;
        let kind = self.buf[0];
        if size > MAX_FRAME {
            // Content of the sandbox's making: never buffered past the cap, only counted off.
            self.buf.drain(..5);
            self.skipping = Some((kind, size, size));
            return self.frame();
        }
        if self.buf.len() < 5 + size {
            return Ok(None);
        }
        let payload = self.buf[5..5 + size].to_vec();
        self.buf.drain(..5 + size);
        Ok(Some((kind, Body::Data(payload))))
    }

    /// The next frame, waiting until `deadline`. None: EOF or deadline.
    pub(super) fn next(&mut self, deadline: Instant) -> Result<Option<(u8, Body)>> {
        loop {
            if let Some(f) = self.frame()? {
                return Ok(Some(f));
            }
            if self.eof {
                return Ok(None);
            }
            if !self.fill()? {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                poll_one(self.fd.as_raw_fd(), libc::POLLIN, left);
            }
        }
    }

    pub(super) fn send(&self, kind: u8, payload: &[u8], deadline: Instant) -> Result<()> {
        let mut data = Vec::with_capacity(5 + payload.len());
        data.push(kind);
        data.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        data.extend_from_slice(payload);
        let mut off = 0;
        while off < data.len() {
            // SAFETY: sending from our own buffer.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    data[off..].as_ptr().cast(),
                    data.len() - off,
                    libc::MSG_NOSIGNAL,
                )
            };
            if n > 0 {
                off += n as usize;
                continue;
            }
            match errno() {
                libc::EINTR => {}
                libc::EAGAIN => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::Io(std::io::ErrorKind::TimedOut.into()));
                    }
                    poll_one(self.fd.as_raw_fd(), libc::POLLOUT, left);
                }
                e => return Err(Error::Io(std::io::Error::from_raw_os_error(e))),
            }
        }
        Ok(())
    }
}

pub(super) fn poll_one(fd: libc::c_int, events: libc::c_short, wait: Duration) {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: polling one fd we hold.
    unsafe { libc::poll(&mut p, 1, ms) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn frame_of(kind: u8, size: usize) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&(size as u32).to_be_bytes());
        f.resize(5 + size, b'x');
        f
    }

    #[test]
    fn an_oversized_frame_is_discarded_unbuffered_and_the_next_one_read() {
        let (a, mut b) = UnixStream::pair().expect("socketpair");
        let writer = std::thread::spawn(move || {
            b.write_all(&frame_of(b'd', MAX_FRAME + 1)).expect("write");
            b.write_all(&frame_of(b'z', 3)).expect("write");
        });
        let mut conn = Conn::new(a.as_fd());
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut most = 0;
        let first = loop {
            if let Some(f) = conn.frame().expect("frame") {
                break f;
            }
            most = most.max(conn.buf.len());
            if !conn.fill().expect("fill") {
                poll_one(
                    conn.fd.as_raw_fd(),
                    libc::POLLIN,
                    Duration::from_millis(100),
                );
            }
            assert!(Instant::now() < deadline);
        };
        assert_eq!(first, (b'd', Body::Dropped(MAX_FRAME + 1)));
        assert!(most <= 1 << 17, "buffered {most} bytes of a dropped frame");
        let second = conn.next(deadline).expect("next");
        assert_eq!(second, Some((b'z', Body::Data(b"xxx".to_vec()))));
        writer.join().expect("writer");
    }
}
