//! A call's spans as plain data: when each stage began and ended, under which parent, with
//! which attributes, for an exporter to send on (aipipe's is OTLP). Measuring a stage costs
//! two clock reads and a push; turning spans into a wire format happens off the call's path,
//! on the exporter's side of [`SpanSink`].

use std::borrow::Cow;
use std::fmt;
use std::hash::{Hash as _, Hasher as _};
use std::num::NonZeroU64;
use std::time::SystemTime;

/// The 16-byte id of a W3C trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct W3cTraceId([u8; 16]);

impl W3cTraceId {
    /// The trace of a call whose id is `id`: the id itself when it is 32 hex digits (as the
    /// engine makes them, and as a `traceparent` carries them), else one derived from it, so
    /// that the calls a caller groups under one id of its own share one trace.
    pub fn of(id: &str) -> Self {
        if let Some(parsed) = Self::parse_hex(id) {
            return parsed;
        }
        let mut bytes = [0; 16];
        for (half, salt) in bytes.chunks_exact_mut(8).zip(["aipipe.trace.high", "aipipe.trace.low"]) {
            let mut hasher = std::hash::DefaultHasher::new();
            (salt, id).hash(&mut hasher);
            half.copy_from_slice(&hasher.finish().to_be_bytes());
        }
        // The all-zero id is invalid in W3C trace context.
        if bytes == [0; 16] {
            bytes[15] = 1;
        }
        Self(bytes)
    }

    /// `None` for the invalid all-zero id.
    pub fn from_bytes(bytes: [u8; 16]) -> Option<Self> {
        (bytes != [0; 16]).then_some(Self(bytes))
    }

    /// The id `id` spells in 32 hex digits, if it does and is not the invalid all-zero id.
    pub fn parse_hex(id: &str) -> Option<Self> {
        // Digits only: `from_str_radix` would take a sign.
        if id.len() != 32 || !id.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return None;
        }
        let mut bytes = [0; 16];
        for (byte, pair) in bytes.iter_mut().zip(id.as_bytes().chunks_exact(2)) {
            *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Self::from_bytes(bytes)
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }
}

impl fmt::Display for W3cTraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

/// The 8-byte id of one span; never zero (the invalid id in W3C trace context).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(NonZeroU64);

impl SpanId {
    pub fn random() -> Self {
        loop {
            if let Some(id) = NonZeroU64::new(rand::random()) {
                return Self(id);
            }
        }
    }

    /// `None` for the invalid all-zero id.
    pub fn from_bytes(bytes: [u8; 8]) -> Option<Self> {
        NonZeroU64::new(u64::from_be_bytes(bytes)).map(Self)
    }

    pub fn to_bytes(self) -> [u8; 8] {
        self.0.get().to_be_bytes()
    }
}

/// Where a span sits in an exchange, as OpenTelemetry's span kinds say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// A request this process serves.
    Server,
    /// A request this process sends.
    Client,
    /// Work inside this process.
    Internal,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttributeValue {
    Text(Cow<'static, str>),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl From<&'static str> for AttributeValue {
    fn from(text: &'static str) -> Self {
        Self::Text(Cow::Borrowed(text))
    }
}

impl From<String> for AttributeValue {
    fn from(text: String) -> Self {
        Self::Text(Cow::Owned(text))
    }
}

impl From<i64> for AttributeValue {
    fn from(number: i64) -> Self {
        Self::Int(number)
    }
}

impl From<u32> for AttributeValue {
    fn from(number: u32) -> Self {
        Self::Int(i64::from(number))
    }
}

impl From<f64> for AttributeValue {
    fn from(number: f64) -> Self {
        Self::Float(number)
    }
}

impl From<bool> for AttributeValue {
    fn from(flag: bool) -> Self {
        Self::Bool(flag)
    }
}

/// The span a span continues: one of this process's, or the caller's (from its
/// `traceparent`), whose sampling decision the trace follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParentSpan {
    pub id: SpanId,
    pub remote: bool,
}

/// One span, ended.
#[derive(Debug, Clone)]
pub struct FinishedSpan {
    pub trace_id: W3cTraceId,
    pub id: SpanId,
    pub parent: Option<ParentSpan>,
    /// Names are fixed by the code (`aipipe.call`, `upstream.attempt`): a bounded set, as a
    /// trace backend's span-name index wants.
    pub name: &'static str,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, AttributeValue)>,
    /// The span's work failed (OpenTelemetry's status `Error`; `error.type` says why).
    pub failed: bool,
}

/// Where finished spans go when traces are exported. `export` must not block: a call hands
/// its spans over on its way out.
pub trait SpanSink: Send + Sync + fmt::Debug {
    /// Whether a trace's spans are exported, decided once where the trace enters this
    /// process: by the caller's `traceparent` flag (`parent_sampled`) or, for a trace that
    /// starts here, by the sampler.
    fn samples(&self, trace_id: W3cTraceId, parent_sampled: Option<bool>) -> bool;

    fn export(&self, spans: Vec<FinishedSpan>);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hex_trace_id_is_kept_and_any_other_is_derived_the_same_way_every_time() {
        let hex = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(W3cTraceId::of(hex).to_string(), hex);
        assert_eq!(W3cTraceId::of("order-1234"), W3cTraceId::of("order-1234"));
        assert_ne!(W3cTraceId::of("order-1234"), W3cTraceId::of("order-1235"));
        assert_ne!(W3cTraceId::of(&"0".repeat(32)).to_bytes(), [0; 16], "never the invalid id");
        assert_eq!(W3cTraceId::parse_hex(&"0".repeat(32)), None);
        assert_eq!(W3cTraceId::parse_hex("+bf92f3577b34da6a3ce929d0e0e4736"), None, "hex digits only");
        let id = SpanId::random();
        assert_eq!(SpanId::from_bytes(id.to_bytes()), Some(id));
        assert_eq!(SpanId::from_bytes([0; 8]), None);
    }
}
