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

mod encodings;
mod search;
mod stream;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use aho_corasick::{AhoCorasick, AhoCorasickKind, BuildError, MatchKind, StartKind};

use crate::error::{Error, Result};

pub(crate) use encodings::encoded_forms;
use search::SkipTable;
pub use stream::StreamRedactor;

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
        StreamRedactor::new(Arc::clone(&self.compiled))
    }

    /// One-shot redaction of a complete buffer (the same as `stream` + `feed` + `finish`).
    /// Returns the redacted bytes and the number of redactions per secret name.
    pub fn redact(&self, data: &[u8]) -> (Vec<u8>, BTreeMap<String, u64>) {
        let mut stream = self.stream();
        let mut out = Vec::with_capacity(data.len());
        stream.feed(data, &mut out);
        stream.finish(&mut out);
        (out, stream.into_counts())
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
