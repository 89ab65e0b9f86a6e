//! The sandbox side of egress: what PID 1 sets up inside the fresh network namespace.
//!
//! [`ChildPlan::new`] prepares everything in the parent (before fork): the nftables ruleset,
//! the netlink messages, the `nft` command line. [`setup_in_child`] then runs in PID 1 between
//! fork and execve: raw syscalls only, no allocation, no locks.

use super::allow::Allowlist;
use super::nflog::{self, netlink_message, push_attr};
use super::{DNS_PORT, PROXY_PORT, TRANSPARENT_PORT};
use crate::{Error, Result};
use std::ffi::CString;
use std::fmt::Write;
use std::mem::size_of;
use std::net::IpAddr;

/// Number of fds [`setup_in_child`] returns.
pub const CHILD_FDS: usize = 5;
/// Where `nft` is looked for.
const NFT_PATHS: &[&str] = &["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft", "/bin/nft"];
/// A bound on the ruleset's size (nft reads it while it is written, so no buffer limits it).
const MAX_RULESET: usize = 4 << 20;

const RTM_NEWLINK: u16 = 16;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
/// `lo` is the first device of every network namespace.
const LOOPBACK_INDEX: u32 = 1;

/// Everything the child needs, prepared before fork.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ChildPlan {
    nft: CString,
    nft_f: CString,
    nft_stdin: CString,
    dev_null: CString,
    ruleset: Vec<u8>,
    link_up: Vec<u8>,
    route_v4: Vec<u8>,
    route_v6: Vec<u8>,
    nflog_bind: Vec<u8>,
}

impl ChildPlan {
    /// Prepares the child's setup for `allow`. Fails when `nft` (package nftables) is missing.
    pub fn new(allow: &Allowlist) -> Result<ChildPlan> {
        let nft = NFT_PATHS
            .iter()
            .find(|p| std::path::Path::new(p).is_file())
            .ok_or_else(|| {
                Error::Network("nft not found: install nftables for egress allowlists".into())
            })?;
        let ruleset = ruleset(allow).into_bytes();
        if ruleset.len() > MAX_RULESET {
            return Err(Error::Network(
                "allowlist too long for the sandbox's firewall rules".into(),
            ));
        }
        let cstr = |s: &str| CString::new(s).map_err(|_| Error::Network(format!("NUL in {s:?}")));
        Ok(ChildPlan {
            nft: cstr(nft)?,
            nft_f: cstr("-f")?,
            nft_stdin: cstr("-")?,
            dev_null: cstr("/dev/null")?,
            ruleset,
            link_up: link_up_message(),
            route_v4: local_default_route(libc::AF_INET as u8),
            route_v6: local_default_route(libc::AF_INET6 as u8),
            nflog_bind: nflog::bind_message(),
        })
    }

    /// A plan whose ruleset replaces the sandbox's table with the rules for `allow` in one
    /// nft transaction (for a live policy change, see [`super::reload_rules`]).
    pub(crate) fn for_reload(allow: &Allowlist) -> Result<ChildPlan> {
        let mut plan = ChildPlan::new(allow)?;
        let mut ruleset = b"add table inet cellblock\ndelete table inet cellblock\n".to_vec();
        ruleset.append(&mut plan.ruleset);
        plan.ruleset = ruleset;
        Ok(plan)
    }

    /// The nftables ruleset the child loads (for diagnostics).
    pub fn ruleset(&self) -> &str {
        std::str::from_utf8(&self.ruleset).unwrap_or("")
    }
}

