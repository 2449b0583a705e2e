//! The learned verifier: a second look at a candidate that the embedding finds similar.
//!
//! One cosine threshold cannot tell "What is the best way to learn French?" from "What is the
//! best way to learn French grammar?": both score high. A candidate that clears the cosine
//! floor and the guards is described by a few cheap measures of how the two texts differ
//! (which content words only one has, word and character overlap, edit distance, question
//! words), and a boosted forest trained on the labelled dev pairs (`cargo xtask calibrate`)
//! turns them with the cosine into the probability that one request may be answered by the
//! other. That probability is the hit's confidence; a step serves at or above its
//! `min_confidence`.
//!
//! The forest was trained on one model's cosines: it applies only when the loaded model is
//! that model (the file records its id). With any other model the cache falls back to the
//! plain decision (cosine threshold and guards).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::forest::Forest;
use crate::verify::{Prepared, Rejection, entities_differ, guards, numbers_differ, reordered, strict_guards, verify};

/// The measures of how two texts differ that the forest reads first, in order; after them come
/// the two embeddings compared dimension by dimension (see [`feature_names`]).
pub const TEXT_FEATURES: &[&str] = &[
    "cosine",
    "content_jaccard",
    "word_jaccard",
    "fewer_unshared_content",
    "more_unshared_content",
    "shorter_words",
    "longer_words",
    "same_first_word",
    "bigram_jaccard",
    "char_trigram_jaccard",
    "content_union",
    "content_jaccard_by_length",
    "word_edit_ratio",
    "same_question_word",
    "longest_unshared_content",
    "unshared_content_chars",
    "same_content",
    "entities_differ",
    "numbers_differ",
    "reordered",
    "idf_content_share",
    "idf_word_share",
    "idf_unshared_max",
    "idf_unshared_sum",
    "idf_unshared_fewer_side",
    "idf_unshared_more_side",
];

/// How much each word says, learned from the dev sentences (inverse document frequency): a
/// rare word that only one of two questions has ("grammar" in "How do I learn French
/// grammar?") tells them apart far better than a common one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WordWeights {
    /// ln(sentences / sentences with the word), for words seen in at least two sentences.
    pub idf: BTreeMap<String, f32>,
    /// The weight of any other word: one seen once or never, as rare as words get.
    pub unseen: f32,
}

impl WordWeights {
    /// From distinct sentences (prepared as the cache prepares requests). Words seen once are
    /// left out: they would make the file large and say nothing a rare word does not.
    pub fn learn<'a>(sentences: impl Iterator<Item = &'a Prepared>) -> Self {
        let mut documents = 0usize;
        let mut frequency: HashMap<&str, usize> = HashMap::new();
        for sentence in sentences {
            documents += 1;
            for word in set(sentence.words.iter().map(String::as_str)) {
                *frequency.entry(word).or_default() += 1;
            }
        }
        let idf = |count: usize| ((documents.max(1) as f64) / count as f64).ln() as f32;
        Self {
            idf: frequency
                .into_iter()
                .filter(|(_, count)| *count >= 2)
                .map(|(word, count)| (word.to_owned(), idf(count)))
                .collect(),
            unseen: idf(1),
        }
    }

    pub fn weight(&self, word: &str) -> f32 {
        self.idf.get(word).copied().unwrap_or(self.unseen)
    }

    fn sum<'a>(&self, words: impl Iterator<Item = &'a String>) -> f32 {
        words.map(|word| self.weight(word)).sum()
    }
}

/// Every feature's name for embeddings of `dimensions`: [`TEXT_FEATURES`], then `|a-b|` and
/// `a*b` per dimension (the comparison of sentence embeddings that Sentence-BERT's classifiers
/// read); `dimensions` 0 for the text measures alone.
pub fn feature_names(dimensions: usize) -> Vec<String> {
    let mut names: Vec<String> = TEXT_FEATURES.iter().map(|name| (*name).to_owned()).collect();
    names.extend((0..dimensions).map(|d| format!("abs_diff_{d}")));
    names.extend((0..dimensions).map(|d| format!("product_{d}")));
    names
}

/// A text as the verifier sees it: prepared, and its unit-length embedding.
#[derive(Debug, Clone, Copy)]
pub struct Side<'a> {
    pub prepared: &'a Prepared,
    pub vector: &'a [f32],
}

/// The features of [`feature_names`] for two texts and their cosine similarity; the embeddings
/// compared per dimension only `with_embeddings`.
pub fn features(a: Side<'_>, b: Side<'_>, cosine: f32, weights: &WordWeights, with_embeddings: bool) -> Vec<f32> {
    let mut features = text_features(a.prepared, b.prepared, cosine, weights);
    if with_embeddings {
        features.extend(a.vector.iter().zip(b.vector).map(|(x, y)| (x - y).abs()));
        features.extend(a.vector.iter().zip(b.vector).map(|(x, y)| x * y));
    }
    features
}

