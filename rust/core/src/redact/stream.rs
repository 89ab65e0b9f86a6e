//! Per-stream redaction: [`StreamRedactor`] holds back the shortest tail of an output stream
//! that could still grow into a match, so matches across chunk boundaries are caught while
//! output is delayed no more than needed.

use std::collections::BTreeMap;
use std::sync::Arc;

use aho_corasick::Match;

use super::search::Finder;
use super::Compiled;

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
    /// A fresh state over `compiled`: nothing held back, nothing counted.
    pub(super) fn new(compiled: Arc<Compiled>) -> StreamRedactor {
        StreamRedactor {
            compiled,
            pending: Vec::new(),
            counts: BTreeMap::new(),
        }
    }

    /// The counts, consuming the state (for one-shot redaction).
    pub(super) fn into_counts(self) -> BTreeMap<String, u64> {
        self.counts
    }

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

#[cfg(test)]
mod tests {
    use crate::redact::tests::{contains, redact_split, redactor, Rng, TOKEN};
    use crate::redact::{encoded_forms, Redactor};

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
}