/// The sandbox's nftables rules. TCP that may be allowed goes to the transparent listener:
/// listed loopback targets, the DNS stub's synthetic addresses (listed names), listed addresses,
/// and, on the ports a listed name may use, any address (its TLS SNI or HTTP Host may name a
/// listed host). UDP port 53 goes to the DNS stub. Every other packet leaving loopback is
/// logged to the NFLOG group (reported as a violation) and refused right away: TCP with a reset,
/// so the client's connect() fails with ECONNREFUSED instead of being accepted and closed.
pub fn ruleset(allow: &Allowlist) -> String {
    let t = TRANSPARENT_PORT;
    let mut r = String::from("table inet cellblock {\n\tchain egress_nat {\n");
    r.push_str("\t\ttype nat hook output priority -100; policy accept;\n");
    let loopback: Vec<_> = allow
        .loopback_targets()
        .into_iter()
        .filter(|(_, p)| !matches!(p, Some(p) if *p == PROXY_PORT || *p == TRANSPARENT_PORT))
        .collect();
    let not_ours = format!("tcp dport != {{ {PROXY_PORT}, {TRANSPARENT_PORT} }}");
    redirect_rules(&mut r, &loopback, &not_ours);
    // Writing to a String cannot fail.
    let _ = writeln!(
        r,
        "\t\tip daddr {SYNTHETIC_NET} meta l4proto tcp redirect to :{t}"
    );
    redirect_rules(&mut r, &allow.remote_ip_targets(), "meta l4proto tcp");
    let sniffed = match allow.name_ports() {
        None => Some("meta l4proto tcp".to_string()),
        Some(ports) if ports.is_empty() => None,
        Some(ports) => {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            Some(format!("tcp dport {{ {} }}", list.join(", ")))
        }
    };
    if let Some(tcp) = sniffed {
        let _ = writeln!(r, "\t\tip daddr != 127.0.0.0/8 {tcp} redirect to :{t}");
        let _ = writeln!(r, "\t\tip6 daddr != ::1 {tcp} redirect to :{t}");
    }
    let _ = writeln!(
        r,
        "\t\tmeta nfproto ipv4 udp dport 53 redirect to :{DNS_PORT}"
    );
    r.push_str(
        "\t}\n\tchain egress_filter {\n\t\ttype filter hook output priority 0; policy accept;\n",
    );
    r.push_str("\t\tct direction reply accept\n\t\tip daddr 127.0.0.0/8 accept\n\t\tip6 daddr ::1 accept\n");
    let g = nflog::GROUP;
    let _ = writeln!(
        r,
        "\t\tmeta l4proto tcp log group {g} reject with tcp reset"
    );
    let _ = writeln!(r, "\t\tlog group {g} reject\n\t}}\n}}");
    r
}

/// Rules sending TCP to `targets` (address, port or `None` = any port, where `any_port`
/// selects the packets) to the transparent listener. Targets go into anonymous sets, one rule
/// per family and kind: a rule per target would make a batch larger than an unprivileged
/// netlink socket may send ("Message too long") for long allowlists.
fn redirect_rules(r: &mut String, targets: &[(std::net::IpAddr, Option<u16>)], any_port: &str) {
    let t = TRANSPARENT_PORT;
    for (fam, v4) in [("ip", true), ("ip6", false)] {
        let mine = targets.iter().filter(|(ip, _)| ip.is_ipv4() == v4);
        let with_port: Vec<String> = mine
            .clone()
            .filter_map(|(ip, p)| p.map(|p| format!("{ip} . {p}")))
            .collect();
        let any: Vec<String> = mine
            .filter(|(_, p)| p.is_none())
            .map(|(ip, _)| ip.to_string())
            .collect();
        if !with_port.is_empty() {
            let set = with_port.join(", ");
            let _ = writeln!(
                r,
                "\t\t{fam} daddr . tcp dport {{ {set} }} redirect to :{t}"
            );
        }
        if !any.is_empty() {
            let set = any.join(", ");
            let _ = writeln!(r, "\t\t{fam} daddr {{ {set} }} {any_port} redirect to :{t}");
        }
    }
}

/// The DNS stub's synthetic addresses (see [`super::resolve`]).
const SYNTHETIC_NET: &str = "198.18.0.0/15";

fn link_up_message() -> Vec<u8> {
    // ifinfomsg: family, pad, type, index, flags, change.
    let mut body = vec![0u8, 0, 0, 0];
    body.extend_from_slice(&(LOOPBACK_INDEX as i32).to_ne_bytes());
    body.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
    body.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
    netlink_message(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, &body)
}

