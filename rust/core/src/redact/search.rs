//! The search over one buffer: a Wu-Manber skip table over three-byte blocks finds candidate
//! positions, the anchored automaton verifies them, and regions dense with candidates fall
//! back to the plain DFA so the worst case stays linear.

use aho_corasick::{AhoCorasick, Anchored, Input, Match};

use super::Compiled;

/// Wu-Manber shift table: for every three-byte block (hashed), how far the search window (as
/// long as the shortest pattern) may advance when the window ends with that block.
///
/// Three-byte blocks keep the table sparse with hundreds of patterns over one alphabet
/// (base64, base32, hex of many secrets): two-byte blocks of such alphabets are nearly all
/// taken, which leaves no skip. A hash collision only makes a shift smaller, never wrong.
pub(super) struct SkipTable {
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
    pub(super) fn new(patterns: &[Vec<u8>]) -> SkipTable {
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
pub(super) struct Finder<'a> {
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
    pub(super) fn new(compiled: &'a Compiled, matcher: &'a AhoCorasick, buf: &'a [u8]) -> Self {
        Finder {
            compiled,
            matcher,
            buf,
            verified: 0,
            since: 0,
        }
    }

    /// The leftmost-longest match starting at or after `from`.
    pub(super) fn find_from(&mut self, from: usize) -> Option<Match> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::tests::{redactor, Rng};
    use crate::redact::Redactor;

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
}
