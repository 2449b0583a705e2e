//! The call's plan: the route it takes (the step's, its own, or a named model first), without
//! the candidates whose provider cannot honour what it asks for.

use std::borrow::Cow;
use std::sync::Arc;

use providers::{Capabilities, ChatMessage, ChatRequest};

use super::{Call, Engine};
use crate::prompt::ChatOptions;
use crate::{ModelSpec, PipelineError, RouteSpec, StepSpec};

impl Engine {
    /// The provider a candidate runs on. A model on the configured primary provider runs on
    /// the engine's primary, which may be one handed to the builder under another name.
    pub(super) fn provider_of<'a>(&'a self, candidate: &'a ModelSpec) -> &'a str {
        if candidate.provider == self.inner.config.provider.name { &self.inner.primary } else { &candidate.provider }
    }

    /// The guards' key of a candidate: its provider and its model there (for a model the
    /// registry does not list, the entry that admitted it: the keys stay as many as the
    /// config's entries, whatever names callers send).
    pub(super) fn guard_key(&self, candidate: &ModelSpec) -> String {
        format!("{}/{}", self.provider_of(candidate), candidate.guard_model)
    }

    /// The route this call takes: the step's, unless the call names a model or a route.
    ///
    /// A model the call names goes first, then the step's other candidates in order, when the
    /// step has no configured route; with one, the route decides (a gateway client naming its
    /// usual model does not override the operator's routing), and a named model that is one of
    /// its candidates is merely tried first.
    pub(super) fn plan<'s>(&self, spec: &'s StepSpec, call: &Call<'_>) -> Result<Cow<'s, RouteSpec>, PipelineError> {
        let registry = &self.inner.config.models;
        if let Some(chosen) = &call.options.route {
            let candidates = match &chosen.candidates {
                Some(names) => names
                    .iter()
                    .map(|name| {
                        registry.get(name).cloned().ok_or_else(|| PipelineError::InvalidOptions {
                            reason: format!(
                                "route candidate `{name}` is not in the model registry (known: {})",
                                registry.iter().map(|model| model.name.as_str()).collect::<Vec<_>>().join(", ")
                            ),
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                None => spec.route.candidates.clone(),
            };
            let names: Vec<&str> = candidates.iter().map(|candidate| candidate.name.as_str()).collect();
            let label = format!("route:{}:{}", chosen.strategy.label(), names.join(","));
            let weights = vec![1.0; candidates.len()];
            return Ok(Cow::Owned(RouteSpec {
                strategy: chosen.strategy,
                weights,
                min_tier: spec.route.min_tier,
                configured: true,
                label,
                candidates,
            }));
        }
        let Some(model) = call.options.model.as_deref().filter(|model| *model != spec.route.label) else {
            return Ok(Cow::Borrowed(&spec.route));
        };
        let route = &spec.route;
        if route.configured {
            let Some(position) = route.candidates.iter().position(|candidate| candidate.name == model) else {
                tracing::debug!(model, "the step's route decides, not the model the call named");
                return Ok(Cow::Borrowed(route));
            };
            let mut candidates = route.candidates.clone();
            let named = candidates.remove(position);
            candidates.insert(0, named);
            return Ok(Cow::Owned(RouteSpec {
                label: route.label.clone(),
                ..RouteSpec::ordered(candidates, String::new())
            }));
        }
        let named = match registry.get(model) {
            Some(spec) => spec.clone(),
            None => Arc::new(self.unlisted(model)?),
        };
        let candidates = std::iter::once(named).chain(route.candidates.iter().skip(1).cloned()).collect();
        Ok(Cow::Owned(RouteSpec::ordered(candidates, model.to_owned())))
    }

    /// The route without the candidates whose provider cannot honour what the call asks for
    /// (tools, images, sampling controls); with none left, the parameter is named.
    pub(super) fn honouring<'s>(
        &self,
        route: Cow<'s, RouteSpec>,
        messages: &[ChatMessage],
        request: &ChatOptions,
    ) -> Result<Cow<'s, RouteSpec>, PipelineError> {
        let plain = messages.iter().all(|message| message.images.is_empty() && message.tool_calls.is_empty());
        if plain && *request == ChatOptions::default() {
            return Ok(route);
        }
        let probe = ChatRequest {
            messages: messages.to_vec(),
            tools: request.tools.clone(),
            extras: request.extras.clone(),
            ..ChatRequest::default()
        };
        let mut refused = None;
        let kept: Vec<usize> = (0..route.candidates.len())
            .filter(|&index| {
                let candidate = &route.candidates[index];
                let capabilities = self.capabilities(self.provider_of(candidate));
                let param = capabilities
                    .refuses(&probe)
                    .or_else(|| (!candidate.tools && !probe.tools.is_empty()).then_some("tools"));
                if let Some(param) = param {
                    refused.get_or_insert((param, candidate.name.clone()));
                }
                param.is_none()
            })
            .collect();
        if kept.len() == route.candidates.len() {
            return Ok(route);
        }
        let Some(&first) = kept.first() else {
            let (param, model) = refused.unwrap_or(("messages", String::new()));
            return Err(PipelineError::Unsupported {
                param: param.to_owned(),
                reason: format!(
                    "`{param}` cannot be honoured by any model this call may go to (`{model}`'s provider lacks it): \
                     leave it out, or route the step to a model whose provider has it"
                ),
            });
        };
        tracing::debug!(first = %route.candidates[first].name, "candidates that cannot honour the request left out");
        let mut honoured = route.into_owned();
        honoured.candidates = kept.iter().map(|&index| honoured.candidates[index].clone()).collect();
        honoured.weights = kept.iter().map(|&index| honoured.weights.get(index).copied().unwrap_or(1.0)).collect();
        Ok(Cow::Owned(honoured))
    }

    /// What a provider's API can be asked for; one the config does not describe (handed to
    /// the builder) is taken to be like the primary one.
    pub(super) fn capabilities(&self, provider: &str) -> Capabilities {
        let config = &self.inner.config;
        config.providers.get(provider).map_or(config.provider.capabilities, |p| p.capabilities)
    }

    /// A model a call names that the registry does not list: a dated name of a listed model,
    /// or one `[models."*"]` admits, at its price; refused otherwise, since a model with no
    /// price would make its calls free to every budget.
    fn unlisted(&self, model: &str) -> Result<ModelSpec, PipelineError> {
        self.inner.config.models.admit(model).ok_or_else(|| PipelineError::UnlistedModel {
            model: model.chars().take(100).collect(),
            known: self.inner.config.models.iter().map(|spec| spec.name.as_str()).collect::<Vec<_>>().join(", "),
        })
    }
}
