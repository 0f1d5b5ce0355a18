#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cowshed_fuzz::rebase::run(data));
