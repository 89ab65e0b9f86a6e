//! Streaming secret redaction.
//!
//! Every secret is compiled into the byte patterns a program would print it as (raw, hex,
//! base64 and base32 at every alignment, percent- and JSON-escaped, UTF-16 and UTF-32 in both
//! byte orders), found by a leftmost-longest Aho-Corasick automaton. A Wu-Manber shift table
//! over (hashed) three-byte blocks skips most of the text (a DFA alone looks at every byte; the
//! skip makes it several times faster), and the automaton verifies the few candidate
//! positions; if candidates get dense (adversarial text) the scan falls back to the plain DFA,
//! so the worst case stays linear.
//!
//! The streaming state holds back only the longest tail of the data that could still grow into
//! a match, so output is delayed no more than needed and matches across chunk boundaries are
//! still caught.
//!
//! Known limit: the replacement `[REDACTED:NAME]` is plain text, so a secret that starts with
//! `]` (or ends with `[`) can reappear when the replacement's bracket joins the text next to it.
//! (A secret found inside a replacement text, such as `REDACTED`, is refused outright, and so
//! is one whose encoded form is: a name that spells its hex, base64 or base32.)

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use aho_corasick::{
    AhoCorasick, AhoCorasickKind, Anchored, BuildError, Input, Match, MatchKind, StartKind,
};

use crate::error::{Error, Result};

/// Secrets shorter than this are refused: too short to redact without mangling normal output.
pub const MIN_SECRET_LEN: usize = 8;

/// Above this many pattern bytes the automaton falls back from a DFA to a (smaller, slower)
/// contiguous NFA, to keep memory bounded for very long secrets.
const DFA_PATTERN_BYTES: usize = 256 * 1024;

/// Compiled set of secrets with all their encodings. Cheap to clone (shared inside).
#[derive(Clone)]
pub struct Redactor {
    compiled: Arc<Compiled>,
}

/// The immutable part shared by a redactor and all its streams.
struct Compiled {
    /// Anchored automaton verifying candidate positions; `None` when there is no secret:
    /// everything passes through.
    matcher: Option<AhoCorasick>,
    /// Unanchored automaton for regions dense with candidates, built on first need (rare in
    /// real output, and building it costs as much as the anchored one). `None` inside if it
    /// could not be built: skipping alone is still correct.
    plain: OnceLock<Option<AhoCorasick>>,
    /// Unanchored, ASCII-case-insensitive automaton for host names (which DNS and the proxy
    /// fold to lower case), built on first need.
    folded: OnceLock<Option<AhoCorasick>>,
    /// The patterns in pattern-id order.
    patterns: Vec<Vec<u8>>,
    /// Skip table of the patterns (meaningful only with a matcher).
    skip: SkipTable,
    /// Pattern id -> index into `names`.
    pattern_name: Vec<usize>,
    /// Distinct secret names, in the order first given.
    names: Vec<String>,
    /// `[REDACTED:NAME]`, per index of `names`.
    replacements: Vec<Vec<u8>>,
    /// All patterns, sorted, to answer "is this a proper prefix of some pattern?".
    sorted_patterns: Vec<Vec<u8>>,
    /// Bytes that start at least one pattern.
    first_bytes: [bool; 256],
    /// Two-byte starts of the patterns, a bit per `first | second << 8`: rules out most
    /// positions of a held-back tail before the sorted patterns are searched.
    first_pairs: Box<[u64]>,
    /// Length of the longest pattern.
    max_len: usize,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("names", &self.compiled.names)
            .finish_non_exhaustive()
    }
}

