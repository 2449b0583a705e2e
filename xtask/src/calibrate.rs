//! `cargo xtask calibrate`: trains the semantic cache's learned verifier on the labelled dev
//! pairs (never the test pairs) and writes `crates/semantic-cache/verifier.json`.
//!
//! The probability cut is chosen on out-of-fold predictions (each dev pair scored by a forest
//! that did not see it), as the lowest cut at which the served pairs still reach the target
//! precision; the shipped forest is then trained on all dev pairs. The folds share no sentence:
//! pairs are grouped by the connected components of the graph whose edges they are, as the
//! data's dev/test split is, so that a fold forest never scores a sentence it was trained on.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use semantic_cache::learned::{Cut, Verifier, WordWeights, feature_names, features, settled_before_the_forest};
use semantic_cache::verify::Prepared;
use semantic_cache::{ConceptNormalizer, Embedder, ModelPaths};
use serde::Serialize;

use crate::boost::{BoostParams, train};
use crate::eval::{Scores, read_pairs, score};

/// Candidates below this cosine are never served (and not trained on): at 0.80 plain cosine
/// serves wrong answers a third of the time on the dev pairs, and the recall the verifier buys
/// comes from far above it.
const FLOOR: f32 = 0.80;
const FOLDS: u64 = 5;
/// Precision targets whose cuts the file lists beside the shipped one.
const OTHER_TARGETS: &[f64] = &[0.80, 0.85, 0.90];
const DEV_FILES: &[&str] = &["qqp-dev.jsonl", "mrpc-dev.jsonl", "stsb-dev.jsonl"];
/// Whether the forest also reads the two embeddings compared dimension by dimension. With
/// sentence-disjoint folds they did not help: a forest on them learns sentences, not what makes
/// two of them the same request (docs/benchmarks.md).
const READS_EMBEDDINGS: bool = false;

pub struct CalibrateOptions {
    /// Precision the cut must reach on held-out dev pairs.
    pub target_precision: f64,
    pub json: bool,
}

/// One dev pair the decision has to make.
#[derive(Clone)]
struct Row {
    file: usize,
    same: bool,
    /// Identical after normalisation: always served, nothing to learn.
    identical: bool,
    /// At or above the floor and through the guards: the forest decides.
    features: Option<Vec<f32>>,
    fold: u64,
}

#[derive(Debug, Serialize)]
struct FileFigures {
    file: String,
    pairs: usize,
    precision: f64,
    recall: f64,
}

