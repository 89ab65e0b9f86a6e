//! The credentials of one sandbox: placeholders substituted by their values in requests to
//! bound hosts, placeholders (in any encoding) toward other hosts found as leaks, values
//! masked in responses.

use super::http::Request;
use super::pool::{Pool, Upstream};
use super::{DECODE_ROUNDS, POOL_IDLE, POOL_MAX};
use crate::net::allow::{Allowlist, Host};
use crate::net::mitm::Tls;
use crate::spec::{CredentialsSpec, OnCredentialLeak};
use crate::{Error, Result};
use aho_corasick::AhoCorasick;
use base64::Engine as _;

/// Headers of one hop, never forwarded (the proxy frames each request itself).
const DROPPED: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "content-length",
    "upgrade",
    "expect",
];

pub(super) struct Cred {
    pub(super) name: String,
    hosts: Allowlist,
    methods: Option<Vec<String>>,
    header: Option<String>,
    in_query: bool,
    in_body: bool,
}

/// The credentials of one sandbox, its CA, and what a leak does.
pub struct Broker {
    pub(super) creds: Vec<Cred>,
    values: Vec<Vec<u8>>,
    /// Every placeholder, pattern i = credential i.
    finder: AhoCorasick,
    /// Every encoded form of every placeholder (ASCII case ignored).
    encoded: AhoCorasick,
    /// Pattern of `encoded` -> credential index.
    encoded_cred: Vec<usize>,
    /// Every value, masked in responses (a bound host echoing a value hands it to nobody).
    pub(super) value_finder: AhoCorasick,
    pub(super) on_leak: OnCredentialLeak,
    pub(super) tls: Tls,
    /// Idle upstream TLS connections of this sandbox.
    pub(super) pool: Pool<Upstream>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("credentials", &self.creds.len())
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Checks the credentials and makes the sandbox's CA.
    pub fn new(spec: &CredentialsSpec) -> Result<Broker> {
        let mut creds = Vec::new();
        let mut values = Vec::new();
        let mut placeholders = Vec::new();
        for c in &spec.list {
            let bad = |why: &str| Error::Credential(format!("credential {:?}: {why}", c.name));
            if c.value.is_empty() {
                return Err(bad("empty value"));
            }
            if c.value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                // It goes into header lines: a line break would add headers of its own.
                return Err(bad("the value holds a line break or NUL"));
            }
            if c.placeholder.len() < 16
                || !c
                    .placeholder
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(bad("the placeholder must be 16+ letters, digits or _"));
            }
            if c.value.contains(&c.placeholder) || c.placeholder.contains(&c.value) {
                return Err(bad("the value and the placeholder overlap"));
            }
            if c.hosts.is_empty() {
                return Err(bad("no hosts"));
            }
            let hosts = Allowlist::parse(&c.hosts).map_err(|e| bad(&e.to_string()))?;
            creds.push(Cred {
                name: c.name.clone(),
                hosts,
                methods: c.methods.clone(),
                header: c.header.as_ref().map(|h| h.to_ascii_lowercase()),
                in_query: c.in_query,
                in_body: c.in_body,
            });
            values.push(c.value.clone().into_bytes());
            placeholders.push(c.placeholder.clone().into_bytes());
        }
        let finder =
            AhoCorasick::new(&placeholders).map_err(|e| Error::Credential(e.to_string()))?;
        let (encoded, encoded_cred) = encoded_finder(&placeholders)?;
        let value_finder =
            AhoCorasick::new(&values).map_err(|e| Error::Credential(e.to_string()))?;
        Ok(Broker {
            creds,
            values,
            finder,
            encoded,
            encoded_cred,
            value_finder,
            on_leak: spec.on_leak,
            tls: Tls::new(spec.tls_ca_bundle.as_deref())?,
            pool: Pool::new(POOL_MAX, POOL_IDLE),
        })
    }

    /// The sandbox's CA certificate (PEM), to add to the trust store inside.
    pub fn ca_pem(&self) -> String {
        self.tls.ca_pem()
    }

    /// Whether credential `i` may be substituted into `method` toward `host:port`.
    fn bound(&self, i: usize, host: &Host, port: u16, method: &str) -> bool {
        let c = &self.creds[i];
        c.hosts.allows_host(host, port)
            && c.methods
                .as_ref()
                .is_none_or(|m| m.iter().any(|x| x == method))
    }

    /// Replaces the placeholders of `which` credentials in `data`.
    fn substitute(&self, data: &[u8], which: &[bool]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len());
        let mut last = 0;
        for m in self.finder.find_iter(data) {
            let i = m.pattern().as_usize();
            if which[i] {
                out.extend_from_slice(&data[last..m.start()]);
                out.extend_from_slice(&self.values[i]);
                last = m.end();
            }
        }
        out.extend_from_slice(&data[last..]);
        out
    }

    /// Overwrites every credential value in `data` with `*` (same length: framing holds).
    pub(super) fn mask_values(&self, data: &mut [u8]) {
        let spans: Vec<(usize, usize)> = self
            .value_finder
            .find_iter(&*data)
            .map(|m| (m.start(), m.end()))
            .collect();
        for (a, b) in spans {
            data[a..b].fill(b'*');
        }
    }

    /// The first credential whose placeholder is in `data`, plain or encoded, but which is
    /// not bound to `host:port` at all (whatever the method).
    pub(super) fn leaked(&self, data: &[u8], host: &Host, port: u16) -> Option<usize> {
        let unbound = |i: &usize| !self.creds[*i].hosts.allows_host(host, port);
        if let Some(i) = self
            .finder
            .find_iter(data)
            .map(|m| m.pattern().as_usize())
            .find(unbound)
        {
            return Some(i);
        }
        let mut text = std::borrow::Cow::Borrowed(data);
        for _ in 0..=DECODE_ROUNDS {
            // Overlapping: a bound credential's form must not hide an unbound one's.
            if let Some(i) = self
                .encoded
                .find_overlapping_iter(&*text)
                .map(|m| self.encoded_cred[m.pattern().as_usize()])
                .find(unbound)
            {
                return Some(i);
            }
            match percent_decode(&text) {
                Some(decoded) => text = std::borrow::Cow::Owned(decoded),
                None => break,
            }
        }
        None
    }

    /// How much of a relayed stream is kept to find a placeholder split between reads.
    pub(super) fn scan_tail(&self) -> usize {
        // A form fully percent-escaped is three times as long.
        (3 * self.encoded.max_pattern_len()).max(self.finder.max_pattern_len())
    }

    /// `Authorization: Basic` with the placeholders of `which` replaced inside the decoded
    /// credentials and encoded again; `None` when the value is not basic auth or holds none.
    fn substitute_basic(&self, value: &[u8], which: &[bool]) -> Option<Vec<u8>> {
        let text = std::str::from_utf8(value).ok()?.trim();
        let (scheme, rest) = text.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = BASIC.decode(rest.trim()).ok()?;
        let replaced = self.substitute(&decoded, which);
        if replaced == decoded {
            return None;
        }
        let mut out = format!("{scheme} ").into_bytes();
        out.extend_from_slice(
            base64::engine::general_purpose::STANDARD
                .encode(replaced)
                .as_bytes(),
        );
        Some(out)
    }

    /// The bytes to send upstream for `req` toward `host:port`, or the leaked credential.
    /// `host_header`: the `Host` to send (absolute-URI requests), else the client's is kept.
    pub(super) fn prepare(
        &self,
        req: &Request,
        host: &Host,
        port: u16,
        target: &str,
        host_header: Option<&str>,
        keep_alive: bool,
    ) -> std::result::Result<Vec<u8>, usize> {
        let bound: Vec<bool> = (0..self.creds.len())
            .map(|i| self.bound(i, host, port, &req.method))
            .collect();
        let only = |pick: &dyn Fn(&Cred) -> bool| -> Vec<bool> {
            bound
                .iter()
                .zip(&self.creds)
                .map(|(b, c)| *b && pick(c))
                .collect()
        };
        let target = match target.split_once('?') {
            Some((path, query)) => {
                let q = self.substitute(query.as_bytes(), &only(&|c| c.in_query));
                format!("{path}?{}", String::from_utf8_lossy(&q))
            }
            None => target.to_string(),
        };
        let mut out = format!("{} {target} HTTP/1.1\r\n", req.method).into_bytes();
        if let Some(h) = host_header {
            out.extend_from_slice(format!("Host: {h}\r\n").as_bytes());
        }
        for (name, value) in &req.headers {
            let lname = name.to_ascii_lowercase();
            if DROPPED.contains(&lname.as_str()) || (host_header.is_some() && lname == "host") {
                continue;
            }
            let which = only(&|c| c.header.as_ref().is_none_or(|h| *h == lname));
            let value = match lname.as_str() {
                "authorization" => self
                    .substitute_basic(value, &which)
                    .unwrap_or_else(|| self.substitute(value, &which)),
                _ => self.substitute(value, &which),
            };
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(&value);
            out.extend_from_slice(b"\r\n");
        }
        let body = self.substitute(&req.body, &only(&|c| c.in_body));
        if !body.is_empty() || matches!(req.method.as_str(), "POST" | "PUT" | "PATCH") {
            out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        }
        if !keep_alive {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        match self.leaked(&out, host, port) {
            Some(i) => Err(i),
            None => Ok(out),
        }
    }
}

