//! A time namespace per sandbox: its CLOCK_MONOTONIC and CLOCK_BOOTTIME (and with them
//! /proc/uptime and the `btime` of /proc/stat) start near 0 when the sandbox is built, so the
//! command learns nothing of the host's uptime or boot time.
//!
//! PID 1 makes it (see [`enter_new`]): unshare(CLONE_NEWTIME) only changes the namespace of
//! future children, whose offsets may be written until a first process enters it. PID 1 writes
//! them, then enters the namespace itself (setns): the kernel refuses a CLONE_VM clone (how PID
//! 1 starts the command) across time namespaces. A session call joins its holder's namespace.
//! Runs between clone and execve: raw syscalls only, no allocation.

use crate::error::errno;

/// Where the kernel shows a process's time namespace; present exactly when the kernel has time
/// namespaces (CONFIG_TIME_NS).
const NS_TIME: &[u8] = b"/proc/self/ns/time\0";
/// The offsets of the calling process's namespace for children (readable and, before anyone
/// entered it, writable).
const OFFSETS: &[u8] = b"/proc/self/timens_offsets\0";
/// The namespace the calling process's children will be in.
const NS_TIME_FOR_CHILDREN: &[u8] = b"/proc/self/ns/time_for_children\0";

/// Whether this kernel has time namespaces: the one test the supervisor (for the report) and
/// PID 1 (to tolerate an EINVAL) share. Raw syscall: safe between clone and execve.
pub(crate) fn kernel_has_timens() -> bool {
    // SAFETY: access(2) on a NUL-terminated static path.
    unsafe { libc::access(NS_TIME.as_ptr().cast(), libc::F_OK) == 0 }
}

/// Whether sandboxes get a time namespace of their own on this kernel (what reports say).
pub fn supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(kernel_has_timens)
}

/// A step of [`enter_new`] that failed, with its errno: the index of the `Unshare` stage.
pub(crate) type Failure = (u32, i32);

/// Indices of the `Unshare` stage (0 and 1 are the user and cgroup namespaces).
const STEP_UNSHARE: u32 = 2;
const STEP_READ: u32 = 3;
const STEP_WRITE: u32 = 4;
const STEP_ENTER: u32 = 5;

/// Puts the calling (single-threaded) process, and so every process it starts, in a new time
/// namespace whose monotonic and boot-time clocks read about 0 now (under a second, plus the
/// lag of CLOCK_MONOTONIC_RAW on the host for the monotonic clock). Returns
/// whether it did: `Ok(false)` when the kernel has no time namespaces.
pub(crate) fn enter_new() -> Result<bool, Failure> {
    // SAFETY: unshare has no memory effects.
    if unsafe { libc::unshare(libc::CLONE_NEWTIME) } < 0 {
        let e = errno();
        if e == libc::EINVAL && !kernel_has_timens() {
            return Ok(false);
        }
        return Err((STEP_UNSHARE, e));
    }
    // The new namespace starts with the caller's offsets (0 on the host, others when the caller
    // is itself in a time namespace); offsets are written relative to the host's clocks.
    let mut buf = [0u8; 128];
    let n = read_file(OFFSETS, &mut buf).map_err(|e| (STEP_READ, e))?;
    let inherited = parse_offsets(&buf[..n]).ok_or((STEP_READ, libc::EINVAL))?;
    // CLOCK_MONOTONIC_RAW shares the monotonic offset and may lag CLOCK_MONOTONIC (by the
    // host's accumulated NTP slewing): zero the earlier of the two, so neither starts negative.
    let mono = now(libc::CLOCK_MONOTONIC).min(now(libc::CLOCK_MONOTONIC_RAW));
    let boot = now(libc::CLOCK_BOOTTIME);
    let mut out = [0u8; 96];
    let len = format_offsets(
        &mut out,
        zeroing(inherited.monotonic, mono),
        zeroing(inherited.boottime, boot),
    );
    crate::child::write_file(OFFSETS, &out[..len]).map_err(|e| (STEP_WRITE, e))?;
    // SAFETY: open/setns/close of the namespace file of our own children.
    unsafe {
        let fd = libc::open(
            NS_TIME_FOR_CHILDREN.as_ptr().cast(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return Err((STEP_ENTER, errno()));
        }
        let r = libc::setns(fd, libc::CLONE_NEWTIME);
        let e = errno();
        libc::close(fd);
        if r < 0 {
            return Err((STEP_ENTER, e));
        }
    }
    Ok(true)
}

/// A clock offset (seconds, nanoseconds in 0..1e9), as /proc/<pid>/timens_offsets has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct Offset {
    sec: i64,
    nsec: i64,
}

/// The offsets of a time namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Offsets {
    monotonic: Offset,
    boottime: Offset,
}