/// `ip route add local default dev lo`: every address is local, so a connect to any address
/// gets past routing to the nat hook instead of failing with "network unreachable".
fn local_default_route(family: u8) -> Vec<u8> {
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let mut body = vec![
        family,
        0,
        0,
        0,
        libc::RT_TABLE_LOCAL,
        libc::RTPROT_BOOT,
        libc::RT_SCOPE_HOST,
        libc::RTN_LOCAL,
    ];
    body.extend_from_slice(&0u32.to_ne_bytes());
    push_attr(&mut body, libc::RTA_OIF, &LOOPBACK_INDEX.to_ne_bytes());
    netlink_message(
        RTM_NEWROUTE,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        &body,
    )
}

/// Hands the sockets made by [`setup_in_child`] to the supervisor over the unix socket `sock`
/// (one SCM_RIGHTS message, unused slots skipped) and closes our copies. Async-signal-safe.
pub fn send_child_fds(
    sock: libc::c_int,
    fds: &[libc::c_int; CHILD_FDS],
) -> std::result::Result<(), libc::c_int> {
    let mut valid = [-1; CHILD_FDS];
    let mut n = 0;
    for &fd in fds.iter().filter(|fd| **fd >= 0) {
        valid[n] = fd;
        n += 1;
    }
    let sent = crate::fdpass::send_fds(sock, &valid[..n]);
    for fd in &valid[..n] {
        // SAFETY: closing our own copies; the supervisor holds its own once sent.
        unsafe { libc::close(*fd) };
    }
    sent
}

/// Sets up egress inside the current network namespace; runs in PID 1 between fork and
/// execve (raw syscalls only, no allocation). Needs CAP_NET_ADMIN there and the host's
/// filesystem (it runs `nft`), so call it before pivot_root.
///
/// Brings `lo` up, adds local default routes, creates the listeners, loads the nftables rules.
/// On success `out` holds, in order: proxy listener (TCP 127.0.0.1:3128), transparent
/// listener IPv4 (TCP 127.0.0.1:3129), transparent listener IPv6 (TCP `[::1]:3129`, or -1 when
/// IPv6 is unavailable), DNS stub (UDP 127.0.0.1:53), NFLOG netlink socket. All are
/// close-on-exec. Send the ones that are not -1 to the supervisor (order does not matter:
/// [`super::Egress::start`] recognises them) and close them in the child.
///
/// Errors are negative errno values; `-ENOEXEC` means nft could not be run, `-EPROTO` that it
/// refused the ruleset (see [`ChildPlan::ruleset`]).
pub fn setup_in_child(
    plan: &ChildPlan,
    out: &mut [libc::c_int; CHILD_FDS],
) -> std::result::Result<(), libc::c_int> {
    *out = [-1; CHILD_FDS];
    let result = setup(plan, out);
    if result.is_err() {
        for fd in out.iter_mut() {
            if *fd >= 0 {
                // SAFETY: closes fds this function opened.
                unsafe { libc::close(*fd) };
                *fd = -1;
            }
        }
    }
    result
}

fn setup(
    plan: &ChildPlan,
    out: &mut [libc::c_int; CHILD_FDS],
) -> std::result::Result<(), libc::c_int> {
    netlink_request(libc::NETLINK_ROUTE, &plan.link_up, None)?;
    netlink_request(libc::NETLINK_ROUTE, &plan.route_v4, None)?;
    let v6 = netlink_request(libc::NETLINK_ROUTE, &plan.route_v6, None).is_ok();
    let lo4 = IpAddr::from([127, 0, 0, 1]);
    let lo6 = IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]);
    out[0] = bind_socket(lo4, PROXY_PORT, libc::SOCK_STREAM)?;
    out[1] = bind_socket(lo4, TRANSPARENT_PORT, libc::SOCK_STREAM)?;
    if v6 {
        out[2] = bind_socket(lo6, TRANSPARENT_PORT, libc::SOCK_STREAM).unwrap_or(-1);
    }
    out[3] = bind_socket(lo4, DNS_PORT, libc::SOCK_DGRAM)?;
    let mut nflog_fd = -1;
    netlink_request(
        libc::NETLINK_NETFILTER,
        &plan.nflog_bind,
        Some(&mut nflog_fd),
    )?;
    out[4] = nflog_fd;
    run_nft(plan)
}

