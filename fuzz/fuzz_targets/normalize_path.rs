//! Fuzz target `normalize_path`: `latch::fuzzing::normalize` on the fuzzer's bytes (docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latch::fuzzing::normalize(data));
