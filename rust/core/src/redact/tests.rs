//! Tests of the redactor: every encoding caught, streaming equal to one-shot at any split,
//! the skip search equal to the plain DFA, refusals of unsafe secrets.

use super::encodings::{
    base32_unpadded, base64_unpadded, BASE32_LOWER, BASE32_UPPER, BASE64_STANDARD, BASE64_URL_SAFE,
};
use super::*;

pub(super) fn redactor(secrets: &[(&str, &[u8])]) -> Redactor {
    let owned: Vec<(String, Vec<u8>)> = secrets
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_vec()))
        .collect();
    Redactor::new(&owned).expect("valid secrets")
}

fn redact_str(r: &Redactor, text: &str) -> String {
    String::from_utf8(r.redact(text.as_bytes()).0).expect("utf-8 output")
}

#[test]
fn host_names_are_matched_lower_cased_and_unescaped() {
    let r = redactor(&[("TOKEN", b"Mx7SeCrEtK3y"), ("ODD", b"odd sec.ret")]);
    let name = |n: &str| {
        let (out, counts) = r.redact_name(n.as_bytes());
        (String::from_utf8(out).expect("utf-8"), counts)
    };
    let (out, counts) = name("mx7secretk3y.example.test");
    assert_eq!(out, "[REDACTED:TOKEN].example.test");
    assert_eq!(counts.get("TOKEN"), Some(&1));
    // The hex form, as DNS lower-cases it anyway.
    assert_eq!(
        name(&format!("{}.x", hex_lower(b"Mx7SeCrEtK3y"))).0,
        "[REDACTED:TOKEN].x"
    );
    assert_eq!(
        name("odd\\032sec\\.ret.example\\001.test").0,
        "[REDACTED:ODD].example\\001.test"
    );
    let (out, counts) = name("nothing\\032here.test");
    assert_eq!(out, "nothing\\032here.test");
    assert!(counts.is_empty());
    assert!(redactor(&[]).redact_name(b"a.b").1.is_empty());
}

