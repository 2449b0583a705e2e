//! Spend per workspace (and per step in a workspace) per UTC day, against the configured
//! budgets. Counted by this engine from its start, on its clock (the log's time in a replay).
//! Calls check the budget before they go and pay after, so that concurrent calls may overshoot
//! a budget by what they cost together; shared counting across replicas is not done here.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{BudgetSettings, OnBudget, PipelineError, StepSpec, StepType};

const DAY_SECS: u64 = 86_400;

#[derive(Debug)]
pub(super) struct Budgets {
    settings: BudgetSettings,
    /// Whether any budget is configured: without one, nothing is counted.
    counting: bool,
    spent: Mutex<HashMap<SpendKey, f64>>,
}

/// Spend is kept by UTC day, workspace and step (`None`: the workspace's whole spend).
type SpendKey = (u64, String, Option<StepType>);

/// What the budgets leave a call.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct BudgetView {
    /// What is left of the tightest budget; `None`: no budget applies.
    pub(super) left_usd: Option<f64>,
    /// Past a budget's soft share, under `on_budget = "downgrade"`.
    pub(super) downgrade: bool,
}

/// One budget a call counts against, and how much of it is spent.
struct Applicable {
    step: Option<StepType>,
    limit: f64,
    spent: f64,
}

fn day(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs() / DAY_SECS)
}

impl Budgets {
    pub(super) fn new(settings: BudgetSettings, any_step_budget: bool) -> Self {
        let counting = any_step_budget || settings.workspace_daily_usd.is_some() || !settings.workspaces.is_empty();
        Self { settings, counting, spent: Mutex::default() }
    }

    fn applicable(&self, workspace: &str, spec: &StepSpec, at: SystemTime) -> Vec<Applicable> {
        let spent = self.spent.lock().unwrap_or_else(PoisonError::into_inner);
        let today = day(at);
        let spent_on =
            |step: Option<&StepType>| spent.get(&(today, workspace.to_owned(), step.cloned())).copied().unwrap_or(0.0);
        let workspace_budget = self.settings.workspace_limit(workspace).map(|limit| Applicable {
            step: None,
            limit,
            spent: spent_on(None),
        });
        let step_budget = spec.daily_budget_usd.map(|limit| Applicable {
            step: Some(spec.step.clone()),
            limit,
            spent: spent_on(Some(&spec.step)),
        });
        workspace_budget.into_iter().chain(step_budget).collect()
    }

    pub(super) fn view(&self, workspace: &str, spec: &StepSpec, at: SystemTime) -> BudgetView {
        let budgets = self.applicable(workspace, spec, at);
        let left_usd = budgets.iter().map(|budget| budget.limit - budget.spent).reduce(f64::min);
        let downgrade = self.settings.on_budget == OnBudget::Downgrade
            && budgets.iter().any(|budget| budget.spent >= budget.limit * self.settings.soft_share);
        BudgetView { left_usd, downgrade }
    }

    /// The error for a call that every candidate it could afford is out of: names the budget
    /// that is spent.
    pub(super) fn exhausted(&self, workspace: &str, spec: &StepSpec, at: SystemTime) -> PipelineError {
        let budgets = self.applicable(workspace, spec, at);
        let tightest = budgets.iter().min_by(|a, b| (a.limit - a.spent).total_cmp(&(b.limit - b.spent)));
        let (scope, limit, spent) = match tightest {
            Some(Applicable { step: Some(step), limit, spent }) => {
                (format!("step `{step}` in workspace `{workspace}`"), *limit, *spent)
            }
            Some(Applicable { step: None, limit, spent }) => (format!("workspace `{workspace}`"), *limit, *spent),
            None => (format!("workspace `{workspace}`"), 0.0, 0.0),
        };
        PipelineError::BudgetExhausted { scope, limit_usd: limit, spent_usd: spent }
    }

    /// A call's spend, once it is known.
    pub(super) fn charge(&self, workspace: &str, step: &StepType, at: SystemTime, usd: f64) {
        if !self.counting || usd <= 0.0 {
            return;
        }
        let today = day(at);
        let mut spent = self.spent.lock().unwrap_or_else(PoisonError::into_inner);
        // Yesterday's spend no longer counts against anything.
        spent.retain(|(day, _, _), _| *day >= today);
        for step in [None, Some(step.clone())] {
            *spent.entry((today, workspace.to_owned(), step)).or_default() += usd;
        }
    }
}
