//! OTLP/HTTP with protobuf: where the spans go (the config, else OpenTelemetry's standard
//! `OTEL_EXPORTER_OTLP_*` variables) and their encoding, written straight from the engine's
//! spans into one buffer per batch.
//!
//! Encoding here rather than through `opentelemetry-otlp`: that exporter takes the SDK's span
//! data and converts it to the generated protobuf types before it encodes, two copies of every
//! attribute and several allocations each, and on the gateway's two cores that cost about 10 us
//! per call on the export thread, most of export's share of throughput (docs/benchmarks.md,
//! "Traces over OTLP"). The field numbers are those of `opentelemetry/proto/trace/v1` and
//! `collector/trace/v1`; the tests decode what this writes with the `opentelemetry-proto`
//! crate's generated types.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use pipeline_core::telemetry::{AttributeValue, FinishedSpan, SpanKind};
use prost::bytes::BufMut as _;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// How long an export may take when no variable says, as OpenTelemetry's SDKs default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Where a collector listens when nothing names one, as OpenTelemetry's SDKs default.
const DEFAULT_ENDPOINT: &str = "http://localhost:4318/v1/traces";

/// Where and how batches are sent.
#[derive(Debug, Clone)]
pub(super) struct Destination {
    pub(super) url: reqwest::Url,
    /// Sent with every export (a collector's API key, say): never logged.
    pub(super) headers: HeaderMap,
    pub(super) timeout: Duration,
}

impl Destination {
    /// The config's endpoint, else the standard variables (`var` reads one), as OpenTelemetry's
    /// SDKs read them: the signal's own variable over the general one.
    pub(super) fn resolve(configured: Option<&str>, var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let var = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        for name in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
            if let Some(protocol) = var(name)
                && protocol.trim() != "http/protobuf"
            {
                anyhow::bail!(
                    "{name}: `{}` is not supported: aipipe exports OTLP over HTTP with protobuf \
                     (`http/protobuf`); unset it or point it at a collector's HTTP port",
                    protocol.trim()
                );
            }
        }
        for name in ["OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"] {
            if let Some(compression) = var(name)
                && compression.trim() != "none"
            {
                anyhow::bail!(
                    "{name}: `{}` is not supported: aipipe sends spans uncompressed; unset it",
                    compression.trim()
                );
            }
        }
        let url = match (configured, var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) {
            (Some(configured), _) => traces_path(configured),
            // The signal's own endpoint is used as it is.
            (None, Some(endpoint)) => endpoint.trim().to_owned(),
            (None, None) => var("OTEL_EXPORTER_OTLP_ENDPOINT")
                .map_or_else(|| DEFAULT_ENDPOINT.to_owned(), |endpoint| traces_path(endpoint.trim())),
        };
        let url = reqwest::Url::parse(&url)
            .with_context(|| format!("the OTLP endpoint `{url}` is not a URL (telemetry.otlp_endpoint)"))?;
        let mut headers = HeaderMap::new();
        for name in ["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"] {
            if let Some(list) = var(name) {
                for (key, value) in parse_headers(name, &list)? {
                    headers.insert(key, value);
                }
            }
        }
        let timeout = match var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
            .map(|value| ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", value))
            .or_else(|| var("OTEL_EXPORTER_OTLP_TIMEOUT").map(|value| ("OTEL_EXPORTER_OTLP_TIMEOUT", value)))
        {
            None => DEFAULT_TIMEOUT,
            Some((name, value)) => match value.trim().parse::<u64>() {
                Ok(millis) if millis > 0 => Duration::from_millis(millis),
                _ => anyhow::bail!("{name}: `{}` is not a positive whole number of milliseconds", value.trim()),
            },
        };
        Ok(Self { url, headers, timeout })
    }
}

/// As OTEL_EXPORTER_OTLP_ENDPOINT is read: the collector's base URL, the signal's path added.
fn traces_path(endpoint: &str) -> String {
    let endpoint = endpoint.trim_end_matches('/');
    if endpoint.ends_with("/v1/traces") { endpoint.to_owned() } else { format!("{endpoint}/v1/traces") }
}

