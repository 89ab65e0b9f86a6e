//! Code that runs in forked children: the sandbox's PID 1 and the target command.
//!
//! The caller is a multithreaded process (Python), so between fork and execve only raw syscalls
//! are allowed: no allocation, no locks, no panics. Everything used here is prepared by
//! [`crate::spawn`] before the fork. Failures are written to the error pipe as
//! `(stage, index, errno)` records and the child exits.
//!
//! The children are made with a raw clone, so glibc still believes the caller's other threads
//! exist: its set*id/setgroups wrappers would wait forever for those threads. Credentials are
//! therefore changed with raw syscalls.

use crate::error::errno;
use crate::fdpass;
use crate::fs::MountPlan;
use crate::seccomp;
use std::ffi::CString;

/// Stages that can fail in a child, named in error messages by the parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Stage {
    /// Writing our own uid/gid maps (unprivileged path).
    IdMap = 1,
    /// Making every mount private so nothing propagates to the host.
    MountPrivate,
    /// A step of the mount plan (index = op).
    Mount,
    /// pivot_root into the new root.
    PivotRoot,
    /// Remounting the new root read-only.
    RootReadOnly,
    /// sethostname.
    Hostname,
    /// Bringing up `lo`.
    Loopback,
    /// Network egress plumbing.
    Network,
    /// unshare of the user (root path) or cgroup namespace.
    Unshare,
    /// Waiting for the supervisor.
    Sync,
    /// setresuid/setresgid/setgroups.
    Credentials,
    /// Forking the target.
    Fork,
    /// Setting up stdio, cwd, rlimits of the target.
    Process,
    /// Dropping capabilities / no_new_privs.
    Capabilities,
    /// Installing the seccomp filter or handing its listener out.
    Seccomp,
    /// execve (index = 0, errno of the most telling failure).
    Exec,
    /// Joining a session's namespaces.
    Join,
    /// Opening the command's pseudo-terminal (index = step of [`crate::tty`]).
    Terminal,
    /// PID 1 moving itself into the run's cgroup v1 hierarchies (index = hierarchy).
    Cgroup,
}

impl Stage {
    /// Decodes a stage number written by a child.
    pub fn from_u32(v: u32) -> Option<Stage> {
        use Stage::*;
        [
            IdMap,
            MountPrivate,
            Mount,
            PivotRoot,
            RootReadOnly,
            Hostname,
            Loopback,
            Network,
            Unshare,
            Sync,
            Credentials,
            Fork,
            Process,
            Capabilities,
            Seccomp,
            Exec,
            Join,
            Terminal,
            Cgroup,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }

    /// What the stage does, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Stage::IdMap => "write uid/gid map",
            Stage::MountPrivate => "make mounts private",
            Stage::Mount => "build the root filesystem",
            Stage::PivotRoot => "pivot_root",
            Stage::RootReadOnly => "make the root read-only",
            Stage::Hostname => "set the hostname",
            Stage::Loopback => "bring up loopback",
            Stage::Network => "set up network egress",
            Stage::Unshare => "create namespaces",
            Stage::Sync => "synchronise with the supervisor",
            Stage::Credentials => "switch credentials",
            Stage::Fork => "fork the command",
            Stage::Process => "set up the command's process",
            Stage::Capabilities => "drop capabilities",
            Stage::Seccomp => "install the seccomp filter",
            Stage::Exec => "execute the command",
            Stage::Join => "join the session",
            Stage::Terminal => "open the command's terminal",
            Stage::Cgroup => "join the run's cgroup",
        }
    }
}

/// `LANDLOCK_ACCESS_FS_MAKE_BLOCK`: an access right the target's Landlock ruleset handles.
const LANDLOCK_ACCESS_FS_MAKE_BLOCK: u64 = 1 << 11;
/// `LANDLOCK_ACCESS_FS_REFER` (Landlock ABI 2): handled and allowed everywhere, because a
/// ruleset that does not handle it makes the kernel refuse every rename or link between
/// directories (EXDEV), which apt, dpkg and many installers need.
const LANDLOCK_ACCESS_FS_REFER: u64 = 1 << 13;
/// `LANDLOCK_RULE_PATH_BENEATH`.
const LANDLOCK_RULE_PATH_BENEATH: libc::c_long = 1;

/// `struct landlock_path_beneath_attr` (packed).
#[repr(C, packed)]
struct PathBeneath {
    allowed_access: u64,
    parent_fd: i32,
}

/// Everything the target process needs, prepared before fork.
#[derive(Debug)]
pub struct TargetPlan {
    /// Arguments.
    pub argv: CStringArray,
    /// `KEY=VALUE` environment strings.
    pub envp: CStringArray,
    /// Paths to try with execve, in order.
    pub exec_candidates: CStringArray,
    /// Working directory.
    pub cwd: CString,
    /// (resource, limit) pairs applied with setrlimit.
    pub rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    /// The seccomp filter, if any.
    pub seccomp: Option<seccomp::Program>,
    /// Highest capability number of this kernel.
    pub last_cap: u32,
    /// Stack the command's process runs on until execve (it shares PID 1's memory).
    pub stack: Vec<u8>,
    /// A pseudo-terminal for the command, with this window size.
    pub tty: Option<crate::spec::TtySize>,
}

