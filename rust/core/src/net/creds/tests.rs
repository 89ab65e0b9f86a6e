//! Unit tests of credential substitution, leak detection, request reading and the pool.

use super::broker::percent_decode;
use super::http::{read_request, Buffered, ReadErr, Request};
use super::pool::{OverTcp, Pool};
use super::relay::{relay_response, Masked};
use super::serve::absolute;
use super::*;
use crate::net::allow::Host;
use crate::spec::{CredentialSpec, CredentialsSpec, OnCredentialLeak};
use crate::Error;
use base64::Engine as _;
use std::io::Write;
use std::net::TcpStream;

fn broker(methods: Option<&[&str]>, header: Option<&str>, q: bool, b: bool) -> Broker {
    let spec = CredentialsSpec {
        list: vec![CredentialSpec {
            name: "TOKEN".into(),
            value: "s3cr3t-value".into(),
            placeholder: "cellblock_placeholder_TOKEN_0123456789abcdef".into(),
            hosts: vec!["api.example.com".into()],
            methods: methods.map(|m| m.iter().map(|s| s.to_string()).collect()),
            header: header.map(str::to_string),
            in_query: q,
            in_body: b,
        }],
        on_leak: OnCredentialLeak::Block,
        tls_ca_bundle: None,
    };
    Broker::new(&spec).unwrap_or_else(|e| panic!("{e}"))
}

const PH: &str = "cellblock_placeholder_TOKEN_0123456789abcdef";

fn parse(raw: &[u8]) -> Request {
    let mut r = Buffered::new(raw, Vec::new());
    read_request(&mut r, &mut |_| {}).unwrap_or_else(|e| panic!("{e:?}"))
}

fn host(s: &str) -> Host {
    Host::parse(s).unwrap_or_else(|| panic!("host {s}"))
}

#[test]
fn substitutes_headers_for_bound_hosts_only() {
    let b = broker(None, None, false, false);
    let raw = format!("GET /x?k={PH} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {PH}\r\n\r\n");
    let req = parse(raw.as_bytes());
    let out = b
        .prepare(
            &req,
            &host("api.example.com"),
            443,
            &req.target,
            None,
            false,
        )
        .unwrap_or_else(|_| panic!("leak"));
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("Authorization: Bearer s3cr3t-value\r\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!("?k={PH}")),
        "query not opted in: {text}"
    );
    assert_eq!(
        b.prepare(
            &req,
            &host("evil.example.com"),
            443,
            &req.target,
            None,
            false
        ),
        Err(0)
    );
}

#[test]
fn methods_header_query_and_body() {
    let b = broker(Some(&["GET"]), Some("x-api-key"), true, true);
    let raw = format!(
        "POST /x?k={PH} HTTP/1.1\r\nX-Api-Key: {PH}\r\nContent-Length: {}\r\n\r\n{PH}",
        PH.len()
    );
    let req = parse(raw.as_bytes());
    let out = b
        .prepare(
            &req,
            &host("api.example.com"),
            443,
            &req.target,
            None,
            false,
        )
        .unwrap_or_else(|_| panic!("own host"));
    assert!(
        !String::from_utf8_lossy(&out).contains("s3cr3t"),
        "POST not allowed"
    );
    let raw = format!(
        "GET /x?k={PH} HTTP/1.1\r\nX-Api-Key: {PH}\r\nOther: {PH}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{PH}\r\n0\r\n\r\n",
        PH.len()
    );
    let req = parse(raw.as_bytes());
    assert_eq!(req.body, PH.as_bytes());
    let out = b
        .prepare(
            &req,
            &host("api.example.com"),
            443,
            &req.target,
            None,
            false,
        )
        .unwrap_or_else(|_| panic!("own host"));
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("GET /x?k=s3cr3t-value HTTP/1.1\r\n"),
        "{text}"
    );
    assert!(text.contains("X-Api-Key: s3cr3t-value\r\n"), "{text}");
    assert!(text.contains(&format!("Other: {PH}\r\n")), "{text}");
    assert!(text.contains("Content-Length: 12\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\ns3cr3t-value"), "{text}");
    assert!(!text.to_ascii_lowercase().contains("transfer-encoding"));
}

fn b64(data: &[u8], url: bool) -> String {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    if url {
        URL_SAFE_NO_PAD.encode(data)
    } else {
        STANDARD.encode(data)
    }
}

