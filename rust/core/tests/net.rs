//! Egress end to end, without the spawn code: each test thread moves into a network namespace
//! of its own (the "outside": servers on its loopback, nothing else reachable, so no test can
//! send a packet off this machine), and runs clients in a child process holding a user +
//! network + mount namespace prepared by `setup_in_child`, served by `Egress`.
//!
//! Needs root (for the per-test "outside" namespace), `nft`, `curl`, `python3` and `node`.

use cellblock_core::net::{self, Allowlist, ChildPlan, Egress, EgressConfig, CHILD_FDS};
use cellblock_core::{NetworkStats, Violation};
use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PYTHON: &str = "/usr/bin/python3";

/// Moves this test thread into a fresh network namespace with `lo` up, plus `extra` addresses
/// on `lo` (the test's "outside hosts"). Threads and processes started from here live there.
fn outside_netns(extra: &[&str]) {
    // SAFETY: unshare affects only the calling thread's network namespace.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        r,
        0,
        "these tests need root (unshare CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    let ip = |args: &[&str]| {
        let ok = Command::new("ip")
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "ip {args:?} failed");
    };
    ip(&["link", "set", "lo", "up"]);
    for a in extra {
        ip(&["addr", "add", a, "dev", "lo"]);
    }
}

/// What a test server saw: the first bytes of each connection.
type Seen = Arc<Mutex<Vec<Vec<u8>>>>;

/// A server on `addr` (port 0 = any). HTTP requests get `200 hello <path>`; a TLS ClientHello
/// gets `tls-ok`; with `hold`, connections are accepted and never answered.
fn server(addr: &str, hold: bool) -> (u16, Seen) {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let seen: Seen = Arc::default();
    let s = Arc::clone(&seen);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let s = Arc::clone(&s);
            std::thread::spawn(move || serve_one(conn, &s, hold));
        }
    });
    (port, seen)
}