/// Size of the stack the command's process uses before execve.
pub const TARGET_STACK: usize = 256 * 1024;

impl TargetPlan {
    /// The plan as the allocation-free view the command's process is started from.
    pub fn view(&self) -> TargetView<'_> {
        TargetView {
            argv: self.argv.as_ptr(),
            envp: self.envp.as_ptr(),
            exec_candidates: self.exec_candidates.ptrs(),
            cwd: self.cwd.as_ptr(),
            rlimits: &self.rlimits,
            seccomp: self.seccomp.as_ref().map(|p| p.insns()),
            last_cap: self.last_cap,
            stack_top: stack_top(&self.stack),
            tty: self.tty.map(|t| (t.rows, t.cols)),
        }
    }
}

/// The 16-byte aligned top of a stack buffer.
pub fn stack_top(stack: &[u8]) -> *mut libc::c_void {
    let end = stack.as_ptr() as usize + stack.len();
    (end & !15) as *mut libc::c_void
}

/// What starting the command needs, as plain pointers and slices: built from a [`TargetPlan`],
/// or (in a pre-created cell's PID 1, which may not allocate) decoded in place from a request
/// (see `crate::cell::wire`).
#[derive(Debug, Clone, Copy)]
pub struct TargetView<'a> {
    /// NULL-terminated argv.
    pub argv: *const *const libc::c_char,
    /// NULL-terminated `KEY=VALUE` environment.
    pub envp: *const *const libc::c_char,
    /// Paths to try with execve, in order.
    pub exec_candidates: &'a [*const libc::c_char],
    /// Working directory.
    pub cwd: *const libc::c_char,
    /// (resource, limit) pairs applied with setrlimit.
    pub rlimits: &'a [(libc::__rlimit_resource_t, u64)],
    /// The seccomp filter, if any.
    pub seccomp: Option<&'a [libc::sock_filter]>,
    /// Highest capability number of this kernel.
    pub last_cap: u32,
    /// Top of the stack the command's process runs on until execve.
    pub stack_top: *mut libc::c_void,
    /// (rows, cols) of a pseudo-terminal for the command (see [`crate::tty`]).
    pub tty: Option<(u16, u16)>,
}

/// Owned C strings plus the NULL-terminated pointer array execve wants, built before fork.
#[derive(Debug)]
pub struct CStringArray {
    strings: Vec<CString>,
    ptrs: Vec<*const libc::c_char>,
}

// SAFETY: the pointers only refer to `strings`, owned by the same value and never mutated.
unsafe impl Send for CStringArray {}
// SAFETY: as above; shared access is read-only.
unsafe impl Sync for CStringArray {}

impl CStringArray {
    /// Builds the array; the pointers stay valid as long as the value lives (CString data is
    /// heap-allocated and does not move with the Vec).
    pub fn new(strings: Vec<CString>) -> CStringArray {
        let mut ptrs: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        CStringArray { strings, ptrs }
    }

    /// The NULL-terminated pointer array.
    pub fn as_ptr(&self) -> *const *const libc::c_char {
        self.ptrs.as_ptr()
    }

    /// The strings.
    pub fn strings(&self) -> &[CString] {
        &self.strings
    }

    /// The pointers, without the terminating NULL.
    pub fn ptrs(&self) -> &[*const libc::c_char] {
        &self.ptrs[..self.strings.len()]
    }
}

/// How PID 1 becomes who it is inside.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum Identity {
    /// Unprivileged caller: the user namespace was created by clone; write our own maps.
    SelfMapped {
        /// `/proc/self/uid_map` content.
        uid_map: Vec<u8>,
        /// `/proc/self/gid_map` content.
        gid_map: Vec<u8>,
    },
    /// Root caller: build mounts as real root, then unshare a user namespace whose maps the
    /// supervisor writes (uid 0 inside = an unprivileged host uid).
    RootThenUserns,
    /// A session call's init: already inside the session's namespaces (see [`join_main`]);
    /// `root` says whether to switch to uid 0 of the user namespace (root-built sessions).
    Joined {
        /// Whether the session was built by root.
        root: bool,
    },
}

/// Pipes and sockets of a child, as raw fds (both ends live in the parent until fork).
#[derive(Debug, Clone, Copy)]
pub struct ChildFds {
    /// Target's stdin (read end).
    pub stdin: libc::c_int,
    /// Target's stdout (write end).
    pub stdout: libc::c_int,
    /// Target's stderr (write end).
    pub stderr: libc::c_int,
    /// Child -> supervisor: "ready" byte.
    pub ready: libc::c_int,
    /// Supervisor -> child: "go" byte.
    pub go: libc::c_int,
    /// Child -> supervisor: error records.
    pub err: libc::c_int,
    /// PID 1 -> supervisor: the target's wait status.
    pub status: libc::c_int,
    /// Unix socket to hand fds (seccomp listener) to the supervisor.
    pub fdsock: libc::c_int,
}

