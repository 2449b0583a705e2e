//! The model registry (`[models."NAME"]`), each step's route over it, spend budgets
//! (`[budgets]`) and the routing settings (`[routing]`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use telemetry::{ModelPrice, PriceTable, RouteStrategy};

use super::raw::{RawBudgets, RawModel, RawRoute, RawRouteTarget, RawRouting};
use super::settings::ProviderSettings;
use super::validate::{non_empty, positive, positive_millis};
use crate::SetupError;

/// A model a route can pick: where it runs, what it costs, what it can do.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Its name in the registry, routes and metrics.
    pub name: String,
    pub provider: String,
    /// Its name at the provider.
    pub upstream: String,
    pub price: ModelPrice,
    /// Prompt plus output, in tokens; `None` when unknown (never filtered out for size, but
    /// never taken as larger after a context-length error either).
    pub context_window: Option<u32>,
    /// Quality, from 1 up: a step's `min_tier` keeps weaker models out.
    pub tier: u8,
    /// Answers in JSON when asked (by schema, JSON mode or the prompt): what a structured
    /// step needs.
    pub json: bool,
    pub tools: bool,
    /// What the guards (pause, rate limits, breaker) and the latency estimate know it by,
    /// beside its provider: its name at the provider for a listed model; for a model a call
    /// names that the registry does not list, the name of the entry that admitted it (the
    /// listed model a dated name extends, or `*`), so that names a caller makes up never grow
    /// them.
    pub guard_model: String,
}

impl ModelSpec {
    /// The same model reached through another provider (a step's fallback that names one).
    fn on_provider(&self, provider: &str) -> Self {
        Self { name: format!("{provider}/{}", self.name), provider: provider.to_owned(), ..self.clone() }
    }

    /// The worst case of a call: the whole prompt and the whole output budget.
    pub fn estimated_cost(&self, prompt_tokens: u64, max_output_tokens: u32) -> f64 {
        self.price.cost(prompt_tokens, u64::from(max_output_tokens))
    }
}

/// Every model a route can pick, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelRegistry {
    models: BTreeMap<String, Arc<ModelSpec>>,
    /// `[models."*"]`: the provider and price of any model a call names that the registry
    /// does not list; without it such a call is refused, so that no call is free by accident.
    unlisted: Option<Arc<ModelSpec>>,
}

/// The registry entry that prices and guards every model the others do not name.
pub const UNLISTED_MODELS: &str = "*";

