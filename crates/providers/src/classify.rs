//! The one place that decides what a failed upstream call was.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

use crate::{DeclaredLimits, LimitWindow, ProviderError, scrub};

/// Longest error body we keep in a message; upstream error pages can be large HTML.
const MAX_MESSAGE_CHARS: usize = 500;

/// Classifies a non-2xx HTTP answer from any provider: OpenAI-compatible servers answer
/// `{"error": {"message", "type", "code"}}`, Anthropic `{"type": "error", "error": {"type",
/// "message"}}`; both are read.
///
/// A 429 is a rate limit unless the body says a quota or spend limit is exhausted (OpenAI's
/// `insufficient_quota`, Anthropic's "usage limits"): the first goes away by waiting, the
/// second does not, so retries and breakers must tell them apart. Anthropic's 529
/// (`overloaded_error`) is a server fault like any 5xx. A 400 that says the prompt does not
/// fit the model's context window is apart from other bad requests: a larger model may take it.
pub fn classify_http_failure(status: u16, headers: &HeaderMap, body: &[u8], now: SystemTime) -> ProviderError {
    let (message, code) = error_message_and_code(body);
    let retry_after = parse_retry_after(headers, now);
    let quota = code.as_deref().is_some_and(is_quota_code) || says_quota(&message);
    match status {
        429 if quota => ProviderError::QuotaExhausted { message },
        429 => ProviderError::RateLimited { retry_after, message },
        402 => ProviderError::QuotaExhausted { message },
        401 | 403 => ProviderError::Unauthorized { status, message },
        408 => ProviderError::Timeout { after: Duration::ZERO },
        500..=599 => ProviderError::ServerError { status, message, retry_after },
        400 | 413 if code.as_deref() == Some("context_length_exceeded") || says_context_length(&message) => {
            ProviderError::ContextLength { message }
        }
        _ => ProviderError::BadRequest { status, message },
    }
}

fn is_quota_code(code: &str) -> bool {
    matches!(code, "insufficient_quota" | "billing_hard_limit_reached" | "quota_exceeded" | "billing_error")
}

/// Anthropic says an exhausted spend limit or credit in words, under `rate_limit_error`.
fn says_quota(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    ["usage limit", "spend limit", "credit balance"].iter().any(|words| message.contains(words))
}

/// The words OpenAI-compatible servers (OpenAI, vLLM, llama.cpp) and Anthropic use when a
/// prompt does not fit the context window.
fn says_context_length(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    ["maximum context length", "context window", "context length", "prompt is too long", "exceeds the context"]
        .iter()
        .any(|words| message.contains(words))
}

/// A request that got no HTTP answer: it timed out, the body broke off, or the connection
/// failed (with the cause that tells a person what is wrong).
pub(crate) fn transport_failure(err: &reqwest::Error, timeout: Duration) -> ProviderError {
    if err.is_timeout() {
        ProviderError::Timeout { after: timeout }
    } else if err.is_decode() || err.is_body() {
        ProviderError::MalformedReply { message: error_chain(err) }
    } else {
        ProviderError::Connection { message: error_chain(err) }
    }
}

/// reqwest's top-level message ("error sending request") hides the cause that tells a person
/// what is wrong ("connection refused"). The URL it names is left out: an upstream's address
/// (often an internal one) is the operator's to know, not a caller's.
fn error_chain(err: &reqwest::Error) -> String {
    let mut message = err.to_string();
    if let Some(url) = err.url() {
        message = message.replace(&format!(" for url ({url})"), "").replace(url.as_str(), "the upstream");
    }
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The upstream's own words, from the `error` object of OpenAI's or Anthropic's shape when it
/// is there, else the start of the body; and its code (OpenAI's `code`, Anthropic's `type`).
fn error_message_and_code(body: &[u8]) -> (String, Option<String>) {
    let text = String::from_utf8_lossy(body);
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        let error = value.get("error").unwrap_or(&value);
        let message = error.get("message").and_then(|m| m.as_str()).map(str::to_owned);
        let code = ["code", "type"]
            .iter()
            .filter_map(|field| error.get(*field).and_then(|c| c.as_str()))
            .find(|c| is_quota_code(c))
            .or_else(|| error.get("code").and_then(|c| c.as_str()))
            .map(str::to_owned);
        if let Some(message) = message {
            return (truncate(&message), code);
        }
        return (truncate(&text), code);
    }
    (truncate(&text), None)
}

