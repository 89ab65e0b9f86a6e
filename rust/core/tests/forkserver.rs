//! The fork server through the core API, with `cellblock-spawn --forkserver` as its program: once
//! cold runs are asked for, their PID 1 comes from the fork server, with the same isolation and
//! report; a drain stops it. One test function: the fork server is process-wide.

use cellblock_core::{cell, forkserver, Reason, RunSpec};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn sh(script: &str) -> RunSpec {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), "/usr/bin:/bin".to_string());
    let mut spec = RunSpec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env,
        ..Default::default()
    };
    spec.limits.timeout = Some(60.0);
    spec.limits.pids = Some(16);
    spec
}

fn cold(spec: &RunSpec) -> cellblock_core::RunReport {
    cellblock_core::run_with(spec, Default::default(), false).expect("the run starts")
}

#[test]
fn cold_runs_come_from_the_forkserver_and_a_drain_stops_it() {
    forkserver::set_command(vec![
        env!("CARGO_BIN_EXE_cellblock-spawn").into(),
        "--forkserver".into(),
    ])
    .expect("a valid command");
    let deadline = Instant::now() + Duration::from_secs(30);
    while forkserver::stats().clones == 0 {
        assert!(
            Instant::now() < deadline,
            "no run came from the fork server"
        );
        assert_eq!(cold(&sh("true")).exit_code, Some(0));
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = forkserver::stats().pid;
    assert!(pid > 0);
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).expect("the fork server runs");
    assert_eq!(comm.trim(), "cellblock-fsrv");

    let before = forkserver::stats().clones;
    let report = cold(&sh(
        "echo $$ $PPID; ls /proc | grep -c '^[0-9]'; exec 9>&-; ls /proc/self/fd | wc -l",
    ));
    assert_eq!(forkserver::stats().clones, before + 1);
    assert_eq!(report.reason, Reason::Exited);
    let out = String::from_utf8_lossy(&report.stdout).into_owned();
    let lines: Vec<&str> = out.lines().collect();
    // The command is PID 1's child in a fresh pid namespace: PID 1, itself and its own ls.
    assert_eq!(lines.first().copied(), Some("2 1"), "{out}");
    assert!(
        lines
            .get(1)
            .is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n <= 4)),
        "{out}"
    );
    // Only stdin, stdout, stderr and ls's own directory fd: nothing of the fork server's.
    assert_eq!(lines.get(2).copied(), Some("4"), "{out}");

    // A fork bomb stops at the pids limit, as in a directly cloned sandbox.
    let bomb = cold(&sh("for i in $(seq 40); do sleep 2 & done; wait"));
    assert!(
        bomb.exit_code != Some(0) || !bomb.limits_hit.is_empty(),
        "{bomb:?}"
    );

    assert!(cell::drain(Duration::from_secs(10)));
    assert_eq!(forkserver::stats().pid, 0);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the fork server was stopped and reaped"
    );
}