impl ModelRegistry {
    pub(super) fn validate(
        raw: BTreeMap<String, RawModel>,
        primary: &str,
        providers: &BTreeMap<String, ProviderSettings>,
    ) -> Result<Self, SetupError> {
        let mut models = BTreeMap::new();
        for (name, raw) in raw {
            let key = |field: &str| format!("models.\"{name}\".{field}");
            let provider = raw.provider.unwrap_or_else(|| primary.to_owned());
            if provider != primary && !providers.contains_key(&provider) {
                return Err(SetupError::invalid(
                    key("provider"),
                    format!("no provider `{provider}`: declare it under [providers.{provider}]"),
                ));
            }
            let price = ModelPrice {
                cached_input_per_million_usd: raw.cached_input_per_million_usd,
                cache_write_per_million_usd: raw.cache_write_per_million_usd,
                ..ModelPrice::new(raw.input_per_million_usd, raw.output_per_million_usd)
            };
            if let Some((field, value)) = price.invalid_field() {
                return Err(SetupError::invalid(
                    key(field),
                    format!("{value} is not a price: use a non-negative number"),
                ));
            }
            let context_window =
                raw.context_window.map(|window| positive(&key("context_window"), window)).transpose()?;
            let upstream = match raw.model {
                Some(_) if name == UNLISTED_MODELS => {
                    return Err(SetupError::invalid(
                        key("model"),
                        "the entry for unlisted models sends each call's own model name: leave `model` out",
                    ));
                }
                Some(model) => non_empty(&key("model"), model)?,
                None => name.clone(),
            };
            let spec = ModelSpec {
                provider,
                guard_model: upstream.clone(),
                upstream,
                price,
                context_window,
                tier: positive(&key("tier"), raw.tier)?,
                json: raw.json,
                tools: raw.tools,
                name: name.clone(),
            };
            models.insert(name, Arc::new(spec));
        }
        let unlisted = models.remove(UNLISTED_MODELS);
        Ok(Self { models, unlisted })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ModelSpec>> {
        self.models.get(name)
    }

    /// A model a call names that the registry does not list: a dated name of a listed model
    /// (`gpt-4o-mini-2024-07-18`) is that model, asked for by its dated name; any other is
    /// admitted by `[models."*"]`, if the config has it. `None`: refused.
    pub fn admit(&self, model: &str) -> Option<ModelSpec> {
        let extended = self
            .models
            .values()
            .flat_map(|spec| [(spec.name.as_str(), spec), (spec.upstream.as_str(), spec)])
            .filter(|(listed, _)| model.strip_prefix(*listed).is_some_and(|rest| rest.starts_with('-')))
            .max_by_key(|(listed, _)| listed.len())
            .map(|(_, spec)| spec);
        let entry = extended.or(self.unlisted.as_ref())?;
        Some(ModelSpec { name: model.to_owned(), upstream: model.to_owned(), ..(**entry).clone() })
    }

    /// Whether `[models."*"]` admits the models the registry does not list.
    pub fn admits_unlisted(&self) -> bool {
        self.unlisted.is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<ModelSpec>> {
        self.models.values()
    }

    /// The prices, by registry name and by the name the provider answers with (a reply names
    /// the upstream model, perhaps dated: `gpt-4o-mini-2024-07-18`).
    pub fn prices(&self) -> PriceTable {
        let by_upstream = self.models.values().map(|spec| (spec.upstream.clone(), spec.price));
        let by_name = self.models.values().map(|spec| (spec.name.clone(), spec.price));
        let table = PriceTable::new(by_upstream.chain(by_name));
        match &self.unlisted {
            Some(unlisted) => table.with_unlisted(unlisted.price),
            None => table,
        }
    }
}

/// How a step picks its model: the candidates, in the order given, and the strategy.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    pub strategy: RouteStrategy,
    pub candidates: Vec<Arc<ModelSpec>>,
    /// Parallel to `candidates`; 1 each unless configured.
    pub weights: Vec<f64>,
    pub min_tier: Option<u8>,
    /// Whether the step configures a route (else it is the step's model and its fallbacks).
    /// A configured route decides, whatever model a gateway client names.
    pub configured: bool,
    /// Names the route in cache keys: a configured route's answers are shared by every call
    /// that takes it, whichever candidate answered.
    pub label: String,
}

impl RouteSpec {
    /// `[steps.NAME.route]`.
    pub(super) fn configured(step: &str, raw: &RawRoute, registry: &ModelRegistry) -> Result<Self, SetupError> {
        let key = |field: &str| format!("steps.{step}.route.{field}");
        let strategy = RouteStrategy::parse(&raw.strategy).ok_or_else(|| {
            SetupError::invalid(
                key("strategy"),
                format!("`{}` is not a strategy: use ordered, cheapest, fastest or weighted", raw.strategy),
            )
        })?;
        if raw.candidates.is_empty() {
            return Err(SetupError::invalid(key("candidates"), "name at least one model from [models]"));
        }
        let candidates = raw
            .candidates
            .iter()
            .enumerate()
            .map(|(index, name)| registered(registry, name, &format!("steps.{step}.route.candidates[{index}]")))
            .collect::<Result<Vec<_>, _>>()?;
        for name in raw.weights.keys() {
            if !raw.candidates.contains(name) {
                return Err(SetupError::invalid(key("weights"), format!("`{name}` is not one of the candidates")));
            }
        }
        let weights = raw
            .candidates
            .iter()
            .map(|name| {
                let weight = raw.weights.get(name).copied().unwrap_or(1.0);
                if weight.is_finite() && weight > 0.0 {
                    Ok(weight)
                } else {
                    Err(SetupError::invalid(
                        key("weights"),
                        format!("{weight} for `{name}` must be a number above zero"),
                    ))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let min_tier = raw.min_tier.map(|tier| positive(&key("min_tier"), tier)).transpose()?;
        if let Some(min_tier) = min_tier
            && candidates.iter().all(|candidate| candidate.tier < min_tier)
        {
            return Err(SetupError::invalid(key("min_tier"), format!("no candidate is of tier {min_tier} or above")));
        }
        let label = format!("route:{}:{}", strategy.label(), raw.candidates.join(","));
        Ok(Self { strategy, candidates, weights, min_tier, configured: true, label })
    }

    /// A step without a configured route: its model, then its fallback models, in order.
    pub(super) fn from_model(
        step: &str,
        model: &str,
        fallbacks: &[RawRouteTarget],
        registry: &ModelRegistry,
    ) -> Result<Self, SetupError> {
        let mut candidates = vec![registered(registry, model, &format!("steps.{step}.model"))?];
        for (index, target) in fallbacks.iter().enumerate() {
            let key = format!("steps.{step}.fallbacks[{index}]");
            let spec = registered(registry, &target.model, &format!("{key}.model"))?;
            candidates.push(match &target.provider {
                Some(provider) if *provider != spec.provider => Arc::new(spec.on_provider(provider)),
                _ => spec,
            });
        }
        Ok(Self::ordered(candidates, model.to_owned()))
    }

    /// The candidates in the order given, first to last.
    pub fn ordered(candidates: Vec<Arc<ModelSpec>>, label: String) -> Self {
        let weights = vec![1.0; candidates.len()];
        Self { strategy: RouteStrategy::Ordered, candidates, weights, min_tier: None, configured: false, label }
    }
}

fn registered(registry: &ModelRegistry, name: &str, key: &str) -> Result<Arc<ModelSpec>, SetupError> {
    if name == UNLISTED_MODELS {
        return Err(SetupError::invalid(
            key,
            "`*` prices the models a call names that the registry does not list; a route names listed models",
        ));
    }
    registry.get(name).cloned().ok_or_else(|| {
        SetupError::invalid(
            key,
            format!(
                "model `{name}` is not in the registry: add [models.\"{name}\"] with its provider, prices \
                 (input_per_million_usd, output_per_million_usd; 0 for a free local model) and context_window"
            ),
        )
    })
}

/// What a budget does past its soft share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBudget {
    /// Past the soft share, routes take their cheapest candidates, whatever their tier; at the
    /// limit, calls that would cost anything are refused.
    Downgrade,
    /// Nothing changes until the limit; then calls that would cost anything are refused.
    Reject,
}

/// Spend budgets per UTC day, in US dollars.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetSettings {
    /// Every workspace's, unless `workspaces` names its own; `None`: no workspace budget.
    pub workspace_daily_usd: Option<f64>,
    pub workspaces: BTreeMap<String, f64>,
    /// The share of a budget past which `on_budget` applies.
    pub soft_share: f64,
    pub on_budget: OnBudget,
}

impl BudgetSettings {
    pub(super) fn validate(raw: RawBudgets) -> Result<Self, SetupError> {
        let amount = |key: &str, value: f64| {
            if value.is_finite() && value >= 0.0 {
                Ok(value)
            } else {
                Err(SetupError::invalid(key, format!("{value} is not an amount: use a non-negative number (0: none)")))
            }
        };
        let workspace_daily_usd =
            Some(amount("budgets.workspace_daily_usd", raw.workspace_daily_usd)?).filter(|usd| *usd > 0.0);
        let workspaces = raw
            .workspaces
            .into_iter()
            .map(|(workspace, usd)| Ok((workspace.clone(), amount(&format!("budgets.workspaces.{workspace}"), usd)?)))
            .collect::<Result<BTreeMap<_, _>, SetupError>>()?;
        if !(raw.soft_share > 0.0 && raw.soft_share <= 1.0) {
            return Err(SetupError::invalid(
                "budgets.soft_share",
                format!("{} is not a share: use a number in (0, 1]", raw.soft_share),
            ));
        }
        let on_budget = match raw.on_budget.as_str() {
            "downgrade" => OnBudget::Downgrade,
            "reject" => OnBudget::Reject,
            other => {
                return Err(SetupError::invalid(
                    "budgets.on_budget",
                    format!("`{other}` is not a policy: use downgrade or reject"),
                ));
            }
        };
        Ok(Self { workspace_daily_usd, workspaces, soft_share: raw.soft_share, on_budget })
    }

