//! Priorities for work items: an options struct in, a struct out, boxed errors, and three
//! tries on any failure.

use std::time::Duration;

use super::{Endpoint, chat};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriorityOptions {
    /// What else the model should know about the team or the work.
    pub context: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Low,
    Medium,
    High,
    Critical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priority {
    pub level: Level,
    /// 0 to 100.
    pub score: u8,
}

#[derive(Debug, Clone)]
pub struct Prioritizer {
    endpoint: Endpoint,
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Prioritizer {
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint }
    }

    pub async fn prioritize(&self, task: &str, options: &PriorityOptions) -> Result<Priority, BoxError> {
        let prompt = format!(
            "Task: {task}\n{}Reply as LEVEL SCORE, e.g. `high 80`.",
            options.context.as_deref().map(|context| format!("Context: {context}\n")).unwrap_or_default()
        );
        let mut last = None;
        for attempt in 0..3 {
            match chat(&self.endpoint, "You prioritise work.", &prompt, 10).await {
                Ok(reply) => return parse(&reply),
                Err(failure) => last = Some(failure.message),
            }
            tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await;
        }
        Err(last.unwrap_or_default().into())
    }
}

fn parse(reply: &str) -> Result<Priority, BoxError> {
    let mut words = reply.split_whitespace();
    let level = match words.next().map(str::to_lowercase).as_deref() {
        Some("low") => Level::Low,
        Some("medium") => Level::Medium,
        Some("high") => Level::High,
        Some("critical") => Level::Critical,
        other => return Err(format!("unexpected level {other:?} in `{reply}`").into()),
    };
    let score = words.next().ok_or("no score")?.parse::<u8>()?;
    Ok(Priority { level, score: score.min(100) })
}