impl ChildFds {
    fn keep(&self, extra: libc::c_int) -> [libc::c_int; 9] {
        [
            self.stdin,
            self.stdout,
            self.stderr,
            self.ready,
            self.go,
            self.err,
            self.status,
            self.fdsock,
            extra,
        ]
    }
}

/// What PID 1 does once the sandbox is built.
#[derive(Debug)]
pub struct InitPlan<'a> {
    /// Mount plan (None when joining a session: its root already exists).
    pub mounts: Option<&'a MountPlan>,
    /// Identity switch.
    pub identity: &'a Identity,
    /// Hostname.
    pub hostname: &'a [u8],
    /// The command, or None for a session holder that only waits.
    pub target: Option<&'a TargetPlan>,
    /// fds.
    pub fds: ChildFds,
    /// Die with the spawning thread (one-shot runs; sessions use `lifeline` instead).
    pub pdeathsig: bool,
    /// Read end of a pipe the supervisor holds open: EOF ends a session holder.
    pub lifeline: libc::c_int,
    /// Egress plumbing to set up in the new network namespace (allowlist given).
    pub net: Option<&'a crate::net::ChildPlan>,
    /// Address ranges of the caller's argv and environment strings, zeroed in the child.
    pub wipe: &'a [(usize, usize)],
    /// A pre-created cell: once built, wait for one request and run it (`target` is None).
    pub serve: Option<&'a crate::cell::init::ServePlan>,
    /// A network namespace made ahead (`lo` up) to join instead of a cloned one, or -1.
    pub netns: libc::c_int,
    /// The `tasks` files of the run's cgroup v1 hierarchies, open for writing: PID 1 moves
    /// itself in before anything else (see [`crate::cgroup::RunCgroup::open_tasks`]).
    pub join_tasks: &'a [libc::c_int],
}

/// Writes an error record and exits. Never returns.
pub(crate) fn fail(err_fd: libc::c_int, stage: Stage, index: u32, errno: i32) -> ! {
    let mut rec = [0u8; 12];
    rec[0..4].copy_from_slice(&(stage as u32).to_ne_bytes());
    rec[4..8].copy_from_slice(&index.to_ne_bytes());
    rec[8..12].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: rec is a valid 12-byte buffer; a short write only loses the detail.
    unsafe {
        libc::write(err_fd, rec.as_ptr().cast(), rec.len());
        libc::_exit(126)
    }
}

fn ok_or_fail(ret: libc::c_long, fds: &ChildFds, stage: Stage, index: u32) {
    if ret < 0 {
        fail(fds.err, stage, index, errno());
    }
}

/// Writes `data` to the file at `path` (NUL-terminated) in one write; an errno on failure (EIO
/// for a short write). Raw syscalls only: safe between clone and execve.
pub(crate) fn write_file(path: &[u8], data: &[u8]) -> Result<(), i32> {
    // SAFETY: `path` is NUL-terminated by the caller; the fd is closed below.
    let fd = unsafe { libc::open(path.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: data is a valid buffer.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    let e = errno();
    // SAFETY: fd is open.
    unsafe { libc::close(fd) };
    if n < 0 {
        return Err(e);
    }
    if n as usize != data.len() {
        return Err(libc::EIO);
    }
    Ok(())
}

/// Closes every fd except those in `keep` (unsorted, may contain -1).
pub(crate) fn close_other_fds(keep: &[libc::c_int]) {
    let mut sorted = [i32::MAX; 16];
    let mut n = 0;
    for &fd in keep {
        if fd >= 0 && n < sorted.len() {
            sorted[n] = fd;
            n += 1;
        }
    }
    sorted[..n].sort_unstable();
    let mut lo: u32 = 0;
    for &fd in &sorted[..n] {
        let fd = fd as u32;
        if fd > lo {
            // SAFETY: close_range only closes descriptors.
            unsafe { libc::syscall(libc::SYS_close_range, lo, fd - 1, 0) };
        }
        lo = fd + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, lo, u32::MAX, 0) };
}

fn read_byte(fd: libc::c_int) -> bool {
    let mut b = 0u8;
    loop {
        // SAFETY: reading one byte into a stack buffer.
        let n = unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) };
        if n == 1 {
            return true;
        }
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        return false;
    }
}

fn write_byte(fd: libc::c_int) -> bool {
    let b = 1u8;
    // SAFETY: writing one byte from a stack buffer.
    unsafe { libc::write(fd, (&b as *const u8).cast(), 1) == 1 }
}