fn text_features(a: &Prepared, b: &Prepared, cosine: f32, weights: &WordWeights) -> Vec<f32> {
    let only_a: Vec<&String> = difference(&a.content_set, &b.content_set);
    let only_b: Vec<&String> = difference(&b.content_set, &a.content_set);
    let unshared_lengths = || only_a.iter().chain(&only_b).map(|word| word.chars().count());
    let (shorter, longer) = min_max(a.words.len(), b.words.len());
    let (fewer_unshared, more_unshared) = min_max(only_a.len(), only_b.len());
    let union = a.content_set.len() + only_b.len();
    let weighted_shared: usize =
        a.content_set.iter().filter(|word| b.content_set.binary_search(word).is_ok()).map(|w| w.chars().count()).sum();
    let weighted_union = weighted_shared + unshared_lengths().sum::<usize>();
    let shared_content = a.content_set.iter().filter(|word| b.content_set.binary_search(word).is_ok());
    let idf_shared = weights.sum(shared_content);
    let (idf_only_a, idf_only_b) = (weights.sum(only_a.iter().copied()), weights.sum(only_b.iter().copied()));
    let (word_set_a, word_set_b) = (set(a.words.iter()), set(b.words.iter()));
    let idf_shared_words = weights.sum(word_set_a.intersection(&word_set_b).copied());
    let idf_all_words = weights.sum(word_set_a.union(&word_set_b).copied());
    let idf_unshared_max = only_a.iter().chain(&only_b).map(|word| weights.weight(word)).fold(0.0, f32::max);
    vec![
        cosine,
        ratio(union - only_a.len() - only_b.len(), union),
        jaccard(&set(a.words.iter()), &set(b.words.iter())),
        fewer_unshared as f32,
        more_unshared as f32,
        shorter as f32,
        longer as f32,
        flag(a.words.first() == b.words.first()),
        jaccard(&set(a.words.windows(2)), &set(b.words.windows(2))),
        jaccard(&char_trigrams(&a.normalized), &char_trigrams(&b.normalized)),
        union as f32,
        ratio(weighted_shared, weighted_union),
        ratio(edit_distance(&a.words, &b.words), longer),
        flag(a.question == b.question),
        unshared_lengths().max().unwrap_or(0) as f32,
        unshared_lengths().sum::<usize>() as f32,
        flag(a.content_set == b.content_set),
        flag(entities_differ(a, b)),
        flag(numbers_differ(a, b)),
        flag(reordered(a, b)),
        share(idf_shared, idf_shared + idf_only_a + idf_only_b),
        share(idf_shared_words, idf_all_words),
        idf_unshared_max,
        idf_only_a + idf_only_b,
        idf_only_a.min(idf_only_b),
        idf_only_a.max(idf_only_b),
    ]
}

fn share(part: f32, whole: f32) -> f32 {
    if whole > 0.0 { part / whole } else { 0.0 }
}

/// How a step decides: by the learned verifier, or (for a model it was not trained for) by the
/// cosine threshold alone. Both keep the guards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServeBar {
    /// Cosine at or above which the plain decision serves.
    pub threshold: f32,
    /// The learned verifier's probability at or above which it serves.
    pub min_confidence: f32,
}

/// A trained verifier as `cargo xtask calibrate` writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verifier {
    /// [`crate::Embedder::model_id`] of the model whose cosines it was trained on.
    pub model_id: String,
    /// Candidates below this cosine are never served: the forest saw none in training.
    pub floor: f32,
    /// The probability cut that reached the target precision on held-out dev pairs: the
    /// shipped default of `semantic.min_confidence`.
    pub min_confidence: f32,
    /// Cuts for other precision targets, loosest first: a step whose answers fit a wider
    /// range of requests (generated content) may choose a looser one.
    pub cuts: Vec<Cut>,
    /// What it was trained on and how it did there, for people reading the file.
    pub trained_on: serde_json::Value,
    /// Word weights learned from the dev sentences, which some features read.
    pub weights: WordWeights,
    pub forest: Forest,
}

/// The least probability at which the served dev pairs, scored by forests that did not see them,
/// were still `precision` precise; `recall` of the true pairs was then served.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cut {
    pub precision: f64,
    pub min_confidence: f32,
    pub recall: f64,
}

/// The verifier trained for the model `aipipe setup` installs.
const SHIPPED: &str = include_str!("../verifier.json");