fn hex_lower(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds `data` cut at `cuts` and returns the whole output.
pub(super) fn redact_split(r: &Redactor, data: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut stream = r.stream();
    let mut out = Vec::new();
    let mut last = 0;
    for &cut in cuts {
        stream.feed(&data[last..cut], &mut out);
        last = cut;
    }
    stream.feed(&data[last..], &mut out);
    stream.finish(&mut out);
    out
}

/// A deterministic xorshift generator, enough to pick cuts.
pub(super) struct Rng(pub(super) u64);
impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

pub(super) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

pub(super) const TOKEN: &[u8] = b"ghp_S3cr3t/Tok+en=42";

#[test]
fn raw_secret_is_replaced_and_counted() {
    let r = redactor(&[("GH", TOKEN)]);
    let (out, counts) = r.redact(b"token=ghp_S3cr3t/Tok+en=42 and again ghp_S3cr3t/Tok+en=42.");
    assert_eq!(out, b"token=[REDACTED:GH] and again [REDACTED:GH].");
    assert_eq!(counts.get("GH"), Some(&2));
}

#[test]
fn text_without_secret_is_unchanged() {
    let r = redactor(&[("GH", TOKEN)]);
    let text = "print(\"hello\")\nghp_ almost ghp_S3cr3t/Tok+en=4 not quite \u{e9}\u{1F600}";
    let (out, counts) = r.redact(text.as_bytes());
    assert_eq!(out, text.as_bytes());
    assert!(counts.is_empty());
}

#[test]
fn empty_list_is_passthrough() {
    let r = Redactor::new(&[]).expect("empty list");
    assert!(r.is_empty());
    let mut s = r.stream();
    let mut out = Vec::new();
    s.feed(b"anything at all", &mut out);
    assert_eq!(out, b"anything at all");
    s.finish(&mut out);
    assert_eq!(out, b"anything at all");
}

#[test]
fn short_secret_is_refused_without_showing_it() {
    let err = Redactor::new(&[("PIN".into(), b"1234567".to_vec())]).expect_err("refused");
    let msg = err.to_string();
    assert!(matches!(err, Error::Secret(_)));
    assert!(msg.contains("PIN") && !msg.contains("1234567"), "{msg}");
}

#[test]
fn secret_inside_a_replacement_is_refused() {
    let err = Redactor::new(&[("A".into(), b"REDACTED".to_vec())]).expect_err("refused");
    assert!(matches!(err, Error::Secret(_)));
    let err = Redactor::new(&[
        ("OK".into(), b"12345678".to_vec()),
        ("MY_PASSWORD_1".into(), b"PASSWORD".to_vec()),
    ])
    .expect_err("refused");
    assert!(err.to_string().contains("MY_PASSWORD_1"));
}

#[test]
fn an_encoded_form_inside_a_replacement_is_refused() {
    // A replacement is plain text next to what the reader sees: a name that spells the
    // secret's hex or base64 would print the secret through its own replacement, and a
    // second pass over redacted text would redact (and count) the replacement again.
    let cases: [(&str, &[u8]); 4] = [
        ("H4141414141414141", b"AAAAAAAA"),
        ("QUFBQUFBQUFBQUFB", b"AAAAAAAAAAAA"),
        ("IFAUCQKBIFAUCQ", b"AAAAAAAAA"), // base32 inside the name
        ("x.REDACTED_x", b"[REDACTED:"),
    ];
    for (name, value) in cases {
        let err = Redactor::new(&[(name.into(), value.to_vec())]).expect_err(name);
        assert!(matches!(err, Error::Secret(_)), "{name}: {err}");
        let msg = err.to_string();
        assert!(msg.contains(name), "{msg}");
    }
    // Across secrets: B's replacement spells A's hex.
    let err = Redactor::new(&[
        ("A".into(), b"AAAAAAAA".to_vec()),
        ("B_4141414141414141".into(), b"unrelated-value".to_vec()),
    ])
    .expect_err("refused");
    assert!(err.to_string().contains("secret A "), "{err}");
}

#[test]
fn redacting_twice_is_idempotent_and_counts_once() {
    let r = redactor(&[("REDACTED_TOKEN", b"s3cr3t-v4lue"), ("B", b"bbbbbbbb")]);
    let (once, counts) = r.redact(b"a s3cr3t-v4lue b");
    assert_eq!(once, b"a [REDACTED:REDACTED_TOKEN] b");
    assert_eq!(counts.get("REDACTED_TOKEN"), Some(&1));
    let (twice, again) = r.redact(&once);
    assert_eq!(twice, once);
    assert!(again.values().all(|&n| n == 0), "{again:?}");
}

#[test]
fn bad_name_is_refused() {
    for name in ["", "A B", "A]B", "ÄB"] {
        let err = Redactor::new(&[(name.into(), TOKEN.to_vec())]).expect_err("refused");
        assert!(matches!(err, Error::Secret(_)), "{name}");
    }
}

#[test]
fn every_encoding_is_caught() {
    let r = redactor(&[("GH", TOKEN)]);
    let forms: Vec<&[u8]> = vec![
        b"6768705f5333637233742f546f6b2b656e3d3432",
        b"6768705F5333637233742F546F6B2B656E3D3432",
        b"Z2hwX1MzY3IzdC9Ub2srZW49NDI=",
        b"Z2hwX1MzY3IzdC9Ub2srZW49NDI",
        b"ghp_S3cr3t%2FTok%2Ben%3D42",
        b"ghp_S3cr3t/Tok%2Ben%3D42",
        b"ghp_S3cr3t%2fTok%2ben%3d42",
        b"ghp_S3cr3t\\/Tok+en=42",
    ];
    for form in forms {
        let (out, counts) = r.redact(form);
        assert_eq!(out, b"[REDACTED:GH]", "{}", String::from_utf8_lossy(form));
        assert_eq!(counts.get("GH"), Some(&1));
    }
}

#[test]
fn base64_at_every_alignment_is_caught() {
    let r = redactor(&[("K", TOKEN)]);
    for offset in 0..3 {
        for tail in 0..3 {
            let mut data = b"xyz"[..offset].to_vec();
            data.extend_from_slice(TOKEN);
            data.extend_from_slice(&b"uvw"[..tail]);
            for alphabet in [BASE64_STANDARD, BASE64_URL_SAFE] {
                let mut enc = base64_unpadded(&data, alphabet);
                enc.resize(data.len().div_ceil(3) * 4, b'=');
                let (out, counts) = r.redact(&enc);
                assert_eq!(counts.get("K"), Some(&1), "offset {offset} tail {tail}");
                // At most one partial character survives on each side.
                assert!(out.len() <= "[REDACTED:K]".len() + 2 + 4 + 2);
            }
        }
    }
}

#[test]
fn json_forms_of_unicode_secret() {
    let secret = "p\u{e4}ss/w\u{f6}rd\"<&>\u{1F600}\n";
    let r = redactor(&[("J", secret.as_bytes())]);
    let printed = [
        // serde_json / JSON.stringify / json.dumps(ensure_ascii=False)
        "p\u{e4}ss/w\u{f6}rd\\\"<&>\u{1F600}\\n",
        // json.dumps default
        "p\\u00e4ss/w\\u00f6rd\\\"<&>\\ud83d\\ude00\\n",
        // Go encoding/json
        "p\u{e4}ss/w\u{f6}rd\\\"\\u003c\\u0026\\u003e\u{1F600}\\n",
        // PHP json_encode
        "p\\u00e4ss\\/w\\u00f6rd\\\"<&>\\ud83d\\ude00\\n",
        // Java-style upper-case escapes
        "p\\u00E4ss/w\\u00F6rd\\\"<&>\\uD83D\\uDE00\\n",
    ];
    for form in printed {
        assert_eq!(
            redact_str(&r, &format!("{{\"k\": \"{form}\"}}")),
            "{\"k\": \"[REDACTED:J]\"}"
        );
    }
}

#[test]
fn json_slash_form_of_ascii_secret() {
    // PHP's json_encode of a plain ASCII value: only `/` changes.
    let r = redactor(&[("A", b"lSdiQIzc/7fEI@&tXif3")]);
    assert_eq!(
        redact_str(&r, "\"lSdiQIzc\\/7fEI@&tXif3\""),
        "\"[REDACTED:A]\""
    );
}

#[test]
fn percent_forms() {
    let secret = "a b/c+d!e*f'g(h)i~j";
    let r = redactor(&[("P", secret.as_bytes())]);
    for form in [
        "a%20b/c%2Bd%21e%2Af%27g%28h%29i~j",   // quote
        "a%20b%2Fc%2Bd%21e%2Af%27g%28h%29i~j", // quote(safe='')
        "a+b%2Fc%2Bd%21e%2Af%27g%28h%29i~j",   // quote_plus
        "a%20b%2Fc%2Bd!e*f'g(h)i~j",           // encodeURIComponent
        "a%20b%2fc%2bd!e*f'g(h)i~j",
    ] {
        assert_eq!(
            redact_str(&r, &format!("?q={form}&x")),
            "?q=[REDACTED:P]&x",
            "{form}"
        );
    }
}

#[test]
fn leftmost_longest_between_secrets() {
    let r = redactor(&[
        ("SHORT", b"abcdefgh"),
        ("LONG", b"abcdefghijkl"),
        ("MID", b"fghijklmno"),
    ]);
    assert_eq!(redact_str(&r, "xabcdefghijklmnoz"), "x[REDACTED:LONG]mnoz");
    assert_eq!(redact_str(&r, "xabcdefghijz"), "x[REDACTED:SHORT]ijz");
    assert_eq!(redact_str(&r, "xbcdefghijklmnoz"), "xbcde[REDACTED:MID]z");
}

#[test]
fn padded_form_wins_over_unpadded() {
    let r = redactor(&[("K", b"12345678")]);
    // base64("12345678") = "MTIzNDU2Nzg=": the padding is redacted too.
    assert_eq!(redact_str(&r, "MTIzNDU2Nzg=!"), "[REDACTED:K]!");
    assert_eq!(redact_str(&r, "MTIzNDU2Nzg!"), "[REDACTED:K]!");
}

#[test]
fn non_utf8_secret() {
    let secret = b"\xff\xfe\x00binary\x80";
    let r = redactor(&[("BIN", secret)]);
    let mut data = b"<".to_vec();
    data.extend_from_slice(secret);
    data.extend_from_slice(b"> fffe0062696e61727980 //4AYmluYXJ5gA==");
    assert_eq!(
        r.redact(&data).0,
        b"<[REDACTED:BIN]> [REDACTED:BIN] [REDACTED:BIN]"
    );
}

#[test]
fn same_name_twice_and_shared_patterns() {
    let r = redactor(&[
        ("A", b"aaaaaaaa1"),
        ("A", b"aaaaaaaa2"),
        ("B", b"aaaaaaaa1"),
    ]);
    assert_eq!(r.names(), ["A".to_string(), "B".to_string()]);
    let (out, counts) = r.redact(b"aaaaaaaa1 aaaaaaaa2");
    assert_eq!(out, b"[REDACTED:A] [REDACTED:A]");
    assert_eq!(counts.get("A"), Some(&2));
}

#[test]
fn debug_never_shows_values() {
    let r = redactor(&[("GH", TOKEN)]);
    let shown = format!("{r:?} {:?}", r.stream());
    assert!(shown.contains("GH") && !shown.contains("S3cr3t"), "{shown}");
}

#[test]
fn base32_at_every_alignment_is_caught() {
    let r = redactor(&[("K", TOKEN)]);
    for offset in 0..5 {
        for tail in 0..5 {
            let mut data = b"vwxyz"[..offset].to_vec();
            data.extend_from_slice(TOKEN);
            data.extend_from_slice(&b"uvwxy"[..tail]);
            for alphabet in [BASE32_UPPER, BASE32_LOWER] {
                let mut enc = base32_unpadded(&data, alphabet);
                enc.resize(data.len().div_ceil(5) * 8, b'=');
                let (out, counts) = r.redact(&enc);
                assert_eq!(counts.get("K"), Some(&1), "offset {offset} tail {tail}");
                // At most the characters shared with the neighbours survive.
                assert!(out.len() <= "[REDACTED:K]".len() + 8 + 8 + 6, "{out:?}");
            }
        }
    }
}

#[test]
fn utf16_and_utf32_forms_are_caught() {
    let secret = "p\u{e4}ss-w\u{f6}rd-\u{1F600}-42";
    let r = redactor(&[("W", secret.as_bytes())]);
    let units: Vec<u16> = secret.encode_utf16().collect();
    let printed: [Vec<u8>; 4] = [
        units.iter().flat_map(|u| u.to_le_bytes()).collect(),
        units.iter().flat_map(|u| u.to_be_bytes()).collect(),
        secret
            .chars()
            .flat_map(|c| (c as u32).to_le_bytes())
            .collect(),
        secret
            .chars()
            .flat_map(|c| (c as u32).to_be_bytes())
            .collect(),
    ];
    for form in printed {
        // Inside wide text of the same encoding: the rest survives, the secret does not.
        let data = [b"\xff\xfeA\0=\0".to_vec(), form.clone(), b"\n\0".to_vec()].concat();
        let (out, counts) = r.redact(&data);
        assert_eq!(counts.get("W"), Some(&1), "{form:?}");
        assert_eq!(out, b"\xff\xfeA\0=\0[REDACTED:W]\n\0");
        let cuts: Vec<usize> = (1..data.len()).collect();
        assert_eq!(redact_split(&r, &data, &cuts), out);
    }
    // A value that is not UTF-8 is widened byte by byte (Latin-1).
    let r = redactor(&[("B", b"\xffbinary\x80")]);
    let wide: Vec<u8> = b"\xffbinary\x80".iter().flat_map(|&b| [b, 0]).collect();
    assert_eq!(r.redact(&wide).0, b"[REDACTED:B]");
}

/// Throughput of the core alone: `cargo test --release -p cellblock-core -- --ignored
/// --nocapture redact_throughput`.
#[test]
#[ignore = "benchmark"]
fn redact_throughput() {
    let secrets: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| {
            (
                format!("SECRET_{i}"),
                format!("tok_{i:02}_aZ9/+Qx7Lm3Pw8Rt5Yu2").into_bytes(),
            )
        })
        .collect();
    let t = std::time::Instant::now();
    let r = Redactor::new(&secrets).expect("valid");
    let compile = t.elapsed();
    let mut rng = Rng(42);
    let words: [&[u8]; 8] = [
        b"INFO ",
        b"request ",
        b"id=",
        b"{\"ok\": true} ",
        b"0x7f3a ",
        b"user@example.com ",
        b"\n",
        b"tok_ ",
    ];
    let mut data = Vec::with_capacity(64 << 20);
    while data.len() < 64 << 20 {
        data.extend_from_slice(words[rng.below(words.len())]);
        if rng.below(10_000) == 0 {
            let forms = encoded_forms(&secrets[rng.below(20)].1);
            data.extend_from_slice(&forms[rng.below(forms.len())]);
        }
    }
    let mut out = Vec::with_capacity(data.len());
    let mut best = f64::MAX;
    for _ in 0..5 {
        out.clear();
        let mut s = r.stream();
        let t = std::time::Instant::now();
        for chunk in data.chunks(64 * 1024) {
            s.feed(chunk, &mut out);
        }
        s.finish(&mut out);
        best = best.min(t.elapsed().as_secs_f64());
    }
    eprintln!(
        "{} patterns compiled in {:.2} ms, {:.2} GB/s",
        r.pattern_count(),
        compile.as_secs_f64() * 1e3,
        data.len() as f64 / best / 1e9
    );
}