/// Brings `lo` up in the calling thread's network namespace (errno on failure).
pub(crate) fn loopback_up() -> Result<(), i32> {
    // SAFETY: a plain socket used for one ioctl, closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(errno());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    ifr.ifr_name[0] = b'l' as libc::c_char;
    ifr.ifr_name[1] = b'o' as libc::c_char;
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    let r = unsafe {
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            -1
        } else {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(sock, libc::SIOCSIFFLAGS, &ifr)
        }
    };
    let e = errno();
    // SAFETY: sock is open.
    unsafe { libc::close(sock) };
    if r < 0 {
        Err(e)
    } else {
        Ok(())
    }
}

/// Entry of a freshly cloned PID 1 (or of a session call's init). Never returns.
pub fn init_main(plan: &InitPlan<'_>) -> ! {
    let fds = &plan.fds;
    for (i, fd) in plan.join_tasks.iter().enumerate() {
        // SAFETY: writing "0" (the calling thread) to a `tasks` file opened for us, then
        // closing it. PID 1 is single-threaded: the whole process moves before it forks.
        unsafe {
            if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(fds.err, Stage::Cgroup, i as u32, errno());
            }
            libc::close(*fd);
        }
    }
    if plan.netns >= 0 {
        // SAFETY: setns/close of the namespace fd the supervisor made for this run alone.
        unsafe {
            ok_or_fail(
                libc::setns(plan.netns, libc::CLONE_NEWNET) as libc::c_long,
                fds,
                Stage::Loopback,
                1,
            );
            libc::close(plan.netns);
        }
    }
    // Drop descriptors inherited from the (multithreaded) caller: other runs' pipes among them.
    close_other_fds(&fds.keep(plan.lifeline));
    // PID 1 is a copy of the process that cloned it (the fork server, or the caller when there
    // is none: then its memory holds the caller's heap, environment and command line). Not
    // dumpable: the sandboxed command (same uid, no capabilities) cannot read
    // /proc/1/mem, environ, maps or fds; and the argument and environment areas are wiped so
    // /proc/1/cmdline and environ show nothing of the caller.
    // SAFETY: prctl/umask have no memory effects; the wiped ranges are this process's own
    // (copy-on-write) argv/envp areas as recorded by the kernel before the fork.
    unsafe {
        for (start, end) in plan.wipe {
            if *end > *start {
                std::ptr::write_bytes(*start as *mut u8, 0, end - start);
            }
        }
        libc::umask(0);
        if plan.pdeathsig {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        }
    }
    let root_path = matches!(
        plan.identity,
        Identity::RootThenUserns | Identity::Joined { root: true }
    );

    match plan.identity {
        Identity::SelfMapped { uid_map, gid_map } => {
            let r = write_file(b"/proc/self/setgroups\0", b"deny")
                .and_then(|_| write_file(b"/proc/self/uid_map\0", uid_map))
                .and_then(|_| write_file(b"/proc/self/gid_map\0", gid_map));
            if let Err(e) = r {
                fail(fds.err, Stage::IdMap, 0, e);
            }
        }
        Identity::RootThenUserns => {
            // SAFETY: dropping supplementary groups of real root.
            ok_or_fail(
                unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) }
                    as libc::c_long,
                fds,
                Stage::Credentials,
                0,
            );
        }
        Identity::Joined { .. } => {}
    }
    // A fresh sandbox gets a time namespace of its own (a session call joined its holder's):
    // as any privileged step, while we still have the capabilities and are dumpable.
    if plan.mounts.is_some() {
        if let Err((i, e)) = crate::timens::enter_new() {
            fail(fds.err, Stage::Unshare, i, e);
        }
    }
    // PID 1 is a copy of the process that cloned it and may look as big to the OOM killer. A session holder must
    // never be its victim (only possible with CAP_SYS_RESOURCE, i.e. as real root); an init that
    // runs a command is the preferred victim, which ends its run with reason "memory".
    let runs_command = plan.target.is_some() || plan.serve.is_some();
    let adj: &[u8] = if runs_command { b"1000" } else { b"-1000" };
    let _ = write_file(b"/proc/self/oom_score_adj\0", adj);
    // After the id maps: a non-dumpable process can no longer write its own /proc files. A
    // session holder stays dumpable so the (unprivileged) supervisor can still join it; no call
    // can see it, calls live in pid namespaces nested below it.
    if runs_command {
        // SAFETY: prctl has no memory effects.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    }

    if let Some(mounts) = plan.mounts {
        // SAFETY: mount(2) with static strings; MS_PRIVATE|MS_REC stops propagation to the host.
        ok_or_fail(
            unsafe {
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
            } as libc::c_long,
            fds,
            Stage::MountPrivate,
            0,
        );
        // The network namespace is set up while the host's tree is still the root: nft is the
        // host's (with its libraries), which a rootfs does not have.
        // A namespace made ahead has `lo` up already.
        if plan.netns < 0 {
            if let Err(e) = loopback_up() {
                fail(fds.err, Stage::Loopback, 0, e);
            }
        }
        if let Some(net) = plan.net {
            let mut netfds = [-1; crate::net::CHILD_FDS];
            if let Err(e) = crate::net::setup_in_child(net, &mut netfds) {
                fail(fds.err, Stage::Network, 0, if e < 0 { -e } else { e });
            }
            if let Err(e) = crate::net::send_child_fds(fds.fdsock, &netfds) {
                fail(fds.err, Stage::Network, 1, e);
            }
        }
        if let Err((i, e)) = mounts.apply() {
            fail(fds.err, Stage::Mount, i, e);
        }
        // SAFETY: chdir/pivot_root/umount2 on paths we prepared; pivot_root(".", ".") stacks the
        // old root under the new one, and the detach drops it.
        unsafe {
            ok_or_fail(
                libc::chdir(mounts.base.as_ptr()) as libc::c_long,
                fds,
                Stage::PivotRoot,
                0,
            );
            ok_or_fail(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()),
                fds,
                Stage::PivotRoot,
                1,
            );
            ok_or_fail(
                libc::umount2(c".".as_ptr(), libc::MNT_DETACH) as libc::c_long,
                fds,
                Stage::PivotRoot,
                2,
            );
            ok_or_fail(
                libc::chdir(c"/".as_ptr()) as libc::c_long,
                fds,
                Stage::PivotRoot,
                3,
            );
        }
        let attr: [u64; 4] = [0x1 /* MOUNT_ATTR_RDONLY */, 0, 0, 0];
        // SAFETY: mount_setattr on "/" with a 32-byte struct mount_attr.
        ok_or_fail(
            unsafe {
                libc::syscall(
                    libc::SYS_mount_setattr,
                    libc::AT_FDCWD,
                    c"/".as_ptr(),
                    0,
                    attr.as_ptr(),
                    32usize,
                )
            },
            fds,
            Stage::RootReadOnly,
            0,
        );
        // SAFETY: sethostname with a valid buffer.
        ok_or_fail(
            unsafe { libc::sethostname(plan.hostname.as_ptr().cast(), plan.hostname.len()) }
                as libc::c_long,
            fds,
            Stage::Hostname,
            0,
        );
        if root_path {
            // SAFETY: unshare has no memory effects.
            ok_or_fail(
                unsafe { libc::unshare(libc::CLONE_NEWUSER) } as libc::c_long,
                fds,
                Stage::Unshare,
                0,
            );
        }
    }

    // Tell the supervisor we are built; wait until it has placed us in the run's cgroups (and,
    // on the root path, written our uid/gid maps).
    if !write_byte(fds.ready) || !read_byte(fds.go) {
        fail(fds.err, Stage::Sync, 0, libc::EPIPE);
    }
    // SAFETY: closing our ends of the sync pipes.
    unsafe {
        libc::close(fds.ready);
        libc::close(fds.go);
    }
    if plan.mounts.is_some() {
        // Now that we are in the run's cgroup, make it the root of what the sandbox sees.
        // SAFETY: unshare has no memory effects.
        ok_or_fail(
            unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } as libc::c_long,
            fds,
            Stage::Unshare,
            1,
        );
    }
    if root_path {
        // SAFETY: switching to uid/gid 0 of our user namespace.
        unsafe {
            // Host root's supplementary groups must not follow a session call in.
            ok_or_fail(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>())
                    as libc::c_long,
                fds,
                Stage::Credentials,
                3,
            );
            ok_or_fail(
                libc::syscall(libc::SYS_setresgid, 0, 0, 0),
                fds,
                Stage::Credentials,
                1,
            );
            ok_or_fail(
                libc::syscall(libc::SYS_setresuid, 0, 0, 0),
                fds,
                Stage::Credentials,
                2,
            );
            // A credential change resets the parent-death signal and dumpability (to the host's
            // fs.suid_dumpable): set both again.
            if runs_command {
                libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
            }
            if plan.pdeathsig {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            }
        }
    }

    let target = match (plan.target, plan.serve) {
        (Some(t), _) => t.view(),
        (None, Some(serve)) => crate::cell::init::await_request(serve, fds),
        (None, None) => hold_session(plan.lifeline, fds),
    };
    start_and_wait(target, fds)
}