pub fn calibrate(root: &Path, data: &Path, options: &CalibrateOptions) -> anyhow::Result<()> {
    let embedder = Embedder::load(&ModelPaths::installed(), 0)?;
    let normalizer = ConceptNormalizer::default();
    let files = DEV_FILES
        .iter()
        .map(|name| read_pairs(&data.join("pairs").join(name), None))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let folds = SentenceFolds::of(files.iter().flatten().map(|pair| (pair.a.as_str(), pair.b.as_str())), FOLDS);
    let scored = files.iter().map(|pairs| score(pairs, &embedder, &normalizer)).collect::<anyhow::Result<Vec<_>>>()?;
    // Word weights from every distinct dev sentence (no labels: what a word says comes from how
    // often it occurs).
    let mut sentences: HashMap<&str, &Prepared> = HashMap::new();
    for pair in scored.iter().flatten() {
        sentences.insert(&pair.pair.a, &pair.a);
        sentences.insert(&pair.pair.b, &pair.b);
    }
    let weights = WordWeights::learn(sentences.values().copied());
    let mut rows = Vec::new();
    for (file, pairs) in scored.iter().enumerate() {
        for scored in pairs {
            let (a, b) = scored.sides();
            let settled = settled_before_the_forest(a.prepared, b.prepared, scored.cosine, FLOOR);
            rows.push(Row {
                file,
                same: scored.pair.same,
                identical: matches!(settled, Some(Ok(_))),
                features: settled.is_none().then(|| features(a, b, scored.cosine, &weights, READS_EMBEDDINGS)),
                fold: folds.fold(&scored.pair.a),
            });
        }
    }
    let trainable: Vec<&Row> = rows.iter().filter(|row| row.features.is_some()).collect();
    eprintln!("calibrate: {} dev pairs, {} candidates to learn from", rows.len(), trainable.len());
    let params = BoostParams::default();
    let names = feature_names(if READS_EMBEDDINGS { embedder.dimensions() } else { 0 });
    let names: Vec<&str> = names.iter().map(String::as_str).collect();

    // The five fold forests and the shipped one train side by side, one thread each.
    let (folds, shipped) = std::thread::scope(|scope| {
        let folds: Vec<_> = (0..FOLDS)
            .map(|fold| {
                let trainable = &trainable;
                let names = &names;
                scope.spawn(move || {
                    let (x, labels) = examples(trainable.iter().copied().filter(|row| row.fold != fold));
                    train(&x, &labels, names, params)
                })
            })
            .collect();
        let (x, labels) = examples(trainable.iter().copied());
        let shipped = train(&x, &labels, &names, params);
        (folds.into_iter().map(|fold| fold.join()).collect::<Result<Vec<_>, _>>(), shipped)
    });
    let folds = folds.map_err(|_| anyhow::anyhow!("a training thread panicked"))?;
    let held_out: Vec<Option<f32>> = rows
        .iter()
        .map(|row| row.features.as_ref().map(|features| folds[row.fold as usize].probability(features)))
        .collect();
    let cut_at = |target: f64| {
        lowest_cut_at_precision(&rows, &held_out, target)
            // Three decimals, as people read and write it in the config; rounded up, never below.
            .map(|cut| (cut * 1000.0).ceil() / 1000.0)
            .with_context(|| format!("no cut reaches precision {target} on the dev pairs"))
    };
    let min_confidence = cut_at(options.target_precision)?;
    let cuts = OTHER_TARGETS
        .iter()
        .map(|&precision| {
            let min_confidence = cut_at(precision)?;
            let (scores, _) = figures_at(&rows, &held_out, min_confidence, None);
            Ok(Cut { precision, min_confidence, recall: scores.recall })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let figures: Vec<FileFigures> = DEV_FILES
        .iter()
        .enumerate()
        .map(|(file, name)| {
            let (scores, pairs) = figures_at(&rows, &held_out, min_confidence, Some(file));
            FileFigures { file: (*name).to_owned(), pairs, precision: scores.precision, recall: scores.recall }
        })
        .collect();

    let verifier = Verifier {
        model_id: embedder.model_id().to_owned(),
        floor: FLOOR,
        min_confidence,
        cuts,
        weights,
        trained_on: serde_json::json!({
            "files": DEV_FILES,
            "candidates": trainable.len(),
            "rounds": params.rounds,
            "depth": params.depth,
            "learning_rate": params.learning_rate,
            "target_precision": options.target_precision,
            "held_out": figures,
        }),
        forest: shipped,
    };
    let path = root.join("crates").join("semantic-cache").join("verifier.json");
    std::fs::write(&path, serde_json::to_string(&verifier)? + "\n")
        .with_context(|| format!("cannot write `{}`", path.display()))?;
    for figure in &figures {
        if options.json {
            println!(
                "{}",
                serde_json::json!({"file": figure.file, "min_confidence": min_confidence, "pairs": figure.pairs, "precision": figure.precision, "recall": figure.recall})
            );
        } else {
            println!(
                "{}: {} pairs, held-out precision {:.3} recall {:.3} at min_confidence {min_confidence:.3}",
                figure.file, figure.pairs, figure.precision, figure.recall
            );
        }
    }
    let defaults = root.join("crates").join("pipeline-core").join("defaults.toml");
    set_default_min_confidence(&defaults, min_confidence)?;
    eprintln!(
        "calibrate: wrote {} and semantic.min_confidence = {min_confidence:.3} in {}",
        path.display(),
        defaults.display()
    );
    Ok(())
}

/// The shipped default follows the verifier it was calibrated with (a test checks they agree).
/// Only the value changes: the file's comments and layout stay as they are.
fn set_default_min_confidence(defaults: &Path, min_confidence: f32) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(defaults).with_context(|| format!("cannot read `{}`", defaults.display()))?;
    let mut document: toml_edit::DocumentMut =
        text.parse().with_context(|| format!("`{}` is not TOML", defaults.display()))?;
    let value = document
        .get_mut("semantic")
        .and_then(|semantic| semantic.get_mut("min_confidence"))
        .and_then(toml_edit::Item::as_value_mut)
        .with_context(|| format!("`{}` has no semantic.min_confidence", defaults.display()))?;
    let decor = value.decor().clone();
    // Three decimals, as the cut is reported.
    *value = toml_edit::Value::from((f64::from(min_confidence) * 1000.0).round() / 1000.0);
    *value.decor_mut() = decor;
    std::fs::write(defaults, document.to_string()).with_context(|| format!("cannot write `{}`", defaults.display()))
}

fn examples<'a>(rows: impl Iterator<Item = &'a Row>) -> (Vec<Vec<f32>>, Vec<bool>) {
    rows.filter_map(|row| row.features.clone().map(|features| (features, row.same))).unzip()
}

