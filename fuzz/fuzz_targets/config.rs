//! Fuzz target `config`: `latch::fuzzing::config` on the fuzzer's bytes (docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latch::fuzzing::config(data));
