//! `POST /v1/embeddings`, answered by the local embedding model (the semantic cache's), in
//! OpenAI's shape: no call leaves the machine for it.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

use pipeline_core::CallContext;

use super::Gateway;
use super::error::ApiError;

/// More texts than this in one request are refused: each is a model run on this machine, on
/// the sessions every semantic cache miss embeds on (OpenAI takes 2,048; a local model's CPU is
/// not a fleet's).
const MAX_INPUTS: usize = 256;

#[derive(Debug, Deserialize)]
struct EmbeddingRequest {
    input: Value,
    model: String,
    encoding_format: Option<String>,
    dimensions: Option<usize>,
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

pub(super) async fn embeddings(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match embed(&gateway, &headers, body).await {
        Ok(response) => response,
        Err(error) => gateway.refuse(&headers, error),
    }
}

async fn embed(
    gateway: &Gateway,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let workspace = gateway.keys.workspace(headers)?;
    let body = body.map_err(|rejection| ApiError::unreadable_body(rejection.status(), rejection.body_text()))?;
    let request: EmbeddingRequest = serde_json::from_slice(&body)
        .map_err(|err| ApiError::invalid(None, format!("the body is not an embeddings request: {err}")))?;
    if let Some(field) = request.other.keys().next() {
        return Err(ApiError::invalid(Some(field), format!("`{field}` is not supported by aipipe's embeddings")));
    }
    let Some(model) = gateway.engine.embedding_model() else {
        return Err(ApiError::invalid(
            Some("model"),
            "this gateway has no embedding model loaded (semantic.enabled = false)".into(),
        ));
    };
    if request.model != model {
        return Err(ApiError::invalid(
            Some("model"),
            format!("model `{}` is not served here: this gateway embeds with `{model}`", request.model),
        ));
    }
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                Some("encoding_format"),
                format!("encoding_format is `{other}`: use float or base64"),
            ));
        }
    };
    let texts = texts(&request.input)?;
    let context = CallContext { workspace, ..gateway.context(headers)? };
    let embedded = gateway.engine.embed(texts, &context).await.map_err(ApiError::from)?;
    let dimensions = embedded.vectors.first().map_or(0, Vec::len);
    if let Some(asked) = request.dimensions.filter(|asked| *asked != dimensions) {
        return Err(ApiError::invalid(
            Some("dimensions"),
            format!("dimensions is {asked}: `{model}` gives {dimensions}; leave it out"),
        ));
    }
    let data: Vec<Value> = embedded
        .vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|value| value.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens = embedded.input_tokens;
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": embedded.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

/// `input`: one text or a list of them; token arrays are refused (the tokenizer is not
/// OpenAI's, so their ids would mean other words).
fn texts(input: &Value) -> Result<Vec<String>, ApiError> {
    let invalid = |message: String| ApiError::invalid(Some("input"), message);
    let texts = match input {
        Value::String(text) => vec![text.clone()],
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(index, item)| match item {
                Value::String(text) => Ok(text.clone()),
                _ => Err(invalid(format!("input[{index}] is not a string: send texts, not token ids"))),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(invalid("input must be a string or a non-empty list of strings".into())),
    };
    if texts.len() > MAX_INPUTS {
        return Err(invalid(format!("{} texts in one request: send at most {MAX_INPUTS}", texts.len())));
    }
    if let Some(index) = texts.iter().position(|text| text.is_empty()) {
        return Err(invalid(format!("input[{index}] is empty")));
    }
    Ok(texts)
}