/// A session holder: close what only a command needs, then hold the namespaces.
fn hold_session(lifeline: libc::c_int, fds: &ChildFds) -> ! {
    // Keep the namespaces alive, reap orphans, until killed.
    // SAFETY: closing fds we no longer need.
    unsafe {
        libc::close(fds.err);
        libc::close(fds.stdin);
        libc::close(fds.stdout);
        libc::close(fds.stderr);
        libc::close(fds.fdsock);
    }
    hold(lifeline)
}

/// PID 1's last part: start the command and reap until it ends, then report its status.
fn start_and_wait(target: TargetView<'_>, fds: &ChildFds) -> ! {
    // Block the signals we forward before the target exists, so none is lost.
    // SAFETY: sigset manipulation on a stack value.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut set);
        for s in [
            libc::SIGCHLD,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
        ] {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    // The command is started like posix_spawn: CLONE_VM|CLONE_VFORK shares our memory (a copy
    // of the caller's, possibly large) until execve instead of copying its page tables again;
    // we are suspended meanwhile. It runs on its own stack, prepared before the first fork.
    let ctx = TargetCtx { target, fds: *fds };
    let stack_top = target.stack_top;
    // SAFETY: glibc's clone wrapper runs `target_entry(&ctx)` on `stack_top` (16-byte aligned,
    // owned by `target`, alive until we resume after the child's execve or exit).
    let pid = unsafe {
        libc::clone(
            target_entry,
            stack_top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &ctx as *const TargetCtx<'_> as *mut libc::c_void,
        )
    };
    if pid < 0 {
        fail(fds.err, Stage::Fork, 0, errno());
    }
    // SAFETY: PID 1 keeps only the status pipe.
    unsafe {
        libc::close(fds.err);
        libc::close(fds.stdin);
        libc::close(fds.stdout);
        libc::close(fds.stderr);
        libc::close(fds.fdsock);
    }
    loop {
        // SAFETY: siginfo is written by the kernel.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let sig = unsafe { libc::sigwaitinfo(&set, &mut info) };
        if sig < 0 {
            continue;
        }
        if sig != libc::SIGCHLD {
            // SAFETY: forwarding a signal to our own child.
            unsafe { libc::kill(pid, sig) };
            continue;
        }
        loop {
            let mut status = 0;
            // SAFETY: reaping any child of ours.
            let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if r <= 0 {
                break;
            }
            if r == pid {
                // SAFETY: getrusage fills a stack value; writing the record then exiting; the
                // kernel kills every other process of the namespace when PID 1 exits.
                unsafe {
                    // Every other process of the namespace descends from us now (orphans are
                    // reparented to PID 1 before their parent can be reaped): with no child
                    // left, nothing but PID 1 remains and the supervisor need not wait for
                    // PID 1's exit to know that the run is over.
                    let alone = loop {
                        let mut st = 0;
                        let r = libc::waitpid(-1, &mut st, libc::WNOHANG | libc::__WALL);
                        if r <= 0 {
                            break r < 0 && errno() == libc::ECHILD;
                        }
                    };
                    let mut ru: libc::rusage = std::mem::zeroed();
                    libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
                    let rec = StatusRecord::new(status, &ru, alone).to_bytes();
                    libc::write(fds.status, rec.as_ptr().cast(), rec.len());
                    libc::_exit(0);
                }
            }
        }
    }
}

/// A session holder: keeps the namespaces alive and reaps orphans until the supervisor's end of
/// the lifeline closes (session closed, or the supervisor process died).
fn hold(lifeline: libc::c_int) -> ! {
    // SAFETY: signal masks, a signalfd and poll on fds we own; no allocation.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let sfd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        loop {
            let mut pfds = [
                libc::pollfd {
                    fd: lifeline,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: sfd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            libc::poll(
                pfds.as_mut_ptr(),
                if sfd >= 0 { 2 } else { 1 },
                if sfd >= 0 { -1 } else { 100 },
            );
            if pfds[0].revents != 0 {
                libc::_exit(0);
            }
            let mut info = [0u8; 128];
            while sfd >= 0 && libc::read(sfd, info.as_mut_ptr().cast(), info.len()) > 0 {}
            let mut status = 0;
            while libc::waitpid(-1, &mut status, libc::WNOHANG) > 0 {}
        }
    }
}

/// What a session call's joiner needs: the session's PID 1 and how it was built.
#[derive(Debug, Clone, Copy)]
pub struct JoinPlan {
    /// pidfd of the session holder.
    pub pidfd: libc::c_int,
    /// Whether the session was built by root (its namespaces other than the user namespace
    /// belong to the initial user namespace: join those first, then the user namespace).
    pub root: bool,
}

/// A session call: join the session's namespaces, then start the call's init in a fresh pid
/// namespace nested in the session's, as a child of the supervisor (CLONE_PARENT), and hand its
/// pidfd to the supervisor. Runs in a process cloned by the supervisor; never returns.
pub fn join_main(join: &JoinPlan, init: &InitPlan<'_>) -> ! {
    let fds = &init.fds;
    let mut keep = [-1; 16];
    let pipes = [
        fds.stdin, fds.stdout, fds.stderr, fds.ready, fds.go, fds.err, fds.status, fds.fdsock,
        join.pidfd,
    ];
    keep[..pipes.len()].copy_from_slice(&pipes);
    // The session cgroup's `tasks` files the call's init moves itself in with (v1).
    for (slot, fd) in keep[pipes.len()..].iter_mut().zip(init.join_tasks) {
        *slot = *fd;
    }
    close_other_fds(&keep);
    let mut others = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP;
    // The holder's time namespace (see crate::timens), which it has whenever the kernel can.
    if crate::timens::kernel_has_timens() {
        others |= libc::CLONE_NEWTIME;
    }
    // SAFETY: setns through a pidfd we own; raw clones behave like fork (no CLONE_VM).
    unsafe {
        if join.root {
            ok_or_fail(
                libc::setns(join.pidfd, others) as libc::c_long,
                fds,
                Stage::Join,
                0,
            );
            ok_or_fail(
                libc::setns(join.pidfd, libc::CLONE_NEWUSER) as libc::c_long,
                fds,
                Stage::Join,
                1,
            );
        } else {
            ok_or_fail(
                libc::setns(join.pidfd, others | libc::CLONE_NEWUSER) as libc::c_long,
                fds,
                Stage::Join,
                0,
            );
        }
        libc::close(join.pidfd);
        // The joiner stays outside the session's pid namespace; its child (mid) enters it and
        // gives the call a pid namespace of its own, so that killing the call's init kills
        // everything the call started. The init is the joiner's child (CLONE_PARENT from mid):
        // the joiner reaps it, then exits.
        let mid = libc::syscall(libc::SYS_clone, 0 as libc::c_ulong, 0, 0, 0, 0);
        if mid < 0 {
            fail(fds.err, Stage::Fork, 1, errno());
        }
        if mid == 0 {
            ok_or_fail(
                libc::unshare(libc::CLONE_NEWPID) as libc::c_long,
                fds,
                Stage::Join,
                2,
            );
            let mut pidfd: libc::c_int = -1;
            let init_pid = libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_PARENT | libc::CLONE_PIDFD) as libc::c_ulong,
                0,
                &mut pidfd as *mut libc::c_int,
                0,
                0,
            );
            if init_pid < 0 {
                fail(fds.err, Stage::Fork, 2, errno());
            }
            if init_pid == 0 {
                init_main(init);
            }
            if let Err(e) = fdpass::send_fd(fds.fdsock, pidfd) {
                fail(fds.err, Stage::Join, 3, e);
            }
            libc::_exit(0);
        }
        // Only the init's own pipes keep the supervisor informed; the joiner keeps nothing.
        close_other_fds(&[]);
        let mut status = 0;
        while libc::waitpid(-1, &mut status, libc::__WALL) > 0 || errno() == libc::EINTR {}
        libc::_exit(0)
    }
}

