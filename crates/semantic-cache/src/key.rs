use std::fmt;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// A SHA-256 over the canonical form of everything that changes an answer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    pub fn builder() -> CacheKeyBuilder {
        CacheKeyBuilder { hasher: Sha256::new() }
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", &hex::encode(&self.0[..8]))
    }
}

/// Feeds named fields into the key. Each field is length-prefixed, so `("ab", "c")` and
/// `("a", "bc")` never collide.
#[derive(Debug, Clone)]
pub struct CacheKeyBuilder {
    hasher: Sha256,
}

impl CacheKeyBuilder {
    pub fn text(mut self, name: &str, value: &str) -> Self {
        self.feed(name.as_bytes());
        self.feed(value.as_bytes());
        self
    }

    /// A JSON value in canonical form (see [`canonical_json`]).
    pub fn json(self, name: &str, value: &Value) -> Self {
        let canonical = canonical_json(value);
        self.text(name, &canonical)
    }

    pub fn build(self) -> CacheKey {
        CacheKey(self.hasher.finalize().into())
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.hasher.update((bytes.len() as u64).to_le_bytes());
        self.hasher.update(bytes);
    }
}

/// JSON with object keys sorted and every string trimmed with inner whitespace runs folded to
/// one space, so that inputs differing only in key order or spacing share a key.
///
/// Key order is sorted here rather than trusted to `serde_json::Map`, whose order depends on
/// whether any crate in the build enabled `preserve_order`.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::String(text) => {
            let folded = text.split_whitespace().collect::<Vec<_>>().join(" ");
            out.push_str(&Value::String(folded).to_string());
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_and_spacing_do_not_matter() {
        let a = json!({"text": "  Hello   world ", "labels": ["a", "b"]});
        let b = json!({"labels": ["a", "b"], "text": "Hello world"});
        assert_eq!(canonical_json(&a), canonical_json(&b));
        let key = |v: &Value| CacheKey::builder().text("workspace", "w").json("input", v).build();
        assert_eq!(key(&a), key(&b));
    }

    #[test]
    fn content_case_and_array_order_matter() {
        assert_ne!(canonical_json(&json!({"t": "Hello"})), canonical_json(&json!({"t": "hello"})));
        assert_ne!(canonical_json(&json!(["a", "b"])), canonical_json(&json!(["b", "a"])));
    }

    #[test]
    fn fields_are_length_prefixed() {
        let one = CacheKey::builder().text("a", "bc").build();
        let two = CacheKey::builder().text("ab", "c").build();
        assert_ne!(one, two);
    }
}