/// `Err(-errno)` of the last failed call.
/// Negative errno, this module's error convention.
fn errno() -> libc::c_int {
    -crate::error::errno()
}

fn check(r: libc::c_int) -> std::result::Result<libc::c_int, libc::c_int> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

/// Sends one netlink request and waits for its ack. With `keep`, the socket is handed back
/// through it instead of closed.
fn netlink_request(
    proto: libc::c_int,
    msg: &[u8],
    keep: Option<&mut libc::c_int>,
) -> std::result::Result<(), libc::c_int> {
    // SAFETY: plain socket creation.
    let fd = check(unsafe {
        libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto)
    })?;
    let result = (|| {
        // SAFETY: sends bytes from a slice we borrow; the kernel reads `msg.len()` of them.
        if unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return Err(errno());
        }
        let mut buf = [0u8; 1024];
        loop {
            // SAFETY: receives into a local buffer of the size we pass.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(errno());
            }
            let n = n as usize;
            if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
                let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
                return if code == 0 { Ok(()) } else { Err(code) };
            }
        }
    })();
    match (result, keep) {
        (Ok(()), Some(slot)) => *slot = fd,
        _ => {
            // SAFETY: closes the socket this function opened.
            unsafe { libc::close(fd) };
        }
    }
    result
}

/// A socket bound to `ip:port`, listening when it is a stream socket.
fn bind_socket(
    ip: IpAddr,
    port: u16,
    kind: libc::c_int,
) -> std::result::Result<libc::c_int, libc::c_int> {
    let family = if ip.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket creation.
    let fd = check(unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, 0) })?;
    let result = (|| {
        let one: libc::c_int = 1;
        let int_len = size_of::<libc::c_int>() as libc::socklen_t;
        let r = match ip {
            IpAddr::V4(v4) => {
                let sa = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: port.to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(v4).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                // SAFETY: binds to a local sockaddr_in of the size we pass.
                unsafe { libc::bind(fd, (&sa as *const libc::sockaddr_in).cast(), len) }
            }
            IpAddr::V6(v6) => {
                // SAFETY: sets an int option from a local.
                unsafe {
                    libc::setsockopt(
                        fd,
                        libc::IPPROTO_IPV6,
                        libc::IPV6_V6ONLY,
                        (&one as *const libc::c_int).cast(),
                        int_len,
                    )
                };
                let sa = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: port.to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                    sin6_scope_id: 0,
                };
                let len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
                // SAFETY: binds to a local sockaddr_in6 of the size we pass.
                unsafe { libc::bind(fd, (&sa as *const libc::sockaddr_in6).cast(), len) }
            }
        };
        check(r)?;
        if kind == libc::SOCK_STREAM {
            // SAFETY: listen on the socket we own.
            check(unsafe { libc::listen(fd, 1024) })?;
        }
        Ok(fd)
    })();
    if result.is_err() {
        // SAFETY: closes the socket this function opened.
        unsafe { libc::close(fd) };
    }
    result
}