/// What PID 1 reports when the command ends: its wait status and the resources used by it
/// and every descendant PID 1 reaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRecord {
    /// Raw wait status of the command.
    pub status: i32,
    /// User CPU time, microseconds.
    pub utime_us: u64,
    /// System CPU time, microseconds.
    pub stime_us: u64,
    /// Largest resident set, KiB.
    pub maxrss_kb: u64,
    /// No process but PID 1 was left in the sandbox when the command ended.
    pub alone: bool,
}

impl StatusRecord {
    /// Size of the encoded record.
    pub const LEN: usize = 32;

    fn new(status: i32, ru: &libc::rusage, alone: bool) -> StatusRecord {
        let us = |t: libc::timeval| (t.tv_sec as u64) * 1_000_000 + t.tv_usec as u64;
        StatusRecord {
            status,
            utime_us: us(ru.ru_utime),
            stime_us: us(ru.ru_stime),
            maxrss_kb: ru.ru_maxrss as u64,
            alone,
        }
    }

    fn to_bytes(self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&self.status.to_ne_bytes());
        b[4..12].copy_from_slice(&self.utime_us.to_ne_bytes());
        b[12..20].copy_from_slice(&self.stime_us.to_ne_bytes());
        b[20..28].copy_from_slice(&self.maxrss_kb.to_ne_bytes());
        b[28..32].copy_from_slice(&u32::from(self.alone).to_ne_bytes());
        b
    }

    /// Decodes a record read from the status pipe.
    pub fn from_bytes(b: &[u8; Self::LEN]) -> StatusRecord {
        let u = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        StatusRecord {
            status: i32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            utime_us: u(4),
            stime_us: u(12),
            maxrss_kb: u(20),
            alone: u32::from_ne_bytes([b[28], b[29], b[30], b[31]]) == 1,
        }
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const SECBITS_LOCKED_NOROOT: libc::c_ulong = 0xEF;

/// Argument of [`target_entry`].
struct TargetCtx<'a> {
    target: TargetView<'a>,
    fds: ChildFds,
}

