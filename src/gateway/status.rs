//! `GET /status`: how the gateway is doing now, for a person with a browser. The figures of
//! the last hour come from the telemetry store (its aggregates, the figures the CLI reports), breakers,
//! limits, shared state and alerts from the engine. One HTML page, SVG for the chart, no
//! scripts: it reloads itself while open. Behind the admin key, like `/metrics` (`admin`).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use axum::Extension;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use minijinja::value::Serde;
use minijinja::{Environment, context};
use pipeline_core::telemetry::{Minute, Source};
use serde::Serialize;
use std::sync::Arc;

use super::Gateway;
use super::admin::Listener;

const TEMPLATE: &str = include_str!("status.html");
const WINDOW: Duration = Duration::from_secs(60 * 60);
const REFRESH_SECS: u64 = 5;
const CHART_WIDTH: f64 = 960.0;
const CHART_HEIGHT: f64 = 200.0;
const CHART_LEFT: f64 = 40.0;

pub(super) async fn status(
    State(gateway): State<Arc<Gateway>>,
    Extension(listener): Extension<Listener>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(denied) = gateway.admin.allows(listener, peer, &headers) {
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
    // Aggregates the database computes: an hour of rows never leaves it for a page that
    // reloads every few seconds.
    let overall = &store.overview(from_ms, to_ms).await?;
    let minutes = store.calls_per_minute(from_ms, to_ms).await?;
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
    let cuts: Vec<_> = engine
        .semantic_cuts()
        .into_iter()
        .map(|scope| {
            context! {
                step => scope.step,
                workspace => scope.workspace.unwrap_or_else(|| "(all)".to_owned()),
                cut => cut_text(scope.cut),
                prior => cut_text(scope.prior),
                audits => format!("{:.0}", scope.audits),
                disagreements => format!("{:.0}", scope.disagreements),
                wrong_rate => format!(
                    "{} (95%: {} to {})",
                    percent(scope.wrong_rate.estimate),
                    percent(scope.wrong_rate.lower),
                    percent(scope.wrong_rate.upper)
                ),
                tightened => scope.tightened,
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
        cuts => cuts,
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

fn cut_text(cut: pipeline_core::semantic_cache::audit::Cut) -> String {
    match cut {
        pipeline_core::semantic_cache::audit::Cut::At(cut) => format!("{cut:.3}"),
        pipeline_core::semantic_cache::audit::Cut::Never => "serves nothing".to_owned(),
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
