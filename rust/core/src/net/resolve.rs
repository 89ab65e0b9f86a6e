//! Address policy: which addresses may be dialled, the supervisor's own resolver, and the
//! synthetic addresses the DNS stub hands out.
//!
//! Rule: a public address may be dialled for any allowed target; a non-public one (private,
//! loopback, link-local, CGNAT, unspecified, multicast, reserved, cloud metadata) only when an
//! address pattern lists that address and port. A listed *name* never vouches for a non-public
//! address: that is the defence against DNS rebinding and SSRF through a listed name.

use super::allow::{canonical_ip, Allowlist};
use super::sys::Stop;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

/// Why `ip` is not a public address (`"private"`, `"loopback"`, `"metadata"`, ...), or `None`.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        _ if ip == Ipv4Addr::new(169, 254, 169, 254) => "metadata",
        (0, ..) => "unspecified",
        (127, ..) => "loopback",
        (10, ..) | (192, 168, _) => "private",
        (172, 16..=31, _) => "private",
        (169, 254, _) => "link-local",
        (100, 64..=127, _) => "cgnat",
        (224..=239, ..) => "multicast",
        (240..=255, ..) => "reserved",
        (198, 18..=19, _) | (192, 0, 0) => "reserved",
        _ => return None,
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    Some(match s {
        _ if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) => "metadata",
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_loopback() => "loopback",
        // NAT64 and 6to4 carry an IPv4 address that the gateway will dial.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => return non_public_v4(embedded_v4(hi, lo)),
        [0x2002, hi, lo, ..] => return non_public_v4(embedded_v4(hi, lo)),
        [0, 0, 0, 0, 0, 0, ..] => "reserved",
        [0x100, 0, 0, 0, ..] => "reserved",
        [x, ..] if x & 0xfe00 == 0xfc00 => "private",
        [x, ..] if x & 0xffc0 == 0xfe80 => "link-local",
        [x, ..] if x & 0xffc0 == 0xfec0 => "site-local",
        [x, ..] if x & 0xff00 == 0xff00 => "multicast",
        _ => return None,
    })
}

/// Whether `ip` may be dialled on `port` (`None`: on some port, which is what DNS answers need).
pub fn dialable(ip: IpAddr, port: Option<u16>, allow: &Allowlist) -> bool {
    non_public(ip).is_none()
        || match port {
            Some(p) => allow.allows_ip(ip, p),
            None => allow.lists_ip(ip),
        }
}

/// The addresses of `addrs` that may be dialled on `port`, in order. `Err` is the violation
/// reason naming the first refused address when none may be dialled.
pub fn vet(addrs: &[IpAddr], port: Option<u16>, allow: &Allowlist) -> Result<Vec<IpAddr>, String> {
    let ok: Vec<IpAddr> = addrs
        .iter()
        .copied()
        .filter(|ip| dialable(*ip, port, allow))
        .collect();
    match (ok.is_empty(), addrs.first()) {
        (false, _) => Ok(ok),
        (true, Some(ip)) => Err(format!(
            "non-public address {ip} ({})",
            non_public(*ip).unwrap_or("refused")
        )),
        (true, None) => Err("unresolvable".into()),
    }
}

/// How long a resolution is reused: a connection right after the DNS answer dials what was
/// vetted then, and the host's resolver is not asked again for every connection.
const CACHE_TTL: Duration = Duration::from_secs(30);

/// The supervisor's resolver: static entries, then a short cache, then `getaddrinfo` on the host.
pub struct Resolver {
    hosts: HashMap<String, Vec<IpAddr>>,
    cache: Mutex<HashMap<String, (Instant, Vec<IpAddr>)>>,
}

impl Resolver {
    /// A resolver with static `name -> address` entries consulted before the system resolver
    /// (like curl's `--resolve`; names must be lower-case).
    pub fn new(hosts: &[(String, IpAddr)]) -> Resolver {
        let mut map: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for (name, ip) in hosts {
            map.entry(name.to_ascii_lowercase()).or_default().push(*ip);
        }
        Resolver {
            hosts: map,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The addresses of `name`, or `None` if it does not resolve (or `stop` was raised while
    /// waiting: `getaddrinfo` runs in a helper thread so a stuck lookup never blocks teardown).
    pub(crate) fn lookup(&self, name: &str, stop: &Stop) -> Option<Vec<IpAddr>> {
        if let Some(ips) = self.hosts.get(name) {
            return Some(ips.clone());
        }
        if let Some((at, ips)) = super::lock(&self.cache).get(name) {
            if at.elapsed() < CACHE_TTL {
                return Some(ips.clone());
            }
        }
        let (tx, rx) = mpsc::channel();
        let owned = name.to_string();
        let spawned = std::thread::Builder::new()
            .name("cb-net-dns".into())
            .spawn(move || {
                // AF_UNSPEC lookup: names found in the host's files never reach its DNS server.
                let ips = (owned.as_str(), 0)
                    .to_socket_addrs()
                    .map(|it| it.map(|sa| sa.ip()).collect::<Vec<_>>());
                // The receiver may be gone after a stop; nothing to do then.
                let _ = tx.send(ips.ok());
            });
        spawned.ok()?;
        let ips = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(ips) => break ips?,
                Err(mpsc::RecvTimeoutError::Timeout) if !stop.is_set() => continue,
                Err(_) => return None,
            }
        };
        let mut unique: Vec<IpAddr> = Vec::new();
        for ip in ips.into_iter().map(canonical_ip) {
            if !unique.contains(&ip) {
                unique.push(ip);
            }
        }
        if unique.is_empty() {
            return None;
        }
        super::lock(&self.cache).insert(name.to_string(), (Instant::now(), unique.clone()));
        Some(unique)
    }
}

/// First and last synthetic address: 198.18.0.0/15 (RFC 2544 benchmarking, never routed).
const SYNTHETIC_FIRST: u32 = u32::from_be_bytes([198, 18, 0, 1]);
const SYNTHETIC_LAST: u32 = u32::from_be_bytes([198, 19, 255, 254]);

/// Synthetic IPv4 addresses the DNS stub answers with, one per allowed name for the whole run.
/// A connection to one of them is known to mean that name, whatever protocol it speaks.
#[derive(Debug, Default)]
pub struct Synthetic {
    by_name: HashMap<String, Ipv4Addr>,
    by_ip: HashMap<Ipv4Addr, String>,
}

impl Synthetic {
    /// The address standing for `name` (the same every time), or `None` when the pool is used up.
    pub fn address_for(&mut self, name: &str) -> Option<Ipv4Addr> {
        if let Some(ip) = self.by_name.get(name) {
            return Some(*ip);
        }
        let next = SYNTHETIC_FIRST + u32::try_from(self.by_name.len()).ok()?;
        if next > SYNTHETIC_LAST {
            return None;
        }
        let ip = Ipv4Addr::from(next);
        self.by_name.insert(name.to_string(), ip);
        self.by_ip.insert(ip, name.to_string());
        Some(ip)
    }

