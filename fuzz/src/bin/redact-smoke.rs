//! Stable-Rust stand-in for `cargo fuzz run redact`: random structured inputs from a fixed-seed
//! generator, checked with the same invariants, for a given number of seconds.
//!
//! Usage: `redact-smoke [SECONDS=10] [SEED=1]`.

use std::time::{Duration, Instant};

use cellblock_fuzz::{check, INSERT};

/// xorshift64*: tiny, deterministic, good enough to pick fuzz inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// Bytes in the input layout of [`check`], biased toward small alphabets so that secrets
/// overlap, repeat and share prefixes with the text.
fn generate(rng: &mut Rng) -> Vec<u8> {
    let alphabets: [&[u8]; 6] = [
        b"ab",
        b"abc/+=",
        b"0123456789abcdefABCDEF",
        b"aZ09+/=-_%\\\"u",
        b"ab\0",            // wide text
        b"ABCDEFGH234567=", // base32
    ];
    let alphabet = alphabets[rng.below(alphabets.len() as u64) as usize];
    let pick = |rng: &mut Rng| {
        if rng.below(8) == 0 {
            rng.byte()
        } else {
            alphabet[rng.below(alphabet.len() as u64) as usize]
        }
    };
    let mut input = vec![rng.byte()];
    for _ in 0..input[0] % 4 {
        let len = rng.byte();
        input.push(len);
        for _ in 0..8 + len % 25 {
            input.push(pick(rng));
        }
    }
    let cuts = rng.byte();
    input.push(cuts);
    for _ in 0..cuts % 8 {
        input.push(rng.byte());
    }
    // Now and then a long text, to cross the redactor's internal 16 KiB search regions.
    let len = if rng.below(20) == 0 {
        rng.below(50_000)
    } else {
        rng.below(200)
    };
    for _ in 0..len {
        if rng.below(if len > 200 { 2000 } else { 6 }) == 0 {
            input.extend_from_slice(&[INSERT, rng.byte()]);
        } else {
            input.push(pick(rng));
        }
    }
    input
}

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let seed: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let mut rng = Rng(seed.max(1));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut runs = 0u64;
    while Instant::now() < deadline {
        for _ in 0..100 {
            check(&generate(&mut rng));
        }
        runs += 100;
    }
    println!(
        "redact-smoke: {runs} inputs checked in {seconds} s (seed {seed}), no invariant broken"
    );
}
