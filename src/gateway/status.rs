//! `GET /status`: how the gateway is doing now, for a person with a browser. The figures of
//! the last hour come from the telemetry store (the same `report` the CLI prints), breakers,
//! limits, shared state and alerts from the engine. One HTML page, SVG for the chart, no
//! scripts: it reloads itself while open. Served to loopback clients only, unless
//! `gateway.status_admin_key_env` names an admin key, which any client may then send
//! (HTTP Basic password, or a bearer token).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine as _;
use minijinja::value::Serde;
use minijinja::{Environment, context};
use pipeline_core::telemetry::{Minute, Source};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;

use super::Gateway;

const TEMPLATE: &str = include_str!("status.html");
const WINDOW: Duration = Duration::from_secs(60 * 60);
const REFRESH_SECS: u64 = 5;
const CHART_WIDTH: f64 = 960.0;
const CHART_HEIGHT: f64 = 200.0;
const CHART_LEFT: f64 = 40.0;

/// Who may see the page.
#[derive(Debug)]
pub(super) struct StatusAccess {
    /// SHA-256 of the admin key, if one is configured; else loopback clients only.
    admin_key: Option<[u8; 32]>,
}

impl StatusAccess {
    /// The admin key from the environment variable `variable` names (`None`: loopback only).
    pub(super) fn from_env(variable: Option<&str>) -> anyhow::Result<Self> {
        let Some(variable) = variable else { return Ok(Self { admin_key: None }) };
        let key = std::env::var(variable).ok().filter(|key| !key.trim().is_empty()).ok_or_else(|| {
            anyhow::anyhow!(
                "gateway.status_admin_key_env: the environment variable `{variable}` is not set: set it to the key \
                 that opens /status, or leave the setting empty to serve /status on loopback only"
            )
        })?;
        Ok(Self { admin_key: Some(Sha256::digest(key.as_bytes()).into()) })
    }

    fn allows(&self, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Denied> {
        let Some(admin_key) = self.admin_key else {
            return if peer.ip().is_loopback() { Ok(()) } else { Err(Denied::NotLoopback) };
        };
        let sent = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok()).and_then(credential);
        if sent.is_some_and(|key| <[u8; 32]>::from(Sha256::digest(key.as_bytes())) == admin_key) {
            return Ok(());
        }
        Err(Denied::NeedsKey)
    }
}

/// Why a client may not see the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Denied {
    NotLoopback,
    NeedsKey,
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self {
            Self::NotLoopback => {
                let refusal = "/status is served to loopback clients only: set gateway.status_admin_key_env to open \
                               it with an admin key";
                (StatusCode::FORBIDDEN, refusal).into_response()
            }
            Self::NeedsKey => {
                let mut refusal = (StatusCode::UNAUTHORIZED, "/status needs the admin key").into_response();
                refusal
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"aipipe status\""));
                refusal
            }
        }
    }
}

/// The key in `Basic base64(user:KEY)` (any user) or `Bearer KEY`.
fn credential(value: &str) -> Option<String> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        return decoded.split_once(':').map(|(_, key)| key.to_owned());
    }
    None
}

pub(super) async fn status(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(denied) = gateway.status_access.allows(peer, &headers) {
        return denied.into_response();
    }
    match render(&gateway).await {
        Ok(page) => {
            let mut response = Html(page).into_response();
            response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(error) => {
            tracing::error!(error = %error, "the status page could not be rendered");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("the status page could not be rendered: {error}"))
                .into_response()
        }
    }
}

#[derive(Debug, Serialize)]
struct Figure {
    id: &'static str,
    label: &'static str,
    value: String,
}

#[derive(Debug, Serialize)]
struct Bar {
    x: f64,
    y: f64,
    width: f64,
    height: f64,
    colour: &'static str,
    title: String,
}

