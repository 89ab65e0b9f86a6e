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
    // The scan sees a live sleeper (so its "0" below means something).
    let control = format!("sleep 1000 & sleep 0.3; {SLEEPERS}; kill $!");
    let r = s
        .exec(&call(&["sh", "-c", &control]), Default::default())
        .expect("exec");
    let seen = String::from_utf8_lossy(&r.stdout).trim().to_string();
    assert!(
        seen.starts_with("1 "),
        "the scan missed a live sleeper: {seen}"
    );
    let mut spec = call(&["sh", "-c", "sleep 1000 & sleep 1000"]);
    spec.limits.timeout = Some(0.3);
    let r = s.exec(&spec, Default::default()).expect("exec");
    assert_eq!(r.reason, Reason::Timeout);
    let r = s
        .exec(&call(&["sh", "-c", SLEEPERS]), Default::default())
        .expect("exec");
    let out = String::from_utf8_lossy(&r.stdout).trim().to_string();
    let counts: Vec<u32> = out.split(' ').filter_map(|x| x.parse().ok()).collect();
    assert!(
        counts.len() == 2 && counts[0] == 0 && counts[1] >= 1,
        "sleepers of the timed-out call survived (or nothing was seen): {out}"
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
    assert!(s
        .read_file("/proc/1/root/etc/hostname", DEFAULT_MAX_READ)
        .is_err());
    // A symlink that climbs stays inside the sandbox root, but /etc is no scratch mount.
    let e = s.read_file("up/etc/hostname", DEFAULT_MAX_READ).err();
    assert_eq!(e.as_ref().map(|e| e.kind()), Some("PathEscape"), "{e:?}");
    assert_eq!(e.as_ref().and_then(|e| e.path()), Some("up/etc/hostname"));
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

/// The tests [`everything_again_unprivileged`] re-runs.
const UNPRIVILEGED_TESTS: [&str; 7] = [
    "files_persist_across_calls",
    "timeout_kills_only_that_call",
    "files_api_refuses_escapes",
    "closed_session_is_an_error",
    "background_call_streams_stdin_and_takes_signals",
    "closing_the_session_ends_background_calls",
    "exposed_port_forwards_into_the_sandbox",
];

/// Prints "<sleep processes> <processes seen>" from /proc (the session's pid namespace, which
/// a call sees): no `ps` needed, and a scan that saw nothing cannot pass for "no sleepers".
const SLEEPERS: &str = "n=0; s=0; for c in /proc/[0-9]*/comm; do n=$((n+1)); \
    read x < $c && [ \"$x\" = sleep ] && s=$((s+1)); done; echo $s $n";

/// Re-runs this whole file as uid 65534 (user namespaces make the same isolation real there).
#[test]
fn everything_again_unprivileged() {
    // SAFETY: geteuid has no side effects.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(root, "re-running the session tests as uid 65534 needs root");
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
    // Every other test of this file ran, by name, and passed.
    for name in UNPRIVILEGED_TESTS {
        assert!(
            text.lines()
                .any(|l| l.trim() == format!("test {name} ... ok")),
            "{name} did not pass unprivileged:\n{text}"
        );
    }
    assert!(
        text.lines().any(|l| l.starts_with(&format!(
            "test result: ok. {} passed; 0 failed",
            UNPRIVILEGED_TESTS.len()
        ))),
        "unexpected unprivileged totals:\n{text}"
    );
}

#[test]
fn background_call_streams_stdin_and_takes_signals() {
    let s = session();
    let mut c = s.start(&call(&["cat"]), true).expect("start");
    let stdin = c.take_stdin().expect("stdin kept open");
    let signals = c.signaller().expect("pidfd");
    let sup = std::thread::spawn(move || c.supervise(Default::default()));
    let mut w = std::fs::File::from(stdin);
    for i in 0..100 {
        std::io::Write::write_all(&mut w, format!("{i}\n").as_bytes()).expect("write");
    }
    drop(w);
    let r = sup.join().expect("supervisor");
    let want: String = (0..100).map(|i| format!("{i}\n")).collect();
    assert_eq!(r.stdout, want.as_bytes());
    assert_eq!(r.reason, Reason::Exited);
    // Signalling an ended call says so; a signal init does not forward is refused.
    assert!(!cellblock_core::session::signal_call(&signals, libc::SIGTERM).expect("signal"));
    assert!(matches!(
        cellblock_core::session::signal_call(&signals, libc::SIGSTOP),
        Err(Error::InvalidSpec(_))
    ));
    let c = s
        .start(
            &call(&[
                "sh",
                "-c",
                "trap 'exit 7' TERM; while :; do sleep 0.05; done",
            ]),
            false,
        )
        .expect("start");
    let signals = c.signaller().expect("pidfd");
    let sup = std::thread::spawn(move || c.supervise(Default::default()));
    // The trap is set once sh runs its loop; until then SIGTERM would end sh by default.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(cellblock_core::session::signal_call(&signals, libc::SIGTERM).expect("signal"));
    let r = sup.join().expect("supervisor");
    assert_eq!((r.reason, r.exit_code), (Reason::Exited, Some(7)));
}

#[test]
fn closing_the_session_ends_background_calls() {
    let s = session();
    let c = s.start(&call(&["sleep", "600"]), false).expect("start");
    let sup = std::thread::spawn(move || c.supervise(Default::default()));
    std::thread::sleep(std::time::Duration::from_millis(100));
    s.close().expect("close");
    let r = sup.join().expect("supervisor");
    assert_eq!(r.reason, Reason::SessionClosed);
    assert_eq!(r.signal, Some(libc::SIGKILL));
}

#[test]
fn exposed_port_forwards_into_the_sandbox() {
    use std::io::{Read, Write};
    let s = session();
    let server = "import socket\ns=socket.socket()\ns.bind(('127.0.0.1',8123))\ns.listen()\n\
                  print('up',flush=True)\nc,_=s.accept()\nc.sendall(b'from inside:'+c.recv(5))";
    let c = s
        .start(&call(&["python3", "-c", server]), false)
        .expect("start");
    let sup = std::thread::spawn(move || c.supervise(Default::default()));
    let addr = s
        .expose(8123, "127.0.0.1:0".parse().expect("addr"))
        .expect("expose");
    assert!(addr.ip().is_loopback());
    let mut got = Vec::new();
    for _ in 0..100 {
        let mut conn = std::net::TcpStream::connect(addr).expect("connect");
        let _ = conn.write_all(b"hello");
        got.clear();
        if conn.read_to_end(&mut got).is_ok() && !got.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(got, b"from inside:hello");
    assert_eq!(sup.join().expect("supervisor").exit_code, Some(0));
    assert!(matches!(
        s.expose(0, "127.0.0.1:0".parse().expect("addr")),
        Err(Error::InvalidSpec(_))
    ));
    s.close().expect("close");
    assert!(std::net::TcpStream::connect(addr).is_err());
}
