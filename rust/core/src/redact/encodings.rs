//! The forms a secret is matched in: raw, hex, base64 and base32 at every alignment,
//! percent- and JSON-escaped, and UTF-16 / UTF-32 in both byte orders.

/// Every byte pattern that reveals `value`, deduplicated, in a fixed order (also used by the
/// egress proxy to find credential placeholders sent in encoded form).
pub(crate) fn encoded_forms(value: &[u8]) -> Vec<Vec<u8>> {
    let mut forms = vec![value.to_vec(), hex(value, HEX_LOWER), hex(value, HEX_UPPER)];
    for alphabet in [BASE64_STANDARD, BASE64_URL_SAFE] {
        forms.extend(base64_forms(value, alphabet));
    }
    for alphabet in [BASE32_UPPER, BASE32_LOWER] {
        forms.extend(base32_forms(value, alphabet));
    }
    forms.extend(wide_forms(value));
    for safe in [
        URLLIB_QUOTE_SAFE,
        URLLIB_QUOTE_SAFE_NONE,
        JS_URI_COMPONENT_SAFE,
    ] {
        for digits in [HEX_UPPER, HEX_LOWER] {
            forms.push(percent_encode(value, safe, false, digits));
        }
    }
    for digits in [HEX_UPPER, HEX_LOWER] {
        forms.push(percent_encode(value, URLLIB_QUOTE_SAFE_NONE, true, digits));
    }
    for bits in 0..16u8 {
        let style = JsonStyle {
            ascii_only: bits & 1 != 0,
            escape_slash: bits & 2 != 0,
            html_safe: bits & 4 != 0,
            digits: if bits & 8 != 0 { HEX_UPPER } else { HEX_LOWER },
        };
        forms.extend(json_escape(value, &style));
    }
    let mut seen = std::collections::HashSet::new();
    forms.retain(|f| !f.is_empty() && seen.insert(f.clone()));
    forms
}

const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";
const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn hex(value: &[u8], digits: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() * 2);
    for &b in value {
        out.push(digits[usize::from(b >> 4)]);
        out.push(digits[usize::from(b & 15)]);
    }
    out
}

pub(super) const BASE64_STANDARD: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
pub(super) const BASE64_URL_SAFE: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64 without padding: the partial last character (if any) is included.
pub(super) fn base64_unpadded(data: &[u8], alphabet: &[u8; 64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(3) * 4);
    for group in data.chunks(3) {
        let b = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..=group.len() {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize]);
        }
    }
    out
}

/// The standalone encoding with and without `=` padding, and, for the secret embedded at
/// byte offset 0, 1 or 2 (mod 3) of a longer stream, the characters it alone determines.
fn base64_forms(value: &[u8], alphabet: &[u8; 64]) -> Vec<Vec<u8>> {
    let unpadded = base64_unpadded(value, alphabet);
    let mut padded = unpadded.clone();
    padded.resize(value.len().div_ceil(3) * 4, b'=');
    let mut forms = vec![padded, unpadded];
    for offset in 0..3usize {
        let mut shifted = vec![0u8; offset];
        shifted.extend_from_slice(value);
        let encoded = base64_unpadded(&shifted, alphabet);
        // Character i covers bits [6i, 6i+6); the secret covers bits [8*offset, 8*len).
        let first = (8 * offset).div_ceil(6);
        let end = 8 * shifted.len() / 6;
        forms.push(encoded[first..end].to_vec());
    }
    forms
}

pub(super) const BASE32_UPPER: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
pub(super) const BASE32_LOWER: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Base32 (RFC 4648) without padding: the partial last character (if any) is included.
pub(super) fn base32_unpadded(data: &[u8], alphabet: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(5) * 8);
    for group in data.chunks(5) {
        let mut n = 0u64;
        for i in 0..5 {
            n = n << 8 | u64::from(*group.get(i).unwrap_or(&0));
        }
        for i in 0..(8 * group.len()).div_ceil(5) {
            out.push(alphabet[((n >> (35 - 5 * i)) & 31) as usize]);
        }
    }
    out
}

