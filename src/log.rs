//! The call log that `aipipe replay` reads: one JSON object per line (docs/log-format.md).

use std::io::BufRead;
use std::time::{Duration, SystemTime};

use pipeline_core::StepType;
use pipeline_core::providers::{ErrorClass, ProviderError, RecordedCall, RecordedReply, Usage};
use serde::Deserialize;
use serde_json::Value;

/// One logged AI call, checked.
#[derive(Debug, Clone)]
pub struct LoggedCall {
    pub at: SystemTime,
    pub trace_id: String,
    pub component: String,
    pub step: StepType,
    pub workspace: String,
    pub model: String,
    pub input: Value,
    pub outcome: Result<String, LoggedError>,
    pub usage: Usage,
    pub latency: Duration,
}

#[derive(Debug, Clone)]
pub struct LoggedError {
    pub class: ErrorClass,
    pub status: Option<u16>,
    pub retry_after: Option<Duration>,
    pub message: String,
}

/// A line that could not be used, and why, in words that say what to fix.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BadLine {
    pub line: usize,
    pub reason: String,
}

#[derive(Debug, Deserialize)]
struct RawLine {
    ts: String,
    trace_id: Option<String>,
    component: String,
    step: String,
    workspace: String,
    model: String,
    input: Value,
    response: Option<String>,
    error: Option<RawError>,
    #[serde(default)]
    usage: RawUsage,
    latency_ms: f64,
}

#[derive(Debug, Default, Deserialize)]
struct RawUsage {
    input_tokens: u32,
    output_tokens: u32,
}

#[derive(Debug, Deserialize)]
struct RawError {
    class: String,
    status: Option<u16>,
    retry_after_ms: Option<u64>,
    #[serde(default)]
    message: String,
}

/// Reads every line; good ones become calls, the rest are reported with their line number.
/// Blank lines are neither.
pub fn read_log(reader: impl BufRead) -> std::io::Result<(Vec<LoggedCall>, Vec<BadLine>)> {
    let mut calls: Vec<LoggedCall> = Vec::new();
    let mut bad = Vec::new();
    let mut seen_trace_ids = std::collections::HashMap::new();
    for (index, bytes) in reader.split(b'\n').enumerate() {
        let line = index + 1;
        let bytes = bytes?;
        let Ok(text) = std::str::from_utf8(&bytes) else {
            bad.push(BadLine { line, reason: "not valid UTF-8: the log must be UTF-8 text".into() });
            continue;
        };
        if text.trim().is_empty() {
            continue;
        }
        match parse_line(line, text) {
            Ok(call) => match seen_trace_ids.insert(call.trace_id.clone(), line) {
                Some(first) => bad.push(BadLine {
                    line,
                    reason: format!(
                        "trace_id `{}` was already used on line {first}: trace ids must be unique",
                        call.trace_id
                    ),
                }),
                None => calls.push(call),
            },
            Err(reason) => bad.push(BadLine { line, reason }),
        }
    }
    Ok((calls, bad))
}

