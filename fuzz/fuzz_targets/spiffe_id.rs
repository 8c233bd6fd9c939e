//! Fuzz target `spiffe_id`: `latch::fuzzing::spiffe_id` on the fuzzer's bytes (docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latch::fuzzing::spiffe_id(data));
