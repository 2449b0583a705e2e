//! The call log that `aipipe replay` reads: one JSON object per line (docs/log-format.md).

use std::io::BufRead;
use std::time::{Duration, SystemTime};

use pipeline_core::StepType;
use pipeline_core::providers::{ErrorClass, ProviderError, RecordedCall, RecordedReply, Usage, classify_http_failure};
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
    /// What the call's text means, when the log knows (a generated log does): calls with the
    /// same meaning ask the same thing, so a replay can tell a right semantic hit from a wrong
    /// one.
    pub meaning: Option<String>,
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
    meaning: Option<String>,
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

/// A line in aipipe's own format, or, when it has a `request` object, an OpenAI
/// request/response pair as gateways export them.
fn parse_line(line: usize, text: &str) -> Result<LoggedCall, String> {
    let value: Value = serde_json::from_str(text).map_err(|err| format!("not a log record: {err}"))?;
    if value.get("request").is_some_and(Value::is_object) {
        return parse_openai_line(line, value);
    }
    let raw: RawLine = serde_json::from_value(value).map_err(|err| format!("not a log record: {err}"))?;
    let at = rfc3339("ts", &raw.ts)?;
    let step = StepType::new(&raw.step).map_err(|err| format!("`step`: {err}"))?;
    let latency = latency(raw.latency_ms)?;
    if !raw.input.is_object() {
        return Err("`input` must be a JSON object (the step's input fields)".into());
    }
    let outcome = match (raw.response, raw.error) {
        (Some(response), None) => Ok(response),
        (None, Some(error)) => Err(LoggedError {
            class: error_class(&error.class)?,
            status: error.status,
            retry_after: error.retry_after_ms.map(Duration::from_millis),
            message: error.message,
        }),
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
        usage: Usage::new(raw.usage.input_tokens, raw.usage.output_tokens),
        latency,
        meaning: raw.meaning.filter(|meaning| !meaning.trim().is_empty()),
    })
}

fn rfc3339(field: &str, text: &str) -> Result<SystemTime, String> {
    let at = text
        .parse::<jiff::Timestamp>()
        .map_err(|err| format!("`{field}` is not an RFC 3339 time (like 2026-07-03T09:14:02.118Z): {err}"))?;
    SystemTime::try_from(at).map_err(|err| format!("`{field}` is out of range: {err}"))
}

fn error_class(label: &str) -> Result<ErrorClass, String> {
    ErrorClass::from_label(label).ok_or_else(|| {
        format!(
            "`error.class` is `{label}`: use one of rate_limited, quota_exhausted, server_error, timeout, \
             connection, bad_request, unauthorized, malformed_reply"
        )
    })
}

/// An OpenAI request/response pair (docs/log-format.md): the request's messages become a chat
/// step's input (or, with `metadata.step`, that step's input object from the last user message).
#[derive(Debug, Deserialize)]
struct OpenAiLine {
    request: crate::openai::CompletionRequest,
    response: Option<OpenAiResponse>,
    error: Option<OpenAiError>,
    #[serde(alias = "ts", alias = "created_at")]
    timestamp: Option<Value>,
    #[serde(alias = "duration_ms")]
    latency_ms: Option<f64>,
    trace_id: Option<String>,
    #[serde(default)]
    metadata: OpenAiMetadata,
}

#[derive(Debug, Deserialize)]
struct OpenAiResponse {
    model: Option<String>,
    created: Option<u64>,
    choices: Vec<OpenAiChoice>,
    usage: Option<OpenAiUsage>,
}

#[derive(Debug, Deserialize)]
struct OpenAiChoice {
    message: OpenAiMessage,
}

#[derive(Debug, Deserialize)]
struct OpenAiMessage {
    content: Option<String>,
}

#[derive(Debug, Deserialize)]
struct OpenAiUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
}

