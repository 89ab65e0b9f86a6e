//! What the supervisor sends its fork server for one PID 1, and what comes back.
//!
//! A request is one `SOCK_SEQPACKET` message: the plan (postcard) as data, the run's fds as
//! `SCM_RIGHTS`, in the order of [`FdLayout`]. The reply carries the new PID 1's pid (or the
//! errno of its clone) and its pidfd.

use crate::child::{CStringArray, ChildFds, Identity, TargetPlan};
use crate::fs::MountPlan;
use crate::net::ChildPlan;
use crate::spawn::Rlimit;
use crate::spec::TtySize;
use serde::{Deserialize, Serialize};
use std::ffi::{CStr, CString};

/// Largest request: a larger plan (a huge argv or environment) takes the direct clone.
pub(crate) const REQUEST_CAP: usize = 192 * 1024;

/// Socket buffer size both ends ask for, so that a request of [`REQUEST_CAP`] fits.
pub(crate) const SOCKET_BUFFER: usize = 256 * 1024;

/// The plan of one PID 1, borrowed from the supervisor's prepared run.
#[derive(Serialize)]
pub(crate) struct RequestRef<'a> {
    /// Clone flags (namespaces), without the exit signal.
    pub flags: u64,
    /// Which fds follow the pipes.
    pub layout: FdLayout,
    /// Die with the supervisor's fork server thread.
    pub pdeathsig: bool,
    /// The mount plan; None for a session call's joiner (`join`).
    pub mounts: Option<MountsRef<'a>>,
    pub identity: &'a Identity,
    pub hostname: &'a [u8],
    /// The command; None for a pre-created cell's PID 1 (`serve`).
    pub target: Option<TargetRef<'a>>,
    /// A pre-created cell: PID 1 waits for its command (see [`crate::cell::init`]).
    pub serve: bool,
    /// A session call: the joiner enters the session whose holder's pidfd follows the pipes,
    /// built by root or not (see [`crate::child::join_main`]).
    pub join: Option<bool>,
    pub net: Option<&'a ChildPlan>,
}

/// [`RequestRef`] as the fork server decodes it (the same fields in the same order).
#[derive(Deserialize)]
pub(crate) struct Request {
    pub flags: u64,
    pub layout: FdLayout,
    pub pdeathsig: bool,
    pub mounts: Option<Mounts>,
    pub identity: Identity,
    pub hostname: Vec<u8>,
    pub target: Option<TargetOwned>,
    pub serve: bool,
    pub join: Option<bool>,
    pub net: Option<ChildPlan>,
}

/// Number of mount plans a fork server keeps: a plan (~150 KiB with the copied /etc files) is sent
/// once and named by its slot afterwards.
pub(crate) const PLAN_SLOTS: u8 = 8;

/// The mount plan of a request: sent into a slot, or the one a slot holds.
#[derive(Serialize)]
pub(crate) enum MountsRef<'a> {
    /// Keep this plan in the slot (replacing what it held) and use it.
    New(u8, &'a MountPlan),
    /// Use the plan the slot holds.
    Slot(u8),
}

/// [`MountsRef`] as decoded.
#[derive(Deserialize)]
pub(crate) enum Mounts {
    New(u8, MountPlan),
    Slot(u8),
}

/// Which fds a request carries after the eight of [`ChildFds`], in this order: a session
/// holder's pidfd, the network namespace to join, the cgroup v1 `tasks` files, the cgroup v2
/// directory to clone into.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FdLayout {
    pub holder: bool,
    pub netns: bool,
    pub tasks: u8,
    pub cgroup_dir: bool,
}

/// Number of [`ChildFds`] fields, sent first.
pub(crate) const PIPE_FDS: usize = 8;

impl FdLayout {
    /// How many fds the request carries in all.
    pub fn count(&self) -> usize {
        PIPE_FDS
            + usize::from(self.holder)
            + usize::from(self.netns)
            + usize::from(self.tasks)
            + usize::from(self.cgroup_dir)
    }
}

/// The pipe ends of a [`ChildFds`], in the order they are sent.
pub(crate) fn pipe_fds(c: &ChildFds) -> [libc::c_int; PIPE_FDS] {
    [
        c.stdin, c.stdout, c.stderr, c.ready, c.go, c.err, c.status, c.fdsock,
    ]
}

/// A [`ChildFds`] from fds received in [`pipe_fds`] order.
pub(crate) fn child_fds(f: &[libc::c_int; PIPE_FDS]) -> ChildFds {
    ChildFds {
        stdin: f[0],
        stdout: f[1],
        stderr: f[2],
        ready: f[3],
        go: f[4],
        err: f[5],
        status: f[6],
        fdsock: f[7],
    }
}

/// The command's part of a request, borrowed.
#[derive(Serialize)]
pub(crate) struct TargetRef<'a> {
    argv: &'a [CString],
    envp: &'a [CString],
    exec_candidates: &'a [CString],
    cwd: &'a CStr,
    rlimits: &'a [Rlimit],
    seccomp: Option<Vec<u8>>,
    tty: Option<TtySize>,
}

