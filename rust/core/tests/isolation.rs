//! Isolation through the core API alone (`cellblock_core::run`), as whatever user runs
//! `cargo test` (root in CI: cgroups, uid 0 mapped to an unused host uid). Every claim is an
//! escape the payload attempts; see `unprivileged.rs` for the same as uid 65534.

use cellblock_core::{Enforcer, Error, Reason, RunReport, RunSpec, Stream};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

fn spec(argv: &[&str]) -> RunSpec {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), "/usr/bin:/bin".to_string());
    let mut spec = RunSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env,
        ..Default::default()
    };
    spec.limits.timeout = Some(60.0);
    spec
}

fn sh(script: &str) -> RunSpec {
    spec(&["sh", "-c", script])
}

fn run(spec: &RunSpec) -> RunReport {
    cellblock_core::run(spec, Default::default()).expect("the run starts")
}

fn stdout(r: &RunReport) -> String {
    String::from_utf8_lossy(&r.stdout).into_owned()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no side effects.
    unsafe { libc::geteuid() == 0 }
}

/// A `sleep` argument no other process on the host uses.
fn marker() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("3600.{}{:09}", std::process::id(), nanos)
}

/// Host processes whose command line is exactly `sleep <mark>`.
fn sleepers(mark: &str) -> usize {
    let want = format!("sleep\0{mark}\0").into_bytes();
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn every_namespace_is_new() {
    let names = ["user", "pid", "mnt", "net", "ipc", "uts", "cgroup"];
    let script: String = names
        .iter()
        .map(|n| format!("readlink /proc/self/ns/{n}; "))
        .collect();
    let r = run(&sh(&script));
    let inside: Vec<String> = stdout(&r).lines().map(str::to_string).collect();
    assert_eq!(
        inside.len(),
        names.len(),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    for (name, seen) in names.iter().zip(&inside) {
        let host = std::fs::read_link(format!("/proc/self/ns/{name}")).expect("host ns");
        assert_ne!(
            host.to_string_lossy(),
            seen.as_str(),
            "{name} namespace shared with the host"
        );
    }
}

#[test]
fn root_inside_without_privileges() {
    let r = run(&sh("id -u; id -g; cat /proc/self/uid_map; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs)' /proc/self/status"));
    let out = stdout(&r);
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0], ["0"]);
    assert_eq!(lines[1], ["0"]);
    let outside: u32 = lines[2][1].parse().expect("uid_map");
    assert_eq!((lines[2][0], lines[2][2]), ("0", "1"));
    // SAFETY: getuid has no side effects.
    let me = unsafe { libc::getuid() };
    if is_root() {
        assert!(outside != 0, "sandbox root is host root");
    } else {
        assert_eq!(outside, me);
    }
    assert_eq!(lines[3], ["CapPrm:", "0000000000000000"]);
    assert_eq!(lines[4], ["CapEff:", "0000000000000000"]);
    assert_eq!(lines[5], ["CapBnd:", "0000000000000000"]);
    assert_eq!(lines[6], ["NoNewPrivs:", "1"]);
}

#[test]
fn host_paths_are_absent_and_the_root_is_read_only() {
    let hidden = [
        "/root",
        "/home",
        "/work",
        "/run",
        "/var/run",
        "/etc/shadow",
        "/etc/gshadow",
    ];
    let mut script = String::new();
    for p in hidden {
        script.push_str(&format!("test -e {p} && echo visible {p}; "));
    }
    for p in ["/x", "/usr/x", "/etc/x", "/bin/x"] {
        script.push_str(&format!("touch {p} 2>/dev/null && echo writable {p}; "));
    }
    script.push_str("echo ok > /tmp/t && echo ok > /workspace/w && cat /tmp/t /workspace/w; pwd");
    let r = run(&sh(&script));
    assert_eq!(stdout(&r), "ok\nok\n/workspace\n");
}

#[test]
fn proc_and_dev_show_only_the_sandbox() {
    let r = run(&sh("ls /proc | grep -E '^[0-9]+$' | wc -l; echo $$; ls /dev | tr '\\n' ' '; \
                     echo x > /proc/sys/kernel/hostname 2>/dev/null && echo proc-sys-writable; true"));
    let out = stdout(&r);
    let lines: Vec<&str> = out.lines().collect();
    // PID 1, the shell (pid 2) and the few commands of the pipeline.
    assert!(lines[0].trim().parse::<u32>().expect("count") <= 5, "{out}");
    assert_eq!(lines[1], "2");
    assert_eq!(
        lines[2].trim(),
        "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero"
    );
    assert_eq!(lines.len(), 3, "{out}");
}

