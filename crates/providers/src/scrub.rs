//! Secrets never leave through an error message: an upstream that echoes the key it was sent
//! ("Incorrect API key provided: sk-...") must not pass it on to a caller, a log line, a
//! telemetry row or an alert.

use std::sync::LazyLock;

use regex::Regex;

/// Anything shaped like a credential: provider keys (`sk-...`, `sk-ant-...`, Google's `AIza...`,
/// AWS's `AKIA...`) and the token of an `Authorization: Bearer ...` header.
static KEY_SHAPES: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(?:bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}|\bsk-[A-Za-z0-9_-]{8,}|\bAIza[0-9A-Za-z_-]{30,}|\bAKIA[0-9A-Z]{16}\b")
        .unwrap_or_else(|err| unreachable!("the key pattern is a constant and valid: {err}"))
});

/// What stands where a secret was.
pub const MASK: &str = "[secret]";

/// `text` with every value of `secrets` (configured keys; empty ones are skipped) and anything
/// shaped like a key masked.
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut scrubbed = text.to_owned();
    for secret in secrets.iter().filter(|secret| secret.len() >= 4) {
        if scrubbed.contains(*secret) {
            scrubbed = scrubbed.replace(*secret, MASK);
        }
    }
    match KEY_SHAPES.is_match(&scrubbed) {
        true => KEY_SHAPES.replace_all(&scrubbed, MASK).into_owned(),
        false => scrubbed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_tokens_are_masked_and_the_rest_stays() {
        let echoed = "Incorrect API key provided: sk-proj-abcDEF123456789. You can find your key at ...";
        assert_eq!(scrub(echoed, &[]), "Incorrect API key provided: [secret]. You can find your key at ...");
        assert_eq!(scrub("header was Bearer abc.def-ghi_jkl", &[]), "header was [secret]");
        assert_eq!(scrub("sk-ant-api03-XYZxyz0123456789", &[]), "[secret]");
        assert_eq!(scrub("the key is hunter2-custom", &["hunter2-custom"]), "the key is [secret]");
        assert_eq!(scrub("rate limit reached for sk-1 model", &[]), "rate limit reached for sk-1 model");
        assert_eq!(scrub("Rate limit reached for requests", &["", "ab"]), "Rate limit reached for requests");
    }
}