/// Runs `nft -f -` with the ruleset on stdin and waits for it. nft is started first and the
/// ruleset written while it reads: writing it before would block forever on a ruleset larger
/// than the buffer (small when the user's pipe quota is spent). A socket pair rather than a
/// pipe, so that an nft that dies early gives EPIPE, never SIGPIPE.
pub(super) fn run_nft(plan: &ChildPlan) -> std::result::Result<(), libc::c_int> {
    let mut pair = [0; 2];
    // SAFETY: socketpair writes two fds into the local array.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    })?;
    let [rd, wr] = pair;
    let argv = [
        plan.nft.as_ptr(),
        plan.nft_f.as_ptr(),
        plan.nft_stdin.as_ptr(),
        std::ptr::null(),
    ];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: a raw fork (clone with SIGCHLD only): no atfork handlers, no locks taken. The
    // child only calls dup2/open/execve/_exit.
    let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0) };
    if pid == 0 {
        // SAFETY: in the fresh child: wire stdin to the socket, silence output, exec nft (the
        // write end is close-on-exec).
        unsafe {
            libc::dup2(rd, 0);
            let null = libc::open(plan.dev_null.as_ptr(), libc::O_RDWR);
            if null >= 0 {
                libc::dup2(null, 1);
                libc::dup2(null, 2);
            }
            libc::execve(plan.nft.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    let mut written = 0;
    while pid > 0 && written < plan.ruleset.len() {
        let rest = &plan.ruleset[written..];
        // SAFETY: sends from a slice we borrow; nft reads the other end meanwhile.
        let n = unsafe { libc::send(wr, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
        if n <= 0 {
            if errno() == -libc::EINTR {
                continue;
            }
            // nft stopped reading: its exit status below says why.
            break;
        }
        written += n as usize;
    }
    // SAFETY: closes our write end so nft sees EOF.
    unsafe { libc::close(wr) };
    // SAFETY: closes the read end the child now holds its own copy of.
    unsafe { libc::close(rd) };
    if pid < 0 {
        return Err(errno());
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for the child we just forked, status into a local.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        if r >= 0 {
            break;
        }
        if errno() != -libc::EINTR {
            return Err(errno());
        }
    }
    match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
        (true, 0) => Ok(()),
        (true, 127) => Err(-libc::ENOEXEC),
        _ => Err(-libc::EPROTO),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_replaces_the_table_in_one_batch() {
        let allow = Allowlist::parse(&["127.0.0.1:9000".into()]).unwrap_or_else(|e| panic!("{e}"));
        let plan = ChildPlan::for_reload(&allow).unwrap_or_else(|e| panic!("{e}"));
        let text = plan.ruleset();
        // `add` first, so the delete never fails, then the new table: one nft transaction.
        assert!(text.starts_with("add table inet cellblock\ndelete table inet cellblock\n"));
        assert!(text.ends_with(&ruleset(&allow)), "{text}");
    }

    #[test]
    fn ruleset_redirects_listed_loopback_targets() {
        let allow = Allowlist::parse(&[
            "127.0.0.1:9000".into(),
            "[::1]".into(),
            "127.0.0.1:3128".into(),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let r = ruleset(&allow);
        assert!(
            r.contains("ip daddr . tcp dport { 127.0.0.1 . 9000 } redirect to :3129"),
            "{r}"
        );
        assert!(
            r.contains("ip6 daddr { ::1 } tcp dport != { 3128, 3129 } redirect to :3129"),
            "{r}"
        );
        assert!(
            !r.contains("dport 3128 redirect"),
            "the proxy port is never shadowed: {r}"
        );
        // No name is listed: nothing else could be allowed, so nothing else is intercepted.
        assert!(!r.contains("daddr != 127.0.0.0/8"), "{r}");
        assert!(r.contains("udp dport 53 redirect to :53"));
        assert!(
            r.contains("meta l4proto tcp log group 7 reject with tcp reset"),
            "{r}"
        );
        assert!(r.contains("log group 7 reject"));
    }

    #[test]
    fn ruleset_intercepts_only_what_may_be_allowed() {
        let parse = |p: &[&str]| {
            Allowlist::parse(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let r = ruleset(&parse(&[
            "example.com:443",
            "*.example.org:8443",
            "192.0.2.7:22",
        ]));
        assert!(
            r.contains("ip daddr 198.18.0.0/15 meta l4proto tcp redirect to :3129"),
            "{r}"
        );
        assert!(
            r.contains("ip daddr . tcp dport { 192.0.2.7 . 22 } redirect"),
            "{r}"
        );
        assert!(
            r.contains("ip daddr != 127.0.0.0/8 tcp dport { 443, 8443 } redirect"),
            "{r}"
        );
        // A name on any port: any address may turn out to be that name.
        let r = ruleset(&parse(&["example.com"]));
        assert!(
            r.contains("ip daddr != 127.0.0.0/8 meta l4proto tcp redirect to :3129"),
            "{r}"
        );
    }

    #[test]
    fn netlink_messages_are_well_formed() {
        for m in [
            link_up_message(),
            local_default_route(libc::AF_INET as u8),
            nflog::bind_message(),
        ] {
            assert_eq!(
                u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
                m.len()
            );
            assert_eq!(m.len() % 4, 0);
        }
    }
}