impl<'a> TargetRef<'a> {
    /// The parts of `t` PID 1 needs (its stack and the kernel's last capability are the
    /// fork server's own).
    pub fn of(t: &'a TargetPlan) -> TargetRef<'a> {
        TargetRef {
            argv: t.argv.strings(),
            envp: t.envp.strings(),
            exec_candidates: t.exec_candidates.strings(),
            cwd: &t.cwd,
            rlimits: &t.rlimits,
            seccomp: t.seccomp.as_ref().map(crate::seccomp::Program::to_bytes),
            tty: t.tty,
        }
    }
}

/// [`TargetRef`] as decoded.
#[derive(Deserialize)]
pub(crate) struct TargetOwned {
    argv: Vec<CString>,
    envp: Vec<CString>,
    exec_candidates: Vec<CString>,
    cwd: CString,
    rlimits: Vec<Rlimit>,
    seccomp: Option<Vec<u8>>,
    tty: Option<TtySize>,
}

impl TargetOwned {
    /// The target plan, with a fresh stack.
    pub fn into_plan(self) -> crate::Result<TargetPlan> {
        let seccomp = match self.seccomp {
            Some(b) => Some(crate::seccomp::Program::from_bytes(&b)?),
            None => None,
        };
        Ok(TargetPlan {
            argv: CStringArray::new(self.argv),
            envp: CStringArray::new(self.envp),
            exec_candidates: CStringArray::new(self.exec_candidates),
            cwd: self.cwd,
            rlimits: self.rlimits,
            seccomp,
            last_cap: crate::spawn::last_cap(),
            stack: vec![0; crate::child::TARGET_STACK],
            tty: self.tty,
        })
    }
}

/// The fork server's answer: the pid of PID 1 (its pidfd rides along) or the clone's errno.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reply {
    /// Host pid, or 0 when the clone failed.
    pub pid: i32,
    /// errno of the failed clone (0 on success); EPROTO for a request it could not read.
    pub errno: i32,
    /// Whether PID 1 started inside the cgroup v2 directory it was given.
    pub attached: bool,
    /// A cell's PID 1: the address of its request buffer (see [`crate::cell::wire`]).
    pub serve_buf: u64,
}

/// Encodes a request; None when it exceeds [`REQUEST_CAP`].
pub(crate) fn encode(req: &RequestRef<'_>) -> Option<Vec<u8>> {
    let bytes = postcard::to_stdvec(req).ok()?;
    (bytes.len() <= REQUEST_CAP).then_some(bytes)
}

/// Decodes a request.
pub(crate) fn decode(bytes: &[u8]) -> Option<Request> {
    postcard::from_bytes(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::Op;

    #[test]
    fn a_request_decodes_as_it_was_encoded() {
        let mounts = MountPlan {
            base: CString::new("/tmp/x/.root").expect("no NUL"),
            ops: vec![
                Op::Mkdir(CString::new("/a").expect("no NUL"), 0o755),
                Op::Write(
                    CString::new("/a/f").expect("no NUL"),
                    b"data\0\xff".to_vec(),
                ),
                Op::Mount {
                    src: None,
                    dst: CString::new("/a").expect("no NUL"),
                    fstype: Some(CString::new("tmpfs").expect("no NUL")),
                    flags: 6,
                    data: Some(CString::new("size=1m").expect("no NUL")),
                },
            ],
        };
        let identity = Identity::SelfMapped {
            uid_map: b"0 1000 1\n".to_vec(),
            gid_map: b"0 1000 1\n".to_vec(),
        };
        let bpf: Vec<u8> = (0..16u8).collect();
        let target = TargetPlan {
            argv: CStringArray::new(vec![CString::new("/bin/true").expect("no NUL")]),
            envp: CStringArray::new(vec![CString::new("A=b").expect("no NUL")]),
            exec_candidates: CStringArray::new(vec![CString::new("/bin/true").expect("no NUL")]),
            cwd: CString::new("/w").expect("no NUL"),
            rlimits: vec![(libc::RLIMIT_NOFILE, 64)],
            seccomp: Some(crate::seccomp::Program::from_bytes(&bpf).expect("two insns")),
            last_cap: 40,
            stack: Vec::new(),
            tty: Some(TtySize { rows: 3, cols: 4 }),
        };
        let layout = FdLayout {
            holder: false,
            netns: true,
            tasks: 3,
            cgroup_dir: false,
        };
        let bytes = encode(&RequestRef {
            flags: 0x1234,
            layout,
            pdeathsig: true,
            mounts: Some(MountsRef::New(3, &mounts)),
            identity: &identity,
            hostname: b"cellblock",
            target: Some(TargetRef::of(&target)),
            serve: false,
            join: None,
            net: None,
        })
        .expect("small");
        let req = decode(&bytes).expect("decodes");
        assert_eq!(req.flags, 0x1234);
        assert_eq!(req.layout, layout);
        assert_eq!(layout.count(), 12);
        assert!(req.pdeathsig);
        match req.mounts {
            Some(Mounts::New(3, m)) => assert_eq!(format!("{m:?}"), format!("{mounts:?}")),
            _ => panic!("not the plan sent"),
        }
        assert_eq!(format!("{:?}", req.identity), format!("{identity:?}"));
        assert_eq!(req.hostname, b"cellblock");
        assert!(!req.serve);
        let t = req.target.expect("a target").into_plan().expect("valid");
        assert_eq!(t.argv.strings(), target.argv.strings());
        assert_eq!(t.envp.strings(), target.envp.strings());
        assert_eq!(t.cwd, target.cwd);
        assert_eq!(t.rlimits, target.rlimits);
        assert_eq!(t.seccomp.map(|p| p.to_bytes()), Some(bpf));
        assert_eq!(t.tty, target.tty);
        assert_eq!(t.stack.len(), crate::child::TARGET_STACK);
        assert!(decode(&bytes[..bytes.len() - 1]).is_none());
    }
}