async fn render(gateway: &Gateway) -> anyhow::Result<String> {
    let engine = &gateway.engine;
    let now = engine.now();
    let to_ms = epoch_ms(now);
    let from_ms = to_ms - WINDOW.as_millis() as i64;
    let store = engine.recorder().store();
    let report = store.report(from_ms, to_ms).await?;
    let minutes = store.calls_per_minute(from_ms, to_ms).await?;
    let overall = &report.overall;
    let figure = |id, label, value| Figure { id, label, value };
    let figures = [
        figure("calls", "calls", overall.calls.to_string()),
        figure("calls-per-minute", "calls per minute", format!("{:.1}", overall.calls as f64 / 60.0)),
        figure("hit-rate", "cache hit rate", percent(overall.cache_hit_rate)),
        figure("cost", "cost (USD)", format!("{:.6}", overall.cost_usd)),
        figure("saved-cost", "cost saved (USD)", format!("{:.6}", overall.saved_cost_usd)),
        figure("p50", "p50 latency (ms)", format!("{:.0}", overall.p50_latency_ms)),
        figure("p99", "p99 latency (ms)", format!("{:.0}", overall.p99_latency_ms)),
        figure("error-rate", "error rate", percent(overall.error_rate)),
        figure("degraded", "answered by a fallback", percent(overall.fallback_rate)),
        figure("upstream-requests", "upstream requests", overall.upstream_requests.to_string()),
    ];
    let (bars, peak) = bars(&minutes);
    let legend: Vec<_> = sources_seen(&minutes)
        .into_iter()
        .map(|source| context! { source => shown(source), colour => colour(source) })
        .collect();
    let breakers: Vec<_> = engine
        .breakers()
        .into_iter()
        .map(|breaker| {
            context! {
                key => breaker.key,
                state => breaker.state.label(),
                since => clock_time(breaker.since),
                times_opened => breaker.times_opened,
            }
        })
        .collect();
    let paused: Vec<_> = engine
        .paused()
        .into_iter()
        .map(|pause| context! { key => pause.key, resumes_in => format!("{:.1} s", pause.resumes_in.as_secs_f64()) })
        .collect();
    let headroom: Vec<_> = engine
        .headroom()
        .into_iter()
        .map(|limit| {
            context! {
                scope => limit.scope.label(),
                key => limit.key,
                available => format!("{:.0}", limit.available),
                per_minute => limit.per_minute,
                set_by => if limit.declared { "upstream" } else { "config" },
            }
        })
        .collect();
    let shared: Vec<_> = engine
        .shared_state()
        .into_iter()
        .map(|part| {
            context! {
                part => part.part,
                address => part.address,
                state => if part.up { "up".to_owned() } else { format!("down: {}", part.reason.unwrap_or_default()) },
                class => if part.up { "closed" } else { "down" },
            }
        })
        .collect();
    let alerts: Vec<_> = engine
        .recorder()
        .recent_alerts()
        .into_iter()
        .map(|alert| {
            context! {
                minute => clock_time(SystemTime::UNIX_EPOCH + Duration::from_millis(alert.minute_ts_ms.max(0) as u64)),
                step => alert.step,
                metric => alert.metric.label(),
                observed => format!("{:.3}", alert.observed),
                baseline => format!("{:.3}", alert.baseline),
                z => format!("{:.1}", alert.z_score),
            }
        })
        .collect();
    let mut environment = Environment::new();
    // Named `.html`, the template escapes every value it prints.
    environment.add_template("status.html", TEMPLATE)?;
    let page = environment.get_template("status.html")?.render(context! {
        refresh_secs => REFRESH_SECS,
        window_minutes => WINDOW.as_secs() / 60,
        now => clock_time(now),
        from_ms => from_ms,
        to_ms => to_ms,
        figures => Serde(figures),
        legend => legend,
        chart => context! {
            width => CHART_WIDTH,
            height => CHART_HEIGHT + 20.0,
            bottom => CHART_HEIGHT,
            peak => format!("{peak} calls"),
            bars => Serde(bars),
        },
        breakers => breakers,
        paused => paused,
        headroom => headroom,
        shared => shared,
        alerts => alerts,
        alerts_on => engine.config().alerts.is_some(),
    })?;
    Ok(page)
}

