//! A sandbox must not outlive its supervisor: `cellblock-spawn` is killed with SIGKILL while its
//! command runs, and the command must die with it, as root and as uid 65534.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn is_root() -> bool {
    // SAFETY: geteuid has no side effects.
    unsafe { libc::geteuid() == 0 }
}

fn marker() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("3600.{}{:09}", std::process::id(), nanos)
}

/// Host pids whose command line is exactly `sleep <mark>`.
fn sleepers(mark: &str) -> Vec<i32> {
    let want = format!("sleep\0{mark}\0").into_bytes();
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// A world-readable directory holding a copy of the binary, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn with_binary() -> Scratch {
        let dir = std::env::temp_dir().join(format!("cellblock-supervisor-test-{}", marker()));
        std::fs::create_dir(&dir).expect("scratch dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::copy(
            env!("CARGO_BIN_EXE_cellblock-spawn"),
            dir.join("cellblock-spawn"),
        )
        .expect("copy");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `prefix... binary` on a spec running `sleep <mark>`, SIGKILLs it once the sleep runs,
/// and says whether the sandbox died with it. Whatever survived is then killed, and the cgroups
/// a killed supervisor could not remove are removed.
fn sandbox_dies_with_its_supervisor(binary: &Path, prefix: &[&str]) -> bool {
    let mark = marker();
    let spec = format!(
        r#"{{"argv": ["sleep", "{mark}"], "env": {{"PATH": "/usr/bin:/bin"}}, "limits": {{"timeout": 120.0, "memory": 67108864}}}}"#
    );
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(binary);
            c
        }
        None => Command::new(binary),
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .current_dir("/")
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(spec.as_bytes())
        .expect("write spec");
    assert!(
        wait_until(Duration::from_secs(60), || !sleepers(&mark).is_empty()),
        "the sleep never started"
    );
    child.kill().expect("kill");
    child.wait().expect("wait");
    let died = wait_until(Duration::from_secs(5), || sleepers(&mark).is_empty());
    for pid in sleepers(&mark) {
        // SAFETY: killing a process this test started; PID 1 then takes the rest along.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let prefix = format!("cellblock-{}-", child.id());
    let layout = cellblock_core::cgroup::layout();
    for dir in layout
        .v2_dir
        .iter()
        .chain(layout.v1_dirs.iter().map(|(_, d)| d))
    {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                wait_until(Duration::from_secs(5), || {
                    std::fs::remove_dir(e.path()).is_ok()
                });
            }
        }
    }
    died
}

#[test]
fn killed_supervisor_takes_the_sandbox_along() {
    let binary = Path::new(env!("CARGO_BIN_EXE_cellblock-spawn"));
    assert!(
        sandbox_dies_with_its_supervisor(binary, &[]),
        "the sandbox outlived its killed supervisor"
    );
}

#[test]
fn killed_unprivileged_supervisor_takes_the_sandbox_along() {
    assert!(
        is_root(),
        "running as uid 65534 needs root: run this test as root"
    );
    let scratch = Scratch::with_binary();
    let died = sandbox_dies_with_its_supervisor(
        &scratch.0.join("cellblock-spawn"),
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
    );
    assert!(died, "the sandbox outlived its killed supervisor");
}
