//! Sessions through the core API: shared workspace, isolated calls, files API confinement.

use cellblock_core::files::DEFAULT_MAX_READ;
use cellblock_core::{Error, Reason, RunSpec, Session};
use std::collections::BTreeMap;

fn call(argv: &[&str]) -> RunSpec {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), "/usr/bin:/bin".to_string());
    RunSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env,
        ..Default::default()
    }
}

fn session() -> Session {
    let mut spec = RunSpec::default();
    spec.limits.memory = Some(256 << 20);
    spec.limits.pids = Some(64);
    spec.limits.disk = Some(16 << 20);
    Session::open(&spec).expect("open session")
}

#[test]
fn files_persist_across_calls() {
    let s = session();
    let r = s
        .exec(
            &call(&[
                "sh",
                "-c",
                "echo kept > /workspace/a.txt; echo tmp > /tmp/t",
            ]),
            Default::default(),
        )
        .expect("exec");
    assert_eq!(
        r.exit_code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let r = s
        .exec(
            &call(&["cat", "/workspace/a.txt", "/tmp/t"]),
            Default::default(),
        )
        .expect("exec");
    assert_eq!(r.stdout, b"kept\ntmp\n");
    assert_eq!(
        s.read_file("a.txt", DEFAULT_MAX_READ).expect("read"),
        b"kept\n"
    );
    s.write_file("dir/sub/b.txt", b"from host").expect("write");
    let r = s
        .exec(
            &call(&[
                "sh",
                "-c",
                "cat /workspace/dir/sub/b.txt && echo more >> /workspace/dir/sub/b.txt",
            ]),
            Default::default(),
        )
        .expect("exec");
    assert_eq!(r.stdout, b"from host");
    assert_eq!(
        r.exit_code,
        Some(0),
        "sandbox can modify files written by the host: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let names: Vec<String> = s
        .list_dir("dir/sub")
        .expect("list")
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec!["b.txt"]);
    s.remove("dir/sub/b.txt").expect("remove");
    assert!(s.read_file("dir/sub/b.txt", DEFAULT_MAX_READ).is_err());
}

#[test]
fn timeout_kills_only_that_call() {
    let s = session();
    let mut spec = call(&["sh", "-c", "sleep 1000 & sleep 1000"]);
    spec.limits.timeout = Some(0.3);
    let r = s.exec(&spec, Default::default()).expect("exec");
    assert_eq!(r.reason, Reason::Timeout);
    let r = s
        .exec(
            &call(&[
                "sh",
                "-c",
                "ps -e -o comm= 2>/dev/null | grep -c sleep || true",
            ]),
            Default::default(),
        )
        .expect("exec");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        "0",
        "sleepers of the timed-out call survived"
    );
}

#[test]
fn files_api_refuses_escapes() {
    let s = session();
    let r = s.exec(&call(&["sh", "-c", "ln -s /etc/shadow /workspace/evil; ln -s /proc/1/root /workspace/proot; ln -s ../../../../ /workspace/up"]), Default::default()).expect("exec");
    assert_eq!(r.exit_code, Some(0));
    assert!(matches!(
        s.read_file("../../etc/hostname", DEFAULT_MAX_READ),
        Err(Error::PathEscape(_))
    ));
    assert!(
        s.read_file("evil", DEFAULT_MAX_READ).is_err(),
        "host /etc/shadow reached through a planted symlink"
    );
    assert!(s.read_file("proot/etc/shadow", DEFAULT_MAX_READ).is_err());
    // A magic link is refused (the helper cannot even reach PID 1's root: EACCES).
    assert!(s.read_file("/proc/1/root/etc/hostname", DEFAULT_MAX_READ).is_err());
    // A symlink that climbs stays inside the sandbox root, but /etc is no scratch mount.
    assert!(matches!(
        s.read_file("up/etc/hostname", DEFAULT_MAX_READ),
        Err(Error::PathEscape(_))
    ));
    // Re-rooted back onto a scratch mount, it reads the sandbox's own file.
    s.write_file("/tmp/t", b"mine").expect("write");
    assert_eq!(
        s.read_file("up/tmp/t", DEFAULT_MAX_READ)
            .expect("re-rooted"),
        b"mine"
    );
    assert!(
        s.write_file("evil", b"x").is_err(),
        "write followed a planted symlink"
    );
}

#[test]
fn closed_session_is_an_error() {
    let s = session();
    s.close().expect("close");
    assert!(matches!(
        s.exec(&call(&["true"]), Default::default()),
        Err(Error::SessionClosed(_))
    ));
    assert!(matches!(
        s.read_file("x", DEFAULT_MAX_READ),
        Err(Error::SessionClosed(_))
    ));
}

/// Re-runs this whole file as uid 65534 (user namespaces make the same isolation real there).
#[test]
fn everything_again_unprivileged() {
    // SAFETY: geteuid has no side effects.
    if unsafe { libc::geteuid() } != 0 || std::env::var_os("CELLBLOCK_UNPRIVILEGED_RUN").is_some() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("cellblock-session-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let exe = dir.join("session-test");
    std::fs::copy(std::env::current_exe().expect("exe"), &exe).expect("copy test binary");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = std::process::Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&exe)
        .args([
            "--skip",
            "everything_again_unprivileged",
            "--test-threads",
            "2",
        ])
        .env("CELLBLOCK_UNPRIVILEGED_RUN", "1")
        .current_dir(&dir)
        .output()
        .expect("setpriv");
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "unprivileged run failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("4 passed"),
        "expected the 4 session tests to pass unprivileged:\n{text}"
    );
}
