//! Checks shared by every section: each takes the key it checks, so that an error names it,
//! and says what a valid value is.

use std::time::Duration;

use crate::SetupError;

pub(super) fn non_empty(key: &str, value: String) -> Result<String, SetupError> {
    if value.trim().is_empty() {
        return Err(SetupError::invalid(key, "must not be empty"));
    }
    Ok(value)
}

pub(super) fn positive<T: PartialOrd + Default + std::fmt::Display>(key: &str, value: T) -> Result<T, SetupError> {
    if value <= T::default() {
        return Err(SetupError::invalid(key, format!("{value} must be greater than zero")));
    }
    Ok(value)
}

pub(super) fn finite_positive(key: &str, value: f64) -> Result<f64, SetupError> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(SetupError::invalid(key, format!("{value} must be a number greater than zero")))
    }
}

pub(super) fn positive_millis(key: &str, millis: u64) -> Result<Duration, SetupError> {
    positive(key, millis).map(Duration::from_millis)
}

pub(super) fn http_url(key: &str, url: String) -> Result<String, SetupError> {
    let url = non_empty(key, url)?;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(SetupError::invalid(key, format!("`{url}` is not an http(s) URL")));
    }
    Ok(url)
}

/// A bar on the cosine of two embeddings: above zero (an orthogonal text is no match) and at
/// most one.
pub(super) fn cosine(key: &str, value: f32) -> Result<f32, SetupError> {
    if !(value > 0.0 && value <= 1.0) {
        return Err(SetupError::invalid(
            key,
            format!("{value} is not a cosine similarity bar: use a number in (0, 1]"),
        ));
    }
    Ok(value)
}

/// A probability or a confidence: from 0 to 1, both included.
pub(super) fn probability(key: &str, value: f64) -> Result<f64, SetupError> {
    if !(0.0..=1.0).contains(&value) {
        return Err(SetupError::invalid(key, format!("{value} is not a probability: use a number in [0, 1]")));
    }
    Ok(value)
}

/// A bound on a wrong-answer rate: below a half (a cache wrong half the time saves nothing
/// worth having), 0 for no audits.
pub(super) fn wrong_rate(key: &str, value: f64) -> Result<f64, SetupError> {
    if !(0.0..0.5).contains(&value) {
        return Err(SetupError::invalid(
            key,
            format!("{value} is outside 0.0..0.5 (0.02: at most 2% of semantic hits wrong; 0: no audits)"),
        ));
    }
    Ok(value)
}
