//! Pre-created cells through the core API: a ready cell serves `cellblock_core::run` with the
//! same isolation, and a drained pool leaves no process or cgroup of this process behind.
//! One test function: the pool is process-wide, and the leak check needs no other runs.

use cellblock_core::cell;
use cellblock_core::{Reason, RunSpec};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn spec(script: &str) -> RunSpec {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), "/usr/bin:/bin".to_string());
    let mut spec = RunSpec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env,
        ..Default::default()
    };
    spec.limits.timeout = Some(60.0);
    spec.limits.memory = Some(256 << 20);
    spec.limits.pids = Some(64);
    spec
}

fn wait_ready() {
    let deadline = Instant::now() + Duration::from_secs(30);
    while cell::stats().ready == 0 {
        assert!(Instant::now() < deadline, "no cell became ready");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Live children of this process (zombies excluded).
fn children() -> usize {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
                .filter(|s| {
                    let f: Vec<&str> = s
                        .rsplit(')')
                        .next()
                        .unwrap_or("")
                        .split_whitespace()
                        .collect();
                    f.get(1) == Some(&me.as_str()) && f.first() != Some(&"Z")
                })
                .count()
        })
        .unwrap_or(0)
}

/// cellblock cgroups of this process that still exist (v1 hierarchies and the unified one).
fn own_cgroups() -> usize {
    let prefix = format!("cellblock-{}-", std::process::id());
    let layout = cellblock_core::cgroup::layout();
    layout
        .v2_dir
        .iter()
        .chain(layout.v1_dirs.iter().map(|(_, d)| d))
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|d| d.flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .count()
}

#[test]
fn cells_serve_runs_isolated_and_leave_nothing() {
    let probe = spec(
        "echo pid=$$ host=$(hostname) uid=$(id -u); grep CapEff /proc/self/status; \
         ls /work 2>&1; echo x > /usr/cellblock-x 2>&1; cat /proc/self/uid_map",
    );
    // The first run of a shape records it, the second (cold too) asks for a cell.
    let first = cellblock_core::run(&probe, Default::default()).expect("cold run");
    cellblock_core::run(&probe, Default::default()).expect("cold run");
    wait_ready();
    let before = cell::stats();
    let r = cellblock_core::run(&probe, Default::default()).expect("pooled run");
    let after = cell::stats();
    assert_eq!(after.hits, before.hits + 1, "a ready cell served the run");
    let text = |r: &cellblock_core::RunReport| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        )
    };
    let out = text(&r);
    assert_eq!(r.reason, Reason::Exited, "{out}");
    // The same sandbox as a cold run's, line for line.
    assert_eq!(out, text(&first));
    assert!(out.contains("pid=2 host=cellblock uid=0"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("/work': No such file"), "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    assert_eq!(r.enforcement, first.enforcement);

    // Bounded while in use, nothing left once drained.
    let mut peak = 0;
    for _ in 0..200 {
        let r = cellblock_core::run(&spec("true"), Default::default()).expect("run");
        assert_eq!(r.exit_code, Some(0));
        peak = peak.max(children());
    }
    let bound = cell::stats().max_cells + 1 + 16;
    assert!(peak <= bound, "{peak} children (bound {bound})");
    assert!(cell::drain(Duration::from_secs(20)), "drained in time");
    assert_eq!(cell::stats().ready, 0);
    assert_eq!(children(), 0, "no sandbox process is left");
    assert_eq!(own_cgroups(), 0, "no cgroup is left");
}
