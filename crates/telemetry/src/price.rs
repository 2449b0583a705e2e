use std::collections::BTreeMap;

use serde::Deserialize;

/// What a model costs, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input_per_million_usd: f64,
    pub output_per_million_usd: f64,
}

impl ModelPrice {
    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        (input_tokens as f64 * self.input_per_million_usd + output_tokens as f64 * self.output_per_million_usd)
            / 1_000_000.0
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable {
    prices: BTreeMap<String, ModelPrice>,
}

impl PriceTable {
    pub fn new(prices: impl IntoIterator<Item = (String, ModelPrice)>) -> Self {
        Self { prices: prices.into_iter().collect() }
    }

    /// The price of `model`, or of the longest listed name it extends at a `-` boundary:
    /// providers answer with dated names (`gpt-4o-mini-2024-07-18`) for listed ones.
    pub fn price(&self, model: &str) -> Option<ModelPrice> {
        if let Some(price) = self.prices.get(model) {
            return Some(*price);
        }
        self.prices
            .iter()
            .filter(|(name, _)| model.strip_prefix(name.as_str()).is_some_and(|rest| rest.starts_with('-')))
            .max_by_key(|(name, _)| name.len())
            .map(|(_, price)| *price)
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
            ("gpt-4o".to_owned(), ModelPrice { input_per_million_usd: 2.5, output_per_million_usd: 10.0 }),
            ("gpt-4o-mini".to_owned(), ModelPrice { input_per_million_usd: 0.15, output_per_million_usd: 0.6 }),
        ])
    }

    #[test]
    fn costs_per_million() {
        let cost = table().cost("gpt-4o-mini", 1_000_000, 500_000).unwrap();
        assert!((cost - 0.45).abs() < 1e-12);
    }

    #[test]
    fn dated_names_take_the_longest_listed_prefix() {
        assert_eq!(table().price("gpt-4o-mini-2024-07-18").unwrap().input_per_million_usd, 0.15);
        assert_eq!(table().price("gpt-4o-2024-08-06").unwrap().input_per_million_usd, 2.5);
        assert!(table().price("gpt-4omni").is_none());
        assert!(table().price("claude-3").is_none());
    }
}
