//! Deciding whether a cached answer may serve a new request.
//!
//! A cosine threshold alone serves wrong answers: "Cancel my subscription" and "Don't cancel
//! my subscription" embed close together. A candidate above the threshold is served only if
//! it also passes guards for what embeddings miss: a flipped negation, different numbers, the
//! same words in a different order (who does what to whom), or different named entities.

use std::collections::BTreeSet;

use crate::normalize::{ConceptNormalizer, tokens};

/// A text prepared once for comparisons: its normalised form and what the guards and the
/// learned verifier look at.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub normalized: String,
    pub(crate) words: Vec<String>,
    pub(crate) negations: usize,
    pub(crate) numbers: Vec<String>,
    /// Content words in order (word order matters to a guard).
    pub(crate) content: Vec<String>,
    /// The same, sorted and deduplicated (overlap measures).
    pub(crate) content_set: Vec<String>,
    /// The first question word ("how", "why", ...), which sets what kind of answer is wanted.
    pub(crate) question: Option<String>,
    pub(crate) entities: BTreeSet<String>,
}

impl Prepared {
    pub fn new(text: &str, normalizer: &ConceptNormalizer) -> Self {
        let normalized = normalizer.normalize(text);
        let words: Vec<String> = normalized.split(' ').filter(|w| !w.is_empty()).map(str::to_owned).collect();
        let negations = words.iter().filter(|w| NEGATIONS.contains(&w.as_str())).count();
        let mut numbers: Vec<String> =
            words.iter().filter(|w| w.chars().any(|c| c.is_ascii_digit())).cloned().collect();
        numbers.sort();
        let content: Vec<String> = words
            .iter()
            .filter(|w| !STOPWORDS.contains(&w.as_str()) && !NEGATIONS.contains(&w.as_str()))
            .cloned()
            .collect();
        let mut content_set = content.clone();
        content_set.sort();
        content_set.dedup();
        let question = words.iter().find(|w| QUESTION_WORDS.contains(&w.as_str())).cloned();
        Self {
            entities: entities(text, normalizer),
            normalized,
            words,
            negations,
            numbers,
            content,
            content_set,
            question,
        }
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
    /// The learned verifier's confidence is below the step's `min_confidence`.
    LowConfidence,
}

impl Rejection {
    pub fn label(self) -> &'static str {
        match self {
            Self::BelowThreshold => "below_threshold",
            Self::Negation => "negation",
            Self::Numbers => "numbers",
            Self::WordOrder => "word_order",
            Self::Entities => "entities",
            Self::LowConfidence => "low_confidence",
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
    strict_guards(query, candidate)?;
    if query.normalized == candidate.normalized {
        return Ok(());
    }
    if numbers_differ(query, candidate) {
        return Err(Rejection::Numbers);
    }
    if reordered(query, candidate) {
        return Err(Rejection::WordOrder);
    }
    if entities_differ(query, candidate) {
        return Err(Rejection::Entities);
    }
    Ok(())
}

/// The guards no score may overrule: a flipped negation, numbers that contradict each other,
/// content words that swapped places in an otherwise identical sentence ("from Paris to Rome"
/// / "from Rome to Paris"). Weaker signals (a number only one text gives, the same content
/// words in a reworded sentence, different names by a crude test) reject more true
/// duplicates than false ones on the dev pairs, so the learned verifier weighs them instead
/// of obeying them.
pub fn strict_guards(query: &Prepared, candidate: &Prepared) -> Result<(), Rejection> {
    if query.normalized == candidate.normalized {
        return Ok(());
    }
    if query.negations % 2 != candidate.negations % 2 {
        return Err(Rejection::Negation);
    }
    if !query.numbers.is_empty() && !candidate.numbers.is_empty() && query.numbers != candidate.numbers {
        return Err(Rejection::Numbers);
    }
    if reordered(query, candidate) && roles_swapped(query, candidate) {
        return Err(Rejection::WordOrder);
    }
    Ok(())
}

/// The same content words in another order.
pub(crate) fn reordered(query: &Prepared, candidate: &Prepared) -> bool {
    query.content != candidate.content && sorted(&query.content) == sorted(&candidate.content)
}

/// Word for word the same sentence except where content words stand: only their places moved.
fn roles_swapped(query: &Prepared, candidate: &Prepared) -> bool {
    query.words.len() == candidate.words.len()
        && query.words.iter().zip(&candidate.words).all(|(a, b)| a == b || (is_content(a) && is_content(b)))
}

fn is_content(word: &str) -> bool {
    !STOPWORDS.contains(&word) && !NEGATIONS.contains(&word)
}

pub(crate) fn numbers_differ(query: &Prepared, candidate: &Prepared) -> bool {
    query.numbers != candidate.numbers
}

/// Both name something, and not the same things.
pub(crate) fn entities_differ(query: &Prepared, candidate: &Prepared) -> bool {
    query.entities != candidate.entities && !query.entities.is_empty() && !candidate.entities.is_empty()
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

const QUESTION_WORDS: &[&str] = &["what", "how", "why", "which", "who", "whom", "whose", "where", "when"];

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
    fn strict_guards_leave_weaker_signals_to_the_learned_verifier() {
        let n = ConceptNormalizer::default();
        let strict = |a: &str, b: &str| strict_guards(&Prepared::new(a, &n), &Prepared::new(b, &n));
        assert_eq!(strict("Cancel my subscription", "Don't cancel my subscription"), Err(Rejection::Negation));
        assert_eq!(strict("Is 5 mg a safe dose?", "Is 50 mg a safe dose?"), Err(Rejection::Numbers));
        assert_eq!(strict("Flights from Paris to Rome", "Flights from Rome to Paris"), Err(Rejection::WordOrder));
        // A number only one side gives, a reworded sentence, other names: weighed, not vetoed.
        assert_eq!(strict("Best phones under 15000?", "What are the best phones?"), Ok(()));
        assert_eq!(
            strict("How can I increase the traffic to my website?", "How to increase my website traffic?"),
            Ok(())
        );
        assert_eq!(strict("How do I learn Python fast?", "How do I learn Java fast?"), Ok(()));
        assert_eq!(check("Best phones under 15000?", "What are the best phones?"), Err(Rejection::Numbers));
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