/// The offset that makes a clock read `now`'s nanoseconds (under a second), given the offset
/// `inherited` the clock had when it read `now`: host = now - inherited, so host + result =
/// now.nsec. Never negative, as the kernel requires (the clock only moves on).
fn zeroing(inherited: Offset, now: Offset) -> Offset {
    Offset {
        sec: inherited.sec - now.sec,
        nsec: inherited.nsec,
    }
}

fn now(clock: libc::clockid_t) -> Offset {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    Offset {
        sec: ts.tv_sec,
        nsec: ts.tv_nsec,
    }
}

/// Parses `monotonic <sec> <nsec>` and `boottime <sec> <nsec>` lines (either clock may be
/// missing: offset 0).
fn parse_offsets(text: &[u8]) -> Option<Offsets> {
    let mut out = Offsets::default();
    for line in text.split(|b| *b == b'\n') {
        let mut words = line
            .split(|b| *b == b' ' || *b == b'\t')
            .filter(|w| !w.is_empty());
        let Some(name) = words.next() else { continue };
        let sec = parse_i64(words.next()?)?;
        let nsec = parse_i64(words.next()?)?;
        let off = Offset { sec, nsec };
        match name {
            b"monotonic" | b"1" => out.monotonic = off,
            b"boottime" | b"7" => out.boottime = off,
            _ => return None,
        }
    }
    Some(out)
}

fn parse_i64(word: &[u8]) -> Option<i64> {
    let (neg, digits) = match word.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, word),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: i64 = 0;
    for d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
    }
    Some(if neg { -v } else { v })
}

/// Writes `monotonic <sec> <nsec>\nboottime <sec> <nsec>\n` into `out` (96 bytes are enough);
/// returns the length.
fn format_offsets(out: &mut [u8; 96], monotonic: Offset, boottime: Offset) -> usize {
    let mut n = 0;
    for (name, off) in [(&b"monotonic"[..], monotonic), (&b"boottime"[..], boottime)] {
        n = put(out, n, name);
        n = put(out, n, b" ");
        n = put_i64(out, n, off.sec);
        n = put(out, n, b" ");
        n = put_i64(out, n, off.nsec);
        n = put(out, n, b"\n");
    }
    n
}

fn put(out: &mut [u8], at: usize, bytes: &[u8]) -> usize {
    let end = (at + bytes.len()).min(out.len());
    out[at..end].copy_from_slice(&bytes[..end - at]);
    end
}

fn put_i64(out: &mut [u8], at: usize, v: i64) -> usize {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut m = v.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (m % 10) as u8;
        m /= 10;
        if m == 0 {
            break;
        }
    }
    let at = if v < 0 { put(out, at, b"-") } else { at };
    put(out, at, &digits[i..])
}

fn read_file(path: &[u8], buf: &mut [u8]) -> Result<usize, i32> {
    // SAFETY: `path` is NUL-terminated; the fd is closed below; reads go into `buf`.
    unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(errno());
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        let e = errno();
        libc::close(fd);
        if n < 0 {
            return Err(e);
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_kernel_shows() {
        let text = b"monotonic           0         0\nboottime      -3600       250\n";
        let o = parse_offsets(text).expect("parsed");
        assert_eq!(o.monotonic, Offset { sec: 0, nsec: 0 });
        assert_eq!(
            o.boottime,
            Offset {
                sec: -3600,
                nsec: 250
            }
        );
        assert_eq!(parse_offsets(b"").expect("empty"), Offsets::default());
        assert!(parse_offsets(b"realtime 1 2\n").is_none());
        assert!(parse_offsets(b"monotonic x 0\n").is_none());
        assert!(parse_offsets(b"monotonic 1\n").is_none());
    }

    #[test]
    fn formats_what_the_kernel_reads() {
        let mut out = [0u8; 96];
        let n = format_offsets(
            &mut out,
            Offset {
                sec: -123456,
                nsec: 0,
            },
            Offset {
                sec: i64::MIN + 1,
                nsec: 999_999_999,
            },
        );
        let text = std::str::from_utf8(&out[..n]).expect("ascii");
        assert_eq!(
            text,
            "monotonic -123456 0\nboottime -9223372036854775807 999999999\n"
        );
        let back = parse_offsets(&out[..n]).expect("round trip");
        assert_eq!(back.monotonic.sec, -123456);
    }

    #[test]
    fn zeroing_leaves_only_the_fraction_of_a_second() {
        // Host clock 5000.3 s; the caller's namespace shows it 100.25 s ahead.
        let inherited = Offset {
            sec: 100,
            nsec: 250_000_000,
        };
        let now = Offset {
            sec: 5100,
            nsec: 550_000_000,
        };
        let z = zeroing(inherited, now);
        let host_ns = 5000 * 1_000_000_000i64 + 300_000_000;
        let inside = host_ns + z.sec * 1_000_000_000 + z.nsec;
        assert_eq!(inside, 550_000_000);
        assert!((0..1_000_000_000).contains(&z.nsec));
    }
}
