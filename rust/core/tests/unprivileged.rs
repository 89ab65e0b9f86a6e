//! The `cellblock-spawn` binary run as uid 65534 (through `setpriv`), where a user namespace makes
//! the same isolation real without privileges and limits fall back to rlimits. Needs root to
//! switch uid; skipped (with a message) otherwise.

use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A world-readable temporary directory holding a copy of the binary (the build directory may
/// not be readable by uid 65534), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "cellblock-spawn-test-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir(&dir).expect("scratch dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::copy(
            env!("CARGO_BIN_EXE_cellblock-spawn"),
            dir.join("cellblock-spawn"),
        )
        .expect("copy binary");
        std::fs::set_permissions(
            dir.join("cellblock-spawn"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        Scratch(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn can_switch_uid() -> bool {
    // SAFETY: geteuid has no side effects.
    let root = unsafe { libc::geteuid() == 0 };
    let setpriv = Command::new("setpriv").arg("--version").output().is_ok();
    if !root || !setpriv {
        eprintln!("skipped: running as uid 65534 needs root and setpriv");
    }
    root && setpriv
}

/// Runs `spec` with cellblock-spawn as uid/gid 65534 and returns its JSON report.
fn spawn_as_nobody(spec: &Value) -> Value {
    let scratch = Scratch::new();
    let spec_path = scratch.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).expect("write spec");
    std::fs::set_permissions(&spec_path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(scratch.path().join("cellblock-spawn"))
        .arg(&spec_path)
        .current_dir("/")
        .output()
        .expect("run setpriv");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON report")
}

fn sh(script: &str, limits: Value) -> Value {
    json!({"argv": ["sh", "-c", script], "env": {"PATH": "/usr/bin:/bin"}, "limits": limits})
}

#[test]
fn identity_namespaces_and_privileges() {
    assert!(
        can_switch_uid(),
        "this test runs payloads as uid 65534: run it as root with setpriv installed"
    );
    let host_ns: Vec<String> = ["user", "pid", "mnt", "net", "ipc", "uts", "cgroup"]
        .iter()
        .map(|n| {
            std::fs::read_link(format!("/proc/self/ns/{n}"))
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        })
        .collect();
    let r = spawn_as_nobody(&sh(
        "id -u; cat /proc/self/uid_map; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; \
         for n in user pid mnt net ipc uts cgroup; do readlink /proc/self/ns/$n; done",
        json!({"timeout": 30.0}),
    ));
    let out = r["stdout"].as_str().unwrap_or_default().to_string();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0");
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["0", "65534", "1"]
    );
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        ["CapEff:", "0000000000000000"]
    );
    assert_eq!(
        lines[3].split_whitespace().collect::<Vec<_>>(),
        ["NoNewPrivs:", "1"]
    );
    for (inside, host) in lines[4..].iter().zip(&host_ns) {
        assert_ne!(inside, host, "namespace shared with the host");
    }
    assert_eq!(lines.len(), 4 + host_ns.len());
}

#[test]
fn filesystem_network_and_environment() {
    assert!(
        can_switch_uid(),
        "this test runs payloads as uid 65534: run it as root with setpriv installed"
    );
    let r = spawn_as_nobody(&sh(
        "for p in /root /home /work /run /etc/shadow; do test -e $p && echo visible $p; done; \
         touch /usr/x /etc/x /x 2>/dev/null && echo writable; \
         tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; env | sort",
        json!({"timeout": 30.0}),
    ));
    assert_eq!(r["stdout"], "lo\nPATH=/usr/bin:/bin\nPWD=/workspace\n");
}

#[test]
fn limits_are_rlimits_and_hold() {
    assert!(
        can_switch_uid(),
        "this test runs payloads as uid 65534: run it as root with setpriv installed"
    );
    let limits = json!({"memory": 64 << 20, "pids": 16, "cpus": 0.5, "cpu_time": 5.0, "timeout": 30.0,
                        "max_output": 65536, "disk": 1 << 20});
    let r = spawn_as_nobody(&sh(
        "head -c 4194304 /dev/zero > /tmp/f; wc -c < /tmp/f; yes",
        limits,
    ));
    assert_eq!(
        r["enforcement"],
        json!({"memory": "rlimit", "pids": "rlimit", "cpus": null, "cpu_time": "rlimit",
               "timeout": "supervisor", "max_output": "supervisor", "disk": "tmpfs"})
    );
    assert_eq!(r["reason"], "output_limit");
    assert_eq!(r["stdout_truncated"], true);
    let stdout = r["stdout"].as_str().unwrap_or_default();
    let size: u64 = stdout
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .parse()
        .expect("size");
    assert!(size <= 1 << 20, "disk cap not enforced: {size}");
    assert!(stdout.len() <= 65536);
    let r = spawn_as_nobody(&sh("sleep 60", json!({"timeout": 0.5})));
    assert_eq!(r["reason"], "timeout");
    assert_eq!(r["exit_code"], Value::Null);
}