/// As [`base64_forms`] for base32: padded and unpadded standalone encodings, and the
/// characters the secret alone determines at byte offset 0 to 4 (mod 5) of a longer stream.
fn base32_forms(value: &[u8], alphabet: &[u8; 32]) -> Vec<Vec<u8>> {
    let unpadded = base32_unpadded(value, alphabet);
    let mut padded = unpadded.clone();
    padded.resize(value.len().div_ceil(5) * 8, b'=');
    let mut forms = vec![padded, unpadded];
    for offset in 0..5usize {
        let mut shifted = vec![0u8; offset];
        shifted.extend_from_slice(value);
        let encoded = base32_unpadded(&shifted, alphabet);
        // Character i covers bits [5i, 5i+5); the secret covers bits [8*offset, 8*len).
        let first = (8 * offset).div_ceil(5);
        let end = 8 * shifted.len() / 5;
        forms.push(encoded[first..end].to_vec());
    }
    forms
}

/// UTF-16LE, UTF-16BE, UTF-32LE and UTF-32BE of the secret's text (without a byte-order
/// mark, which only ever precedes it). A value that is not UTF-8 is taken as Latin-1, the
/// way a program widening its bytes one by one would print it.
fn wide_forms(value: &[u8]) -> Vec<Vec<u8>> {
    let chars: Vec<char> = match std::str::from_utf8(value) {
        Ok(text) => text.chars().collect(),
        Err(_) => value.iter().map(|&b| char::from(b)).collect(),
    };
    let mut units = Vec::with_capacity(chars.len() * 2);
    let mut buf = [0u16; 2];
    for c in &chars {
        units.extend_from_slice(c.encode_utf16(&mut buf));
    }
    let utf16le = units.iter().flat_map(|u| u.to_le_bytes()).collect();
    let utf16be = units.iter().flat_map(|u| u.to_be_bytes()).collect();
    let utf32le = chars
        .iter()
        .flat_map(|&c| u32::from(c).to_le_bytes())
        .collect();
    let utf32be = chars
        .iter()
        .flat_map(|&c| u32::from(c).to_be_bytes())
        .collect();
    vec![utf16le, utf16be, utf32le, utf32be]
}

/// Python's `urllib.parse.quote` default: unreserved characters and `/` are kept.
const URLLIB_QUOTE_SAFE: &[u8] = b"_.-~/";
/// `quote(s, safe='')` and `quote_plus`: only unreserved characters are kept.
const URLLIB_QUOTE_SAFE_NONE: &[u8] = b"_.-~";
/// JavaScript's `encodeURIComponent`.
const JS_URI_COMPONENT_SAFE: &[u8] = b"_.-~!*'()";

/// Percent-encodes every byte except ASCII alphanumerics and `safe` (`plus`: space as `+`).
fn percent_encode(value: &[u8], safe: &[u8], plus: bool, digits: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() * 3);
    for &b in value {
        if b.is_ascii_alphanumeric() || safe.contains(&b) {
            out.push(b);
        } else if plus && b == b' ' {
            out.push(b'+');
        } else {
            out.extend_from_slice(&[
                b'%',
                digits[usize::from(b >> 4)],
                digits[usize::from(b & 15)],
            ]);
        }
    }
    out
}

/// How one JSON encoder escapes a string body.
struct JsonStyle {
    /// Escape everything outside printable ASCII as `\uXXXX` (Python's `ensure_ascii`).
    ascii_only: bool,
    /// Write `/` as `\/` (PHP, some Java encoders).
    escape_slash: bool,
    /// Escape `<`, `>`, `&`, U+2028 and U+2029 (Go's `encoding/json`).
    html_safe: bool,
    /// Hex digits of `\u` escapes.
    digits: &'static [u8; 16],
}

