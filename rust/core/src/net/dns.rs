//! The DNS stub inside the sandbox (UDP 127.0.0.1:53; all UDP port 53 traffic is redirected
//! to it). It never forwards a query, so nothing leaks through DNS.
//!
//! An allowed name gets an `A` answer with a *synthetic* address (198.18.0.0/15) that stands
//! for the name for the whole run, after the supervisor resolved the name on the host and found
//! an address it may dial; a connection to that address reaches the transparent path, which
//! maps it back to the name, whatever protocol it speaks. `AAAA` and other types of allowed
//! names get an empty answer, so clients use IPv4. Unlisted names get NXDOMAIN and a violation.

use super::allow::Host;
use super::resolve;
use super::Shared;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::Arc;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
/// Response codes.
const NOERROR: u8 = 0;
const FORMERR: u8 = 1;
const SERVFAIL: u8 = 2;
const NXDOMAIN: u8 = 3;
const REFUSED: u8 = 5;
/// TTL of synthetic answers: they stay valid for the whole run.
const TTL: u32 = 300;
/// Queries being resolved at once; more are dropped (the client retries).
const MAX_PENDING: usize = 32;

/// One parsed question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Query {
    id: u16,
    /// Recursion-desired bit, echoed.
    rd: bool,
    /// The name as asked (labels joined with `.`, bytes outside printable ASCII escaped).
    pub(crate) name: String,
    pub(crate) qtype: u16,
    qclass: u16,
    /// The raw question section, echoed in the response.
    question: Vec<u8>,
}

/// Parses a query; `Err(Some(id))` when the header is readable but the rest is not.
pub(crate) fn parse_query(pkt: &[u8]) -> Result<Query, Option<u16>> {
    if pkt.len() < 12 {
        return Err(None);
    }
    let id = u16::from_be_bytes([pkt[0], pkt[1]]);
    let flags = u16::from_be_bytes([pkt[2], pkt[3]]);
    let qdcount = u16::from_be_bytes([pkt[4], pkt[5]]);
    let is_query = flags & 0x8000 == 0;
    let opcode = (flags >> 11) & 0xf;
    if !is_query {
        return Err(None);
    }
    if opcode != 0 || qdcount != 1 {
        return Err(Some(id));
    }
    let mut pos = 12;
    let mut name = String::new();
    loop {
        let len = usize::from(*pkt.get(pos).ok_or(Some(id))?);
        pos += 1;
        if len == 0 {
            break;
        }
        // Compression pointers (and the reserved label types) have no place in a question.
        if len > 63 || name.len() + len > 255 {
            return Err(Some(id));
        }
        let label = pkt.get(pos..pos + len).ok_or(Some(id))?;
        if !name.is_empty() {
            name.push('.');
        }
        for &b in label {
            match b {
                b'.' | b'\\' => name.push_str(&format!("\\{}", b as char)),
                0x21..=0x7e => name.push(b as char),
                _ => name.push_str(&format!("\\{b:03}")),
            }
        }
        pos += len;
    }
    let tail = pkt.get(pos..pos + 4).ok_or(Some(id))?;
    Ok(Query {
        id,
        rd: flags & 0x0100 != 0,
        name,
        qtype: u16::from_be_bytes([tail[0], tail[1]]),
        qclass: u16::from_be_bytes([tail[2], tail[3]]),
        question: pkt[12..pos + 4].to_vec(),
    })
}

/// A response to `q` with `rcode` and at most one address answer.
pub(crate) fn response(q: &Query, rcode: u8, answer: Option<IpAddr>) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + q.question.len() + 28);
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR=1, AA=1, RD echoed, RA=1.
    let flags: u16 = 0x8000 | 0x0400 | if q.rd { 0x0100 } else { 0 } | 0x0080 | u16::from(rcode);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&u16::from(answer.is_some()).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&q.question);
    if let Some(ip) = answer {
        // The answer's name points back at the question's (offset 12).
        out.extend_from_slice(&[0xc0, 12]);
        let (rtype, data) = match ip {
            IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
            IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
        };
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(&data);
    }
    out
}

