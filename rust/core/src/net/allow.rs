//! Allowlist patterns: parsing and matching.
//!
//! Grammar: `host`, `host:port`, `*.domain` (subdomains only, never `domain` itself), `ip`,
//! `ip:port`, `[ipv6]`, `[ipv6]:port` (a bare IPv6 address without port also works). No port
//! means any port. `localhost[:port]` also lists `127.0.0.1[:port]` and `[::1][:port]`.

use crate::{Error, Result};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What a pattern or a connection names: a DNS name or an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name, lower-case, without trailing dot.
    Name(String),
    /// An address (IPv4-mapped IPv6 addresses are stored as IPv4).
    Ip(IpAddr),
}

impl Host {
    /// Parses a host as clients write it: a name, an IPv4 address, an IPv6 address with or
    /// without brackets. Names are lower-cased and lose a trailing dot. `None` if invalid.
    pub fn parse(s: &str) -> Option<Host> {
        let inner = s.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
        if let Some(v6) = inner {
            return v6
                .parse::<Ipv6Addr>()
                .ok()
                .map(|ip| Host::Ip(canonical_ip(IpAddr::V6(ip))));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Some(Host::Ip(canonical_ip(ip)));
        }
        let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
        valid_name(&name).then_some(Host::Name(name))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) as plain IPv4, everything else unchanged.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// A DNS name: labels of 1-63 letters, digits, `-` or `_`, not starting or ending with `-`;
/// at most 253 characters; the last label is not all digits (that would be a bad IPv4).
fn valid_name(name: &str) -> bool {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let last_numeric = name
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    (1..=253).contains(&name.len()) && name.split('.').all(label_ok) && !last_numeric
}

/// The host part of one pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// Exactly this name.
    Exact(String),
    /// Any name ending in this suffix (which starts with `.`), not the bare domain.
    Subdomains(String),
    /// Exactly this address.
    Ip(IpAddr),
}

/// One parsed pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    host: HostPattern,
    port: Option<u16>,
}

impl Pattern {
    fn port_ok(&self, port: u16) -> bool {
        !matches!(self.port, Some(p) if p != port)
    }

    fn name_ok(&self, name: &str) -> bool {
        match &self.host {
            HostPattern::Exact(n) => n == name,
            HostPattern::Subdomains(suffix) => {
                name.len() > suffix.len() && name.ends_with(suffix.as_str())
            }
            HostPattern::Ip(_) => false,
        }
    }
}

/// A parsed egress allowlist. An empty list allows nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    patterns: Vec<Pattern>,
}

impl Allowlist {
    /// Parses patterns; `Err(Error::Network)` names the first bad one and why.
    pub fn parse(patterns: &[String]) -> Result<Allowlist> {
        let mut out = Vec::new();
        for p in patterns {
            parse_pattern(p, &mut out)
                .map_err(|why| Error::Network(format!("bad allow pattern {p:?}: {why}")))?;
        }
        Ok(Allowlist { patterns: out })
    }