/// `key1=value1,key2=value2`, values percent-encoded, as the OTLP exporter variables are
/// written. Errors name the variable and the entry's position, never a value (they hold keys).
fn parse_headers(variable: &str, list: &str) -> anyhow::Result<Vec<(HeaderName, HeaderValue)>> {
    let mut headers = Vec::new();
    for (position, entry) in list.split(',').enumerate().filter(|(_, entry)| !entry.trim().is_empty()) {
        let invalid =
            || format!("{variable}: entry {} is not `name=value` with a valid header name and value", position + 1);
        let (name, value) = entry.split_once('=').with_context(invalid)?;
        let name = HeaderName::from_bytes(name.trim().as_bytes()).with_context(invalid)?;
        let mut value = HeaderValue::from_bytes(&percent_decoded(value.trim())).with_context(invalid)?;
        value.set_sensitive(true);
        headers.push((name, value));
    }
    Ok(headers)
}

fn percent_decoded(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let hex = bytes.get(at + 1..at + 3).and_then(|pair| std::str::from_utf8(pair).ok());
        match (bytes[at], hex.and_then(|pair| u8::from_str_radix(pair, 16).ok())) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                at += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                at += 1;
            }
        }
    }
    decoded
}

/// An `ExportTraceServiceRequest` in the making: the resource and scope encoded once, the
/// batch's spans appended as they come.
pub(super) struct Encoder {
    resource: Vec<u8>,
    scope: Vec<u8>,
    spans: Vec<u8>,
    /// One span's fields, before their length is known.
    span: Vec<u8>,
}

impl Encoder {
    pub(super) fn new(resource: &[(String, AttributeValue)], scope_name: &str, scope_version: &str) -> Self {
        let mut encoded_resource = Vec::new();
        for (key, value) in resource {
            put_attribute(&mut encoded_resource, 1, key, value);
        }
        let mut scope = Vec::new();
        put_text(&mut scope, 1, scope_name);
        put_text(&mut scope, 2, scope_version);
        Self { resource: encoded_resource, scope, spans: Vec::new(), span: Vec::new() }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    pub(super) fn push(&mut self, span: &FinishedSpan) {
        let fields = &mut self.span;
        fields.clear();
        put_bytes(fields, 1, &span.trace_id.to_bytes());
        put_bytes(fields, 2, &span.id.to_bytes());
        if let Some(parent) = span.parent {
            put_bytes(fields, 4, &parent.id.to_bytes());
        }
        put_text(fields, 5, span.name);
        let kind = match span.kind {
            SpanKind::Internal => 1,
            SpanKind::Server => 2,
            SpanKind::Client => 3,
        };
        encode_key(6, WireType::Varint, fields);
        encode_varint(kind, fields);
        encode_key(7, WireType::SixtyFourBit, fields);
        fields.put_u64_le(unix_nanos(span.start));
        encode_key(8, WireType::SixtyFourBit, fields);
        fields.put_u64_le(unix_nanos(span.end));
        for (key, value) in &span.attributes {
            put_attribute(fields, 9, key, value);
        }
        if span.failed {
            // Status { code: STATUS_CODE_ERROR }
            put_length(fields, 15, 2);
            encode_key(3, WireType::Varint, fields);
            encode_varint(2, fields);
        }
        // Sampled, and whether the parent is remote (SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK,
        // SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK).
        let remote = span.parent.is_some_and(|parent| parent.remote);
        encode_key(16, WireType::ThirtyTwoBit, fields);
        fields.put_u32_le(0x01 | 0x100 | if remote { 0x200 } else { 0 });
        // ScopeSpans.spans
        put_length(&mut self.spans, 2, self.span.len());
        self.spans.extend_from_slice(&self.span);
    }

    /// The request's bytes; the encoder is empty again afterwards.
    pub(super) fn finish(&mut self) -> Vec<u8> {
        let scope_spans = field_len(1, self.scope.len()) + self.spans.len();
        let resource_spans = field_len(1, self.resource.len()) + field_len(2, scope_spans);
        let mut request = Vec::with_capacity(field_len(1, resource_spans));
        // ExportTraceServiceRequest.resource_spans
        put_length(&mut request, 1, resource_spans);
        // ResourceSpans.resource
        put_length(&mut request, 1, self.resource.len());
        request.extend_from_slice(&self.resource);
        // ResourceSpans.scope_spans
        put_length(&mut request, 2, scope_spans);
        // ScopeSpans.scope
        put_length(&mut request, 1, self.scope.len());
        request.extend_from_slice(&self.scope);
        request.extend_from_slice(&self.spans);
        self.spans.clear();
        request
    }
}

fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
}