fn parse_line(line: usize, text: &str) -> Result<LoggedCall, String> {
    let raw: RawLine = serde_json::from_str(text).map_err(|err| format!("not a log record: {err}"))?;
    let at = raw
        .ts
        .parse::<jiff::Timestamp>()
        .map_err(|err| format!("`ts` is not an RFC 3339 time (like 2026-07-03T09:14:02.118Z): {err}"))?;
    let at = SystemTime::try_from(at).map_err(|err| format!("`ts` is out of range: {err}"))?;
    let step = StepType::new(&raw.step).map_err(|err| format!("`step`: {err}"))?;
    if !(raw.latency_ms.is_finite() && raw.latency_ms >= 0.0) {
        return Err(format!("`latency_ms` is {}: use a non-negative number of milliseconds", raw.latency_ms));
    }
    if !raw.input.is_object() {
        return Err("`input` must be a JSON object (the step's input fields)".into());
    }
    let outcome = match (raw.response, raw.error) {
        (Some(response), None) => Ok(response),
        (None, Some(error)) => {
            let class = ErrorClass::from_label(&error.class).ok_or_else(|| {
                format!(
                    "`error.class` is `{}`: use one of rate_limited, quota_exhausted, server_error, timeout, \
                     connection, bad_request, unauthorized, malformed_reply",
                    error.class
                )
            })?;
            Err(LoggedError {
                class,
                status: error.status,
                retry_after: error.retry_after_ms.map(Duration::from_millis),
                message: error.message,
            })
        }
        (Some(_), Some(_)) => return Err("has both `response` and `error`: a call ends in one of them".into()),
        (None, None) => return Err("has neither `response` nor `error`: say how the call ended".into()),
    };
    for (field, value) in [("component", &raw.component), ("workspace", &raw.workspace), ("model", &raw.model)] {
        if value.trim().is_empty() {
            return Err(format!("`{field}` is empty"));
        }
    }
    Ok(LoggedCall {
        at,
        trace_id: raw.trace_id.unwrap_or_else(|| format!("line-{line}")),
        component: raw.component,
        step,
        workspace: raw.workspace,
        model: raw.model,
        input: raw.input,
        outcome,
        usage: Usage { input_tokens: raw.usage.input_tokens, output_tokens: raw.usage.output_tokens },
        latency: Duration::from_secs_f64(raw.latency_ms / 1000.0),
    })
}

impl LoggedCall {
    /// What the recorded provider answers for this call.
    pub fn recorded(&self) -> RecordedCall {
        let outcome = match &self.outcome {
            Ok(content) => Ok(RecordedReply { content: content.clone(), model: self.model.clone(), usage: self.usage }),
            Err(error) => Err(error.to_provider_error(self.latency)),
        };
        RecordedCall { trace_id: self.trace_id.clone(), outcome, latency: self.latency }
    }
}

impl LoggedError {
    fn to_provider_error(&self, latency: Duration) -> ProviderError {
        let message = self.message.clone();
        let status = self.status;
        match self.class {
            ErrorClass::RateLimited => ProviderError::RateLimited { retry_after: self.retry_after, message },
            ErrorClass::QuotaExhausted => ProviderError::QuotaExhausted { message },
            ErrorClass::ServerError => {
                ProviderError::ServerError { status: status.unwrap_or(500), message, retry_after: self.retry_after }
            }
            ErrorClass::Timeout => ProviderError::Timeout { after: latency },
            ErrorClass::Connection => ProviderError::Connection { message },
            ErrorClass::BadRequest => ProviderError::BadRequest { status: status.unwrap_or(400), message },
            ErrorClass::Unauthorized => ProviderError::Unauthorized { status: status.unwrap_or(401), message },
            ErrorClass::MalformedReply => ProviderError::MalformedReply { message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"ts":"2026-07-03T09:00:00.500Z","trace_id":"t1","component":"c","step":"classifier","workspace":"w","model":"gpt-4o-mini","input":{"text":"x"},"response":"{}","usage":{"input_tokens":10,"output_tokens":2},"latency_ms":850}"#;

    #[test]
    fn good_and_bad_lines() {
        let log = format!(
            "{GOOD}\n{{broken\n\n{}\n{}\n",
            GOOD.replace("\"t1\"", "\"t2\"").replace(r#""response":"{}""#, r#""error":{"class":"slow","message":"?"}"#),
            GOOD
        );
        let (calls, bad) = read_log(log.as_bytes()).unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].latency, Duration::from_millis(850));
        assert_eq!(calls[0].at, SystemTime::UNIX_EPOCH + Duration::from_millis(1_783_069_200_500));
        let lines: Vec<_> = bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, [2, 4, 5]);
        assert!(bad[0].reason.contains("not a log record"), "{}", bad[0].reason);
        assert!(bad[1].reason.contains("error.class"), "{}", bad[1].reason);
        assert!(bad[2].reason.contains("already used on line 1"), "{}", bad[2].reason);
    }

    #[test]
    fn invalid_utf8_is_a_bad_line_not_a_failure() {
        let mut log = GOOD.as_bytes().to_vec();
        log.extend_from_slice(b"\n\xff\xfe garbage\n");
        let (calls, bad) = read_log(log.as_slice()).unwrap();
        assert_eq!((calls.len(), bad.len(), bad[0].line), (1, 1, 2));
    }
}