/// A failed request: an HTTP status with OpenAI's error fields, or, for failures without one
/// (timeouts, connection errors), the engine's class.
#[derive(Debug, Deserialize)]
struct OpenAiError {
    status: Option<u16>,
    class: Option<String>,
    #[serde(default)]
    message: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    code: Option<String>,
    retry_after_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct OpenAiMetadata {
    component: Option<String>,
    workspace: Option<String>,
    step: Option<String>,
    trace_id: Option<String>,
}

fn parse_openai_line(line: usize, value: Value) -> Result<LoggedCall, String> {
    let raw: OpenAiLine =
        serde_json::from_value(value).map_err(|err| format!("not an OpenAI request/response record: {err}"))?;
    let step = match &raw.metadata.step {
        Some(step) => StepType::new(step).map_err(|err| format!("`metadata.step`: {err}"))?,
        None => StepType::CHAT,
    };
    if let Some(unsupported) = raw.request.unsupported_field() {
        return Err(format!("`request`: {}", unsupported.message));
    }
    let input = if step == StepType::CHAT { raw.request.chat_input() } else { raw.request.structured_input(&step) }
        .map_err(|unsupported| format!("`request`: {}", unsupported.message))?;
    let at = match (&raw.timestamp, raw.response.as_ref().and_then(|response| response.created)) {
        (Some(Value::String(text)), _) => rfc3339("timestamp", text)?,
        (Some(Value::Number(seconds)), _) => unix_seconds(seconds.as_f64().unwrap_or(-1.0))?,
        (Some(_), _) => return Err("`timestamp` must be an RFC 3339 string or Unix seconds".into()),
        (None, Some(created)) => unix_seconds(created as f64)?,
        (None, None) => return Err("no time: add `timestamp` (RFC 3339 or Unix seconds) or `response.created`".into()),
    };
    let latency = latency(raw.latency_ms.unwrap_or(0.0))?;
    let response_model = raw.response.as_ref().and_then(|response| response.model.clone());
    let model = response_model.or_else(|| raw.request.model.clone()).filter(|model| !model.trim().is_empty());
    let model = model.ok_or("no model: the request or the response must name it")?;
    let mut usage = Usage::default();
    let outcome = match (raw.response, raw.error) {
        (Some(response), None) => {
            if let Some(reported) = response.usage {
                usage = Usage::new(reported.prompt_tokens, reported.completion_tokens);
            }
            let content = response.choices.into_iter().next().and_then(|choice| choice.message.content);
            Ok(content.ok_or("`response.choices[0].message.content` is missing: only text replies can be replayed")?)
        }
        (None, Some(error)) => Err(openai_error(error)?),
        (Some(_), Some(_)) => return Err("has both `response` and `error`: a call ends in one of them".into()),
        (None, None) => return Err("has neither `response` nor `error`: say how the call ended".into()),
    };
    Ok(LoggedCall {
        at,
        trace_id: raw.trace_id.or(raw.metadata.trace_id).unwrap_or_else(|| format!("line-{line}")),
        component: raw.metadata.component.unwrap_or_else(|| "openai-log".to_owned()),
        step,
        workspace: raw.metadata.workspace.unwrap_or_else(|| "default".to_owned()),
        model,
        input,
        outcome,
        usage,
        latency,
        meaning: None,
    })
}

fn unix_seconds(seconds: f64) -> Result<SystemTime, String> {
    let since_epoch =
        Duration::try_from_secs_f64(seconds).map_err(|_| format!("the time {seconds} is not Unix seconds"))?;
    SystemTime::UNIX_EPOCH.checked_add(since_epoch).ok_or_else(|| format!("the time {seconds} is out of range"))
}

/// A logged latency: a non-negative number of milliseconds that a duration can hold.
fn latency(millis: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(millis / 1000.0)
        .map_err(|_| format!("`latency_ms` is {millis}: use a non-negative number of milliseconds"))
}

/// The engine's one failure classifier decides what a logged HTTP failure was.
fn openai_error(error: OpenAiError) -> Result<LoggedError, String> {
    let retry_after = error.retry_after_ms.map(Duration::from_millis);
    let class = match (&error.class, error.status) {
        (Some(label), _) => error_class(label)?,
        (None, Some(status)) => {
            let mut headers = axum::http::HeaderMap::new();
            if let Some(millis) = error.retry_after_ms {
                headers.insert("retry-after-ms", millis.into());
            }
            let body = serde_json::json!({"error": {"message": error.message, "type": error.kind, "code": error.code}});
            classify_http_failure(status, &headers, body.to_string().as_bytes(), SystemTime::now()).class()
        }
        (None, None) => return Err("`error` needs a `status` (HTTP) or a `class` (timeout, connection, ...)".into()),
    };
    Ok(LoggedError { class, status: error.status, retry_after, message: error.message })
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

    /// How the engine would classify the logged failure, in telemetry's words; `None` for a
    /// call that was answered.
    pub fn failure_class(&self) -> Option<pipeline_core::telemetry::ErrorClass> {
        let error = self.outcome.as_ref().err()?;
        let source = error.to_provider_error(self.latency);
        Some(pipeline_core::PipelineError::Upstream { step: self.step.clone(), attempts: 1, source }.class())
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
            ErrorClass::ContextLength => ProviderError::ContextLength { message },
            ErrorClass::Unauthorized => ProviderError::Unauthorized { status: status.unwrap_or(401), message },
            ErrorClass::MalformedReply => ProviderError::MalformedReply { message },
            ErrorClass::ClientClosed => ProviderError::ClientClosed,
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
    fn openai_request_response_pairs() {
        let ok =
            r#"{"timestamp": 1783069200.5, "latency_ms": 420, "metadata": {"component": "docs-bot", "workspace": "w"},
            "request": {"model": "gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]},
            "response": {"model": "gpt-4o-mini-2024-07-18", "created": 1783069201,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}}],
                "usage": {"prompt_tokens": 8, "completion_tokens": 2}}}"#
                .replace('\n', " ");
        let limited = r#"{"created_at": "2026-07-03T09:00:01Z", "request": {"model": "m", "messages": [{"role": "user", "content": "x"}]},
            "error": {"status": 429, "code": "rate_limit_exceeded", "message": "slow down", "retry_after_ms": 2000}}"#
            .replace('\n', " ");
        let structured = r#"{"timestamp": "2026-07-03T09:00:02Z", "metadata": {"step": "classifier"},
            "request": {"model": "m", "messages": [{"role": "user", "content": "{\"text\": \"refund\", \"labels\": [\"a\"]}"}]},
            "error": {"class": "timeout"}}"#
            .replace('\n', " ");
        let no_time = r#"{"request": {"model": "m", "messages": []}, "error": {"status": 500}}"#;
        let log = format!("{ok}\n{limited}\n{structured}\n{no_time}\n");
        let (calls, bad) = read_log(log.as_bytes()).unwrap();
        assert_eq!(calls.len(), 3, "{bad:?}");
        assert_eq!(calls[0].step, StepType::CHAT);
        assert_eq!(
            calls[0].input,
            serde_json::json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0.0})
        );
        assert_eq!(calls[0].outcome.as_deref().ok(), Some("Hello"));
        assert_eq!((calls[0].usage.input_tokens, calls[0].model.as_str()), (8, "gpt-4o-mini-2024-07-18"));
        assert_eq!(calls[0].at, SystemTime::UNIX_EPOCH + Duration::from_millis(1_783_069_200_500));
        assert_eq!((calls[0].component.as_str(), calls[0].latency), ("docs-bot", Duration::from_millis(420)));
        let error = calls[1].outcome.as_ref().unwrap_err();
        assert_eq!((error.class, error.retry_after), (ErrorClass::RateLimited, Some(Duration::from_secs(2))));
        assert_eq!(calls[2].step, StepType::CLASSIFIER);
        assert_eq!(calls[2].input["text"], "refund");
        assert_eq!(calls[2].outcome.as_ref().unwrap_err().class, ErrorClass::Timeout);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].reason.contains("no time"), "{}", bad[0].reason);
    }

    #[test]
    fn invalid_utf8_is_a_bad_line_not_a_failure() {
        let mut log = GOOD.as_bytes().to_vec();
        log.extend_from_slice(b"\n\xff\xfe garbage\n");
        let (calls, bad) = read_log(log.as_slice()).unwrap();
        assert_eq!((calls.len(), bad.len(), bad[0].line), (1, 1, 2));
    }

    /// Found by the `log_line` fuzz target: a finite latency too large for a duration.
    #[test]
    fn a_latency_no_duration_can_hold_is_a_bad_line_not_a_panic() {
        let huge = GOOD.replace(r#""latency_ms":850"#, r#""latency_ms":1e300"#);
        let negative = GOOD.replace(r#""latency_ms":850"#, r#""latency_ms":-1"#);
        let openai = r#"{"timestamp": 1e300, "latency_ms": 1e300, "request": {"model": "m", "messages": [{"role": "user", "content": "x"}]}, "response": {"choices": [{"message": {"content": "y"}}]}}"#;
        let log = format!("{huge}\n{negative}\n{openai}\n");
        let (calls, bad) = read_log(log.as_bytes()).unwrap();
        assert!(calls.is_empty());
        assert_eq!(bad.len(), 3);
        assert!(bad[0].reason.contains("latency_ms"), "{}", bad[0].reason);
        assert!(bad[1].reason.contains("latency_ms"), "{}", bad[1].reason);
    }
}
