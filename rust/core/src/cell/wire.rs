//! The request a pre-created cell's PID 1 receives: one message holding the command's argv,
//! environment, exec candidates, cwd, rlimits and seccomp filter, laid out so that PID 1 uses
//! it in place (it is a copy of a multithreaded process and may not allocate).
//!
//! PID 1 is a copy of the parent made after its receive buffer was allocated, so the buffer
//! sits at the same address in both: the parent writes absolute pointers into that buffer, and
//! PID 1 only checks that every pointer lies inside the message it received.

use crate::child::{TargetPlan, TargetView};
use crate::spawn::Rlimit;
use std::mem::{align_of, size_of};

/// Marks a request ("cellblk1").
const MAGIC: u64 = 0x6365_6c6c_626c_6b31;

/// Size of PID 1's receive buffer: requests that do not fit take the cold path.
pub const REQUEST_CAP: usize = 128 * 1024;

/// Start of a request: addresses (in PID 1's buffer) and counts of its parts.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Header {
    magic: u64,
    len: u64,
    argv: u64,
    envp: u64,
    cands: u64,
    ncands: u64,
    cwd: u64,
    rlimits: u64,
    nrlimits: u64,
    bpf: u64,
    nbpf: u64,
}

const HEADER: usize = size_of::<Header>();
const INSN: usize = size_of::<libc::sock_filter>();

fn align_up(n: usize, a: usize) -> usize {
    n.div_ceil(a) * a
}

struct Writer {
    base: u64,
    out: Vec<u8>,
}

impl Writer {
    /// Appends `bytes` at an `align`-aligned offset; returns its address in PID 1's buffer.
    fn push(&mut self, bytes: &[u8], align: usize) -> u64 {
        let off = align_up(self.out.len(), align);
        self.out.resize(off, 0);
        self.out.extend_from_slice(bytes);
        self.base + off as u64
    }

    /// Appends NUL-terminated strings and then their NULL-terminated pointer array.
    fn strings<'a>(&mut self, items: impl Iterator<Item = &'a [u8]>) -> (u64, u64) {
        let addrs: Vec<u64> = items.map(|s| self.push(s, 1)).collect();
        let mut words: Vec<u8> = addrs.iter().flat_map(|a| a.to_ne_bytes()).collect();
        words.extend_from_slice(&0u64.to_ne_bytes());
        (self.push(&words, 8), addrs.len() as u64)
    }
}

/// Encodes `target` for a PID 1 whose receive buffer starts at `base` (8-aligned). `None` when
/// the request would not fit in [`REQUEST_CAP`].
pub fn encode(base: usize, target: &TargetPlan) -> Option<Vec<u8>> {
    let mut w = Writer {
        base: base as u64,
        out: vec![0; HEADER],
    };
    let mut h = Header {
        magic: MAGIC,
        ..Header::default()
    };
    let bytes = |a: &crate::child::CStringArray| {
        a.strings()
            .iter()
            .map(|s| s.as_bytes_with_nul().to_vec())
            .collect::<Vec<_>>()
    };
    let (argv, envp, cands) = (
        bytes(&target.argv),
        bytes(&target.envp),
        bytes(&target.exec_candidates),
    );
    h.argv = w.strings(argv.iter().map(|v| v.as_slice())).0;
    h.envp = w.strings(envp.iter().map(|v| v.as_slice())).0;
    (h.cands, h.ncands) = w.strings(cands.iter().map(|v| v.as_slice()));
    h.cwd = w.push(target.cwd.as_bytes_with_nul(), 1);
    // Rlimits are laid out as PID 1 (the same binary) reads them: `Rlimit` values, written
    // field by field so that no padding byte is ever read.
    let (size, align) = (size_of::<Rlimit>(), align_of::<Rlimit>());
    let mut rl = vec![0u8; size * target.rlimits.len()];
    for (i, r) in target.rlimits.iter().enumerate() {
        let p = rl[i * size..].as_mut_ptr().cast::<Rlimit>();
        // SAFETY: `p` points at `size` bytes inside `rl`; unaligned writes of the two fields.
        unsafe {
            std::ptr::addr_of_mut!((*p).0).write_unaligned(r.0);
            std::ptr::addr_of_mut!((*p).1).write_unaligned(r.1);
        }
    }
    h.rlimits = w.push(&rl, align.max(8));
    h.nrlimits = target.rlimits.len() as u64;
    if let Some(prog) = &target.seccomp {
        let mut insns = Vec::with_capacity(prog.insns().len() * INSN);
        for i in prog.insns() {
            insns.extend_from_slice(&i.code.to_ne_bytes());
            insns.extend_from_slice(&[i.jt, i.jf]);
            insns.extend_from_slice(&i.k.to_ne_bytes());
        }
        h.bpf = w.push(&insns, 8);
        h.nbpf = prog.insns().len() as u64;
    }
    if w.out.len() > REQUEST_CAP {
        return None;
    }
    h.len = w.out.len() as u64;
    let fields = [
        h.magic, h.len, h.argv, h.envp, h.cands, h.ncands, h.cwd, h.rlimits, h.nrlimits, h.bpf,
        h.nbpf,
    ];
    for (i, f) in fields.iter().enumerate() {
        w.out[i * 8..i * 8 + 8].copy_from_slice(&f.to_ne_bytes());
    }
    Some(w.out)
}