    /// The daily budget of `workspace`, if it has one.
    pub fn workspace_limit(&self, workspace: &str) -> Option<f64> {
        match self.workspaces.get(workspace) {
            Some(usd) => Some(*usd).filter(|usd| *usd > 0.0),
            None => self.workspace_daily_usd,
        }
    }
}

/// Shared by every route.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingSettings {
    /// Seeds the random choices (power of two, weights); `None`: a new seed every start.
    pub seed: Option<u64>,
    /// How fast a candidate's latency estimate forgets: a candidate not asked for this long
    /// weighs half, so that a slow one that recovered is tried again.
    pub latency_half_life: Duration,
}

impl RoutingSettings {
    pub(super) fn validate(raw: &RawRouting) -> Result<Self, SetupError> {
        Ok(Self {
            seed: Some(raw.seed).filter(|seed| *seed != 0),
            latency_half_life: positive_millis("routing.latency_half_life_ms", raw.latency_half_life_ms)?,
        })
    }
}

/// `steps.NAME.daily_budget_usd`.
pub(super) fn step_budget(step: &str, usd: Option<f64>) -> Result<Option<f64>, SetupError> {
    match usd {
        Some(usd) if usd.is_finite() && usd > 0.0 => Ok(Some(usd)),
        Some(usd) => Err(SetupError::invalid(
            format!("steps.{step}.daily_budget_usd"),
            format!("{usd} is not an amount: use a number above zero, or leave it out"),
        )),
        None => Ok(None),
    }
}
