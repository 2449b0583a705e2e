//! The config loader, on any text over the embedded defaults: a config or an error naming a
//! key, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(err) = pipeline_core::Config::from_toml(&text) {
        assert!(!err.to_string().is_empty());
    }
});
