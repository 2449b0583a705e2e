//! The call log reader, on any bytes: every line is a call or a bad line with its reason.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((calls, bad)) = aipipe::log::read_log(data) {
        for call in &calls {
            let _ = call.recorded();
            let _ = call.failure_class();
        }
        assert!(bad.iter().all(|line| !line.reason.is_empty()));
    }
});