/// One stacked bar per minute, a segment per source; and the tallest minute.
fn bars(minutes: &[Minute]) -> (Vec<Bar>, u64) {
    let peak = minutes.iter().map(|minute| minute.by_source.values().sum::<u64>()).max().unwrap_or(0).max(1);
    let slot = (CHART_WIDTH - CHART_LEFT) / minutes.len().max(1) as f64;
    let scale = (CHART_HEIGHT - 12.0) / peak as f64;
    let mut bars = Vec::new();
    for (index, minute) in minutes.iter().enumerate() {
        let mut top = CHART_HEIGHT;
        for (source, calls) in &minute.by_source {
            let height = *calls as f64 * scale;
            top -= height;
            bars.push(Bar {
                x: CHART_LEFT + index as f64 * slot + 1.0,
                y: top,
                width: (slot - 2.0).max(1.0),
                height,
                colour: colour(*source),
                title: format!(
                    "{}: {calls} {}",
                    clock_time(SystemTime::UNIX_EPOCH + Duration::from_millis(minute.minute_ms.max(0) as u64)),
                    shown(*source)
                ),
            });
        }
    }
    (bars, peak)
}

fn sources_seen(minutes: &[Minute]) -> Vec<Source> {
    let mut seen: Vec<Source> = minutes.iter().flat_map(|minute| minute.by_source.keys().copied()).collect();
    seen.sort();
    seen.dedup();
    seen
}

/// A source as the chart names it: a call nothing served ended in an error.
fn shown(source: Source) -> &'static str {
    if source == Source::None { "error" } else { source.label() }
}

fn colour(source: Source) -> &'static str {
    match source {
        Source::Upstream => "#2e75b6",
        Source::Exact => "#27ae60",
        Source::Semantic => "#8e44ad",
        Source::Coalesced => "#16a085",
        Source::FallbackModel => "#f39c12",
        Source::FallbackSimilar => "#d35400",
        Source::FallbackRule => "#c0392b",
        Source::None => "#7f8c8d",
    }
}

fn percent(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

fn epoch_ms(at: SystemTime) -> i64 {
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |since| since.as_millis() as i64)
}

/// `HH:MM:SS` in UTC.
fn clock_time(at: SystemTime) -> String {
    jiff::Timestamp::try_from(at).map_or_else(|_| "-".to_owned(), |at| at.strftime("%H:%M:%S").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_key_comes_as_a_basic_password_or_a_bearer_token() {
        let basic = base64::engine::general_purpose::STANDARD.encode("admin:s3cret");
        assert_eq!(credential(&format!("Basic {basic}")).as_deref(), Some("s3cret"));
        assert_eq!(credential("bearer s3cret").as_deref(), Some("s3cret"));
        assert_eq!(credential("Digest x"), None);
    }

    #[test]
    fn without_an_admin_key_only_loopback_clients_see_it() {
        let access = StatusAccess { admin_key: None };
        let headers = HeaderMap::new();
        assert!(access.allows("127.0.0.1:5000".parse().unwrap(), &headers).is_ok());
        assert!(access.allows("[::1]:5000".parse().unwrap(), &headers).is_ok());
        let refused = access.allows("10.0.0.7:5000".parse().unwrap(), &headers).unwrap_err();
        assert_eq!(refused.into_response().status(), StatusCode::FORBIDDEN);

        let access = StatusAccess { admin_key: Some(Sha256::digest(b"s3cret").into()) };
        let refused = access.allows("127.0.0.1:5000".parse().unwrap(), &headers).unwrap_err();
        assert_eq!(refused.into_response().status(), StatusCode::UNAUTHORIZED);
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
        assert!(access.allows("10.0.0.7:5000".parse().unwrap(), &headers).is_ok());
    }
}