extern "C" fn target_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `TargetCtx` PID 1 passed to clone; PID 1 is suspended (CLONE_VFORK)
    // so it stays valid until execve or exit.
    let ctx = unsafe { &*(arg as *const TargetCtx<'_>) };
    exec_target(&ctx.target, &ctx.fds)
}

/// The target: set up the process, shed every privilege, install seccomp, execve. Never returns.
fn exec_target(t: &TargetView<'_>, fds: &ChildFds) -> ! {
    // SAFETY: raw syscalls on our own process state; every pointer refers to prepared data.
    unsafe {
        libc::setsid();
        if libc::dup2(fds.stdin, 0) < 0
            || libc::dup2(fds.stdout, 1) < 0
            || libc::dup2(fds.stderr, 2) < 0
        {
            fail(fds.err, Stage::Process, 0, errno());
        }
        // With stdio on 0-2 already, the pty's fds land above them; the slave then replaces them.
        if let Some((rows, cols)) = t.tty {
            if let Err((step, e)) = crate::tty::attach_in_child(rows, cols, fds.fdsock) {
                fail(fds.err, Stage::Terminal, step, e);
            }
        }
        // Python ignores SIGPIPE and blocks some signals: give the command default behaviour.
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = libc::SIG_DFL;
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::sigaction(sig, &act, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::umask(0o022);
        if libc::chdir(t.cwd) < 0 {
            fail(fds.err, Stage::Process, 1, errno());
        }
        for (i, (res, val)) in t.rlimits.iter().enumerate() {
            // SIGXCPU at the soft limit, SIGKILL one second later.
            let max = if *res == libc::RLIMIT_CPU {
                val.saturating_add(1)
            } else {
                *val
            };
            let lim = libc::rlimit {
                rlim_cur: *val,
                rlim_max: max,
            };
            if libc::setrlimit(*res, &lim) < 0 {
                fail(fds.err, Stage::Process, 10 + i as u32, errno());
            }
        }
        close_other_fds(&[0, 1, 2, fds.err, fds.fdsock]);

        // Capabilities: lock "root is not special", empty the bounding set, clear the rest.
        if libc::prctl(libc::PR_SET_SECUREBITS, SECBITS_LOCKED_NOROOT, 0, 0, 0) < 0 {
            fail(fds.err, Stage::Capabilities, 0, errno());
        }
        for cap in 0..=t.last_cap {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0
                && errno() != libc::EINVAL
            {
                fail(fds.err, Stage::Capabilities, 1, errno());
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
        let hdr = CapHeader {
            version: 0x2008_0522,
            pid: 0,
        };
        let data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr()) < 0 {
            fail(fds.err, Stage::Capabilities, 2, errno());
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
            fail(fds.err, Stage::Capabilities, 3, errno());
        }
        // A Landlock domain of its own (after no_new_privs, which it needs; before seccomp,
        // which may refuse it): Landlock lets a process ptrace or open /proc/<pid>/mem,
        // environ or fds of another only within its own domain or one nested in it, so no
        // other run or session call (each in a domain of its own) can reach this one's
        // processes, dumpable or not. The ruleset handles only the making of block devices
        // and reparenting (REFER), which a rule allows everywhere (so the kernel's own
        // answers stand). A kernel with Landlock ABI 1 knows no REFER (EINVAL): its ruleset
        // handles MAKE_BLOCK alone (and such a kernel refuses reparenting regardless).
        // A kernel without Landlock runs without.
        let mut attr: u64 = LANDLOCK_ACCESS_FS_MAKE_BLOCK | LANDLOCK_ACCESS_FS_REFER;
        let mut ruleset = libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const u64,
            std::mem::size_of::<u64>(),
            0,
        );
        if ruleset < 0 && errno() == libc::EINVAL {
            attr = LANDLOCK_ACCESS_FS_MAKE_BLOCK;
            ruleset = libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const u64,
                std::mem::size_of::<u64>(),
                0,
            );
        }
        if ruleset >= 0 {
            let root = libc::open(c"/".as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
            let rule = PathBeneath {
                allowed_access: attr,
                parent_fd: root,
            };
            let added = libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset,
                LANDLOCK_RULE_PATH_BENEATH,
                &rule as *const PathBeneath,
                0,
            );
            let r = if root >= 0 && added == 0 {
                libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0)
            } else {
                -1
            };
            let e = errno();
            if root >= 0 {
                libc::close(root);
            }
            libc::close(ruleset as libc::c_int);
            if r < 0 {
                fail(fds.err, Stage::Capabilities, 4, e);
            }
        } else if !matches!(errno(), libc::ENOSYS | libc::EOPNOTSUPP) {
            fail(fds.err, Stage::Capabilities, 5, errno());
        }

        // Seccomp last: from here on the filter judges every call, execve included.
        if let Some(prog) = t.seccomp {
            match seccomp::install(prog) {
                Ok(listener) => {
                    if let Err(e) = fdpass::send_fd(fds.fdsock, listener) {
                        fail(fds.err, Stage::Seccomp, 1, e);
                    }
                    libc::close(listener);
                }
                Err(e) => fail(fds.err, Stage::Seccomp, 0, e),
            }
        }
        libc::close(fds.fdsock);

        let mut best = libc::ENOENT;
        for path in t.exec_candidates {
            libc::execve(*path, t.argv, t.envp);
            let e = errno();
            // Like execvp: a permission problem is more telling than a missing file.
            if e != libc::ENOENT && e != libc::ENOTDIR {
                best = e;
            }
        }
        fail(fds.err, Stage::Exec, 0, best)
    }
}