impl Redactor {
    /// Compiles `secrets` given as `(name, value)` pairs.
    ///
    /// Refused with [`Error::Secret`] (the message names the secret, never shows its value):
    /// values shorter than [`MIN_SECRET_LEN`] bytes, names outside `[A-Za-z0-9_.-]{1,128}`,
    /// and values that occur inside a replacement text (e.g. `REDACTED`).
    /// An empty list is allowed and gives a passthrough redactor.
    pub fn new(secrets: &[(String, Vec<u8>)]) -> Result<Redactor> {
        let mut names: Vec<String> = Vec::new();
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        let mut pattern_name = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (name, value) in secrets {
            check_name(name)?;
            if value.len() < MIN_SECRET_LEN {
                return Err(Error::Secret(format!(
                    "secret {name} is shorter than {MIN_SECRET_LEN} bytes (too short to redact safely)"
                )));
            }
            let index = match names.iter().position(|n| n == name) {
                Some(i) => i,
                None => {
                    names.push(name.clone());
                    names.len() - 1
                }
            };
            // The first secret to claim a pattern names it.
            for form in encoded_forms(value) {
                if seen.insert(form.clone()) {
                    patterns.push(form);
                    pattern_name.push(index);
                }
            }
        }
        let matcher = if patterns.is_empty() {
            None
        } else {
            let ac = build_automaton(&patterns, StartKind::Anchored)
                .map_err(|e| Error::Secret(format!("cannot compile the secret patterns: {e}")))?;
            Some(ac)
        };
        let mut first_bytes = [false; 256];
        let mut first_pairs = vec![0u64; (1 << 16) / 64].into_boxed_slice();
        for p in &patterns {
            first_bytes[usize::from(p[0])] = true;
            // Only a pattern of 3 bytes or more can have a proper prefix of 2 bytes.
            if let [a, b, _, ..] = p.as_slice() {
                let pair = usize::from(*a) | usize::from(*b) << 8;
                first_pairs[pair / 64] |= 1 << (pair % 64);
            }
        }
        let max_len = patterns.iter().map(Vec::len).max().unwrap_or(0);
        let replacements: Vec<Vec<u8>> = names
            .iter()
            .map(|n| format!("[REDACTED:{n}]").into_bytes())
            .collect();
        // Otherwise the replacement itself would print the secret (raw, or in a form a reader
        // decodes: a name spelling its hex or base64), and redacting redacted text again would
        // replace and count the replacement. Every form is checked, not only the raw value.
        for (pattern, &index) in patterns.iter().zip(&pattern_name) {
            if let Some(r) = replacements
                .iter()
                .position(|r| r.windows(pattern.len()).any(|w| w == pattern.as_slice()))
            {
                let name = &names[index];
                return Err(Error::Secret(format!(
                    "secret {name} (or an encoding of it) occurs in the replacement text \
                     [REDACTED:{}]: rename the secret",
                    names[r]
                )));
            }
        }
        let skip = SkipTable::new(&patterns);
        let mut sorted_patterns = patterns.clone();
        sorted_patterns.sort();
        Ok(Redactor {
            compiled: Arc::new(Compiled {
                matcher,
                plain: OnceLock::new(),
                folded: OnceLock::new(),
                patterns,
                skip,
                pattern_name,
                names,
                replacements,
                sorted_patterns,
                first_bytes,
                first_pairs,
                max_len,
            }),
        })
    }

    /// A fresh per-stream state (one per output stream).
    pub fn stream(&self) -> StreamRedactor {
        StreamRedactor {
            compiled: Arc::clone(&self.compiled),
            pending: Vec::new(),
            counts: BTreeMap::new(),
        }
    }

    /// One-shot redaction of a complete buffer (the same as `stream` + `feed` + `finish`).
    /// Returns the redacted bytes and the number of redactions per secret name.
    pub fn redact(&self, data: &[u8]) -> (Vec<u8>, BTreeMap<String, u64>) {
        let mut stream = self.stream();
        let mut out = Vec::with_capacity(data.len());
        stream.feed(data, &mut out);
        stream.finish(&mut out);
        (out, stream.counts)
    }

    /// Redacts a host name as a refusal recorded it: lower-cased (by the proxy and DNS) and,
    /// for DNS, with odd bytes escaped as `\DDD` or `\.`. The name is unescaped, then every
    /// encoding of every secret is matched regardless of ASCII case. When something is found
    /// the result is the redacted unescaped name (bytes outside printable ASCII escaped as
    /// `\DDD`); otherwise the name is returned as it was.
    pub fn redact_name(&self, name: &[u8]) -> (Vec<u8>, BTreeMap<String, u64>) {
        let mut counts = BTreeMap::new();
        let Some(ac) = self.compiled.folded() else {
            return (name.to_vec(), counts);
        };
        let raw = dns_unescape(name);
        let mut out = Vec::with_capacity(raw.len());
        let mut at = 0;
        for m in ac.find_iter(&raw) {
            escape_into(&raw[at..m.start()], &mut out);
            let index = self.compiled.pattern_name[m.pattern().as_usize()];
            out.extend_from_slice(&self.compiled.replacements[index]);
            *counts
                .entry(self.compiled.names[index].clone())
                .or_insert(0) += 1;
            at = m.end();
        }
        if counts.is_empty() {
            return (name.to_vec(), counts);
        }
        escape_into(&raw[at..], &mut out);
        (out, counts)
    }