/// Every encoding of the placeholder, each in the query, a header and a form body.
fn encodings() -> Vec<(String, String)> {
    let pct_all: String = PH.bytes().map(|b| format!("%{b:02X}")).collect();
    let pct_mixed: String = PH
        .bytes()
        .enumerate()
        .map(|(i, b)| {
            if i % 3 == 0 {
                format!("%{b:02x}")
            } else {
                (b as char).to_string()
            }
        })
        .collect();
    let hex: String = PH.bytes().map(|b| format!("{b:02x}")).collect();
    let mut out = vec![
        ("percent-all".to_string(), pct_all.clone()),
        ("percent-mixed".into(), pct_mixed),
        ("percent-twice".into(), pct_all.replace('%', "%25")),
        ("hex".into(), hex.to_ascii_uppercase()),
        ("upper".into(), PH.to_ascii_uppercase()),
        ("lower".into(), PH.to_ascii_lowercase()),
        (
            "b64-upper".into(),
            b64(PH.to_ascii_uppercase().as_bytes(), false),
        ),
    ];
    for align in 0..3 {
        let data = format!("{}{PH}{}", &"xyz"[..align], "tail");
        out.push((format!("base64@{align}"), b64(data.as_bytes(), false)));
        out.push((format!("base64url@{align}"), b64(data.as_bytes(), true)));
        // base64 whose `+ / =` are percent-escaped, as in a query
        let escaped = b64(data.as_bytes(), false)
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D");
        out.push((format!("base64-escaped@{align}"), escaped));
    }
    out
}

#[test]
fn encoded_placeholders_toward_unbound_hosts_are_leaks() {
    let b = broker(None, None, false, false);
    let evil = host("evil.example.com");
    for (what, enc) in encodings() {
        for raw in [
            format!("GET /x?q={enc} HTTP/1.1\r\nHost: e\r\n\r\n"),
            format!("GET /x HTTP/1.1\r\nHost: e\r\nX-Data: {enc}\r\n\r\n"),
            format!(
                "POST /x HTTP/1.1\r\nHost: e\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\nk={enc}",
                enc.len() + 2
            ),
        ] {
            let req = parse(raw.as_bytes());
            assert_eq!(
                b.prepare(&req, &evil, 443, &req.target, None, false),
                Err(0),
                "{what}: {raw}"
            );
        }
    }
    // Basic auth with the placeholder as the password.
    let basic = b64(format!("git:{PH}").as_bytes(), false);
    let raw = format!("GET / HTTP/1.1\r\nAuthorization: Basic {basic}\r\n\r\n");
    let req = parse(raw.as_bytes());
    assert_eq!(
        b.prepare(&req, &evil, 443, &req.target, None, false),
        Err(0)
    );
    // Raw bytes relayed (not HTTP) are scanned the same way.
    assert_eq!(b.leaked(basic.as_bytes(), &evil, 443), Some(0));
}

#[test]
fn ordinary_requests_are_not_leaks() {
    let b = broker(None, None, false, false);
    let other = format!("cellblock_placeholder_OTHER_{}", "f".repeat(16));
    let raw = format!(
        "GET /a%20b?x=%ZZ%4&y={} HTTP/1.1\r\nAuthorization: Basic {}\r\nX: {}\r\n\r\n",
        b64(other.as_bytes(), false),
        b64(b"user:pass", false),
        "%".repeat(5)
    );
    let req = parse(raw.as_bytes());
    assert!(b
        .prepare(
            &req,
            &host("evil.example.com"),
            443,
            &req.target,
            None,
            false
        )
        .is_ok());
    assert_eq!(percent_decode(b"a%41%4g%"), Some(b"aA%4g%".to_vec()));
    assert_eq!(percent_decode(b"plain"), None);
}

#[test]
fn basic_auth_is_substituted_for_the_bound_host() {
    let b = broker(None, None, false, false);
    for basic in [
        b64(format!("git:{PH}").as_bytes(), false),
        b64(format!("git:{PH}").as_bytes(), false)
            .trim_end_matches('=')
            .to_string(),
    ] {
        let raw = format!("GET / HTTP/1.1\r\nAuthorization: Basic {basic}\r\n\r\n");
        let req = parse(raw.as_bytes());
        let out = b
            .prepare(
                &req,
                &host("api.example.com"),
                443,
                &req.target,
                None,
                false,
            )
            .unwrap_or_else(|_| panic!("own host"));
        let want = b64(b"git:s3cr3t-value", false);
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains(&format!("Authorization: Basic {want}\r\n")),
            "{text}"
        );
    }
    // A credential limited to another header leaves basic auth alone.
    let b = broker(None, Some("x-api-key"), false, false);
    let basic = b64(format!("git:{PH}").as_bytes(), false);
    let raw = format!("GET / HTTP/1.1\r\nAuthorization: Basic {basic}\r\n\r\n");
    let req = parse(raw.as_bytes());
    let out = b
        .prepare(
            &req,
            &host("api.example.com"),
            443,
            &req.target,
            None,
            false,
        )
        .unwrap_or_else(|_| panic!("own host"));
    assert!(String::from_utf8_lossy(&out).contains(&basic));
}

#[test]
fn masks_values_and_refuses_line_breaks() {
    let b = broker(None, None, false, false);
    let mut data = b"echo: s3cr3t-value!".to_vec();
    b.mask_values(&mut data);
    assert_eq!(data, b"echo: ************!");
    let spec = CredentialsSpec {
        list: vec![CredentialSpec {
            name: "T".into(),
            value: "a\r\nX-Injected: 1".into(),
            placeholder: "cellblock_placeholder_T_0123456789abcdef".into(),
            hosts: vec!["x.example".into()],
            methods: None,
            header: None,
            in_query: false,
            in_body: false,
        }],
        ..CredentialsSpec::default()
    };
    assert!(matches!(Broker::new(&spec), Err(Error::Credential(_))));
}