fn serve_one(mut conn: TcpStream, seen: &Seen, hold: bool) {
    if hold {
        seen.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Vec::new());
        let _ = conn.read(&mut [0u8; 1]);
        return;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = conn.read(&mut chunk) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf[0] == 0x16 || buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    seen.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(buf.clone());
    let reply = if buf.first() == Some(&0x16) {
        b"tls-ok".to_vec()
    } else {
        let path = String::from_utf8_lossy(&buf)
            .split(' ')
            .nth(1)
            .unwrap_or("?")
            .to_string();
        let body = format!("hello {path}");
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let _ = conn.write_all(&reply);
}

/// A free port on `addr` with nothing listening (bound, then closed).
fn dead_port(addr: &str) -> u16 {
    TcpListener::bind(addr)
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(1)
}

fn allow(patterns: &[String]) -> Allowlist {
    Allowlist::parse(patterns).unwrap_or_else(|e| panic!("{e}"))
}

static RESOLV_SEQ: AtomicUsize = AtomicUsize::new(0);

/// Starts `argv` in a child that holds a new user + network + mount namespace set up by
/// `setup_in_child` (and `/etc/resolv.conf` pointing at the stub), and serves it.
fn start(
    patterns: &[String],
    config: EgressConfig,
    argv: &[&str],
    env: &[(&str, &str)],
) -> (Child, Egress) {
    let allowlist = allow(patterns);
    let plan = ChildPlan::new(&allowlist).unwrap_or_else(|e| panic!("{e}"));
    let resolv = format!(
        "/tmp/cb-net-test-{}-{}.conf",
        std::process::id(),
        RESOLV_SEQ.fetch_add(1, Ordering::SeqCst)
    );
    std::fs::write(&resolv, net::resolv_conf()).unwrap_or_else(|e| panic!("{e}"));
    let (ours, theirs) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
    // SAFETY: geteuid/getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let prep = ChildPrep {
        plan,
        uid_map: cstr(&format!("0 {uid} 1")),
        gid_map: cstr(&format!("0 {gid} 1")),
        resolv: cstr(&resolv),
        sock: theirs.as_raw_fd(),
    };
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/tmp");
    for (k, v) in net::proxy_env() {
        cmd.env(k, v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure only makes raw syscalls on data prepared above (no allocation).
    unsafe { cmd.pre_exec(move || prep.enter()) };
    let child = cmd.spawn();
    drop(theirs);
    let _ = std::fs::remove_file(&resolv);
    let child = child.unwrap_or_else(|e| panic!("sandbox child failed: {e}"));
    let fds = cellblock_core::fdpass::recv_fds(ours.as_fd()).unwrap_or_default();
    assert!(
        fds.len() >= 4,
        "expected the child's sockets, got {}",
        fds.len()
    );
    let egress = Egress::start_with(allowlist, fds, config).unwrap_or_else(|e| panic!("{e}"));
    (child, egress)
}

/// Runs `argv` to the end in a served sandbox; returns its output and the egress report.
fn run(
    patterns: &[String],
    config: EgressConfig,
    argv: &[&str],
) -> (Output, NetworkStats, Vec<Violation>) {
    let (child, egress) = start(patterns, config, argv, &[]);
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let (stats, violations) = egress.finish();
    eprintln!(
        "--- stdout\n{}--- stderr\n{}--- {stats:?}\n--- {violations:?}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, stats, violations)
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_else(|e| panic!("{e}"))
}

/// Data the forked child uses before exec.
struct ChildPrep {
    plan: ChildPlan,
    uid_map: CString,
    gid_map: CString,
    resolv: CString,
    sock: RawFd,
}

impl ChildPrep {
    /// In the forked child: new namespaces, id maps, resolv.conf, egress setup, fds out.
    fn enter(&self) -> std::io::Result<()> {
        let err = std::io::Error::last_os_error;
        // SAFETY: raw syscalls on prepared, NUL-terminated data; single-threaded child.
        unsafe {
            if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET | libc::CLONE_NEWNS) != 0 {
                return Err(err());
            }
            write_file(c"/proc/self/setgroups", b"deny");
            write_file(c"/proc/self/uid_map", self.uid_map.as_bytes());
            write_file(c"/proc/self/gid_map", self.gid_map.as_bytes());
            let none = std::ptr::null();
            if libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
                || libc::mount(
                    self.resolv.as_ptr(),
                    c"/etc/resolv.conf".as_ptr(),
                    none,
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
            {
                return Err(err());
            }
        }
        let mut fds = [-1; CHILD_FDS];
        net::setup_in_child(&self.plan, &mut fds)
            .map_err(|e| std::io::Error::from_raw_os_error(-e))?;
        net::send_child_fds(self.sock, &fds).map_err(std::io::Error::from_raw_os_error)
    }
}

/// Writes `data` to `path` (best effort: setgroups may be absent).
unsafe fn write_file(path: &std::ffi::CStr, data: &[u8]) {
    // SAFETY: open/write/close on a NUL-terminated path and a borrowed buffer.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::write(fd, data.as_ptr().cast(), data.len());
            libc::close(fd);
        }
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn has_violation(v: &[Violation], host: &str, port: u16, reason: &str) -> bool {
    v.iter().any(|x| {
        matches!(x, Violation::Network { host: h, port: p, reason: r }
        if h == host && *p == port && r.starts_with(reason))
    })
}

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

fn argv(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn listed_loopback_target_is_reachable_by_every_client() {
    outside_netns(&[]);
    let (port, seen) = server("127.0.0.1:0", false);
    let (port6, _) = server("[::1]:0", false);
    let proxy = format!("http://127.0.0.1:{}", net::PROXY_PORT);
    let script = format!(
        "curl -sS --max-time 10 --noproxy '' -x {proxy} http://127.0.0.1:{port}/curl-forward; echo; \
         curl -sS --max-time 10 --noproxy '' -p -x {proxy} http://127.0.0.1:{port}/curl-connect; echo; \
         curl -sS --max-time 10 http://127.0.0.1:{port}/curl-direct; echo; \
         curl -sS --max-time 10 -g 'http://[::1]:{port6}/curl-v6'; echo; \
         NO_PROXY= no_proxy= {PYTHON} -c 'import urllib.request as u; print(u.urlopen(\"http://127.0.0.1:{port}/urllib\", timeout=10).read().decode())'; \
         {PYTHON} -c 'import socket; s=socket.create_connection((\"127.0.0.1\",{port}),timeout=10); s.sendall(b\"GET /raw HTTP/1.0\\r\\n\\r\\n\"); print(s.recv(999).decode().split(\"\\r\\n\\r\\n\")[1])'; \
         node -e 'fetch(\"http://127.0.0.1:{port}/node\").then(r=>r.text()).then(console.log)'"
    );
    let patterns = vec![format!("127.0.0.1:{port}"), format!("[::1]:{port6}")];
    let (out, stats, violations) = run(&patterns, EgressConfig::default(), &argv(&sh(&script)));
    let text = stdout(&out);
    for want in [
        "curl-forward",
        "curl-connect",
        "curl-direct",
        "curl-v6",
        "urllib",
        "raw",
        "node",
    ] {
        assert!(
            text.contains(&format!("hello /{want}")),
            "{want} missing from:\n{text}"
        );
    }
    assert!(violations.is_empty(), "{violations:?}");
    assert_eq!(stats.connections, 7, "{stats:?}");
    assert!(
        stats.bytes_in > 7 * 40 && stats.bytes_out > 7 * 14,
        "{stats:?}"
    );
    let heads = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let forwarded = heads
        .iter()
        .map(|h| String::from_utf8_lossy(h).into_owned())
        .find(|h| h.contains("/curl-forward"));
    let forwarded = forwarded.unwrap_or_default();
    assert!(
        forwarded.starts_with("GET /curl-forward HTTP/1.1\r\n"),
        "origin form upstream: {forwarded}"
    );
    assert!(
        !forwarded.to_ascii_lowercase().contains("proxy-"),
        "proxy headers stripped: {forwarded}"
    );
}

#[test]
fn unlisted_ports_and_addresses_are_refused_and_reported() {
    outside_netns(&["198.51.100.7/32"]);
    let (port, _) = server("127.0.0.1:0", false);
    let (other, other_seen) = server("127.0.0.1:0", false);
    let (outside, outside_seen) = server("198.51.100.7:0", false);
    let proxy = format!("http://127.0.0.1:{}", net::PROXY_PORT);
    let script = format!(
        "curl -sS --max-time 10 -o /dev/null -w 'forward=%{{http_code}}\\n' --noproxy '' -x {proxy} http://127.0.0.1:{other}/; \
         curl -sS --max-time 10 -o /dev/null -w 'connect=%{{http_code}}\\n' --noproxy '' -p -x {proxy} http://127.0.0.1:{other}/ 2>&1; \
         {PYTHON} -c '\nimport socket\ntry:\n  s=socket.create_connection((\"198.51.100.7\",{outside}),timeout=10); s.sendall(b\"GET / HTTP/1.0\\r\\n\\r\\n\"); print(\"raw got\", s.recv(99))\nexcept OSError as e: print(\"raw refused\", type(e).__name__)'"
    );
    let patterns = vec![format!("127.0.0.1:{port}")];
    let (out, stats, violations) = run(&patterns, EgressConfig::default(), &argv(&sh(&script)));
    let text = stdout(&out);
    assert!(text.contains("forward=403"), "{text}");
    assert!(
        text.contains("connect=403") || text.contains("CONNECT tunnel failed, response 403"),
        "{text}"
    );
    assert!(
        text.contains("raw refused ConnectionRefusedError"),
        "{text}"
    );
    assert!(
        has_violation(&violations, "127.0.0.1", other, "not allowed"),
        "{violations:?}"
    );
    assert!(
        has_violation(&violations, "198.51.100.7", outside, "not allowed"),
        "{violations:?}"
    );
    assert_eq!(stats.connections, 0);
    assert!(
        other_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty(),
        "unlisted port was dialled"
    );
    assert!(
        outside_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty(),
        "unlisted address was dialled"
    );
}

#[test]
fn dns_answers_listed_names_only_and_udp_is_refused() {
    outside_netns(&[]);
    let (port, _) = server("127.0.0.1:0", false);
    let lo = IpAddr::from([127, 0, 0, 1]);
    let config = EgressConfig {
        hosts: vec![("files.test".into(), lo)],
        ..Default::default()
    };
    let script = format!(
        "{PYTHON} -c '\nimport socket, urllib.request as u\n\
print(\"files\", socket.gethostbyname(\"files.test\"))\n\
print(u.build_opener(u.ProxyHandler({{}})).open(\"http://files.test:{port}/by-name\", timeout=10).read().decode())\n\
for name in (\"evil.test\", \"secret-data.exfil.test\"):\n  try: print(\"resolved\", socket.gethostbyname(name))\n  except OSError as e: print(\"no\", name)\n\
s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
try: s.sendto(b\"x\", (\"198.51.100.9\", 9999)); print(\"udp sent\")\nexcept OSError as e: print(\"udp refused\", e.errno)\n'; \
         node -e 'fetch(\"http://files.test:{port}/node-by-name\").then(r=>r.text()).then(console.log, e=>console.log(\"node error\", e.cause))'"
    );
    let patterns = vec![format!("files.test:{port}"), format!("127.0.0.1:{port}")];
    let (out, stats, violations) = run(&patterns, config, &argv(&sh(&script)));
    let text = stdout(&out);
    assert!(
        text.contains("files 198.18.0.1"),
        "synthetic answer: {text}"
    );
    assert!(text.contains("hello /by-name"), "{text}");
    assert!(text.contains("hello /node-by-name"), "{text}");
    assert!(
        text.contains("no evil.test") && text.contains("no secret-data.exfil.test"),
        "{text}"
    );
    assert!(text.contains("udp refused"), "{text}");
    assert!(
        has_violation(&violations, "evil.test", 0, "not allowed"),
        "{violations:?}"
    );
    assert!(
        has_violation(&violations, "secret-data.exfil.test", 0, "not allowed"),
        "{violations:?}"
    );
    assert!(
        has_violation(&violations, "198.51.100.9", 9999, "udp not allowed"),
        "{violations:?}"
    );
    assert_eq!(stats.connections, 2, "{stats:?}");
}

#[test]
fn listed_name_with_private_address_needs_the_address_listed() {
    outside_netns(&[]);
    let (port, seen) = server("127.0.0.1:0", false);
    let lo = IpAddr::from([127, 0, 0, 1]);
    let config = EgressConfig {
        hosts: vec![("internal.test".into(), lo)],
        ..Default::default()
    };
    let proxy = format!("http://127.0.0.1:{}", net::PROXY_PORT);
    let script = format!(
        "curl -sS --max-time 10 -o /dev/null -w 'proxy=%{{http_code}}\\n' --noproxy '' -x {proxy} http://internal.test:{port}/; \
         {PYTHON} -c '\nimport socket\ntry: print(\"resolved\", socket.gethostbyname(\"internal.test\"))\nexcept OSError: print(\"no internal.test\")'"
    );
    let (out, stats, violations) = run(
        &[format!("internal.test:{port}")],
        config,
        &argv(&sh(&script)),
    );
    let text = stdout(&out);
    assert!(text.contains("proxy=403"), "{text}");
    assert!(text.contains("no internal.test"), "{text}");
    assert!(
        has_violation(
            &violations,
            "internal.test",
            port,
            "non-public address 127.0.0.1"
        ),
        "{violations:?}"
    );
    assert!(
        has_violation(
            &violations,
            "internal.test",
            0,
            "non-public address 127.0.0.1"
        ),
        "{violations:?}"
    );
    assert_eq!(stats.connections, 0);
    assert!(seen.lock().unwrap_or_else(|e| e.into_inner()).is_empty());

    // Listing the address as well lets the same request through.
    let config = EgressConfig {
        hosts: vec![("internal.test".into(), lo)],
        ..Default::default()
    };
    let patterns = vec![format!("internal.test:{port}"), format!("127.0.0.1:{port}")];
    let (out, _, violations) = run(&patterns, config, &argv(&sh(&script)));
    assert!(stdout(&out).contains("proxy=200"), "{}", stdout(&out));
    assert!(violations.is_empty(), "{violations:?}");
}

#[test]
fn tls_sni_and_http_host_name_the_target_of_raw_connections() {
    outside_netns(&[]);
    let (port, seen) = server("127.0.0.1:0", false);
    let lo = IpAddr::from([127, 0, 0, 1]);
    let config = EgressConfig {
        hosts: vec![("files.test".into(), lo)],
        ..Default::default()
    };
    // The client dials an unlisted documentation address; only the name it sends is listed.
    let script = format!(
        "{PYTHON} -c '\nimport socket, ssl\n\
c=socket.create_connection((\"203.0.113.5\",{port}),timeout=10)\n\
c.sendall(b\"GET /by-host HTTP/1.1\\r\\nHost: files.test:{port}\\r\\n\\r\\n\"); print(c.recv(999).decode().split(\"\\r\\n\\r\\n\")[1])\n\
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()\n\
t = ssl.create_default_context().wrap_bio(inc, out, server_hostname=\"files.test\")\n\
try: t.do_handshake()\nexcept ssl.SSLWantReadError: pass\n\
c=socket.create_connection((\"203.0.113.5\",{port}),timeout=10); c.sendall(out.read()); print(c.recv(99).decode())\n\
t = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out, server_hostname=\"evil.test\")\n\
try: t.do_handshake()\nexcept ssl.SSLWantReadError: pass\n\
c=socket.create_connection((\"203.0.113.5\",{port}),timeout=10); c.sendall(out.read())\n\
try: print(\"evil got\", c.recv(99))\nexcept OSError as e: print(\"evil refused\")\n'"
    );
    let patterns = vec![format!("files.test:{port}"), format!("127.0.0.1:{port}")];
    let (out, stats, violations) = run(&patterns, config, &argv(&sh(&script)));
    let text = stdout(&out);
    assert!(text.contains("hello /by-host"), "{text}");
    assert!(text.contains("tls-ok"), "{text}");
    assert!(text.contains("evil refused"), "{text}");
    assert!(
        has_violation(&violations, "evil.test", port, "not allowed"),
        "{violations:?}"
    );
    assert_eq!(stats.connections, 2, "{stats:?}");
    let heads = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        heads.iter().any(|h| h.first() == Some(&0x16)),
        "the ClientHello was replayed upstream"
    );
}

#[test]
fn unreachable_listed_target_is_a_502_and_reported() {
    outside_netns(&[]);
    let port = dead_port("127.0.0.1:0");
    let proxy = format!("http://127.0.0.1:{}", net::PROXY_PORT);
    let script = format!("curl -sS --max-time 10 -o /dev/null -w 'code=%{{http_code}}\\n' --noproxy '' -x {proxy} http://127.0.0.1:{port}/");
    let (out, stats, violations) = run(
        &[format!("127.0.0.1:{port}")],
        EgressConfig::default(),
        &argv(&sh(&script)),
    );
    assert!(stdout(&out).contains("code=502"), "{}", stdout(&out));
    assert!(
        has_violation(&violations, "127.0.0.1", port, "unreachable"),
        "{violations:?}"
    );
    assert_eq!(stats.connections, 0);
}

#[test]
fn connection_cap_and_finish_cut_everything() {
    outside_netns(&[]);
    let (port, seen) = server("127.0.0.1:0", true);
    let script = format!(
        "import socket, sys, time\n\
held = []\n\
for i in range(3):\n  c = socket.create_connection((\"127.0.0.1\", {p}), timeout=30)\n  c.sendall(b\"CONNECT 127.0.0.1:{port} HTTP/1.1\\r\\n\\r\\n\")\n  held.append(c)\n\
answers = [c.recv(99) for c in held]\n\
print(\"answers\", [a.split(b\" \")[1].decode() for a in answers], flush=True)\n\
print(\"cut\", [c.recv(99) for c, a in zip(held, answers) if b\"200\" in a], flush=True)\n\
try: socket.create_connection((\"127.0.0.1\", {p}), timeout=5); print(\"proxy still open\")\n\
except OSError: print(\"proxy closed\", flush=True)\n",
        p = net::PROXY_PORT
    );
    let config = EgressConfig {
        max_connections: 2,
        ..Default::default()
    };
    let (mut child, egress) = start(
        &[format!("127.0.0.1:{port}")],
        config,
        &[PYTHON, "-c", &script],
        &[],
    );
    let mut lines =
        BufReader::new(child.stdout.take().unwrap_or_else(|| panic!("no stdout"))).lines();
    let answers = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(answers, "answers ['200', '200', '503']");
    // Both tunnels are open and idle: finish must still return, cutting them.
    while seen.lock().unwrap_or_else(|e| e.into_inner()).len() < 2 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (stats, violations) = egress.finish();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(
        rest,
        vec!["cut [b'', b'']".to_string(), "proxy closed".to_string()]
    );
    assert!(child.wait().map(|s| s.success()).unwrap_or(false));
    assert_eq!(stats.connections, 2);
    assert!(
        has_violation(
            &violations,
            "127.0.0.1",
            net::PROXY_PORT,
            "too many connections"
        ),
        "{violations:?}"
    );
}

/// A server answering every request with `size` bytes (from a reused buffer).
fn bulk_server(size: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let block = vec![b'x'; 1 << 20];
                let _ = conn.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                );
                let mut left = size;
                while left > 0 {
                    let n = left.min(block.len());
                    if conn.write_all(&block[..n]).is_err() {
                        return;
                    }
                    left -= n;
                }
            });
        }
    });
    port
}

