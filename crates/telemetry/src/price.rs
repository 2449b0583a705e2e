use std::collections::BTreeMap;

use serde::Deserialize;

/// What a model costs, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input_per_million_usd: f64,
    pub output_per_million_usd: f64,
    /// Input tokens read from the provider's prompt cache; the input price when not given.
    #[serde(default)]
    pub cached_input_per_million_usd: Option<f64>,
    /// Input tokens written to the provider's prompt cache; the input price when not given.
    #[serde(default)]
    pub cache_write_per_million_usd: Option<f64>,
}

/// The tokens of one reply, as they are priced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PricedTokens {
    /// Every input token, cached ones included.
    pub input: u64,
    pub output: u64,
    /// Of `input`, read from the prompt cache.
    pub cached_input: u64,
    /// Of `input`, written to the prompt cache.
    pub cache_write: u64,
}

impl ModelPrice {
    pub const fn new(input_per_million_usd: f64, output_per_million_usd: f64) -> Self {
        Self {
            input_per_million_usd,
            output_per_million_usd,
            cached_input_per_million_usd: None,
            cache_write_per_million_usd: None,
        }
    }

    /// Input and output at their plain prices (an estimate before a call, a log's usage).
    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        self.cost_of(PricedTokens { input: input_tokens, output: output_tokens, ..PricedTokens::default() })
    }

    /// Every kind of token at its own price.
    pub fn cost_of(&self, tokens: PricedTokens) -> f64 {
        let uncached = tokens.input.saturating_sub(tokens.cached_input).saturating_sub(tokens.cache_write);
        let cached_price = self.cached_input_per_million_usd.unwrap_or(self.input_per_million_usd);
        let write_price = self.cache_write_per_million_usd.unwrap_or(self.input_per_million_usd);
        (uncached as f64 * self.input_per_million_usd
            + tokens.cached_input as f64 * cached_price
            + tokens.cache_write as f64 * write_price
            + tokens.output as f64 * self.output_per_million_usd)
            / 1_000_000.0
    }

    /// Every price a non-negative number; the field that is not, if one is not.
    pub fn invalid_field(&self) -> Option<(&'static str, f64)> {
        [
            ("input_per_million_usd", Some(self.input_per_million_usd)),
            ("output_per_million_usd", Some(self.output_per_million_usd)),
            ("cached_input_per_million_usd", self.cached_input_per_million_usd),
            ("cache_write_per_million_usd", self.cache_write_per_million_usd),
        ]
        .into_iter()
        .find_map(|(field, value)| {
            value.filter(|value| !(value.is_finite() && *value >= 0.0)).map(|value| (field, value))
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable {
    prices: BTreeMap<String, ModelPrice>,
    /// The price of every model the table does not list, when the config sets one.
    unlisted: Option<ModelPrice>,
}

impl PriceTable {
    pub fn new(prices: impl IntoIterator<Item = (String, ModelPrice)>) -> Self {
        Self { prices: prices.into_iter().collect(), unlisted: None }
    }

    /// The same, every model it does not list priced at `price`.
    #[must_use]
    pub fn with_unlisted(self, price: ModelPrice) -> Self {
        Self { unlisted: Some(price), ..self }
    }

    /// The price of `model`, or of the longest listed name it extends at a `-` boundary
    /// (providers answer with dated names, `gpt-4o-mini-2024-07-18`, for listed ones), or the
    /// price of unlisted models.
    pub fn price(&self, model: &str) -> Option<ModelPrice> {
        if let Some(price) = self.prices.get(model) {
            return Some(*price);
        }
        self.prices
            .iter()
            .filter(|(name, _)| model.strip_prefix(name.as_str()).is_some_and(|rest| rest.starts_with('-')))
            .max_by_key(|(name, _)| name.len())
            .map(|(_, price)| *price)
            .or(self.unlisted)
    }

    /// The models with a listed price.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.prices.keys().map(String::as_str)
    }

    /// `None` for a model the table does not know.
    pub fn cost(&self, model: &str, input_tokens: u64, output_tokens: u64) -> Option<f64> {
        self.price(model).map(|price| price.cost(input_tokens, output_tokens))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> PriceTable {
        PriceTable::new([
            ("gpt-4o".to_owned(), ModelPrice::new(2.5, 10.0)),
            ("gpt-4o-mini".to_owned(), ModelPrice::new(0.15, 0.6)),
        ])
    }

    #[test]
    fn costs_per_million() {
        let cost = table().cost("gpt-4o-mini", 1_000_000, 500_000).unwrap();
        assert!((cost - 0.45).abs() < 1e-12);
    }

    #[test]
    fn cached_tokens_are_priced_apart() {
        let price = ModelPrice {
            cached_input_per_million_usd: Some(0.3),
            cache_write_per_million_usd: Some(3.75),
            ..ModelPrice::new(3.0, 15.0)
        };
        let tokens = PricedTokens { input: 1_000_000, output: 0, cached_input: 800_000, cache_write: 100_000 };
        // 100k plain at 3.0, 800k cached at 0.3, 100k written at 3.75.
        assert!((price.cost_of(tokens) - (0.3 + 0.24 + 0.375)).abs() < 1e-12);
        assert_eq!(ModelPrice::new(-1.0, 1.0).invalid_field(), Some(("input_per_million_usd", -1.0)));
    }

    #[test]
    fn dated_names_take_the_longest_listed_prefix() {
        assert_eq!(table().price("gpt-4o-mini-2024-07-18").unwrap().input_per_million_usd, 0.15);
        assert_eq!(table().price("gpt-4o-2024-08-06").unwrap().input_per_million_usd, 2.5);
        assert!(table().price("gpt-4omni").is_none());
        assert!(table().price("claude-3").is_none());
    }
}
