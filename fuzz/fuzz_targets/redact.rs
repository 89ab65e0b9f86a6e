//! libFuzzer target: arbitrary secrets, text and chunk splits through the redactor.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cellblock_fuzz::check(data);
});