    /// Whether a connection to `host` (name or address, as clients write it) on `port` is allowed.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        Host::parse(host).is_some_and(|h| self.allows_host(&h, port))
    }

    /// Whether a connection to a parsed host on `port` is allowed.
    pub fn allows_host(&self, host: &Host, port: u16) -> bool {
        match host {
            Host::Name(n) => self
                .patterns
                .iter()
                .any(|p| p.port_ok(port) && p.name_ok(n)),
            Host::Ip(ip) => self.allows_ip(*ip, port),
        }
    }

    /// Whether `ip:port` is listed by an address pattern (names never vouch for an address).
    pub fn allows_ip(&self, ip: IpAddr, port: u16) -> bool {
        self.ip_listed(ip, Some(port))
    }

    /// Whether `ip` is listed by an address pattern for at least one port.
    pub fn lists_ip(&self, ip: IpAddr) -> bool {
        self.ip_listed(ip, None)
    }

    fn ip_listed(&self, ip: IpAddr, port: Option<u16>) -> bool {
        let ip = canonical_ip(ip);
        self.patterns.iter().any(|p| {
            p.host == HostPattern::Ip(ip)
                && (port.is_none() || port.is_some_and(|port| p.port_ok(port)))
        })
    }

    /// Whether some pattern allows the name `name` on at least one port (what DNS answers need).
    pub fn allows_name(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| p.name_ok(name))
    }

    /// Listed loopback addresses with their port (`None` = any): the connections the sandbox
    /// makes to its own loopback that must be sent to the host instead.
    pub fn loopback_targets(&self) -> Vec<(IpAddr, Option<u16>)> {
        let mut out = Vec::new();
        for p in &self.patterns {
            if let HostPattern::Ip(ip) = p.host {
                if ip.is_loopback() && !out.contains(&(ip, p.port)) {
                    out.push((ip, p.port));
                }
            }
        }
        out
    }

    /// Listed addresses other than loopback, with their port (`None` = any): connections to
    /// them are intercepted and relayed.
    pub fn remote_ip_targets(&self) -> Vec<(IpAddr, Option<u16>)> {
        let mut out = Vec::new();
        for p in &self.patterns {
            if let HostPattern::Ip(ip) = p.host {
                if !ip.is_loopback() && !out.contains(&(ip, p.port)) {
                    out.push((ip, p.port));
                }
            }
        }
        out
    }

    /// The ports a listed name may be reached on: `None` when some name pattern allows any
    /// port. A connection to an unlisted address can only be let through if its first bytes
    /// name a listed host (TLS SNI, HTTP Host), so only these ports are worth intercepting.
    pub fn name_ports(&self) -> Option<Vec<u16>> {
        let mut ports = Vec::new();
        for p in self
            .patterns
            .iter()
            .filter(|p| !matches!(p.host, HostPattern::Ip(_)))
        {
            match p.port {
                None => return None,
                Some(port) if !ports.contains(&port) => ports.push(port),
                Some(_) => {}
            }
        }
        Some(ports)
    }

    /// Whether the list is empty (nothing is allowed).
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

/// Parses one pattern into one or more [`Pattern`]s, or says why it is bad.
fn parse_pattern(p: &str, out: &mut Vec<Pattern>) -> std::result::Result<(), String> {
    if p.is_empty() {
        return Err("empty".into());
    }
    if p.contains("://") {
        return Err("a URL; write host or host:port".into());
    }
    if p.chars()
        .any(|c| c.is_whitespace() || c == '/' || c == '@' || c == '%')
    {
        return Err("not a host[:port] (whitespace, '/', '@' or '%')".into());
    }
    let (host, port) = split_host_port(p)?;
    let port = port.map(parse_port).transpose()?;
    let host = match host.strip_prefix("*.") {
        Some(domain) => {
            let domain = domain
                .strip_suffix('.')
                .unwrap_or(domain)
                .to_ascii_lowercase();
            if domain.contains('*') || domain.parse::<IpAddr>().is_ok() || !valid_name(&domain) {
                return Err("`*.` must be followed by a domain name".into());
            }
            HostPattern::Subdomains(format!(".{domain}"))
        }
        None if host.contains('*') => {
            return Err("a wildcard is only allowed as a leading `*.`".into())
        }
        None => match Host::parse(host) {
            Some(Host::Ip(ip)) => HostPattern::Ip(ip),
            Some(Host::Name(n)) => HostPattern::Exact(n),
            None if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') => {
                return Err("bad IPv4 address".into())
            }
            None => return Err("bad host name".into()),
        },
    };
    if host == HostPattern::Exact("localhost".into()) {
        for ip in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            out.push(Pattern {
                host: HostPattern::Ip(ip),
                port,
            });
        }
    }
    out.push(Pattern { host, port });
    Ok(())
}

/// Splits `host[:port]`, `[v6][:port]` or a bare IPv6 address.
fn split_host_port(p: &str) -> std::result::Result<(&str, Option<&str>), String> {
    if p.starts_with('[') {
        let end = p.find(']').ok_or("unclosed '['")?;
        let (host, rest) = p.split_at(end + 1);
        return match rest {
            "" => Ok((host, None)),
            _ => rest
                .strip_prefix(':')
                .map(|port| (host, Some(port)))
                .ok_or_else(|| "junk after ']'".into()),
        };
    }
    if p.parse::<Ipv6Addr>().is_ok() {
        return Ok((p, None));
    }
    match p.matches(':').count() {
        0 => Ok((p, None)),
        1 => p
            .split_once(':')
            .map(|(h, port)| (h, Some(port)))
            .ok_or_else(|| "bad port".into()),
        _ => Err("an IPv6 address with a port needs brackets: [addr]:port".into()),
    }
}

