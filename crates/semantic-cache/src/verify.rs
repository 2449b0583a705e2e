//! Deciding whether a cached answer may serve a new request.
//!
//! A cosine threshold alone serves wrong answers: "Cancel my subscription" and "Don't cancel
//! my subscription" embed close together. A candidate above the threshold is served only if
//! it also passes guards for what embeddings miss: a flipped negation, different numbers, the
//! same words in a different order (who does what to whom), or different named entities.

use std::collections::BTreeSet;

use crate::normalize::{ConceptNormalizer, tokens};

/// A text prepared once for comparisons: its normalised form and what the guards look at.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub normalized: String,
    negations: usize,
    numbers: Vec<String>,
    content: Vec<String>,
    entities: BTreeSet<String>,
}

impl Prepared {
    pub fn new(text: &str, normalizer: &ConceptNormalizer) -> Self {
        let normalized = normalizer.normalize(text);
        let words: Vec<&str> = normalized.split(' ').filter(|w| !w.is_empty()).collect();
        let negations = words.iter().filter(|w| NEGATIONS.contains(w)).count();
        let mut numbers: Vec<String> =
            words.iter().filter(|w| w.chars().any(|c| c.is_ascii_digit())).map(|w| (*w).to_owned()).collect();
        numbers.sort();
        let content = words
            .iter()
            .filter(|w| !STOPWORDS.contains(w) && !NEGATIONS.contains(w))
            .map(|w| (*w).to_owned())
            .collect();
        Self { normalized, negations, numbers, content, entities: entities(text, normalizer) }
    }
}

/// Why a candidate was not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    BelowThreshold,
    /// One says "not" where the other does not.
    Negation,
    /// The numbers differ ("5 mg" / "50 mg").
    Numbers,
    /// The same content words in another order ("Paris to Rome" / "Rome to Paris").
    WordOrder,
    /// Different names ("Python" / "Java").
    Entities,
}

impl Rejection {
    pub fn label(self) -> &'static str {
        match self {
            Self::BelowThreshold => "below_threshold",
            Self::Negation => "negation",
            Self::Numbers => "numbers",
            Self::WordOrder => "word_order",
            Self::Entities => "entities",
        }
    }
}

/// The served decision: similarity at or above `threshold`, then every guard.
pub fn verify(query: &Prepared, candidate: &Prepared, similarity: f32, threshold: f32) -> Result<(), Rejection> {
    if similarity < threshold {
        return Err(Rejection::BelowThreshold);
    }
    guards(query, candidate)
}

/// The guards alone, for callers that apply their own similarity bar.
pub fn guards(query: &Prepared, candidate: &Prepared) -> Result<(), Rejection> {
    if query.normalized == candidate.normalized {
        return Ok(());
    }
    if query.negations % 2 != candidate.negations % 2 {
        return Err(Rejection::Negation);
    }
    if query.numbers != candidate.numbers {
        return Err(Rejection::Numbers);
    }
    if query.content != candidate.content && sorted(&query.content) == sorted(&candidate.content) {
        return Err(Rejection::WordOrder);
    }
    if query.entities != candidate.entities && !query.entities.is_empty() && !candidate.entities.is_empty() {
        return Err(Rejection::Entities);
    }
    Ok(())
}

fn sorted(words: &[String]) -> Vec<&String> {
    let mut sorted: Vec<&String> = words.iter().collect();
    sorted.sort();
    sorted
}

/// Capitalised words that do not start a sentence: a cheap stand-in for named entities.
/// Terms of the concept table ("KPI", "SaaS") are concepts, not names, and never count.
fn entities(text: &str, normalizer: &ConceptNormalizer) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut sentence_start = true;
    for raw in text.split_whitespace() {
        let word: String = raw.chars().filter(|c| c.is_alphanumeric()).collect();
        let capitalised = word.chars().next().is_some_and(char::is_uppercase);
        let acronym_or_name = word.chars().count() > 1 && word != "I";
        if capitalised && acronym_or_name && !sentence_start && !normalizer.is_concept(&word) {
            found.extend(tokens(&word));
        }
        sentence_start = raw.ends_with(['.', '?', '!', ':']);
    }
    found
}

const NEGATIONS: &[&str] = &["not", "no", "never", "none", "nobody", "nothing", "neither", "nor", "without", "cannot"];

const STOPWORDS: &[&str] = &[
    "a", "an", "the", "and", "or", "but", "if", "then", "of", "to", "in", "on", "at", "by", "for", "with", "from",
    "into", "about", "as", "is", "are", "was", "were", "be", "been", "being", "am", "do", "does", "did", "have", "has",
    "had", "i", "you", "he", "she", "it", "we", "they", "me", "my", "your", "our", "their", "his", "her", "its",
    "this", "that", "these", "those", "what", "which", "who", "whom", "how", "why", "when", "where", "can", "could",
    "would", "should", "will", "shall", "may", "might", "must", "there", "here", "so", "some", "any", "all", "more",
    "most", "very", "just", "also", "than", "too", "up", "out", "get", "one", "s",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn check(a: &str, b: &str) -> Result<(), Rejection> {
        let n = ConceptNormalizer::default();
        guards(&Prepared::new(a, &n), &Prepared::new(b, &n))
    }

    #[test]
    fn guards_catch_what_embeddings_miss() {
        assert_eq!(check("Cancel my subscription", "Don't cancel my subscription"), Err(Rejection::Negation));
        assert_eq!(check("Is 5 mg a safe dose?", "Is 50 mg a safe dose?"), Err(Rejection::Numbers));
        assert_eq!(check("Flights from Paris to Rome", "Flights from Rome to Paris"), Err(Rejection::WordOrder));
        assert_eq!(check("How do I learn Python fast?", "How do I learn Java fast?"), Err(Rejection::Entities));
        assert_eq!(
            check("Is Python slow?", "Is Python fast?"),
            Ok(()),
            "entities agree; the words are the embedding's job"
        );
    }

    #[test]
    fn paraphrases_pass() {
        assert_eq!(check("How can I lose weight quickly?", "What is the fastest way to lose weight?"), Ok(()));
        assert_eq!(
            check(
                "Generate KPI for business-to-business software company",
                "Create a list of KPIs for B2B SaaS startup"
            ),
            Ok(())
        );
        assert_eq!(check("I can't log in", "I cannot log in"), Ok(()));
    }
}
