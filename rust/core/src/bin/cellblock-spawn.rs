//! `cellblock-spawn`: drives the core without Python.
//!
//! Reads a JSON [`RunSpec`] from the file named by the first argument (or stdin), runs it and
//! prints the report as one JSON object (stdout/stderr as UTF-8 text, lossy). Optional:
//! `--bpf FILE` (compiled seccomp program), `--stdin FILE` (bytes for the command's stdin).
//! Exit status: 0 when a report was printed, 2 on an error (printed as `cellblock: error: ...`).
//!
//! `cellblock-spawn --forkserver` serves as a fork server (see `cellblock_core::forkserver`): a program
//! embedding the core without Python can name it in `forkserver::set_command`.

use cellblock_core::{run, RunSpec};
use std::io::Read;

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--forkserver") {
        cellblock_core::forkserver::serve();
    }
    match real_main() {
        Ok(()) => {}
        Err(msg) => {
            eprintln!("cellblock: error: {msg}");
            std::process::exit(2);
        }
    }
}

fn real_main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (mut spec_path, mut bpf_path, mut stdin_path) = (None, None, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bpf" => bpf_path = args.next(),
            "--stdin" => stdin_path = args.next(),
            _ => spec_path = Some(a),
        }
    }
    let text = match &spec_path {
        Some(p) if p != "-" => std::fs::read_to_string(p).map_err(|e| format!("{p}: {e}"))?,
        _ => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| e.to_string())?;
            s
        }
    };
    let mut spec: RunSpec = serde_json::from_str(&text).map_err(|e| format!("InvalidSpec: {e}"))?;
    if let Some(p) = bpf_path {
        let bpf = std::fs::read(&p).map_err(|e| format!("{p}: {e}"))?;
        spec.seccomp.get_or_insert_with(Default::default).bpf = bpf;
    }
    if let Some(p) = stdin_path {
        spec.stdin = std::fs::read(&p).map_err(|e| format!("{p}: {e}"))?;
    }
    let report = run(&spec, Default::default()).map_err(|e| format!("{}: {e}", e.kind()))?;
    let mut value = serde_json::to_value(&report).map_err(|e| e.to_string())?;
    if let Some(obj) = value.as_object_mut() {
        obj.insert(
            "stdout".into(),
            String::from_utf8_lossy(&report.stdout).into_owned().into(),
        );
        obj.insert(
            "stderr".into(),
            String::from_utf8_lossy(&report.stderr).into_owned().into(),
        );
    }
    println!("{value}");
    Ok(())
}
