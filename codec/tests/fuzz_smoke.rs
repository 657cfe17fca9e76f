//! Stable-Rust stand-in for the `cargo fuzz` target: ~100k random and mutated
//! inputs from a seeded RNG through the same body (`common::fuzz_body`). It
//! must not panic.

mod common;

use common::fuzz_body::check;
use tern_codec::encode_packet;

/// SplitMix64: small, seeded, good enough to drive mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn corpus() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for v in common::VERSIONS {
        for p in common::sample(common::packet(v), 150) {
            let mut out = bytes::BytesMut::new();
            encode_packet(&p, v, &mut out).unwrap();
            seeds.push(out.to_vec());
        }
    }
    seeds
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(input.len() + 1);
                input.insert(i, rng.next() as u8);
            }
            3 if !input.is_empty() => {
                let i = rng.below(input.len());
                input.remove(i);
            }
            4 => {
                let n = rng.below(input.len() + 1);
                input.truncate(n);
            }
            _ => {
                // Interesting bytes: 0, 0xFF, continuation bits, wildcards, NUL.
                let interesting = [0x00, 0xFF, 0x80, 0x7F, b'+', b'#', 0x01, 0x02];
                if !input.is_empty() {
                    let i = rng.below(input.len());
                    input[i] = interesting[rng.below(interesting.len())];
                }
            }
        }
    }
}

#[test]
fn fuzz_smoke_100k() {
    let seeds = corpus();
    let mut rng = Rng(0x5EED_7E2B);
    let mut decoded = 0;
    for i in 0..100_000 {
        let input = if i % 4 == 0 {
            let len = rng.below(48);
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            let mut input = seeds[rng.below(seeds.len())].clone();
            if i % 8 == 1 {
                // Two packets back to back, the second mutated.
                let mut second = seeds[rng.below(seeds.len())].clone();
                mutate(&mut rng, &mut second);
                input.extend_from_slice(&second);
            } else {
                mutate(&mut rng, &mut input);
            }
            input
        };
        decoded += check(&input);
    }
    // The mutations must leave enough valid packets to exercise the round trip.
    assert!(decoded > 20_000, "only {decoded} packets decoded");
}

#[test]
fn seeds_roundtrip() {
    for seed in corpus() {
        assert!(check(&seed) >= 1);
    }
}
