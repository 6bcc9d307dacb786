//! `ops_model`: see `waybill::fuzzing::ops_model` for what it feeds the store and what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| waybill::fuzzing::ops_model(data));