/// Served at `cut`: identical texts always, candidates whose held-out probability reaches it.
fn served(row: &Row, confidence: Option<f32>, cut: f32) -> bool {
    row.identical || confidence.is_some_and(|confidence| confidence >= cut)
}

/// The decisions at `cut` for one dev file's pairs (all files' when `None`), and how many.
fn figures_at(rows: &[Row], held_out: &[Option<f32>], cut: f32, file: Option<usize>) -> (Scores, usize) {
    let decisions: Vec<(bool, bool)> = rows
        .iter()
        .zip(held_out)
        .filter(|(row, _)| file.is_none_or(|file| file == row.file))
        .map(|(row, confidence)| (served(row, *confidence, cut), row.same))
        .collect();
    (Scores::of(decisions.iter().copied()), decisions.len())
}

/// The lowest held-out probability at which everything served, over all dev files, is still at
/// least `target` precise: the most recall the target allows.
fn lowest_cut_at_precision(rows: &[Row], held_out: &[Option<f32>], target: f64) -> Option<f32> {
    let mut scored: Vec<(f32, bool)> =
        rows.iter().zip(held_out).filter_map(|(row, p)| p.filter(|_| !row.identical).map(|p| (p, row.same))).collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut tp, mut fp) = rows
        .iter()
        .filter(|row| row.identical)
        .fold((0u64, 0u64), |(tp, fp), row| if row.same { (tp + 1, fp) } else { (tp, fp + 1) });
    let mut cut = None;
    for (index, (p, same)) in scored.iter().enumerate() {
        if *same {
            tp += 1;
        } else {
            fp += 1;
        }
        // Only where a cut can fall: between distinct probabilities.
        let boundary = scored.get(index + 1).is_none_or(|next| next.0 < *p);
        if boundary && tp as f64 / (tp + fp) as f64 >= target {
            cut = Some(*p);
        }
    }
    cut
}

/// Cross-validation folds that share no sentence: a pair is an edge between its two
/// sentences, and each connected component of that graph goes whole to one fold, chosen by a
/// stable hash of its smallest sentence (the same folds on every run and machine).
struct SentenceFolds {
    fold_of: HashMap<String, u64>,
}