/// Upstream text as it may be kept: secrets masked (before cutting, so that no half key is left
/// to slip past the mask), then cut to a readable length.
pub(crate) fn truncate(text: &str) -> String {
    let scrubbed = scrub(text.trim(), &[]);
    match scrubbed.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}...", &scrubbed[..cut]),
        None if scrubbed.is_empty() => "(empty body)".to_owned(),
        None => scrubbed,
    }
}

/// How long the upstream asked us to wait: `retry-after-ms` (OpenAI's, precise) first, then
/// `retry-after` as seconds or as an HTTP date.
pub fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = header_str(headers, "retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return duration_from_secs(ms / 1000.0);
    }
    let value = header_str(headers, "retry-after")?.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return duration_from_secs(secs);
    }
    let at = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    let now = jiff::Timestamp::try_from(now).ok()?;
    let wait = now.until(at).ok()?.total(jiff::Unit::Millisecond).ok()?;
    duration_from_secs(wait.max(0.0) / 1000.0)
}

/// The rate limits an upstream declares in its response headers: OpenAI's
/// `x-ratelimit-{limit,remaining}-{requests,tokens}` or Anthropic's
/// `anthropic-ratelimit-{requests,tokens}-{limit,remaining}`. `None` when it declares none.
pub fn declared_limits(headers: &HeaderMap) -> Option<DeclaredLimits> {
    let number = |name: &str| header_str(headers, name).and_then(|value| value.trim().parse::<u64>().ok());
    let window = |kind: &str| {
        let openai = (number(&format!("x-ratelimit-limit-{kind}")), number(&format!("x-ratelimit-remaining-{kind}")));
        let anthropic = (
            number(&format!("anthropic-ratelimit-{kind}-limit")),
            number(&format!("anthropic-ratelimit-{kind}-remaining")),
        );
        match (openai, anthropic) {
            ((Some(limit), Some(remaining)), _) | (_, (Some(limit), Some(remaining))) => {
                Some(LimitWindow { limit, remaining: remaining.min(limit) })
            }
            _ => None,
        }
    };
    let declared = DeclaredLimits { requests: window("requests"), tokens: window("tokens") };
    (declared != DeclaredLimits::default()).then_some(declared)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn duration_from_secs(secs: f64) -> Option<Duration> {
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorClass;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn rate_limit_and_quota_are_different_429s() {
        let now = SystemTime::now();
        let limited = classify_http_failure(
            429,
            &headers(&[("retry-after", "2")]),
            br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
            now,
        );
        assert_eq!(limited.class(), ErrorClass::RateLimited);
        assert_eq!(limited.retry_after(), Some(Duration::from_secs(2)));
        assert!(limited.is_retryable());

        let quota = classify_http_failure(
            429,
            &HeaderMap::new(),
            br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#,
            now,
        );
        assert_eq!(quota.class(), ErrorClass::QuotaExhausted);
        assert!(!quota.is_retryable());
        assert!(!quota.class().is_upstream_fault());
    }

    #[test]
    fn statuses_map_to_classes() {
        let now = SystemTime::now();
        let class = |status| classify_http_failure(status, &HeaderMap::new(), b"<html>oops</html>", now).class();
        assert_eq!(class(500), ErrorClass::ServerError);
        assert_eq!(class(503), ErrorClass::ServerError);
        assert_eq!(class(400), ErrorClass::BadRequest);
        assert_eq!(class(401), ErrorClass::Unauthorized);
        assert_eq!(class(408), ErrorClass::Timeout);
        assert!(!ErrorClass::BadRequest.is_upstream_fault());
        assert!(ErrorClass::ServerError.is_upstream_fault());
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after(&headers(&[("retry-after-ms", "1500")]), now), Some(Duration::from_millis(1500)));
        assert_eq!(parse_retry_after(&headers(&[("retry-after", "0.5")]), now), Some(Duration::from_millis(500)));
        // 1_700_000_000 is Tue, 14 Nov 2023 22:13:20 GMT.
        assert_eq!(
            parse_retry_after(&headers(&[("retry-after", "Tue, 14 Nov 2023 22:13:30 GMT")]), now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(parse_retry_after(&headers(&[("retry-after", "soon")]), now), None);
        assert_eq!(parse_retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn declared_limits_in_either_vendors_headers() {
        let openai = headers(&[
            ("x-ratelimit-limit-requests", "600"),
            ("x-ratelimit-remaining-requests", "598"),
            ("x-ratelimit-limit-tokens", "150000"),
            ("x-ratelimit-remaining-tokens", "149000"),
        ]);
        let declared = declared_limits(&openai).unwrap();
        assert_eq!(declared.requests, Some(LimitWindow { limit: 600, remaining: 598 }));
        assert_eq!(declared.tokens, Some(LimitWindow { limit: 150_000, remaining: 149_000 }));
        let anthropic =
            headers(&[("anthropic-ratelimit-requests-limit", "50"), ("anthropic-ratelimit-requests-remaining", "49")]);
        assert_eq!(declared_limits(&anthropic).unwrap().requests, Some(LimitWindow { limit: 50, remaining: 49 }));
        assert_eq!(declared_limits(&HeaderMap::new()), None);
        assert_eq!(declared_limits(&headers(&[("x-ratelimit-limit-requests", "soon")])), None);
    }

    #[test]
    fn anthropic_errors_classify_like_openai_ones() {
        let now = SystemTime::now();
        let anthropic = |kind: &str, message: &str| {
            serde_json::json!({"type": "error", "error": {"type": kind, "message": message}}).to_string()
        };
        let overloaded =
            classify_http_failure(529, &HeaderMap::new(), anthropic("overloaded_error", "Overloaded").as_bytes(), now);
        assert_eq!(overloaded.class(), ErrorClass::ServerError);
        assert_eq!(overloaded.to_string(), "upstream server error 529: Overloaded");
        let limited = classify_http_failure(
            429,
            &headers(&[("retry-after", "3")]),
            anthropic("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit")
                .as_bytes(),
            now,
        );
        assert_eq!(limited.class(), ErrorClass::RateLimited);
        assert_eq!(limited.retry_after(), Some(Duration::from_secs(3)));
        let spend = classify_http_failure(
            429,
            &headers(&[("retry-after", "3600")]),
            anthropic("rate_limit_error", "You have reached your specified workspace API usage limits.").as_bytes(),
            now,
        );
        assert_eq!(spend.class(), ErrorClass::QuotaExhausted);
        assert!(!spend.is_retryable());
        let too_long = classify_http_failure(
            400,
            &HeaderMap::new(),
            anthropic("invalid_request_error", "prompt is too long: 210034 tokens > 200000 maximum").as_bytes(),
            now,
        );
        assert_eq!(too_long.class(), ErrorClass::ContextLength);
        assert!(too_long.class().falls_through() && !too_long.is_retryable());
        let openai_too_long = classify_http_failure(
            400,
            &HeaderMap::new(),
            br#"{"error":{"message":"This model's maximum context length is 8192 tokens.","type":"invalid_request_error","code":"context_length_exceeded"}}"#,
            now,
        );
        assert_eq!(openai_too_long.class(), ErrorClass::ContextLength);
        let wrong = classify_http_failure(
            400,
            &HeaderMap::new(),
            anthropic("invalid_request_error", "messages: field required").as_bytes(),
            now,
        );
        assert_eq!(wrong.class(), ErrorClass::BadRequest);
        assert!(!wrong.class().falls_through());
    }

    #[test]
    fn long_bodies_are_cut() {
        let body = "x".repeat(10_000);
        let err = classify_http_failure(500, &HeaderMap::new(), body.as_bytes(), SystemTime::now());
        assert!(err.to_string().len() < 700);
    }
}