/// The body of the JSON string literal of `value` (without quotes). Values that are not
/// UTF-8 have their ASCII escaped and other bytes kept; `ascii_only` needs UTF-8 (`None`).
fn json_escape(value: &[u8], style: &JsonStyle) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(value.len() + 8);
    match std::str::from_utf8(value) {
        Ok(text) => {
            for c in text.chars() {
                json_escape_char(c, style, &mut out);
            }
        }
        Err(_) if style.ascii_only => return None,
        Err(_) => {
            for &b in value {
                if b.is_ascii() {
                    json_escape_char(char::from(b), style, &mut out);
                } else {
                    out.push(b);
                }
            }
        }
    }
    Some(out)
}

fn json_unicode_escape(unit: u16, digits: &[u8; 16], out: &mut Vec<u8>) {
    out.extend_from_slice(b"\\u");
    for shift in [12, 8, 4, 0] {
        out.push(digits[usize::from((unit >> shift) & 15)]);
    }
}

fn json_escape_char(c: char, style: &JsonStyle, out: &mut Vec<u8>) {
    match c {
        '"' => out.extend_from_slice(b"\\\""),
        '\\' => out.extend_from_slice(b"\\\\"),
        '\n' => out.extend_from_slice(b"\\n"),
        '\r' => out.extend_from_slice(b"\\r"),
        '\t' => out.extend_from_slice(b"\\t"),
        '\u{8}' => out.extend_from_slice(b"\\b"),
        '\u{c}' => out.extend_from_slice(b"\\f"),
        '/' if style.escape_slash => out.extend_from_slice(b"\\/"),
        '<' | '>' | '&' | '\u{2028}' | '\u{2029}' if style.html_safe => {
            json_unicode_escape(c as u16, style.digits, out);
        }
        c if c < ' ' || (style.ascii_only && c >= '\u{7f}') => {
            let mut units = [0u16; 2];
            for &unit in c.encode_utf16(&mut units).iter() {
                json_unicode_escape(unit, style.digits, out);
            }
        }
        c => {
            let mut utf8 = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::tests::contains;

    #[test]
    fn base64_forms_match_definition() {
        // "abcdefgh" at offset 1 in "Xabcdefgh..." : chars determined by the secret only.
        let forms = base64_forms(b"abcdefgh", BASE64_STANDARD);
        assert_eq!(forms[0], b"YWJjZGVmZ2g=");
        assert_eq!(forms[1], b"YWJjZGVmZ2g");
        assert_eq!(forms[2], b"YWJjZGVmZ2"); // 64 bits -> 10 full characters
        let enc = base64_unpadded(b"Xabcdefghyy", BASE64_STANDARD); // "WGFiY2RlZmdoeXk"
        assert!(contains(&enc, &forms[3]) && forms[3].len() == 10);
        let enc = base64_unpadded(b"XYabcdefghy", BASE64_STANDARD);
        assert!(contains(&enc, &forms[4]) && forms[4].len() == 10);
    }

    #[test]
    fn base32_forms_match_definition() {
        // RFC 4648 test vectors.
        assert_eq!(base32_unpadded(b"f", BASE32_UPPER), b"MY");
        assert_eq!(base32_unpadded(b"foobar", BASE32_UPPER), b"MZXW6YTBOI");
        let forms = base32_forms(b"foobar", BASE32_UPPER);
        assert_eq!(forms[0], b"MZXW6YTBOI======");
        assert_eq!(forms[1], b"MZXW6YTBOI");
        assert_eq!(forms[2], b"MZXW6YTBO"); // 48 bits -> 9 full characters
        for offset in 0..5 {
            let mut data = b"XYZVW"[..offset].to_vec();
            data.extend_from_slice(b"foobar");
            data.extend_from_slice(b"tail");
            for (k, alphabet) in [BASE32_UPPER, BASE32_LOWER].into_iter().enumerate() {
                let enc = base32_unpadded(&data, alphabet);
                let form = &base32_forms(b"foobar", alphabet)[2 + offset];
                assert!(contains(&enc, form), "offset {offset} alphabet {k}");
            }
        }
    }
}