#[test]
fn only_loopback() {
    let r = run(&sh("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '"));
    assert_eq!(stdout(&r), "lo\n");
}

#[test]
fn environment_is_only_what_was_given() {
    std::env::set_var("CELLBLOCK_CORE_CANARY", "leaked");
    let mut s = spec(&["env"]);
    s.env.insert("GIVEN".into(), "yes".into());
    let r = run(&s);
    let mut lines: Vec<String> = stdout(&r).lines().map(str::to_string).collect();
    lines.sort();
    assert_eq!(lines, ["GIVEN=yes", "PATH=/usr/bin:/bin"]);
}

#[test]
fn exit_status_and_signals() {
    let r = run(&sh("exit 3"));
    assert_eq!(
        (r.reason, r.exit_code, r.signal),
        (Reason::Exited, Some(3), None)
    );
    let r = run(&sh("kill -KILL $$"));
    assert_eq!(
        (r.reason, r.exit_code, r.signal),
        (Reason::Signaled, None, Some(9))
    );
}

/// Shell code that waits until `n` processes `sleep <mark>` are visible inside, then says so.
fn wait_visible(mark: &str, n: usize) -> String {
    format!(
        "until [ \"$(for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done | grep -c '^sleep {mark} ')\" = {n} ]; \
         do sleep 0.01; done; echo started; "
    )
}

#[test]
fn timeout_kills_daemons() {
    let mark = marker();
    let mut s = sh(&format!(
        "setsid sh -c 'trap \"\" TERM; sleep {mark}' & sleep {mark} & (trap '' TERM HUP; sleep {mark}) & {} wait",
        wait_visible(&mark, 3)
    ));
    s.limits.timeout = Some(3.0);
    let r = run(&s);
    assert_eq!((r.reason, r.exit_code), (Reason::Timeout, None));
    assert_eq!(stdout(&r), "started\n");
    assert_eq!(sleepers(&mark), 0, "a process outlived the run");
}

#[test]
fn descendants_die_when_the_command_exits() {
    let mark = marker();
    let r = run(&sh(&format!(
        "setsid sleep {mark} </dev/null >/dev/null 2>&1 & {}",
        wait_visible(&mark, 1)
    )));
    assert_eq!(
        (r.reason, stdout(&r).as_str()),
        (Reason::Exited, "started\n")
    );
    assert_eq!(sleepers(&mark), 0, "a daemon outlived the run");
}

#[test]
fn output_flood_is_cut() {
    let mut s = sh("yes | head -c 300000000");
    s.limits.max_output = Some(64 << 10);
    let r = run(&s);
    assert_eq!(r.reason, Reason::OutputLimit);
    assert!(r.stdout_truncated && !r.stderr_truncated);
    assert!(!r.stdout.is_empty() && r.stdout.len() <= 64 << 10);
}

#[test]
fn disk_is_capped() {
    let mut s = sh("head -c 4194304 /dev/zero > /tmp/f; echo $?; wc -c < /tmp/f");
    s.limits.disk = Some(1 << 20);
    let r = run(&s);
    let out = stdout(&r);
    let lines: Vec<&str> = out.lines().collect();
    assert_ne!(lines[0], "0");
    assert!(lines[1].trim().parse::<u64>().expect("size") <= 1 << 20);
    assert!(String::from_utf8_lossy(&r.stderr).contains("No space left on device"));
    assert_eq!(r.enforcement["disk"], Some(Enforcer::Tmpfs));
}

#[test]
fn fork_bomb_is_bounded() {
    let bomb = "import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n    \
                except OSError:\n        break\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n    \
                n += 1\nprint(n)";
    let mut s = spec(&["python3", "-c", bomb]);
    s.limits.pids = Some(16);
    let r = run(&s);
    let forked: u32 = stdout(&r).trim().parse().expect("count");
    assert!(forked < 16, "forked {forked} with pids=16");
}

#[test]
fn memory_limit() {
    let mut s = spec(&[
        "python3",
        "-c",
        "x = bytearray(256 << 20); print('allocated')",
    ]);
    s.limits.memory = Some(32 << 20);
    let r = run(&s);
    assert!(!stdout(&r).contains("allocated"));
    if is_root() {
        assert_eq!(r.reason, Reason::Memory);
        assert!(matches!(
            r.enforcement["memory"],
            Some(Enforcer::CgroupV1 | Enforcer::CgroupV2)
        ));
    } else {
        assert_eq!(r.enforcement["memory"], Some(Enforcer::Rlimit));
    }
}

