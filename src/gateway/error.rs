//! Errors in OpenAI's shape, with the status an OpenAI SDK expects for each.

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use pipeline_core::PipelineError;
use pipeline_core::providers::ErrorClass;
use pipeline_core::resilience::Refusal;
use pipeline_core::telemetry;
use serde_json::json;

use aipipe::openai::Unsupported;

/// An error in OpenAI's shape, with the status an OpenAI SDK expects for it.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    param: Option<String>,
    message: String,
    retry_after: Option<Duration>,
    /// For a request refused before the engine saw it: what to record for it (the engine
    /// records its own failures).
    pub(super) refused: Option<telemetry::ErrorClass>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, code, param: None, message: message.into(), retry_after: None, refused: None }
    }

    /// A request the gateway cannot read or honour, refused before the engine.
    pub(super) fn invalid(param: Option<&str>, message: String) -> Self {
        Self {
            param: param.map(str::to_owned),
            refused: Some(telemetry::ErrorClass::InvalidRequest),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_request", message)
        }
    }

    /// A path or method the gateway does not serve (404, 405).
    pub(super) fn refused_route(status: StatusCode, code: &'static str, message: String) -> Self {
        Self {
            refused: Some(telemetry::ErrorClass::InvalidRequest),
            ..Self::new(status, "invalid_request_error", code, message)
        }
    }

    pub(super) fn unauthorized(message: &str) -> Self {
        Self {
            refused: Some(telemetry::ErrorClass::Unauthenticated),
            ..Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid_api_key", message)
        }
    }

    /// The body could not be read: too large (413), or not bytes at all.
    pub(super) fn unreadable_body(status: StatusCode, message: String) -> Self {
        let refused = if status == StatusCode::PAYLOAD_TOO_LARGE {
            telemetry::ErrorClass::RequestTooLarge
        } else {
            telemetry::ErrorClass::InvalidRequest
        };
        Self { refused: Some(refused), ..Self::new(status, "invalid_request_error", "invalid_body", message) }
    }

    /// A failure of the gateway itself.
    pub(super) fn internal(message: &str) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error", message)
    }

    pub(super) fn message(&self) -> &str {
        &self.message
    }

    fn retry_after(mut self, after: Option<Duration>) -> Self {
        self.retry_after = after;
        self
    }
}

impl From<Unsupported> for ApiError {
    fn from(unsupported: Unsupported) -> Self {
        Self { param: unsupported.param, ..Self::invalid(None, unsupported.message) }
    }
}

impl From<PipelineError> for ApiError {
    fn from(err: PipelineError) -> Self {
        let message = err.to_string();
        let (status, kind, code, retry_after) = match &err {
            PipelineError::UnknownStep { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", "unknown_step", None)
            }
            PipelineError::InvalidContext { .. } | PipelineError::InvalidInput { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_request", None)
            }
            PipelineError::PromptTooLarge { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", "context_length_exceeded", None)
            }
            PipelineError::CostLimitExceeded { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", "cost_limit_exceeded", None)
            }
            PipelineError::InvalidOptions { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_request", None)
            }
            // As OpenAI says an exhausted quota: waiting a few seconds does not help.
            PipelineError::BudgetExhausted { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "insufficient_quota", "budget_exhausted", None)
            }
            PipelineError::NoRoute { .. } => (StatusCode::BAD_REQUEST, "invalid_request_error", "no_route", None),
            // As OpenAI answers a model it does not have.
            PipelineError::UnlistedModel { .. } => {
                (StatusCode::NOT_FOUND, "invalid_request_error", "model_not_found", None)
            }
            // Our limits, or the upstream's Retry-After outlasting what a caller may wait: the
            // caller should come back after Retry-After, as from the upstream itself.
            PipelineError::Refused {
                source: source @ (Refusal::RateLimited { .. } | Refusal::Paused { .. }), ..
            } => (StatusCode::TOO_MANY_REQUESTS, "requests", "rate_limit_exceeded", Some(source.retry_after())),
            PipelineError::Refused { source, .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error", "upstream_unavailable", Some(source.retry_after()))
            }
            PipelineError::Upstream { source, .. } => match source.class() {
                ErrorClass::RateLimited => {
                    (StatusCode::TOO_MANY_REQUESTS, "requests", "rate_limit_exceeded", source.retry_after())
                }
                ErrorClass::QuotaExhausted => {
                    (StatusCode::TOO_MANY_REQUESTS, "insufficient_quota", "insufficient_quota", None)
                }
                ErrorClass::BadRequest => (StatusCode::BAD_REQUEST, "invalid_request_error", "upstream_rejected", None),
                ErrorClass::ContextLength => {
                    (StatusCode::BAD_REQUEST, "invalid_request_error", "context_length_exceeded", None)
                }
                ErrorClass::Timeout => (StatusCode::GATEWAY_TIMEOUT, "server_error", "upstream_timeout", None),
                // The gateway's own upstream key is wrong: not the caller's fault.
                ErrorClass::Unauthorized => (StatusCode::BAD_GATEWAY, "server_error", "upstream_unauthorized", None),
                _ => (StatusCode::BAD_GATEWAY, "server_error", "upstream_error", source.retry_after()),
            },
            PipelineError::ContractViolation { .. } => {
                (StatusCode::BAD_GATEWAY, "server_error", "contract_violation", None)
            }
            PipelineError::DeadlineExceeded { .. } => (StatusCode::GATEWAY_TIMEOUT, "server_error", "timeout", None),
            PipelineError::Unsupported { param, .. } => {
                let param = Some(param.clone());
                return Self {
                    param,
                    ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", "unsupported_parameter", message)
                };
            }
            PipelineError::Embedding { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "server_error", "embedding_failed", None)
            }
            PipelineError::StreamInterrupted { .. } => {
                (StatusCode::BAD_GATEWAY, "server_error", "stream_interrupted", None)
            }
        };
        Self::new(status, kind, code, message).retry_after(retry_after)
    }
}

impl ApiError {
    /// OpenAI's error object: the body of an error response, and the data of the error event
    /// that ends a stream which failed after it began (OpenAI's SDKs raise it).
    pub(super) fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(after) = self.retry_after {
            let headers = response.headers_mut();
            // Whole seconds, rounded up, for clients that read only `Retry-After`; the exact
            // wait for those that read OpenAI's `retry-after-ms`.
            let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            headers.insert(HeaderName::from_static("retry-after-ms"), HeaderValue::from(after.as_millis() as u64));
        }
        response
    }
}