/// Egress throughput and per-connection latency against the host directly. Prints a table;
/// run with `cargo test --release --test net -- --ignored --nocapture egress_bench`.
#[test]
#[ignore = "benchmark: prints numbers, asserts nothing about speed"]
fn egress_bench() {
    outside_netns(&[]);
    const SIZE: usize = 100 << 20;
    const CONNS: usize = 200;
    let big = bulk_server(SIZE);
    let small = bulk_server(64);
    let proxy = format!("http://127.0.0.1:{}", net::PROXY_PORT);
    let curl = |via: &str| {
        format!("curl -sS -o /dev/null -w '%{{speed_download}}\\n' {via} http://127.0.0.1:{big}/")
    };
    let latency = format!(
        "import socket, time\nt = time.perf_counter()\nfor i in range({CONNS}):\n  c = socket.create_connection((\"127.0.0.1\", {small}))\n  c.sendall(b\"GET / HTTP/1.0\\r\\n\\r\\n\")\n  while c.recv(65536): pass\n  c.close()\nprint((time.perf_counter() - t) / {CONNS} * 1e6)\n"
    );
    let host = |argv: &[&str]| {
        let out = Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<f64>()
            .unwrap_or(f64::NAN)
    };
    let sandboxed = |argv: &[&str]| {
        let patterns = vec![format!("127.0.0.1:{big}"), format!("127.0.0.1:{small}")];
        let (out, _, _) = run(&patterns, EgressConfig::default(), argv);
        stdout(&out).trim().parse::<f64>().unwrap_or(f64::NAN)
    };
    let best = |f: &dyn Fn() -> f64| (0..3).map(|_| f()).fold(f64::NAN, f64::max);
    let least = |f: &dyn Fn() -> f64| (0..3).map(|_| f()).fold(f64::NAN, f64::min);
    let direct = best(&|| host(&argv(&sh(&curl("")))));
    let via_proxy = best(&|| sandboxed(&argv(&sh(&curl(&format!("--noproxy '' -x {proxy}"))))));
    let transparent = best(&|| sandboxed(&argv(&sh(&curl("")))));
    // At a link speed (about 1 Gbit/s) the network, not the CPU, is the limit.
    let limited_direct = best(&|| host(&argv(&sh(&curl("--limit-rate 100M")))));
    let limited_proxy = best(&|| {
        sandboxed(&argv(&sh(&curl(&format!(
            "--limit-rate 100M --noproxy '' -x {proxy}"
        )))))
    });
    let lat_direct = least(&|| host(&[PYTHON, "-c", &latency]));
    let lat_sandbox = least(&|| sandboxed(&[PYTHON, "-c", &latency]));
    let mb = |bps: f64| bps / 1e6;
    println!(
        "egress benchmark (100 MB over loopback, {} CPUs)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{:<28}{:>12}{:>10}", "path", "MB/s", "% direct");
    println!("{:<28}{:>12.0}{:>10.0}", "direct (host)", mb(direct), 100.0);
    println!(
        "{:<28}{:>12.0}{:>10.0}",
        "proxy (absolute-URI GET)",
        mb(via_proxy),
        100.0 * via_proxy / direct
    );
    println!(
        "{:<28}{:>12.0}{:>10.0}",
        "transparent (redirect)",
        mb(transparent),
        100.0 * transparent / direct
    );
    println!(
        "{:<28}{:>12.0}{:>10.0}",
        "direct, --limit-rate 100M",
        mb(limited_direct),
        100.0
    );
    let pct = 100.0 * limited_proxy / limited_direct;
    println!(
        "{:<28}{:>12.0}{:>10.0}",
        "proxy, --limit-rate 100M",
        mb(limited_proxy),
        pct
    );
    println!(
        "connection latency (connect + tiny GET, mean of {CONNS}): direct {lat_direct:.0} us, \
              sandbox transparent {lat_sandbox:.0} us, added {:.0} us",
        lat_sandbox - lat_direct
    );
}
