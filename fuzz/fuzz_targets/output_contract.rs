//! The output contract's parser, on any reply text, for every built-in structured step: an
//! output valid against the step's schema, or the violations in words.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use pipeline_core::Config;

static CONFIG: LazyLock<Config> = LazyLock::new(|| Config::defaults().expect("the embedded defaults load"));

fuzz_target!(|data: &[u8]| {
    let reply = String::from_utf8_lossy(data);
    for spec in CONFIG.steps() {
        match spec.check_reply(&reply) {
            Ok(output) => assert!(output.is_object() || output.is_string()),
            Err(violations) => assert!(!violations.is_empty()),
        }
    }
});