    /// True when there is no secret (everything passes through unchanged).
    pub fn is_empty(&self) -> bool {
        self.compiled.matcher.is_none()
    }

    /// The distinct secret names, in the order first given.
    pub fn names(&self) -> &[String] {
        &self.compiled.names
    }

    /// Number of distinct byte patterns searched for (all secrets, all encodings).
    pub fn pattern_count(&self) -> usize {
        self.compiled.sorted_patterns.len()
    }
}

/// Redaction state of one output stream: the held-back tail and the counts so far.
pub struct StreamRedactor {
    compiled: Arc<Compiled>,
    /// Bytes received but not yet emitted: a tail that may be the start of a match.
    pending: Vec<u8>,
    counts: BTreeMap<String, u64>,
}

impl std::fmt::Debug for StreamRedactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamRedactor")
            .field("held_back", &self.pending.len())
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl StreamRedactor {
    /// Feeds a chunk; appends to `out` every byte that can no longer be part of a match
    /// (with matches replaced by `[REDACTED:NAME]`). Holds back only the longest tail that is
    /// a proper prefix of some pattern.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len() + self.pending.len());
        if self.pending.is_empty() {
            let used = self.scan(chunk, 0, false, out);
            self.pending.extend_from_slice(&chunk[used..]);
        } else if chunk.len() >= self.compiled.max_len {
            // Only the seam is joined (copying every chunk behind a few held bytes would cost
            // more than the search): matches starting in the held bytes end within it.
            let mut held = std::mem::take(&mut self.pending);
            let start = self.seam(&held, chunk, out);
            let used = self.scan(chunk, start, false, out);
            held.clear();
            held.extend_from_slice(&chunk[used..]);
            self.pending = held;
        } else {
            let mut buf = std::mem::take(&mut self.pending);
            buf.extend_from_slice(chunk);
            let used = self.scan(&buf, 0, false, out);
            buf.drain(..used);
            self.pending = buf;
        }
    }

    /// End of stream: flushes what was held back, redacting any final match. The state is
    /// then empty again (counts are kept), so the stream may be reused.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let buf = std::mem::take(&mut self.pending);
        self.scan(&buf, 0, true, out);
    }

    /// Redactions so far per secret name (names never redacted are absent).
    pub fn counts(&self) -> &BTreeMap<String, u64> {
        &self.counts
    }

    /// Number of bytes currently held back (a possible match in progress).
    pub fn held_back(&self) -> usize {
        self.pending.len()
    }

    /// Redacts the matches that start in `held` (bytes held back from earlier chunks) and
    /// emits `held`; `chunk` follows it and has at least `max_len` bytes, so none of those
    /// matches can still grow. Returns where in `chunk` the emitted text ends (a match
    /// starting in `held` may reach into it).
    fn seam(&mut self, held: &[u8], chunk: &[u8], out: &mut Vec<u8>) -> usize {
        let compiled = Arc::clone(&self.compiled);
        let Some(matcher) = &compiled.matcher else {
            out.extend_from_slice(held);
            return 0;
        };
        let seam = [held, &chunk[..compiled.max_len]].concat();
        let mut pos = 0;
        let mut finder = Finder::new(&compiled, matcher, &seam);
        while pos < held.len() {
            match finder.find_from(pos) {
                Some(m) if m.start() < held.len() => {
                    out.extend_from_slice(&seam[pos..m.start()]);
                    self.replace(&compiled, m, out);
                    pos = m.end();
                }
                _ => {
                    out.extend_from_slice(&seam[pos..held.len()]);
                    pos = held.len();
                }
            }
        }
        pos - held.len()
    }

    /// Emits the replacement of match `m` and counts it.
    fn replace(&mut self, compiled: &Compiled, m: Match, out: &mut Vec<u8>) {
        let name = compiled.pattern_name[m.pattern().as_usize()];
        out.extend_from_slice(&compiled.replacements[name]);
        match self.counts.get_mut(&compiled.names[name]) {
            Some(count) => *count += 1,
            None => {
                self.counts.insert(compiled.names[name].clone(), 1);
            }
        }
    }

    /// Emits the redacted form of `buf[start..]` up to the point where a match could still be
    /// in progress (everything when `at_end`); returns how many bytes of `buf` were consumed.
    fn scan(&mut self, buf: &[u8], start: usize, at_end: bool, out: &mut Vec<u8>) -> usize {
        let compiled = Arc::clone(&self.compiled);
        let Some(matcher) = &compiled.matcher else {
            out.extend_from_slice(&buf[start..]);
            return buf.len();
        };
        // A match starting before `hold` ends inside `buf` and cannot grow: no pattern
        // extends past the end of `buf` from there. From `hold` on, more data may matter.
        let mut hold = if at_end {
            buf.len()
        } else {
            compiled.hold_start(buf, start)
        };
        let mut pos = start;
        let mut finder = Finder::new(&compiled, matcher, buf);
        while let Some(m) = finder.find_from(pos) {
            if m.start() >= hold {
                break;
            }
            out.extend_from_slice(&buf[pos..m.start()]);
            self.replace(&compiled, m, out);
            pos = m.end();
            if pos > hold {
                hold = compiled.hold_start(buf, pos);
            }
        }
        out.extend_from_slice(&buf[pos..hold]);
        hold
    }
}

