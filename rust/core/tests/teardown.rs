//! Teardown thaws before it kills, and no wait on a killed child is unbounded: a frozen task
//! ignores SIGKILL on cgroup v1 until it is thawed. Root only (a freezer cgroup is needed); a
//! test binary of its own, so no other test's cgroups are around.

use cellblock_core::cell::teardown::{self, Remains};
use cellblock_core::cgroup::RunCgroup;
use cellblock_core::{spawn, Limits};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn is_root() -> bool {
    // SAFETY: geteuid has no side effects.
    unsafe { libc::geteuid() == 0 }
}

fn pidfd_of(pid: u32) -> OwnedFd {
    // SAFETY: pidfd_open of our own child; the fd is checked before it is owned.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
    assert!(raw >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    unsafe { OwnedFd::from_raw_fd(raw) }
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

/// A freezer cgroup holding a `sleep` child of ours, frozen; (cgroup, child, freezer file).
fn frozen_child() -> (RunCgroup, Child, PathBuf) {
    assert!(
        is_root(),
        "a freezer cgroup needs root: run this test as root"
    );
    let cg = RunCgroup::create(&Limits::default(), true).expect("a cgroup as root");
    assert!(cg.can_freeze(), "no freezer in {:?}", cg.dir_paths());
    let child = Command::new("sleep")
        .arg("300")
        .spawn()
        .expect("spawn sleep");
    let pid = child.id();
    cg.add(pid as i32).expect("join the cgroup");
    cg.freeze(true).expect("freeze");
    let (file, _) = cg.thaw_files().into_iter().next().expect("a freezer file");
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let frozen = wait_until(Duration::from_secs(10), || {
        let v1 = std::fs::read_to_string(dir.join("freezer.state")).unwrap_or_default();
        let v2 = std::fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default();
        v1.trim() == "FROZEN" || v2.contains("frozen 1")
    });
    assert!(frozen, "{} did not freeze", dir.display());
    (cg, child, file)
}

fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_frozen_sandbox_is_thawed_killed_reaped_and_removed() {
    let (cg, mut child, _) = frozen_child();
    let pid = child.id();
    let dirs = cg.dir_paths();
    let failures = teardown::failures();
    let started = Instant::now();
    teardown::tear_down(Remains {
        pidfd: pidfd_of(pid),
        cgroup: Some(cg),
    });
    // Without the thaw, a v1 frozen child outlives the kill and the bounded wait gives up.
    assert!(
        started.elapsed() < spawn::KILL_GRACE,
        "teardown waited on a frozen child"
    );
    assert_eq!(
        teardown::failures(),
        failures,
        "failures: {:?}",
        teardown::errors()
    );
    assert!(gone(pid), "the child was not killed and reaped");
    for d in dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    // Reaped through its pidfd already: nothing left to wait for (ECHILD).
    assert!(child.wait().is_err());
}

#[test]
fn a_kill_of_a_frozen_child_is_not_waited_for_without_bound() {
    let (cg, mut child, file) = frozen_child();
    let pid = child.id();
    let pidfd = pidfd_of(pid);
    let started = Instant::now();
    let ended = spawn::kill_and_reap_within(&pidfd, Duration::from_millis(300));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the wait was not bounded"
    );
    if file.ends_with("freezer.state") {
        // cgroup v1: SIGKILL stays pending while frozen; the wait gives up and says so.
        assert!(!ended, "a frozen v1 task cannot have ended");
        assert!(!gone(pid));
    } else {
        // cgroup v2 lets a fatal signal through the freezer.
        assert!(ended && gone(pid));
    }
    // Thawed, the pending kill ends it (reaped by the buried-children sweep or here).
    cg.freeze(false).expect("thaw");
    assert!(spawn::kill_and_reap_within(&pidfd, Duration::from_secs(10)) || gone(pid));
    assert!(wait_until(Duration::from_secs(10), || gone(pid)));
    cg.remove().expect("remove the cgroup");
    assert!(child.wait().is_err(), "reaped through its pidfd already");
}
