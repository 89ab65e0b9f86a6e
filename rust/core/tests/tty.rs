//! Terminals through the core API alone: a tty run's stdio is a pty of the sandbox's own
//! devpts instance, sized as asked, its controlling terminal, and its output is read (merged,
//! redacted) from the master by the supervisor. Python's tests/test_tty.py covers uid 65534,
//! sessions and the caller's terminal.

use cellblock_core::{Error, RunReport, RunSpec, Secret, TtySize};
use std::collections::BTreeMap;

fn sh(script: &str, tty: Option<TtySize>) -> RunSpec {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), "/usr/bin:/bin".to_string());
    let mut spec = RunSpec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env,
        tty,
        ..Default::default()
    };
    spec.limits.timeout = Some(60.0);
    spec
}

fn run(spec: &RunSpec) -> RunReport {
    cellblock_core::run(spec, Default::default()).expect("the run starts")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_tty_run_has_its_own_terminal_of_the_given_size() {
    // ls lays its listing out in columns: it writes to a terminal.
    let script = "tty; stty size; ls /dev/pts; echo err >&2";
    let r = run(&sh(
        script,
        Some(TtySize {
            rows: 33,
            cols: 101,
        }),
    ));
    assert_eq!(r.exit_code, Some(0), "{}", text(&r.stdout));
    // stdout and stderr merged, CRLF from the terminal's output processing.
    assert_eq!(
        text(&r.stdout),
        "/dev/pts/0\r\n33 101\r\n0  ptmx\r\nerr\r\n"
    );
    assert!(r.stderr.is_empty());
}

#[test]
fn without_tty_the_command_has_pipes_and_no_terminal() {
    let r = run(&sh("tty; ls /dev/pts; exec 3<>/dev/tty", None));
    // tty(1) says "not a tty" and exits 1; /dev/tty opens nothing (no controlling terminal).
    let out = text(&r.stdout);
    assert!(out.starts_with("not a tty\nptmx\n"), "{out}");
    assert_ne!(r.exit_code, Some(0));
}

#[test]
fn tty_output_is_redacted() {
    let mut spec = sh("echo \"$TOKEN\"", Some(TtySize { rows: 24, cols: 80 }));
    spec.secrets = vec![Secret {
        name: "TOKEN".into(),
        value: "s3cr3t-tty-value".into(),
    }];
    let r = run(&spec);
    assert_eq!(text(&r.stdout), "[REDACTED:TOKEN]\r\n");
}

#[test]
fn an_empty_window_is_refused() {
    let e = cellblock_core::run(
        &sh("true", Some(TtySize { rows: 0, cols: 80 })),
        Default::default(),
    );
    assert!(matches!(e, Err(Error::InvalidSpec(m)) if m.contains("tty")));
}
