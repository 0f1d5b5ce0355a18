#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cowshed_fuzz::check_repair::run(data));