#[test]
fn refuses_malformed_framing() {
    for raw in [
        &b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"[..],
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
    ] {
        let mut r = Buffered::new(raw, Vec::new());
        assert!(
            matches!(read_request(&mut r, &mut |_| {}), Err(ReadErr::Bad(..))),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
}

#[test]
fn absolute_uris() {
    let (h, p, a, t) =
        absolute("http://Api.Example.com:8080/a?b").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (h, p, a.as_str(), t.as_str()),
        (
            host("api.example.com"),
            8080,
            "Api.Example.com:8080",
            "/a?b"
        )
    );
    assert!(absolute("https://x/").is_err());
}

fn relayed(
    b: &Broker,
    raw: &[u8],
    head_only: bool,
) -> (std::result::Result<bool, ReadErr>, Vec<u8>, Vec<u8>) {
    let mut up = Buffered::new(raw, Vec::new());
    let mut out = Vec::new();
    let mut sink = Masked {
        broker: b,
        out: &mut out,
        pending: Vec::new(),
        total: 0,
    };
    let r = relay_response(&mut up, &mut sink, head_only);
    sink.finish().unwrap_or_else(|e| panic!("{e}"));
    (r, out, up.buf)
}

#[test]
fn responses_are_relayed_to_their_end() {
    let b = broker(None, None, false, false);
    let one = b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\necho s3cr3t-value";
    let mut raw = one.to_vec();
    raw.extend_from_slice(b"NEXT");
    let (r, out, left) = relayed(&b, &raw, false);
    assert_eq!(r, Ok(true));
    assert_eq!(
        out,
        b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\necho ************"
    );
    assert_eq!(left, b"NEXT", "nothing past the response is read into it");
    let chunked = b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x\r\nabc\r\n0\r\nT: 1\r\n\r\n";
    assert_eq!(
        relayed(&b, chunked, false),
        (Ok(true), chunked.to_vec(), Vec::new())
    );
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n";
    assert_eq!(relayed(&b, head, true).0, Ok(true));
    let closed = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
    assert_eq!(relayed(&b, closed, false).0, Ok(false));
    let unframed = b"HTTP/1.1 200 OK\r\n\r\nuntil the end";
    assert_eq!(
        relayed(&b, unframed, false),
        (Ok(false), unframed.to_vec(), Vec::new())
    );
    let short = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nok";
    assert_eq!(relayed(&b, short, false).0, Err(ReadErr::Closed));
    assert_eq!(relayed(&b, b"", false).0, Err(ReadErr::Closed));
}

impl OverTcp for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

/// A connected pair on loopback: (our end, the server's end).
fn pair(l: &std::net::TcpListener) -> (TcpStream, TcpStream) {
    let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let c = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{e}"));
    let (s, _) = l.accept().unwrap_or_else(|e| panic!("{e}"));
    (c, s)
}

fn port_of(c: &TcpStream) -> u16 {
    c.local_addr().map(|a| a.port()).unwrap_or(0)
}

#[test]
fn the_pool_is_bounded_by_count_and_idle_time() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let (a, b) = (host("a.example"), host("b.example"));
    let pool = Pool::new(2, Duration::from_secs(60));
    let (c1, _s1) = pair(&l);
    let (c2, _s2) = pair(&l);
    let (c3, _s3) = pair(&l);
    let ids = [port_of(&c1), port_of(&c2), port_of(&c3)];
    pool.put(&a, 443, c1);
    pool.put(&a, 443, c2);
    pool.put(&b, 443, c3);
    // Full at 2: the oldest (c1) went.
    assert!(pool.take(&a, 8443).is_none(), "keyed by port too");
    assert_eq!(pool.take(&b, 443).map(|c| port_of(&c)), Some(ids[2]));
    assert_eq!(pool.take(&a, 443).map(|c| port_of(&c)), Some(ids[1]));
    assert!(pool.take(&a, 443).is_none());
    // One the server closed, or sent something unasked on, is not handed out.
    let (c4, s4) = pair(&l);
    let (c5, mut s5) = pair(&l);
    pool.put(&a, 443, c4);
    pool.put(&a, 443, c5);
    drop(s4);
    s5.write_all(b"x").unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_millis(50));
    assert!(pool.take(&a, 443).is_none());
    // Idle past the time limit: closed.
    let short = Pool::new(2, Duration::from_millis(30));
    let (c6, _s6) = pair(&l);
    short.put(&a, 443, c6);
    std::thread::sleep(Duration::from_millis(60));
    assert!(short.take(&a, 443).is_none());
    let (c7, _s7) = pair(&l);
    let id7 = port_of(&c7);
    short.put(&a, 443, c7);
    assert_eq!(short.take(&a, 443).map(|c| port_of(&c)), Some(id7));
}