    /// The name a synthetic address stands for.
    pub fn name_of(&self, ip: IpAddr) -> Option<&str> {
        match canonical_ip(ip) {
            IpAddr::V4(v4) => self.by_ip.get(&v4).map(String::as_str),
            IpAddr::V6(_) => None,
        }
    }
}

/// Socket addresses for the vetted `ips` on `port`.
pub fn with_port(ips: &[IpAddr], port: u16) -> Vec<SocketAddr> {
    ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|_| panic!("bad test address {s}"))
    }

    fn allow(p: &[&str]) -> Allowlist {
        let v: Vec<String> = p.iter().map(|s| s.to_string()).collect();
        Allowlist::parse(&v).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn classifies_non_public_addresses() {
        for (a, why) in [
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("127.0.0.1", "loopback"),
            ("127.8.8.8", "loopback"),
            ("169.254.169.254", "metadata"),
            ("169.254.1.1", "link-local"),
            ("100.64.0.1", "cgnat"),
            ("100.127.255.255", "cgnat"),
            ("0.0.0.0", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("198.18.0.1", "reserved"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd00:ec2::254", "metadata"),
            ("fc00::1", "private"),
            ("fdff::1", "private"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:169.254.169.254", "metadata"),
            ("64:ff9b::a9fe:a9fe", "metadata"),
            ("2002:c0a8:0101::1", "private"),
        ] {
            assert_eq!(non_public(ip(a)), Some(why), "{a}");
        }
        for a in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "1.1.1.1",
            "2606:4700::1111",
            "2002:0808:0808::1",
        ] {
            assert_eq!(non_public(ip(a)), None, "{a}");
        }
    }

    #[test]
    fn non_public_needs_the_address_listed() {
        let a = allow(&["internal.corp:443", "10.0.0.5:443"]);
        assert!(dialable(ip("93.184.216.34"), Some(443), &a));
        assert!(dialable(ip("10.0.0.5"), Some(443), &a));
        assert!(
            !dialable(ip("10.0.0.5"), Some(80), &a),
            "listed for another port only"
        );
        assert!(dialable(ip("10.0.0.5"), None, &a), "listed for some port");
        assert!(!dialable(ip("10.0.0.6"), Some(443), &a));
        assert!(!dialable(ip("169.254.169.254"), Some(80), &a));
        let got = vet(&[ip("10.0.0.6"), ip("10.0.0.5")], Some(443), &a);
        assert_eq!(got, Ok(vec![ip("10.0.0.5")]));
        let refused = vet(&[ip("169.254.169.254")], Some(80), &a);
        assert_eq!(
            refused,
            Err("non-public address 169.254.169.254 (metadata)".to_string())
        );
    }

    #[test]
    fn synthetic_addresses_are_stable_and_reversible() {
        let mut s = Synthetic::default();
        let a = s.address_for("a.example");
        let b = s.address_for("b.example");
        assert_eq!(a, Some(Ipv4Addr::new(198, 18, 0, 1)));
        assert_eq!(b, Some(Ipv4Addr::new(198, 18, 0, 2)));
        assert_eq!(s.address_for("a.example"), a);
        assert_eq!(s.name_of(ip("198.18.0.2")), Some("b.example"));
        assert_eq!(s.name_of(ip("::ffff:198.18.0.1")), Some("a.example"));
        assert_eq!(s.name_of(ip("198.18.0.3")), None);
    }

    #[test]
    fn static_hosts_win() {
        let r = Resolver::new(&[("Svc.Test".to_string(), ip("192.0.2.7"))]);
        let stop = Stop::new().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.lookup("svc.test", &stop), Some(vec![ip("192.0.2.7")]));
    }
}
