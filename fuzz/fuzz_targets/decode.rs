//! Feeds arbitrary bytes to `decode_packet` for each protocol version, as a
//! stream of packets until "need more bytes" or an error, and checks that
//! every packet decoded re-encodes and decodes back equal. The body is shared
//! with the stable-Rust smoke test in `codec/tests/fuzz_smoke.rs`.
//!
//! Run with `cargo +nightly fuzz run decode` from `fuzz/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../codec/tests/common/fuzz_body.rs"]
mod fuzz_body;

fuzz_target!(|data: &[u8]| {
    fuzz_body::check(data);
});