/// The size of a length-delimited field of `len` bytes, key and length included.
fn field_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn put_length(buffer: &mut Vec<u8>, tag: u32, len: usize) {
    encode_key(tag, WireType::LengthDelimited, buffer);
    encode_varint(len as u64, buffer);
}

fn put_bytes(buffer: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    put_length(buffer, tag, bytes.len());
    buffer.extend_from_slice(bytes);
}

fn put_text(buffer: &mut Vec<u8>, tag: u32, text: &str) {
    put_bytes(buffer, tag, text.as_bytes());
}

/// A `KeyValue` as field `tag`.
fn put_attribute(buffer: &mut Vec<u8>, tag: u32, key: &str, value: &AttributeValue) {
    // AnyValue: string_value = 1, bool_value = 2, int_value = 3, double_value = 4.
    let value_len = match value {
        AttributeValue::Text(text) => field_len(1, text.len()),
        AttributeValue::Bool(_) => key_len(2) + 1,
        AttributeValue::Int(number) => key_len(3) + encoded_len_varint(*number as u64),
        AttributeValue::Float(_) => key_len(4) + 8,
    };
    put_length(buffer, tag, field_len(1, key.len()) + field_len(2, value_len));
    put_text(buffer, 1, key);
    put_length(buffer, 2, value_len);
    match value {
        AttributeValue::Text(text) => put_text(buffer, 1, text),
        AttributeValue::Bool(flag) => {
            encode_key(2, WireType::Varint, buffer);
            encode_varint(u64::from(*flag), buffer);
        }
        AttributeValue::Int(number) => {
            encode_key(3, WireType::Varint, buffer);
            // Protobuf's int64: two's complement, as a varint.
            encode_varint(*number as u64, buffer);
        }
        AttributeValue::Float(number) => {
            encode_key(4, WireType::SixtyFourBit, buffer);
            buffer.put_f64_le(*number);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use pipeline_core::telemetry::{ParentSpan, SpanId, W3cTraceId};
    use prost::Message as _;

    use super::*;

    #[test]
    fn what_the_encoder_writes_decodes_as_an_otlp_export_request() {
        let trace_id = W3cTraceId::of("4bf92f3577b34da6a3ce929d0e0e4736");
        let (call, parent) = (SpanId::random(), SpanId::random());
        let start = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let span = FinishedSpan {
            trace_id,
            id: call,
            parent: Some(ParentSpan { id: parent, remote: true }),
            name: "gateway.request",
            kind: SpanKind::Server,
            start,
            end: start + Duration::from_micros(250),
            attributes: vec![
                ("text", "a".repeat(200).into()),
                ("negative", AttributeValue::Int(-3)),
                ("ratio", 0.25.into()),
                ("flag", true.into()),
            ],
            failed: true,
        };
        let resource = [("service.name".to_owned(), AttributeValue::from("aipipe"))];
        let mut encoder = Encoder::new(&resource, "aipipe", "1.2.3");
        for _ in 0..3 {
            encoder.push(&span);
        }
        let request = ExportTraceServiceRequest::decode(encoder.finish().as_slice()).unwrap();
        assert!(encoder.is_empty(), "finishing empties the encoder");
        let [resource_spans] = request.resource_spans.as_slice() else { panic!("one resource") };
        let resource = resource_spans.resource.as_ref().unwrap();
        assert_eq!(resource.attributes[0].key, "service.name");
        let [scope_spans] = resource_spans.scope_spans.as_slice() else { panic!("one scope") };
        let scope = scope_spans.scope.as_ref().unwrap();
        assert_eq!((scope.name.as_str(), scope.version.as_str()), ("aipipe", "1.2.3"));
        assert_eq!(scope_spans.spans.len(), 3);
        let decoded = &scope_spans.spans[2];
        assert_eq!(decoded.trace_id, trace_id.to_bytes());
        assert_eq!(decoded.span_id, call.to_bytes());
        assert_eq!(decoded.parent_span_id, parent.to_bytes());
        assert_eq!(decoded.name, "gateway.request");
        assert_eq!(decoded.kind, 2, "server");
        assert_eq!(decoded.start_time_unix_nano, 1_700_000_000_123_456_789);
        assert_eq!(decoded.end_time_unix_nano - decoded.start_time_unix_nano, 250_000);
        assert_eq!(decoded.status.as_ref().unwrap().code, 2, "error");
        assert_eq!(decoded.flags, 0x301, "sampled, with a remote parent");
        let attributes: HashMap<&str, Value> =
            decoded.attributes.iter().map(|kv| (kv.key.as_str(), kv.value.clone().unwrap().value.unwrap())).collect();
        assert_eq!(attributes["text"], Value::StringValue("a".repeat(200)));
        assert_eq!(attributes["negative"], Value::IntValue(-3));
        assert_eq!(attributes["ratio"], Value::DoubleValue(0.25));
        assert_eq!(attributes["flag"], Value::BoolValue(true));
    }

    #[test]
    fn the_destination_follows_the_config_then_the_standard_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(key, _)| *key == name).map(|(_, value)| (*value).to_owned())
        };
        let configured = Destination::resolve(
            Some("http://collector:4318/"),
            vars(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://other:4318/v1/traces")]),
        )
        .unwrap();
        assert_eq!(configured.url.as_str(), "http://collector:4318/v1/traces");
        assert_eq!(configured.timeout, DEFAULT_TIMEOUT);
        let from_env = Destination::resolve(
            None,
            vars(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://agent:4318"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=secret%3D1,x-team=a"),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-team=b"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ]),
        )
        .unwrap();
        assert_eq!(from_env.url.as_str(), "http://agent:4318/v1/traces");
        assert_eq!(from_env.headers["x-api-key"], "secret=1");
        assert_eq!(from_env.headers["x-team"], "b", "the signal's own variable wins");
        assert_eq!(from_env.timeout, Duration::from_millis(2_500));
        let signal = Destination::resolve(
            None,
            vars(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://agent:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:9999/custom"),
            ]),
        )
        .unwrap();
        assert_eq!(signal.url.as_str(), "http://traces:9999/custom", "used as it is");
        assert_eq!(Destination::resolve(None, vars(&[])).unwrap().url.as_str(), DEFAULT_ENDPOINT);
    }

    #[test]
    fn a_bad_variable_is_named_and_a_header_value_never_shown() {
        let error = |pairs: &'static [(&'static str, &'static str)]| {
            let var =
                move |name: &str| pairs.iter().find(|(key, _)| *key == name).map(|(_, value)| (*value).to_owned());
            format!("{:#}", Destination::resolve(None, var).unwrap_err())
        };
        let protocol = error(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]);
        assert!(protocol.starts_with("OTEL_EXPORTER_OTLP_PROTOCOL: `grpc`"), "{protocol}");
        let compression = error(&[("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")]);
        assert!(compression.starts_with("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION: `gzip`"), "{compression}");
        let timeout = error(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")]);
        assert!(timeout.starts_with("OTEL_EXPORTER_OTLP_TIMEOUT: `10s`"), "{timeout}");
        let headers = error(&[("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer sk-live-1234\u{1},x-team=a")]);
        assert!(headers.starts_with("OTEL_EXPORTER_OTLP_HEADERS: entry 1"), "{headers}");
        assert!(!headers.contains("sk-live"), "{headers}");
    }
}
