//! What a request's headers ask of the engine: the step, the component, the trace id, the
//! cache policy, the deadline, the route and whether a stand-in may answer.

use std::time::Duration;

use axum::http::HeaderMap;
use pipeline_core::{CachePolicy, CallOptions, RouteChoice};

use super::error::ApiError;
use aipipe::openai::CompletionRequest;

pub(super) fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|text| Some(text.trim()).filter(|text| !text.is_empty()))
            .map_err(|_| ApiError::invalid(None, format!("header `{name}` is not visible ASCII"))),
    }
}

/// The body's `model` that leaves the choice to the step's route.
pub(super) const ANY_MODEL: &str = "auto";

pub(super) fn call_options(headers: &HeaderMap, request: &CompletionRequest) -> Result<CallOptions, ApiError> {
    let model = request.model.clone().filter(|model| !model.is_empty() && model != ANY_MODEL);
    let mut options = CallOptions { model, ..Default::default() };
    if let Some(route) = header_text(headers, "x-aipipe-route")? {
        let route: RouteChoice = route.parse().map_err(|reason| {
            ApiError::invalid(
                None,
                format!("x-aipipe-route: {reason} (e.g. `cheapest` or `fastest: gpt-4o-mini, gpt-4.1-nano`)"),
            )
        })?;
        options.route = Some(route);
    }
    if let Some(policy) = header_text(headers, "x-aipipe-cache")? {
        options.cache = match policy {
            "use" => CachePolicy::Use,
            "skip" => CachePolicy::Skip,
            "refresh" => CachePolicy::Refresh,
            other => {
                return Err(ApiError::invalid(
                    None,
                    format!("x-aipipe-cache is `{other}`: use `use`, `skip` or `refresh`"),
                ));
            }
        };
    }
    if let Some(millis) = header_text(headers, "x-aipipe-deadline-ms")? {
        let millis: u64 = millis.parse().ok().filter(|millis| *millis > 0).ok_or_else(|| {
            ApiError::invalid(
                None,
                format!("x-aipipe-deadline-ms is `{millis}`: use a positive number of milliseconds"),
            )
        })?;
        options.deadline = Some(Duration::from_millis(millis));
    }
    if let Some(allow) = header_text(headers, "x-aipipe-allow-fallback")? {
        options.allow_stand_in = match allow {
            "true" => true,
            "false" => false,
            other => {
                return Err(ApiError::invalid(
                    None,
                    format!("x-aipipe-allow-fallback is `{other}`: use true or false"),
                ));
            }
        };
    }
    Ok(options)
}