/// Wu-Manber shift table: for every three-byte block (hashed), how far the search window (as
/// long as the shortest pattern) may advance when the window ends with that block.
///
/// Three-byte blocks keep the table sparse with hundreds of patterns over one alphabet
/// (base64, base32, hex of many secrets): two-byte blocks of such alphabets are nearly all
/// taken, which leaves no skip. A hash collision only makes a shift smaller, never wrong.
struct SkipTable {
    /// Window length: the shortest pattern length, capped to fit a `u8` shift.
    window: usize,
    /// Indexed by [`block_hash`] of the window's last three bytes.
    shift: Box<[u8]>,
}

/// Bytes per block of the skip table.
const BLOCK: usize = 3;
/// log2 of the skip table's size.
const SKIP_BITS: u32 = 16;

/// Hash of the three bytes ending at `end` (exclusive) into the skip table.
#[inline(always)]
fn block_hash(buf: &[u8], end: usize) -> usize {
    let n = u32::from(buf[end - 3]) | u32::from(buf[end - 2]) << 8 | u32::from(buf[end - 1]) << 16;
    (n.wrapping_mul(0x9E37_79B1) >> (32 - SKIP_BITS)) as usize
}

impl SkipTable {
    fn new(patterns: &[Vec<u8>]) -> SkipTable {
        let shortest = patterns.iter().map(Vec::len).min().unwrap_or(BLOCK);
        let window = shortest.clamp(BLOCK, 255);
        // Patterns shorter than a block cannot be skipped over: verify everywhere.
        let default = if shortest < BLOCK {
            0
        } else {
            window - BLOCK + 1
        };
        let mut shift = vec![default as u8; 1 << SKIP_BITS].into_boxed_slice();
        for p in patterns.iter().filter(|p| p.len() >= BLOCK) {
            for end in BLOCK..=window.min(p.len()) {
                let block = block_hash(p, end);
                shift[block] = shift[block].min((window - end) as u8);
            }
        }
        SkipTable { window, shift }
    }
}

/// Bytes searched by the plain DFA each time candidates get too dense for skipping.
const PLAIN_REGION: usize = 16 * 1024;

/// Leftmost-longest search over one buffer: skip table first, automaton to verify.
struct Finder<'a> {
    compiled: &'a Compiled,
    /// The anchored automaton of `compiled`.
    matcher: &'a AhoCorasick,
    buf: &'a [u8],
    /// Candidate positions verified since `since`.
    verified: usize,
    /// Where the current stretch of skipping began.
    since: usize,
}

impl<'a> Finder<'a> {
    fn new(compiled: &'a Compiled, matcher: &'a AhoCorasick, buf: &'a [u8]) -> Self {
        Finder {
            compiled,
            matcher,
            buf,
            verified: 0,
            since: 0,
        }
    }