/// What to do with a query, decided from the allowlist alone.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Answer now with this code and optional address.
    Reply(u8, Option<IpAddr>),
    /// Answer NXDOMAIN and report the name.
    Deny,
    /// An `A` query for an allowed name: resolve and vet it on the host first.
    Resolve(String),
}

/// Decides a query: `localhost` answers loopback, unlisted names are denied, allowed names get
/// an `A` answer after resolution and an empty answer for every other type.
pub(crate) fn plan(q: &Query, allow: &super::Allowlist) -> Plan {
    if q.qclass != CLASS_IN {
        return Plan::Reply(REFUSED, None);
    }
    let name = match Host::parse(&q.name) {
        Some(Host::Name(n)) => n,
        _ => return Plan::Deny,
    };
    if name == "localhost" {
        return Plan::Reply(
            NOERROR,
            match q.qtype {
                TYPE_A => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                TYPE_AAAA => Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                _ => None,
            },
        );
    }
    if !allow.allows_name(&name) {
        return Plan::Deny;
    }
    match q.qtype {
        TYPE_A => Plan::Resolve(name),
        _ => Plan::Reply(NOERROR, None),
    }
}

/// Answers every query waiting on the stub socket (called when it is readable).
pub(crate) fn serve_pending(shared: &Arc<Shared>, sock: &Arc<UdpSocket>) {
    let mut buf = [0u8; 512];
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let reply = match parse_query(&buf[..n]) {
            Err(None) => continue,
            Err(Some(id)) => {
                let mut r = vec![0u8; 12];
                r[..2].copy_from_slice(&id.to_be_bytes());
                r[2] = 0x80;
                r[3] = FORMERR;
                r
            }
            Ok(q) => match plan(&q, &shared.allow()) {
                Plan::Reply(rcode, ip) => response(&q, rcode, ip),
                Plan::Deny => {
                    shared.refuse(&q.name, 0, "not allowed");
                    response(&q, NXDOMAIN, None)
                }
                Plan::Resolve(name) => {
                    resolve_later(shared, sock, q, name, from);
                    continue;
                }
            },
        };
        // A lost answer is retried by the client.
        let _ = sock.send_to(&reply, from);
    }
}