/// Base64 as clients write basic auth: the standard alphabet, padding optional.
const BASIC: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// The automaton over every encoded form of every placeholder, in its own, upper and lower
/// case (the placeholder alphabet has letters), and the credential of each pattern.
fn encoded_finder(placeholders: &[Vec<u8>]) -> Result<(AhoCorasick, Vec<usize>)> {
    let mut patterns = Vec::new();
    let mut owner = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, p) in placeholders.iter().enumerate() {
        for variant in [p.clone(), p.to_ascii_uppercase(), p.to_ascii_lowercase()] {
            for form in crate::redact::encoded_forms(&variant) {
                // Matching ignores ASCII case: one pattern per folded form.
                if seen.insert((i, form.to_ascii_lowercase())) {
                    patterns.push(form);
                    owner.push(i);
                }
            }
        }
    }
    let ac = AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build(&patterns)
        .map_err(|e| Error::Credential(e.to_string()))?;
    Ok((ac, owner))
}

/// `data` with its `%XX` escapes decoded (other bytes kept), or `None` when there is none.
pub(super) fn percent_decode(data: &[u8]) -> Option<Vec<u8>> {
    let hexval = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(data.len());
    let mut changed = false;
    let mut i = 0;
    while i < data.len() {
        if data[i] == b'%' && i + 2 < data.len() {
            if let (Some(h), Some(l)) = (hexval(data[i + 1]), hexval(data[i + 2])) {
                out.push(h << 4 | l);
                changed = true;
                i += 3;
                continue;
            }
        }
        out.push(data[i]);
        i += 1;
    }
    changed.then_some(out)
}