    /// The leftmost-longest match starting at or after `from`.
    fn find_from(&mut self, from: usize) -> Option<Match> {
        let mut start = from;
        loop {
            match self.skip_to_match(start) {
                Ok(found) => return found,
                // Dense candidates (adversarial or pattern-like text): the plain DFA is faster
                // there, and linear. Use it over one region, then try skipping again.
                Err(dense_at) => {
                    let Some(plain) = self.compiled.plain() else {
                        self.verified = 0;
                        self.since = dense_at;
                        start = dense_at;
                        continue;
                    };
                    let max_len = self.compiled.max_len;
                    let region_end = (dense_at + PLAIN_REGION.max(4 * max_len)).min(self.buf.len());
                    // A match starting before `settled` ends inside the region, so neither it
                    // nor a longer or earlier one can reach past the region's end.
                    let settled = if region_end == self.buf.len() {
                        region_end
                    } else {
                        region_end + 1 - max_len
                    };
                    let input = Input::new(self.buf).range(dense_at..region_end);
                    let found = plain.find(input).filter(|m| m.start() < settled);
                    // Density is measured afresh after each plain region.
                    self.verified = 0;
                    self.since = found.map_or(settled, |m| m.end());
                    if found.is_some() || settled == self.buf.len() {
                        return found;
                    }
                    start = settled;
                }
            }
        }
    }

    /// Wu-Manber scan from `start`: `Ok` with the match (or none up to the end), or `Err` with
    /// the position reached when verified candidates became too dense.
    fn skip_to_match(&mut self, mut start: usize) -> Result<Option<Match>, usize> {
        let skip = &self.compiled.skip;
        let window = skip.window;
        while start + window <= self.buf.len() {
            let shift = usize::from(skip.shift[block_hash(self.buf, start + window)]);
            if shift > 0 {
                start += shift;
                continue;
            }
            let input = Input::new(self.buf).range(start..).anchored(Anchored::Yes);
            if let Some(m) = self.matcher.find(input) {
                return Ok(Some(m));
            }
            start += 1;
            // A failed verification costs about as much as the DFA reading 16 bytes.
            self.verified += 1;
            if self.verified > 16 && self.verified * 16 > start.saturating_sub(self.since) {
                return Err(start);
            }
        }
        Ok(None)
    }
}

