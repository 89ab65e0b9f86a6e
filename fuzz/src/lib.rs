//! Invariants of the secret redactor, checked on one fuzz input.
//!
//! Input layout (every byte sequence is valid; missing bytes read as 0):
//! - `n % 4` secrets, each `8 + len % 25` bytes of value (`[` and `]` mapped to `(` and `)`:
//!   a secret starting with `]` or ending with `[` may be re-formed from the replacement text,
//!   a documented limit of the redactor);
//! - `k % 8` cut points, one byte each (scaled to the text length);
//! - the text: byte [`INSERT`] followed by a selector byte plants a form of a secret, any
//!   other byte is itself.
//!
//! Checked: any chunking gives the one-shot output and counts; no raw, hex, base64, base32,
//! UTF-16 or UTF-32 form of a secret is emitted; with no redaction the output is the input; no
//! secrets means passthrough.

use cellblock_core::redact::Redactor;

/// Text byte that plants a form of a secret (chosen by the next byte).
pub const INSERT: u8 = 0xFF;

/// Runs the redactor on one input and panics if an invariant is broken.
pub fn check(data: &[u8]) {
    let mut input = Reader { data, pos: 0 };
    let secrets = read_secrets(&mut input);
    let redactor = match Redactor::new(&secrets) {
        Ok(r) => r,
        // Refused (a value inside a replacement text): nothing to redact with.
        Err(cellblock_core::Error::Secret(_)) => return,
        Err(e) => panic!("unexpected error: {e}"),
    };
    let cuts: Vec<u8> = (0..input.byte() % 8).map(|_| input.byte()).collect();
    let text = read_text(&mut input, &secrets);

    let (whole, whole_counts) = redactor.redact(&text);
    let mut bounds: Vec<usize> = cuts
        .iter()
        .map(|&c| usize::from(c) * text.len() / 255)
        .collect();
    bounds.sort_unstable();
    let mut stream = redactor.stream();
    let mut out = Vec::new();
    let mut last = 0;
    for cut in bounds {
        stream.feed(&text[last..cut], &mut out);
        last = cut;
    }
    stream.feed(&text[last..], &mut out);
    stream.finish(&mut out);

    assert_eq!(out, whole, "chunking changed the output");
    assert_eq!(
        stream.counts(),
        &whole_counts,
        "chunking changed the counts"
    );
    if secrets.is_empty() || whole_counts.is_empty() {
        assert_eq!(out, text, "text without secrets was changed");
    }
    for (name, value) in &secrets {
        for form in forms(value) {
            assert!(!contains(&out, &form), "a form of {name} was emitted");
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn rest(&self) -> &[u8] {
        self.data.get(self.pos..).unwrap_or(&[])
    }
}

fn read_secrets(input: &mut Reader<'_>) -> Vec<(String, Vec<u8>)> {
    (0..input.byte() % 4)
        .map(|i| {
            let len = 8 + usize::from(input.byte() % 25);
            let value = (0..len)
                .map(|_| match input.byte() {
                    b'[' => b'(',
                    b']' => b')',
                    b => b,
                })
                .collect();
            (format!("S{i}"), value)
        })
        .collect()
}

fn read_text(input: &mut Reader<'_>, secrets: &[(String, Vec<u8>)]) -> Vec<u8> {
    let rest = input.rest();
    let mut text = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        match rest.get(i + 1) {
            Some(&sel) if rest[i] == INSERT && !secrets.is_empty() => {
                let value = &secrets[usize::from(sel >> 4) % secrets.len()].1;
                planted_form(value, sel & 15, &mut text);
                i += 2;
            }
            _ => {
                text.push(rest[i]);
                i += 1;
            }
        }
    }
    text
}

/// Appends form number `which` of `value`, as a program would print it.
fn planted_form(value: &[u8], which: u8, text: &mut Vec<u8>) {
    match which % 16 {
        0 | 1 => text.extend_from_slice(value),
        8 => text.extend(base32(value, true, true)),
        9 => text.extend(base32(value, false, false)),
        // Inside a longer base32 stream, at byte offset 1 to 4.
        k @ 10..=13 => {
            let mut embedded = vec![b'~'; usize::from(k - 9)];
            embedded.extend_from_slice(value);
            embedded.extend_from_slice(b"~~~");
            text.extend(base32(&embedded, k % 2 == 0, true));
        }
        // Byte order from the position, so both are planted.
        14 => text.extend(wide(value, 2, text.len().is_multiple_of(2))),
        15 => text.extend(wide(value, 4, text.len().is_multiple_of(2))),
        2 => text.extend(hex(value, b"0123456789abcdef")),
        3 => text.extend(hex(value, b"0123456789ABCDEF")),
        4 => text.extend(base64(value, STANDARD, true)),
        5 => text.extend(base64(value, URL_SAFE, false)),
        // Inside a longer base64 stream, at byte offset 1 or 2.
        k => {
            let mut embedded = vec![b'~'; usize::from(k - 5)];
            embedded.extend_from_slice(value);
            embedded.extend_from_slice(b"~~");
            text.extend(base64(&embedded, STANDARD, true));
        }
    }
}

/// The forms checked in the output: raw, hex, base64 and base32 standalone and at each
/// alignment, UTF-16 and UTF-32 in both byte orders.
fn forms(value: &[u8]) -> Vec<Vec<u8>> {
    let mut forms = vec![
        value.to_vec(),
        hex(value, b"0123456789abcdef"),
        hex(value, b"0123456789ABCDEF"),
    ];
    for alphabet in [STANDARD, URL_SAFE] {
        forms.push(base64(value, alphabet, true));
        for offset in 0..3 {
            let mut shifted = vec![0u8; offset];
            shifted.extend_from_slice(value);
            let encoded = base64(&shifted, alphabet, false);
            forms.push(encoded[(8 * offset).div_ceil(6)..8 * shifted.len() / 6].to_vec());
        }
    }
    for upper in [true, false] {
        forms.push(base32(value, upper, true));
        for offset in 0..5 {
            let mut shifted = vec![0u8; offset];
            shifted.extend_from_slice(value);
            let encoded = base32(&shifted, upper, false);
            forms.push(encoded[(8 * offset).div_ceil(5)..8 * shifted.len() / 5].to_vec());
        }
    }
    for width in [2, 4] {
        for little in [true, false] {
            forms.push(wide(value, width, little));
        }
    }
    forms
}

/// Base32 (RFC 4648) via a bit accumulator, upper or lower case.
fn base32(data: &[u8], upper: bool, pad: bool) -> Vec<u8> {
    let alphabet: &[u8; 32] = if upper {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    } else {
        b"abcdefghijklmnopqrstuvwxyz234567"
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in data {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(alphabet[((acc >> bits) & 31) as usize]);
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(alphabet[((acc << (5 - bits)) & 31) as usize]);
    }
    while pad && out.len() % 8 != 0 {
        out.push(b'=');
    }
    out
}

/// UTF-16 (`width` 2) or UTF-32 (4) of the value's text; a value that is not UTF-8 widened
/// byte by byte (Latin-1), as the redactor documents.
fn wide(value: &[u8], width: usize, little: bool) -> Vec<u8> {
    let chars: Vec<char> = match std::str::from_utf8(value) {
        Ok(t) => t.chars().collect(),
        Err(_) => value.iter().map(|&b| char::from(b)).collect(),
    };
    let mut out = Vec::new();
    for c in chars {
        let units: Vec<u32> = if width == 2 {
            let mut buf = [0u16; 2];
            c.encode_utf16(&mut buf)
                .iter()
                .map(|&u| u32::from(u))
                .collect()
        } else {
            vec![u32::from(c)]
        };
        for u in units {
            let bytes = u.to_be_bytes();
            let unit = &bytes[4 - width..];
            if little {
                out.extend(unit.iter().rev());
            } else {
                out.extend_from_slice(unit);
            }
        }
    }
    out
}

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn hex(value: &[u8], digits: &[u8; 16]) -> Vec<u8> {
    value
        .iter()
        .flat_map(|&b| [digits[usize::from(b >> 4)], digits[usize::from(b & 15)]])
        .collect()
}

/// Base64 via a bit accumulator (a different method from the redactor's own encoder).
fn base64(data: &[u8], alphabet: &[u8; 64], pad: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in data {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            out.push(alphabet[((acc >> bits) & 63) as usize]);
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(alphabet[((acc << (6 - bits)) & 63) as usize]);
    }
    while pad && out.len() % 4 != 0 {
        out.push(b'=');
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64(b"", STANDARD, true), b"");
        assert_eq!(base64(b"f", STANDARD, true), b"Zg==");
        assert_eq!(base64(b"fo", STANDARD, false), b"Zm8");
        assert_eq!(base64(b"foobar", STANDARD, true), b"Zm9vYmFy");
        assert_eq!(base64(b"\xfb\xff", URL_SAFE, true), b"-_8=");
    }

    #[test]
    fn base32_and_wide_match_known_vectors() {
        assert_eq!(base32(b"f", true, true), b"MY======");
        assert_eq!(base32(b"foobar", true, true), b"MZXW6YTBOI======");
        assert_eq!(base32(b"fooba", false, false), b"mzxw6ytb");
        assert_eq!(wide(b"ab", 2, true), b"a\0b\0");
        assert_eq!(wide("\u{1F600}".as_bytes(), 2, false), b"\xd8\x3d\xde\x00");
        assert_eq!(wide(b"a", 4, false), b"\0\0\0a");
    }

    #[test]
    fn planted_secret_is_checked() {
        // One secret "abcdefgh", no cuts, text: raw form, hex form, embedded base64.
        let mut input = vec![1, 0];
        input.extend_from_slice(b"abcdefgh");
        input.push(0);
        input.extend_from_slice(&[b'<', INSERT, 0, b'|', INSERT, 2, b'|', INSERT, 7, b'>']);
        check(&input);
    }
}