/// Resolves `name` in a helper thread (lookups can take seconds) and answers from there.
fn resolve_later(
    shared: &Arc<Shared>,
    sock: &Arc<UdpSocket>,
    q: Query,
    name: String,
    to: std::net::SocketAddr,
) {
    if shared.dns_pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING {
        shared.dns_pending.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let (s, sock) = (Arc::clone(shared), Arc::clone(sock));
    let spawned = shared.spawn("cb-net-dnsq", move || {
        let looked_up = s.resolver.lookup(&name, &s.stop);
        // Decided against the allowlist of now, not of when the query came: a host removed
        // (Sandbox.set_network) while the lookup ran gets no answer.
        let reply = match settle(&name, looked_up.as_deref(), &s.allow()) {
            Err(reason) => {
                s.refuse(&name, 0, &reason);
                response(&q, NXDOMAIN, None)
            }
            Ok(()) => match super::lock(&s.synthetic).address_for(&name) {
                Some(ip) => response(&q, NOERROR, Some(IpAddr::V4(ip))),
                None => response(&q, SERVFAIL, None),
            },
        };
        let _ = sock.send_to(&reply, to);
        s.dns_pending.fetch_sub(1, Ordering::SeqCst);
    });
    if !spawned {
        shared.dns_pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether a looked-up name may be answered under `allow` (the allowlist in force once the
/// lookup is done): still listed, resolved, and to an address it may dial. Err: why not.
fn settle(
    name: &str,
    looked_up: Option<&[IpAddr]>,
    allow: &super::Allowlist,
) -> Result<(), String> {
    if !allow.allows_name(name) {
        return Err("not allowed".into());
    }
    let ips = looked_up.ok_or_else(|| "unresolvable".to_string())?;
    resolve::vet(ips, None, allow).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Allowlist;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.').filter(|l| !l.is_empty()) {
            p.push(label.len() as u8);
            p.extend_from_slice(label.as_bytes());
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&CLASS_IN.to_be_bytes());
        p
    }

    fn allow(p: &[&str]) -> Allowlist {
        let v: Vec<String> = p.iter().map(|s| s.to_string()).collect();
        Allowlist::parse(&v).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_lookup_in_flight_is_settled_by_the_allowlist_of_when_it_ends() {
        let public: &[IpAddr] = &[IpAddr::V4(Ipv4Addr::new(93, 184, 215, 14))];
        let before = allow(&["api.test"]);
        let after = allow(&["other.test"]);
        let q = parse_query(&query("api.test", 1)).expect("query");
        // Planned while the host was listed ...
        assert_eq!(plan(&q, &before), Plan::Resolve("api.test".into()));
        assert_eq!(settle("api.test", Some(public), &before), Ok(()));
        // ... but removed before the lookup ended: no answer.
        assert_eq!(
            settle("api.test", Some(public), &after),
            Err("not allowed".into())
        );
        assert_eq!(
            settle("api.test", None, &before),
            Err("unresolvable".into())
        );
    }

    #[test]
    fn parses_a_query() {
        let q = parse_query(&query("Api.Example.com", TYPE_A)).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(q.id, 0x1234);
        assert!(q.rd);
        assert_eq!(q.name, "Api.Example.com");
        assert_eq!(q.qtype, TYPE_A);
    }

    #[test]
    fn rejects_malformed_queries() {
        assert_eq!(parse_query(&[1, 2, 3]), Err(None));
        let mut truncated = query("example.com", TYPE_A);
        truncated.truncate(truncated.len() - 2);
        assert_eq!(parse_query(&truncated), Err(Some(0x1234)));
        let mut pointer = query("example.com", TYPE_A);
        pointer[12] = 0xc0;
        assert_eq!(parse_query(&pointer), Err(Some(0x1234)));
        let mut response = query("example.com", TYPE_A);
        response[2] |= 0x80;
        assert_eq!(parse_query(&response), Err(None));
    }

    #[test]
    fn odd_bytes_in_labels_are_escaped() {
        let mut p = query("ab.com", TYPE_A);
        p[13] = 0;
        let q = parse_query(&p).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(q.name, "\\000b.com");
        assert_eq!(plan(&q, &allow(&["*.com"])), Plan::Deny);
    }

    #[test]
    fn builds_answers() {
        let q = parse_query(&query("a.example", TYPE_A)).unwrap_or_else(|e| panic!("{e:?}"));
        let r = response(&q, NOERROR, Some(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))));
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[2] & 0x80, 0x80, "QR set");
        assert_eq!(r[3] & 0x0f, NOERROR);
        assert_eq!(&r[6..8], &[0, 1], "one answer");
        assert_eq!(&r[r.len() - 4..], &[198, 18, 0, 1]);
        let nx = response(&q, NXDOMAIN, None);
        assert_eq!(nx[3] & 0x0f, NXDOMAIN);
        assert_eq!(&nx[6..8], &[0, 0]);
        assert_eq!(nx.len(), 12 + q.question.len());
    }

    #[test]
    fn plans_follow_the_allowlist() {
        let a = allow(&["pypi.org:443", "*.example.com"]);
        let plan_of = |name: &str, t: u16| {
            plan(
                &parse_query(&query(name, t)).unwrap_or_else(|e| panic!("{e:?}")),
                &a,
            )
        };
        assert_eq!(
            plan_of("pypi.org", TYPE_A),
            Plan::Resolve("pypi.org".into())
        );
        assert_eq!(
            plan_of("PyPI.org.", TYPE_A),
            Plan::Resolve("pypi.org".into())
        );
        assert_eq!(plan_of("pypi.org", TYPE_AAAA), Plan::Reply(NOERROR, None));
        assert_eq!(plan_of("pypi.org", 65), Plan::Reply(NOERROR, None));
        assert_eq!(
            plan_of("x.example.com", TYPE_A),
            Plan::Resolve("x.example.com".into())
        );
        assert_eq!(plan_of("example.com", TYPE_A), Plan::Deny);
        assert_eq!(plan_of("evil.org", TYPE_A), Plan::Deny);
        assert_eq!(plan_of("secret-data.evil.org", 16), Plan::Deny);
        assert_eq!(
            plan_of("localhost", TYPE_A),
            Plan::Reply(NOERROR, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)))
        );
    }
}
