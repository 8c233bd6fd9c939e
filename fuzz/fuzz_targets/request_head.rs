//! Fuzz target `request_head`: `latch::fuzzing::request_head` on the fuzzer's bytes (docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latch::fuzzing::request_head(data));
