//! Nothing remains after runs: no cgroups, no children, no fds. A test binary of its own, so no
//! other test's runs are alive while it looks.

use cellblock_core::{cgroup, RunSpec};
use std::collections::BTreeMap;

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn children() -> usize {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("stat")).is_ok_and(|s| {
                        s.rsplit(')')
                            .next()
                            .and_then(|r| r.split_whitespace().nth(1))
                            == Some(&me)
                    })
                })
                .count()
        })
        .unwrap_or(0)
}

fn own_cgroups() -> Vec<String> {
    let prefix = format!("cellblock-{}-", std::process::id());
    let layout = cgroup::layout();
    let dirs = layout
        .v2_dir
        .iter()
        .chain(layout.v1_dirs.iter().map(|(_, d)| d));
    let mut found = Vec::new();
    for dir in dirs {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                found.push(e.path().display().to_string());
            }
        }
    }
    found
}

#[test]
fn runs_leave_nothing_behind() {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), "/usr/bin:/bin".to_string());
    let mut spec = RunSpec {
        argv: ["sh", "-c", "sleep 60 & setsid sleep 60 & yes"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        env,
        ..Default::default()
    };
    spec.limits.memory = Some(64 << 20);
    spec.limits.pids = Some(16);
    spec.limits.cpus = Some(1.0);
    spec.limits.cpu_time = Some(10.0);
    spec.limits.timeout = Some(0.3);
    let ending = [None, Some(1u64 << 16)];
    cellblock_core::run(&spec, Default::default()).expect("warm-up run");
    // Ready cells and queued teardowns are the pool's standing state, not leftovers: drop them
    // (and finish every teardown) before each look.
    let settle = || {
        assert!(cellblock_core::cell::drain(std::time::Duration::from_secs(
            20
        )))
    };
    settle();
    let (fds_before, children_before) = (fds(), children());
    for max_output in ending.iter().cycle().take(6) {
        spec.limits.max_output = *max_output;
        cellblock_core::run(&spec, Default::default()).expect("run");
    }
    assert!(cellblock_core::run(
        &RunSpec {
            argv: vec!["no-such-command".into()],
            ..spec.clone()
        },
        Default::default()
    )
    .is_err());
    settle();
    assert_eq!(own_cgroups(), Vec::<String>::new());
    assert_eq!(fds(), fds_before);
    assert_eq!(children(), children_before);
}