/// A port in 1..=65535, decimal digits only.
fn parse_port(s: &str) -> std::result::Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 && s.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(format!("bad port {s:?} (1-65535)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(p: &[&str]) -> Allowlist {
        let v: Vec<String> = p.iter().map(|s| s.to_string()).collect();
        match Allowlist::parse(&v) {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn bad_patterns_are_errors() {
        for bad in [
            "",
            "a b",
            "host:99999",
            "host:0",
            "host:",
            "host:+80",
            "*.",
            "*foo.com",
            "foo.*.com",
            "*",
            "http://x",
            "x/y",
            "user@x",
            "a..b",
            "-a.com",
            "999.1.1.1",
            "1.2.3",
            "[::1",
            "[::1]x",
            "[nothost]:80",
            "::1:80:x:",
            "fe80::1%eth0",
            "*.1.2.3.4",
            " a.com",
        ] {
            let r = Allowlist::parse(&[bad.to_string()]);
            assert!(
                matches!(r, Err(Error::Network(_))),
                "{bad:?} should be rejected: {r:?}"
            );
        }
    }

    #[test]
    fn names_and_ports() {
        let a = list(&["api.example.com", "pypi.org:443", "Files.Example.NET."]);
        assert!(a.allows("api.example.com", 443));
        assert!(a.allows("api.example.com", 8080));
        assert!(a.allows("API.example.com.", 80));
        assert!(!a.allows("example.com", 443));
        assert!(!a.allows("xapi.example.com", 443));
        assert!(a.allows("pypi.org", 443));
        assert!(!a.allows("pypi.org", 80));
        assert!(a.allows("files.example.net", 1));
        assert!(!a.allows("not a host", 443));
    }

    #[test]
    fn wildcard_matches_subdomains_only() {
        let a = list(&["*.githubusercontent.com:443"]);
        assert!(a.allows("raw.githubusercontent.com", 443));
        assert!(a.allows("a.b.githubusercontent.com", 443));
        assert!(!a.allows("githubusercontent.com", 443));
        assert!(!a.allows("evilgithubusercontent.com", 443));
        assert!(!a.allows("raw.githubusercontent.com", 80));
        assert!(a.allows_name("x.githubusercontent.com"));
        assert!(!a.allows_name("githubusercontent.com"));
    }

    #[test]
    fn addresses() {
        let a = list(&[
            "10.0.0.5:8080",
            "[2001:db8::1]:443",
            "2001:db8::2",
            "[::1]",
            "127.0.0.1:9000",
        ]);
        assert!(a.allows("10.0.0.5", 8080));
        assert!(!a.allows("10.0.0.5", 8081));
        assert!(a.allows("[2001:db8::1]", 443));
        assert!(a.allows("2001:db8::1", 443));
        assert!(a.allows("2001:db8::2", 1));
        assert!(
            a.allows("::ffff:10.0.0.5", 8080),
            "v4-mapped v6 is the v4 address"
        );
        assert!(a.lists_ip(
            "10.0.0.5"
                .parse()
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        ));
        assert!(
            !a.allows_name("10.0.0.5"),
            "an address pattern is not a name"
        );
        let lo = a.loopback_targets();
        assert!(lo.contains(&(IpAddr::V6(Ipv6Addr::LOCALHOST), None)));
        assert!(lo.contains(&(IpAddr::V4(Ipv4Addr::LOCALHOST), Some(9000))));
        assert_eq!(lo.len(), 2);
    }

    #[test]
    fn localhost_lists_loopback_addresses() {
        let a = list(&["localhost:9000"]);
        assert!(a.allows("127.0.0.1", 9000));
        assert!(a.allows("::1", 9000));
        assert!(a.allows("localhost", 9000));
        assert!(!a.allows("127.0.0.1", 9001));
    }

    #[test]
    fn empty_list_allows_nothing() {
        let a = list(&[]);
        assert!(a.is_empty());
        assert!(!a.allows("example.com", 443));
    }
}