/// Checks a received request of `n` bytes in `buf` (8-aligned, zero-filled past the request)
/// and returns the view PID 1 starts the command from. Child-side: no allocation.
///
/// # Safety
/// `buf` must be valid for [`REQUEST_CAP`] bytes and hold what the kernel received.
pub unsafe fn decode<'a>(
    buf: *const u8,
    n: usize,
    stack_top: *mut libc::c_void,
    last_cap: u32,
) -> Option<TargetView<'a>> {
    if !(HEADER..=REQUEST_CAP).contains(&n) || !(buf as usize).is_multiple_of(8) {
        return None;
    }
    // SAFETY: `buf` is 8-aligned and holds at least HEADER bytes.
    let h = unsafe { std::ptr::read(buf.cast::<Header>()) };
    let (lo, hi) = (buf as u64, buf as u64 + n as u64);
    let inside = |addr: u64, bytes: u64, align: u64| {
        addr >= lo && addr.checked_add(bytes).is_some_and(|e| e <= hi) && addr.is_multiple_of(align)
    };
    if h.magic != MAGIC || h.len != n as u64 || !inside(h.cwd, 1, 1) {
        return None;
    }
    // A NULL-terminated pointer array whose every entry points inside the request.
    let ptrs = |addr: u64| -> Option<usize> {
        let mut i = 0u64;
        loop {
            if !inside(addr + i * 8, 8, 8) {
                return None;
            }
            // SAFETY: checked to lie inside the request, aligned.
            let p = unsafe { std::ptr::read((addr + i * 8) as *const u64) };
            if p == 0 {
                return Some(i as usize);
            }
            if !inside(p, 1, 1) {
                return None;
            }
            i += 1;
        }
    };
    ptrs(h.argv)?;
    ptrs(h.envp)?;
    if ptrs(h.cands)? != h.ncands as usize {
        return None;
    }
    let rsize = size_of::<Rlimit>() as u64;
    if !inside(h.rlimits, h.nrlimits * rsize, align_of::<Rlimit>() as u64)
        || h.nbpf > crate::seccomp::MAX_INSNS as u64
        || (h.nbpf > 0 && !inside(h.bpf, h.nbpf * INSN as u64, 8))
    {
        return None;
    }
    // SAFETY: every range was checked to lie inside the request and to be aligned; the request
    // stays untouched while PID 1 lives.
    unsafe {
        Some(TargetView {
            argv: h.argv as *const *const libc::c_char,
            envp: h.envp as *const *const libc::c_char,
            exec_candidates: std::slice::from_raw_parts(
                h.cands as *const *const libc::c_char,
                h.ncands as usize,
            ),
            cwd: h.cwd as *const libc::c_char,
            rlimits: std::slice::from_raw_parts(h.rlimits as *const Rlimit, h.nrlimits as usize),
            seccomp: (h.nbpf > 0).then(|| {
                std::slice::from_raw_parts(h.bpf as *const libc::sock_filter, h.nbpf as usize)
            }),
            last_cap,
            stack_top,
            // Runs with a terminal take the cold path (see `pool::Shape::of`).
            tty: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::child::CStringArray;
    use std::ffi::{CStr, CString};

    fn plan() -> TargetPlan {
        let cs = |v: &[&str]| {
            CStringArray::new(
                v.iter()
                    .map(|s| CString::new(*s).expect("test value"))
                    .collect(),
            )
        };
        let bpf: Vec<u8> = [
            6u16.to_ne_bytes().as_slice(),
            &[0, 0],
            &0x7fff_0000u32.to_ne_bytes(),
        ]
        .concat();
        TargetPlan {
            argv: cs(&["python3", "-c", "pass"]),
            envp: cs(&["PATH=/usr/bin", "HOME=/workspace"]),
            exec_candidates: cs(&["/usr/bin/python3"]),
            cwd: CString::new("/workspace").expect("test value"),
            rlimits: vec![(libc::RLIMIT_CORE, 0), (libc::RLIMIT_NPROC, 256)],
            seccomp: Some(crate::seccomp::Program::from_bytes(&bpf).expect("test value")),
            last_cap: 40,
            stack: Vec::new(),
            tty: None,
        }
    }

    /// Copies an encoded request into an aligned, zero-filled buffer like PID 1's.
    fn received(t: &TargetPlan) -> (Vec<u64>, usize) {
        let mut buf = vec![0u64; REQUEST_CAP / 8];
        let msg = encode(buf.as_ptr() as usize, t).expect("test value");
        // SAFETY: the message fits the buffer (REQUEST_CAP).
        unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.as_mut_ptr().cast(), msg.len()) };
        (buf, msg.len())
    }

    #[test]
    fn a_request_decodes_in_place() {
        let t = plan();
        let (buf, n) = received(&t);
        // SAFETY: buf is an aligned REQUEST_CAP buffer holding the request.
        let v = unsafe { decode(buf.as_ptr().cast(), n, std::ptr::null_mut(), 40) }
            .expect("test value");
        // SAFETY: decode checked every pointer.
        let s = |p: *const libc::c_char| {
            unsafe { CStr::from_ptr(p) }
                .to_str()
                .expect("test value")
                .to_string()
        };
        // SAFETY: argv is NULL-terminated with 3 entries.
        let argv: Vec<String> = (0..3).map(|i| s(unsafe { *v.argv.add(i) })).collect();
        assert_eq!(argv, ["python3", "-c", "pass"]);
        // SAFETY: as above.
        assert!(unsafe { *v.argv.add(3) }.is_null());
        assert_eq!(s(v.cwd), "/workspace");
        assert_eq!(v.exec_candidates.len(), 1);
        assert_eq!(s(v.exec_candidates[0]), "/usr/bin/python3");
        assert_eq!(v.rlimits, &t.rlimits[..]);
        let f = v.seccomp.expect("test value");
        assert_eq!((f.len(), f[0].code, f[0].k), (1, 6, 0x7fff_0000));
    }

    #[test]
    fn damaged_requests_are_refused() {
        let t = plan();
        let (mut buf, n) = received(&t);
        let p = buf.as_ptr().cast::<u8>();
        // SAFETY (all three): buf is an aligned REQUEST_CAP buffer.
        assert!(unsafe { decode(p, n - 1, std::ptr::null_mut(), 40) }.is_none());
        buf[2] = 8; // argv array address now outside the request
        assert!(unsafe { decode(buf.as_ptr().cast(), n, std::ptr::null_mut(), 40) }.is_none());
        buf[0] = 0;
        assert!(unsafe { decode(buf.as_ptr().cast(), n, std::ptr::null_mut(), 40) }.is_none());
    }

    #[test]
    fn oversized_requests_do_not_fit() {
        let mut t = plan();
        let big = "x".repeat(REQUEST_CAP);
        t.envp = CStringArray::new(vec![CString::new(big).expect("test value")]);
        assert!(encode(8, &t).is_none());
    }
}