impl Verifier {
    pub fn shipped() -> Self {
        // The file is part of the source and a unit test parses it; a broken one is a build
        // defect, not a runtime condition.
        Self::from_json(SHIPPED).unwrap_or_else(|err| unreachable!("the shipped verifier.json is broken: {err}"))
    }

    /// The shipped verifier if it was trained for the model `model_id` names, else `None` (and
    /// the plain decision applies).
    pub fn for_model(model_id: &str) -> Option<Self> {
        Some(Self::shipped()).filter(|verifier| verifier.model_id == model_id)
    }

    /// The calibrated `min_confidence` for a precision target, if one was calibrated.
    pub fn cut_for(&self, precision: f64) -> Option<f32> {
        self.cuts.iter().find(|cut| (cut.precision - precision).abs() < 1e-9).map(|cut| cut.min_confidence)
    }

    pub fn from_json(text: &str) -> Result<Self, String> {
        let verifier: Self = serde_json::from_str(text).map_err(|err| err.to_string())?;
        let dimensions = verifier.forest.features.len().saturating_sub(TEXT_FEATURES.len()) / 2;
        if verifier.forest.features != feature_names(dimensions) {
            return Err(format!(
                "trained on other features than this build computes ({} named; this build's first {}: {:?}): \
                 run `cargo xtask calibrate`",
                verifier.forest.features.len(),
                TEXT_FEATURES.len(),
                TEXT_FEATURES
            ));
        }
        verifier.forest.validate()?;
        Ok(verifier)
    }

    /// Whether the forest reads the embeddings compared per dimension besides the text
    /// measures.
    pub fn reads_embeddings(&self) -> bool {
        self.forest.features.len() > TEXT_FEATURES.len()
    }

    /// The probability that `candidate`'s answer serves `query`.
    pub fn confidence(&self, query: Side<'_>, candidate: Side<'_>, cosine: f32) -> f32 {
        self.forest.probability(&features(query, candidate, cosine, &self.weights, self.reads_embeddings()))
    }

    /// The served decision with this verifier: the floor, the strict guards, then the
    /// confidence.
    /// `Ok` holds the confidence.
    pub fn decide(
        &self,
        query: Side<'_>,
        candidate: Side<'_>,
        cosine: f32,
        min_confidence: f32,
    ) -> Result<f32, Rejection> {
        if let Some(settled) = settled_before_the_forest(query.prepared, candidate.prepared, cosine, self.floor) {
            return settled;
        }
        let confidence = self.confidence(query, candidate, cosine);
        if confidence < min_confidence {
            return Err(Rejection::LowConfidence);
        }
        Ok(confidence)
    }
}

/// What is decided before the forest is asked: below `floor` or stopped by a strict guard (an
/// `Err`), or the same text after normalisation (served, confidence 1). `None`: the forest
/// decides. Training asks the same question, so the forest learns exactly the pairs it judges.
pub fn settled_before_the_forest(
    query: &Prepared,
    candidate: &Prepared,
    cosine: f32,
    floor: f32,
) -> Option<Result<f32, Rejection>> {
    if cosine < floor {
        return Some(Err(Rejection::BelowThreshold));
    }
    if let Err(rejection) = strict_guards(query, candidate) {
        return Some(Err(rejection));
    }
    (query.normalized == candidate.normalized).then_some(Ok(1.0))
}

/// A candidate's score whatever the bar: the learned verifier's confidence, or the cosine
/// without one. `None` when a guard (or the verifier's floor) rules it out at any bar.
pub fn score(verifier: Option<&Verifier>, query: Side<'_>, candidate: Side<'_>, cosine: f32) -> Option<f32> {
    match verifier {
        Some(verifier) => match settled_before_the_forest(query.prepared, candidate.prepared, cosine, verifier.floor) {
            Some(settled) => settled.ok(),
            None => Some(verifier.confidence(query, candidate, cosine)),
        },
        None => guards(query.prepared, candidate.prepared).ok().map(|()| cosine),
    }
}

/// The served decision for one candidate, `Ok` with its confidence: the learned verifier's
/// when there is one for the model, else the plain cosine threshold and every guard (the
/// confidence is then the cosine).
pub fn decide(
    verifier: Option<&Verifier>,
    query: Side<'_>,
    candidate: Side<'_>,
    cosine: f32,
    bar: ServeBar,
) -> Result<f32, Rejection> {
    match verifier {
        Some(verifier) => verifier.decide(query, candidate, cosine, bar.min_confidence),
        None => verify(query.prepared, candidate.prepared, cosine, bar.threshold).map(|()| cosine),
    }
}

