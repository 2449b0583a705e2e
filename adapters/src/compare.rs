use std::collections::BTreeSet;

use serde_json::Value;

/// How a shadow call's two answers are judged the same.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Comparison {
    /// Structured answers (a class, a priority, a verdict): equal values.
    Exact,
    /// Free text (an enhancement, a summary): word overlap (Dice coefficient over lower-cased
    /// words) at least this high.
    Text { min_similarity: f64 },
}

impl Comparison {
    /// The similarity of the two answers and whether they agree.
    pub fn judge(self, legacy: &Value, engine: &Value) -> (f64, bool) {
        match self {
            Self::Exact => {
                let same = legacy == engine;
                (if same { 1.0 } else { 0.0 }, same)
            }
            Self::Text { min_similarity } => {
                let similarity = word_overlap(&text_of(legacy), &text_of(engine));
                (similarity, similarity >= min_similarity)
            }
        }
    }
}

fn text_of(value: &Value) -> String {
    value.as_str().map_or_else(|| value.to_string(), str::to_owned)
}

fn word_overlap(a: &str, b: &str) -> f64 {
    let words = |text: &str| -> BTreeSet<String> {
        text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
    };
    let (a, b) = (words(a), words(b));
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    2.0 * a.intersection(&b).count() as f64 / (a.len() + b.len()) as f64
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn exact_and_text_comparisons() {
        assert_eq!(Comparison::Exact.judge(&json!("billing"), &json!("billing")), (1.0, true));
        assert_eq!(Comparison::Exact.judge(&json!({"level": "high"}), &json!({"level": "low"})), (0.0, false));
        let text = Comparison::Text { min_similarity: 0.6 };
        let (similarity, agreed) = text.judge(&json!("The cat sat on the mat."), &json!("the cat sat on a mat"));
        assert!(agreed && similarity > 0.8, "{similarity}");
        assert!(!text.judge(&json!("Revenue grew"), &json!("The app crashes on upload")).1);
    }
}