impl SentenceFolds {
    fn of<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>, folds: u64) -> Self {
        fn root(parent: &mut [usize], mut node: usize) -> usize {
            while parent[node] != node {
                parent[node] = parent[parent[node]];
                node = parent[node];
            }
            node
        }
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut parent: Vec<usize> = Vec::new();
        let mut sentences: Vec<&str> = Vec::new();
        for (a, b) in pairs {
            let mut node = |text: &'a str| {
                *index.entry(text).or_insert_with(|| {
                    parent.push(parent.len());
                    sentences.push(text);
                    parent.len() - 1
                })
            };
            let (a, b) = (node(a), node(b));
            let (ra, rb) = (root(&mut parent, a), root(&mut parent, b));
            if ra != rb {
                parent[ra.max(rb)] = ra.min(rb);
            }
        }
        let mut smallest: HashMap<usize, &str> = HashMap::new();
        for (node, text) in sentences.iter().enumerate() {
            let component = root(&mut parent, node);
            let entry = smallest.entry(component).or_insert(text);
            if text < entry {
                *entry = text;
            }
        }
        let fold_of = sentences
            .iter()
            .enumerate()
            .map(|(node, text)| {
                let component = root(&mut parent, node);
                ((*text).to_owned(), fnv(smallest[&component]) % folds)
            })
            .collect();
        Self { fold_of }
    }

    /// The fold of the component a sentence belongs to (every sentence given to `of` has one).
    fn fold(&self, sentence: &str) -> u64 {
        self.fold_of.get(sentence).copied().unwrap_or(0)
    }
}

/// A stable hash, for folds that do not change between runs or machines.
fn fnv(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(same: bool, identical: bool) -> Row {
        Row { file: 0, same, identical, features: (!identical).then(Vec::new), fold: 0 }
    }

    #[test]
    fn the_cut_is_the_lowest_probability_that_keeps_the_target_precision() {
        // Probabilities, best first: 0.9 same, 0.8 same, 0.7 different, 0.6 same, 0.5 different.
        let rows = [row(true, false), row(true, false), row(false, false), row(true, false), row(false, false)];
        let held_out = [Some(0.9), Some(0.8), Some(0.7), Some(0.6), Some(0.5)];
        // Served at 0.6: 3 of 4 right (0.75); at 0.5: 3 of 5 (0.6); at 0.8: 2 of 2.
        assert_eq!(lowest_cut_at_precision(&rows, &held_out, 0.75), Some(0.6));
        assert_eq!(lowest_cut_at_precision(&rows, &held_out, 0.8), Some(0.8));
        assert_eq!(lowest_cut_at_precision(&rows, &held_out, 0.6), Some(0.5));
        // Identical texts are always served and count for precision: a wrong one moves the cut up.
        let mut with_identical = rows.to_vec();
        with_identical.push(row(false, true));
        let held_out_too = [held_out.as_slice(), &[None]].concat();
        assert_eq!(lowest_cut_at_precision(&with_identical, &held_out_too, 0.6), Some(0.6));
        assert_eq!(lowest_cut_at_precision(&with_identical, &held_out_too, 0.75), None);
        assert_eq!(lowest_cut_at_precision(&rows, &held_out, 1.01), None);
    }

    #[test]
    fn a_cut_never_falls_between_two_pairs_of_the_same_probability() {
        let rows = [row(true, false), row(false, false), row(true, false)];
        let held_out = [Some(0.9), Some(0.7), Some(0.7)];
        // At 0.7 both tied pairs are served (2 of 3): a target of 0.9 stops at 0.9.
        assert_eq!(lowest_cut_at_precision(&rows, &held_out, 0.9), Some(0.9));
    }

    #[test]
    fn folds_never_split_a_sentence() {
        let pairs = [("a", "b"), ("b", "c"), ("d", "e"), ("f", "g"), ("g", "a"), ("h", "i"), ("j", "k"), ("k", "l")];
        let folds = SentenceFolds::of(pairs.iter().copied(), 5);
        for (x, y) in pairs {
            assert_eq!(folds.fold(x), folds.fold(y), "{x} and {y} share a component");
        }
        // a-b-c-g-f is one component.
        assert_eq!(folds.fold("c"), folds.fold("f"));
        assert!(pairs.iter().all(|(x, _)| folds.fold(x) < 5));
    }
}