/// A DNS name's presentation form (`\DDD` decimal and `\X` escapes) back to its bytes.
fn dns_unescape(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len());
    let mut i = 0;
    while i < name.len() {
        let b = name[i];
        if b == b'\\' {
            let digits = name
                .get(i + 1..i + 4)
                .filter(|d| d.iter().all(u8::is_ascii_digit));
            if let Some(d) = digits {
                let v = d.iter().fold(0u32, |v, c| v * 10 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
            if let Some(&next) = name.get(i + 1) {
                out.push(next);
                i += 2;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    out
}

/// Appends `bytes`, those outside printable ASCII as `\DDD` (a report stays printable).
fn escape_into(bytes: &[u8], out: &mut Vec<u8>) {
    for &b in bytes {
        if (0x21..=0x7e).contains(&b) {
            out.push(b);
        } else {
            out.extend_from_slice(format!("\\{b:03}").as_bytes());
        }
    }
}

impl Compiled {
    /// The case-insensitive automaton for host names, built on first use.
    fn folded(&self) -> Option<&AhoCorasick> {
        self.folded
            .get_or_init(|| {
                if self.patterns.is_empty() {
                    return None;
                }
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .ascii_case_insensitive(true)
                    .build(&self.patterns)
                    .ok()
            })
            .as_ref()
    }

    /// The unanchored automaton, built on first use.
    fn plain(&self) -> Option<&AhoCorasick> {
        self.plain
            .get_or_init(|| build_automaton(&self.patterns, StartKind::Unanchored).ok())
            .as_ref()
    }

    /// The leftmost position `s >= from` such that `buf[s..]` is a proper prefix of some
    /// pattern, or `buf.len()` when there is none.
    fn hold_start(&self, buf: &[u8], from: usize) -> usize {
        let lo = from.max(buf.len().saturating_sub(self.max_len.saturating_sub(1)));
        (lo..buf.len())
            .find(|&s| {
                self.first_bytes[usize::from(buf[s])]
                    && buf.get(s + 1).is_none_or(|&second| {
                        let pair = usize::from(buf[s]) | usize::from(second) << 8;
                        self.first_pairs[pair / 64] & 1 << (pair % 64) != 0
                    })
                    && self.is_proper_prefix(&buf[s..])
            })
            .unwrap_or(buf.len())
    }

    /// True when some pattern starts with `head` and is longer than it.
    fn is_proper_prefix(&self, head: &[u8]) -> bool {
        // Patterns that start with `head` and differ from it sort right after `head`.
        let i = self
            .sorted_patterns
            .partition_point(|p| p.as_slice() <= head);
        self.sorted_patterns
            .get(i)
            .is_some_and(|p| p.starts_with(head))
    }
}

/// A leftmost-longest automaton over `patterns`: a DFA unless the patterns are very long.
fn build_automaton(patterns: &[Vec<u8>], start: StartKind) -> Result<AhoCorasick, BuildError> {
    let total: usize = patterns.iter().map(Vec::len).sum();
    AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .start_kind(start)
        .kind((total <= DFA_PATTERN_BYTES).then_some(AhoCorasickKind::DFA))
        .build(patterns)
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Secret(format!(
            "secret name {name:?} must be 1 to 128 characters of A-Z a-z 0-9 _ . -"
        )))
    }
}

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

const BASE64_STANDARD: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const BASE64_URL_SAFE: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64 without padding: the partial last character (if any) is included.
fn base64_unpadded(data: &[u8], alphabet: &[u8; 64]) -> Vec<u8> {
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

const BASE32_UPPER: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const BASE32_LOWER: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Base32 (RFC 4648) without padding: the partial last character (if any) is included.
fn base32_unpadded(data: &[u8], alphabet: &[u8; 32]) -> Vec<u8> {
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

    fn redactor(secrets: &[(&str, &[u8])]) -> Redactor {
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
    fn redact_split(r: &Redactor, data: &[u8], cuts: &[usize]) -> Vec<u8> {
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
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    const TOKEN: &[u8] = b"ghp_S3cr3t/Tok+en=42";

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
    fn output_is_not_delayed_without_a_possible_match() {
        let r = redactor(&[("GH", TOKEN)]);
        let mut s = r.stream();
        let mut out = Vec::new();
        s.feed(b"print(\"hello\")\n", &mut out);
        assert_eq!(out, b"print(\"hello\")\n");
        assert_eq!(s.held_back(), 0);
        // A tail that could start the secret is held back, and only that tail.
        s.feed(b"value: ghp_S3", &mut out);
        assert_eq!(out, b"print(\"hello\")\nvalue: ");
        assert_eq!(s.held_back(), 6);
        // No longer pattern starts with the whole secret: the match is final at once.
        s.feed(b"cr3t/Tok+en=42", &mut out);
        assert_eq!(out, b"print(\"hello\")\nvalue: [REDACTED:GH]");
        assert_eq!(s.held_back(), 0);
        s.finish(&mut out);
        assert_eq!(s.counts().get("GH"), Some(&1));
    }

    #[test]
    fn finish_flushes_a_held_tail_and_a_final_match() {
        let r = redactor(&[("GH", TOKEN)]);
        let mut s = r.stream();
        let mut out = Vec::new();
        s.feed(b"end ghp_S3cr", &mut out);
        s.finish(&mut out);
        assert_eq!(out, b"end ghp_S3cr");
        let mut out = Vec::new();
        s.feed(b"end ghp_S3cr3t/Tok+en=42", &mut out);
        s.finish(&mut out);
        assert_eq!(out, b"end [REDACTED:GH]");
        assert_eq!(s.held_back(), 0);
    }

    #[test]
    fn byte_at_a_time_equals_one_shot() {
        let r = redactor(&[("GH", TOKEN), ("DB", b"postgres://u:pw@db/x")]);
        let text = b"a ghp_S3cr3t/Tok+en=42 b Z2hwX1MzY3IzdC9Ub2srZW49NDI= c postgres%3A%2F%2Fu%3Apw%40db%2Fx d";
        let cuts: Vec<usize> = (1..text.len()).collect();
        assert_eq!(redact_split(&r, text, &cuts), r.redact(text).0);
        assert_eq!(r.redact(text).1.values().sum::<u64>(), 3);
    }

    #[test]
    fn arbitrary_splits_equal_one_shot() {
        let secrets: Vec<(String, Vec<u8>)> = (0..6)
            .map(|i| {
                (
                    format!("S{i}"),
                    format!("sk-{i}{i}-Zq9/+x={}", "y".repeat(i)).into_bytes(),
                )
            })
            .collect();
        let r = Redactor::new(&secrets).expect("valid");
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut all_forms: Vec<Vec<u8>> = Vec::new();
        for (_, value) in &secrets {
            all_forms.extend(encoded_forms(value));
        }
        let fillers: [&[u8]; 6] = [b" ", b"\n", b"sk-", b"Z", b"abc", b"%2"];
        for _ in 0..300 {
            let mut data = Vec::new();
            for _ in 0..rng.below(12) {
                if rng.below(2) == 0 {
                    data.extend_from_slice(&all_forms[rng.below(all_forms.len())]);
                } else {
                    data.extend_from_slice(fillers[rng.below(fillers.len())]);
                }
            }
            let (whole, whole_counts) = r.redact(&data);
            let mut cuts: Vec<usize> = (0..rng.below(6))
                .map(|_| rng.below(data.len() + 1))
                .collect();
            cuts.sort_unstable();
            let mut s = r.stream();
            let mut out = Vec::new();
            let mut last = 0;
            for cut in cuts {
                s.feed(&data[last..cut], &mut out);
                last = cut;
            }
            s.feed(&data[last..], &mut out);
            s.finish(&mut out);
            assert_eq!(out, whole);
            assert_eq!(s.counts(), &whole_counts);
            for (_, value) in &secrets {
                assert!(!contains(&out, value));
            }
        }
    }

    #[test]
    fn long_chunks_after_a_held_tail_equal_one_shot() {
        // Chunks at least as long as the longest pattern take the seam path: only the held
        // tail and the chunk's first bytes are joined. Forms are planted across every cut.
        let secrets = [
            ("A", &b"ghp_S3cr3t/Tok+en=42"[..]),
            ("B", &b"zzzzzzzzzz"[..]),
        ];
        let r = redactor(&secrets);
        let max = r.compiled.max_len;
        let mut all_forms: Vec<Vec<u8>> = Vec::new();
        for (_, value) in secrets {
            all_forms.extend(encoded_forms(value));
        }
        let mut rng = Rng(99);
        for _ in 0..200 {
            let mut data = Vec::new();
            while data.len() < 20 * max {
                match rng.below(4) {
                    0 => data.extend_from_slice(&all_forms[rng.below(all_forms.len())]),
                    1 => {
                        let f = &all_forms[rng.below(all_forms.len())];
                        data.extend_from_slice(&f[..rng.below(f.len())]);
                    }
                    _ => data.extend_from_slice(&b"z ghp_\0x"[..rng.below(9)]),
                }
            }
            let (whole, counts) = r.redact(&data);
            let mut cuts = Vec::new();
            let mut at = 0;
            while at < data.len() {
                at += max + rng.below(3 * max);
                cuts.push(at.min(data.len()));
            }
            let mut s = r.stream();
            let mut out = Vec::new();
            let mut last = 0;
            for cut in cuts {
                s.feed(&data[last..cut], &mut out);
                last = cut;
            }
            s.finish(&mut out);
            assert_eq!(out, whole);
            assert_eq!(s.counts(), &counts);
        }
    }

    /// All matches of `data` through the skip table, as (start, end, pattern), and whether
    /// the search used the plain DFA for some region.
    fn skip_matches(r: &Redactor, data: &[u8]) -> (Vec<(usize, usize, usize)>, bool) {
        let c = &r.compiled;
        let matcher = c.matcher.as_ref().expect("secrets");
        let mut finder = Finder::new(c, matcher, data);
        let mut plain_dfa = false;
        let mut found = Vec::new();
        let mut pos = 0;
        while let Some(m) = finder.find_from(pos) {
            found.push((m.start(), m.end(), m.pattern().as_usize()));
            pos = m.end();
            plain_dfa |= finder.since > 0;
        }
        plain_dfa |= finder.since > 0;
        (found, plain_dfa)
    }

    #[test]
    fn skip_search_equals_plain_dfa() {
        let r = redactor(&[("A", b"abcabcab"), ("B", b"bcaXbcaX"), ("C", b"caabcaab")]);
        let matcher = r.compiled.plain().expect("unanchored automaton");
        let mut rng = Rng(7);
        for len in [0, 1, 7, 8, 9, 40, 300, 5000, 40_000] {
            for _ in 0..10 {
                let data: Vec<u8> = (0..len).map(|_| b"abcX"[rng.below(4)]).collect();
                let plain: Vec<(usize, usize, usize)> = matcher
                    .find_iter(&data)
                    .map(|m| (m.start(), m.end(), m.pattern().as_usize()))
                    .collect();
                assert_eq!(skip_matches(&r, &data).0, plain, "len {len}");
            }
        }
    }

    #[test]
    fn dense_candidates_use_plain_dfa_regions_without_missing_matches() {
        // "abab..." makes every other position a candidate of the long secret (the short one
        // keeps the window at 8 bytes); real matches are planted across many 16 KiB regions,
        // some right at region ends.
        let long = [b"ab".repeat(20), b"ZZ".to_vec()].concat();
        let r = redactor(&[("LONG", &long), ("SHORT", b"qqqqqqqq")]);
        let matcher = r.compiled.plain().expect("unanchored automaton");
        let mut rng = Rng(11);
        for _ in 0..5 {
            let mut data = Vec::new();
            while data.len() < 200_000 {
                match rng.below(300) {
                    0 => data.extend_from_slice(&long),
                    1 => data.extend_from_slice(b"qqqqqqqq"),
                    2 => data.extend_from_slice(&long[..41]),
                    _ => data.extend_from_slice(b"ab"),
                }
            }
            let plain: Vec<(usize, usize, usize)> = matcher
                .find_iter(&data)
                .map(|m| (m.start(), m.end(), m.pattern().as_usize()))
                .collect();
            let (found, plain_dfa) = skip_matches(&r, &data);
            assert!(plain_dfa);
            assert!(plain.len() > 100);
            assert_eq!(found, plain);
        }
        // One match, at every offset around the end of the first plain region.
        for at in PLAIN_REGION - 100..PLAIN_REGION + 100 {
            let mut data = b"ab".repeat(at / 2);
            data.extend_from_slice(&b"b"[..at % 2]);
            data.extend_from_slice(&long);
            data.extend_from_slice(&b"ab".repeat(200));
            let (found, _) = skip_matches(&r, &data);
            assert_eq!(found, [(at, at + long.len(), 0)], "at {at}");
        }
    }

    #[test]
    fn adversarial_text_is_still_redacted() {
        // The short secret makes the window 8 bytes; then every other position is a candidate
        // that verifies 40 bytes before failing: the search falls back to the plain DFA and
        // still finds the one real match.
        let secret = [b"ab".repeat(20), b"ZZ".to_vec()].concat();
        let r = redactor(&[("A", &secret), ("SHORT", b"qqqqqqqq")]);
        let filler = b"ab".repeat(5_000);
        let data = [filler.clone(), secret.clone(), filler.clone()].concat();
        let (found, plain_dfa) = skip_matches(&r, &data);
        assert!(plain_dfa);
        assert_eq!(found.len(), 1);
        let (out, counts) = r.redact(&data);
        assert_eq!(
            out,
            [filler.clone(), b"[REDACTED:A]".to_vec(), filler].concat()
        );
        assert_eq!(counts.get("A"), Some(&1));
    }

    #[test]
    fn held_back_tail_is_shorter_than_longest_pattern() {
        let r = redactor(&[("GH", TOKEN)]);
        let max = r.compiled.max_len;
        let mut s = r.stream();
        let mut out = Vec::new();
        // Repeating a prefix of the secret: only the last, still possible start is held.
        for _ in 0..50 {
            s.feed(b"ghp_S3cr3", &mut out);
            assert!(s.held_back() < max);
        }
        s.finish(&mut out);
        assert_eq!(out, b"ghp_S3cr3".repeat(50));
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
}