fn difference<'a>(from: &'a [String], other: &[String]) -> Vec<&'a String> {
    from.iter().filter(|word| other.binary_search(word).is_err()).collect()
}

fn set<T: Ord>(items: impl Iterator<Item = T>) -> BTreeSet<T> {
    items.collect()
}

fn jaccard<T: Ord>(a: &BTreeSet<T>, b: &BTreeSet<T>) -> f32 {
    let shared = a.intersection(b).count();
    ratio(shared, a.len() + b.len() - shared)
}

fn char_trigrams(text: &str) -> BTreeSet<[char; 3]> {
    let chars: Vec<char> = text.chars().map(|c| if c == ' ' { '_' } else { c }).collect();
    chars.windows(3).map(|w| [w[0], w[1], w[2]]).collect()
}

/// Word-level Levenshtein distance.
fn edit_distance(a: &[String], b: &[String]) -> usize {
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut current = vec![i + 1];
        for (j, y) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(x != y);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

fn ratio(part: usize, whole: usize) -> f32 {
    if whole == 0 { 0.0 } else { part as f32 / whole as f32 }
}

fn min_max(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

fn flag(condition: bool) -> f32 {
    if condition { 1.0 } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConceptNormalizer;

    fn prepared(text: &str) -> Prepared {
        Prepared::new(text, &ConceptNormalizer::default())
    }

    #[test]
    fn the_shipped_verifier_loads_and_matches_these_features() {
        let verifier = Verifier::shipped();
        let dimensions = if verifier.reads_embeddings() { 384 } else { 0 };
        assert_eq!(verifier.forest.features, feature_names(dimensions));
        assert!(verifier.weights.idf.len() > 1_000 && verifier.weights.unseen > 0.0);
        assert!(verifier.floor > 0.0 && verifier.floor < 1.0);
        assert!(verifier.min_confidence > 0.0 && verifier.min_confidence < 1.0);
    }

    #[test]
    fn features_measure_what_differs() {
        let a = prepared("How do I learn French fast?");
        let b = prepared("What is the fastest way to learn French grammar?");
        let (u, v) = ([0.6, 0.8, 0.0], [0.0, 0.8, 0.6]);
        let weights = WordWeights::learn([&a, &b, &prepared("How do I learn Spanish?")].into_iter());
        let f = features(Side { prepared: &a, vector: &u }, Side { prepared: &b, vector: &v }, 0.64, &weights, true);
        assert_eq!(f.len(), feature_names(3).len());
        let names = feature_names(3);
        let named = |name: &str| f[names.iter().position(|n| *n == name).unwrap()];
        // content: {learn, french, fast} / {fastest, way, learn, french, grammar}
        assert_eq!(named("fewer_unshared_content"), 1.0);
        assert_eq!(named("more_unshared_content"), 3.0);
        assert!((named("content_jaccard") - 2.0 / 6.0).abs() < 1e-6);
        assert_eq!(named("same_question_word"), 0.0, "how / what");
        assert_eq!(named("longest_unshared_content"), 7.0, "fastest, grammar");
        assert_eq!(named("same_content"), 0.0);
        assert_eq!(named("abs_diff_0"), 0.6);
        assert!((named("product_1") - 0.64).abs() < 1e-6);
        assert_eq!(
            text_features(&a, &a, 1.0, &weights)[TEXT_FEATURES.iter().position(|n| *n == "word_edit_ratio").unwrap()],
            0.0
        );
        // "learn" is in every sentence (weight 0), "french" in two of three; "grammar" only in
        // one, so it weighs most among the words only one side has.
        assert_eq!(weights.weight("learn"), 0.0);
        assert!(weights.weight("french") > 0.0 && weights.weight("grammar") == weights.unseen);
        assert_eq!(named("idf_unshared_max"), weights.unseen);
        assert!(named("idf_content_share") > 0.0 && named("idf_content_share") < 1.0);
        assert_eq!(
            features(Side { prepared: &a, vector: &u }, Side { prepared: &b, vector: &v }, 0.64, &weights, false).len(),
            TEXT_FEATURES.len()
        );
    }

    #[test]
    fn edit_distance_counts_word_edits() {
        let words = |text: &str| text.split(' ').map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(edit_distance(&words("a b c"), &words("a x c d")), 2);
        assert_eq!(edit_distance(&[], &words("a b")), 2);
    }

    #[test]
    fn a_file_for_other_features_is_refused() {
        let mut verifier = Verifier::shipped();
        verifier.forest.features.pop();
        let text = serde_json::to_string(&verifier).unwrap();
        assert!(Verifier::from_json(&text).unwrap_err().contains("cargo xtask calibrate"));
    }
}