#[test]
fn enforcement_is_reported() {
    let mut s = spec(&["true"]);
    s.limits.memory = Some(64 << 20);
    s.limits.pids = Some(32);
    s.limits.cpus = Some(0.5);
    s.limits.cpu_time = Some(5.0);
    s.limits.max_output = Some(1 << 20);
    s.limits.disk = Some(1 << 20);
    let r = run(&s);
    assert_eq!(r.enforcement["timeout"], Some(Enforcer::Supervisor));
    assert_eq!(r.enforcement["max_output"], Some(Enforcer::Supervisor));
    for limit in ["memory", "pids", "cpus", "cpu_time"] {
        let e = r.enforcement[limit];
        if is_root() {
            assert!(
                matches!(e, Some(Enforcer::CgroupV1 | Enforcer::CgroupV2)),
                "{limit}: {e:?}"
            );
        } else if limit == "cpus" {
            assert_eq!(e, None, "no rlimit caps bandwidth");
        } else {
            assert_eq!(e, Some(Enforcer::Rlimit), "{limit}");
        }
    }
}

#[test]
fn stdin_and_live_output() {
    let mut s = sh("cat; echo err >&2");
    s.stdin = b"from stdin\n".to_vec();
    let mut chunks: Vec<(Stream, Vec<u8>)> = Vec::new();
    let mut sink = |stream: Stream, data: &[u8]| chunks.push((stream, data.to_vec()));
    let r =
        cellblock_core::run(&s, cellblock_core::Hooks::with_sink(Some(&mut sink))).expect("run");
    assert_eq!(r.stdout, b"from stdin\n");
    assert_eq!(r.stderr, b"err\n");
    let out: Vec<u8> = chunks
        .iter()
        .filter(|(s, _)| *s == Stream::Stdout)
        .flat_map(|(_, d)| d.clone())
        .collect();
    assert_eq!(out, b"from stdin\n");
}

#[test]
fn bad_specs_and_missing_commands_are_typed_errors() {
    assert!(matches!(
        cellblock_core::run(&spec(&[]), Default::default()),
        Err(Error::InvalidSpec(_))
    ));
    let mut zero = spec(&["true"]);
    zero.limits.memory = Some(0);
    assert!(matches!(
        cellblock_core::run(&zero, Default::default()),
        Err(Error::InvalidSpec(_))
    ));
    let mut bad_env = spec(&["true"]);
    bad_env.env.insert("A=B".into(), "x".into());
    assert!(matches!(
        cellblock_core::run(&bad_env, Default::default()),
        Err(Error::InvalidSpec(_))
    ));
    // A missing command is named as the error's path.
    for cmd in ["no-such-command-cellblock", "/etc/passwd"] {
        let e = cellblock_core::run(&spec(&[cmd]), Default::default()).err();
        assert_eq!(
            e.as_ref().map(|e| e.kind()),
            Some("CommandNotFound"),
            "{e:?}"
        );
        assert_eq!(e.as_ref().and_then(|e| e.path()), Some(cmd), "{e:?}");
    }
}

/// The run's Landlock domain handles reparenting (REFER) and allows it: renames and hard links
/// between directories of its own scratch space work (apt and dpkg need them; `ln` has no
/// copy fallback, unlike `mv`). What the kernel refuses otherwise still fails.
#[test]
fn renames_and_links_between_directories_work() {
    let r = run(&sh(
        "set -e; mkdir -p /workspace/a/b /tmp/c; echo x > /workspace/a/b/f; \
         ln /workspace/a/b/f /workspace/a/g; \
         python3 -c 'import os; os.rename(\"/workspace/a/b/f\", \"/workspace/h\")'; \
         cat /workspace/h /workspace/a/g; \
         if ln /workspace/h /tmp/c/i 2>/dev/null; then echo same-fs-link; fi; \
         if ln /workspace/h /dev/shm/j 2>/dev/null; then echo shm-link; fi; \
         if mv /workspace/h /usr/h 2>/dev/null; then echo ESCAPED; fi",
    ));
    assert_eq!(r.reason, Reason::Exited, "{r:?}");
    assert_eq!(
        r.exit_code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let out = stdout(&r);
    assert!(out.starts_with("x\nx\n"), "{out}");
    assert!(!out.contains("ESCAPED"), "{out}");
}
