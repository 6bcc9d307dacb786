//! `reconcile`: see `waybill::fuzzing::reconcile` for what it feeds the store and what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| waybill::fuzzing::reconcile(data));
