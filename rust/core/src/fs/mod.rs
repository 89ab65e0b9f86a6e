//! The sandbox filesystem: a fresh tmpfs root with read-only binds of the runtime, or (with a
//! `rootfs`) a read-only overlay of two lower layers: a small tmpfs directory holding the
//! generated files and mount points, over that directory. Nothing is ever written to it.
//!
//! [`MountPlan::build`] decides everything in the parent (pure apart from reading the host's
//! directory entries); [`MountPlan::apply`] replays the plan in the forked child with raw
//! syscalls only — no allocation — and reports the index of a failing step.

mod builder;
mod cache;
mod op;
mod plan;
mod proc;

pub use cache::cached;
pub use op::Op;
pub use plan::{MountPlan, PlanInput};
pub use proc::{MASKED_PROC_DIRS, MASKED_PROC_FILES};

/// Where the new root is assembled (in the child's private mount namespace, so the host never
/// sees it). The first that exists on the host is used.
pub(crate) const BASE_CANDIDATES: &[&str] = &["/mnt", "/tmp", "/var/tmp"];

/// Host directories bound read-only when they exist (symlinks, as on merged-/usr systems, are
/// recreated as symlinks).
pub(crate) const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32",
];

/// What of the host's /etc runtimes need. Everything else (shadow, ssh keys, sudoers, the host's
/// user list) stays invisible.
pub(crate) const ETC_ALLOW: &[&str] = &[
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "gai.conf",
    "host.conf",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "magic",
    "magic.mime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "pki",
    "profile",
    "protocols",
    "python3",
    "python3.11",
    "rpc",
    "services",
    "ssl",
    "timezone",
];

/// /etc files up to this size are copied rather than bound.
const COPY_MAX: u64 = 256 * 1024;

/// Host device nodes bound into the sandbox's /dev.
pub(crate) const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Options of the sandbox's devpts mount: a new instance whose ptmx anyone inside may open,
/// holding at most 256 terminals (every instance draws on the kernel's one `kernel.pty.max`
/// pool, so an unbounded sandbox could leave other containers on the host without ptys).
pub const DEVPTS_OPTIONS: &str = "newinstance,ptmxmode=0666,mode=0620,max=256";

/// Hostname inside every sandbox.
pub const HOSTNAME: &str = "cellblock";

/// Working directory (and HOME) of runs.
pub const WORKSPACE: &str = "/workspace";

/// Where the sandbox finds the CA bundle that trusts its own CA (credential runs).
pub const CA_BUNDLE: &str = "/etc/cellblock/ca-certificates.crt";
