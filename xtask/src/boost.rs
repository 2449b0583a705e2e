//! Training of the semantic cache's verifier forest: gradient boosting of shallow trees on the
//! logistic loss, with features binned at quantiles (as LightGBM and XGBoost's `hist` do).
//! Small data (tens of thousands of rows, a score of features) needs nothing more.

use semantic_cache::{Forest, Node, Tree};

#[derive(Debug, Clone, Copy)]
pub struct BoostParams {
    pub rounds: usize,
    pub depth: usize,
    pub learning_rate: f64,
    /// L2 penalty on leaf values: keeps leaves of few, pure rows from shouting.
    pub lambda: f64,
    /// Rows a leaf must hold at least.
    pub min_leaf: usize,
    /// Most bins per feature (at most 256: bins are bytes).
    pub bins: usize,
    /// The share of features each tree may split on, drawn anew per tree: decorrelates the
    /// trees and, with hundreds of embedding features, keeps training fast.
    pub feature_fraction: f64,
}

impl Default for BoostParams {
    fn default() -> Self {
        Self { rounds: 600, depth: 4, learning_rate: 0.03, lambda: 1.0, min_leaf: 40, bins: 64, feature_fraction: 0.3 }
    }
}

/// A forest whose probability estimates P(label) from the rows of `x` (one feature vector a row).
pub fn train(x: &[Vec<f32>], labels: &[bool], features: &[&str], params: BoostParams) -> Forest {
    let rows = x.len();
    let width = features.len();
    let cuts: Vec<Vec<f32>> = (0..width).map(|j| quantile_cuts(x.iter().map(|row| row[j]), params.bins)).collect();
    let binned: Vec<u8> =
        x.iter().flat_map(|row| row.iter().zip(&cuts).map(|(value, cuts)| bin(*value, cuts))).collect();
    let positives = labels.iter().filter(|label| **label).count().max(1);
    let negatives = (rows - positives.min(rows)).max(1);
    let bias = (positives as f32 / negatives as f32).ln();
    let mut margins = vec![bias; rows];
    let mut trees = Vec::with_capacity(params.rounds);
    let all: Vec<u32> = (0..rows as u32).collect();
    let mut random = XorShift(0x9e37_79b9_7f4a_7c15);
    let per_tree = ((width as f64 * params.feature_fraction).ceil() as usize).clamp(1, width);
    for _ in 0..params.rounds {
        let mut selected: Vec<usize> = (0..width).collect();
        for i in 0..per_tree {
            let j = i + (random.next() % (width - i) as u64) as usize;
            selected.swap(i, j);
        }
        selected.truncate(per_tree);
        // Ascending, so that a row's bins are read front to back.
        selected.sort_unstable();
        let (gradients, hessians): (Vec<f64>, Vec<f64>) = margins
            .iter()
            .zip(labels)
            .map(|(margin, label)| {
                let p = 1.0 / (1.0 + (-f64::from(*margin)).exp());
                (p - f64::from(u8::from(*label)), (p * (1.0 - p)).max(1e-6))
            })
            .unzip();
        let mut grower = Grower {
            binned: &binned,
            width,
            selected: &selected,
            cuts: &cuts,
            gradients: &gradients,
            hessians: &hessians,
            params,
            nodes: Vec::new(),
            leaf_of_row: vec![0.0; rows],
        };
        grower.grow(&all, 0);
        margins.iter_mut().zip(&grower.leaf_of_row).for_each(|(margin, value)| *margin += value);
        trees.push(Tree { nodes: grower.nodes });
    }
    Forest { features: features.iter().map(|name| (*name).to_owned()).collect(), bias, trees }
}

/// Split points: a row goes left of cut `c` when its value is below `c`. At most `bins - 1`
/// of them, at quantiles of the distinct values.
fn quantile_cuts(values: impl Iterator<Item = f32>, bins: usize) -> Vec<f32> {
    let mut sorted: Vec<f32> = values.filter(|value| value.is_finite()).collect();
    sorted.sort_by(f32::total_cmp);
    let count = sorted.len();
    let mut cuts: Vec<f32> =
        (1..bins).map(|q| sorted.get(q * count / bins).copied().unwrap_or(f32::INFINITY)).collect();
    cuts.retain(|cut| cut.is_finite() && Some(cut) != sorted.first());
    cuts.dedup();
    cuts
}

fn bin(value: f32, cuts: &[f32]) -> u8 {
    // Below cut b means bin <= b; at most 255 cuts, so it fits.
    cuts.partition_point(|cut| *cut <= value) as u8
}

/// A small deterministic generator: the same data trains the same forest on every machine.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct Grower<'a> {
    binned: &'a [u8],
    width: usize,
    /// The features this tree may split on.
    selected: &'a [usize],
    cuts: &'a [Vec<f32>],
    gradients: &'a [f64],
    hessians: &'a [f64],
    params: BoostParams,
    nodes: Vec<Node>,
    leaf_of_row: Vec<f32>,
}

struct Split {
    feature: usize,
    bin: usize,
    gain: f64,
}

impl Grower<'_> {
    fn grow(&mut self, rows: &[u32], depth: usize) -> usize {
        let index = self.nodes.len();
        let split = if depth < self.params.depth { self.best_split(rows) } else { None };
        let Some(split) = split else {
            let (g, h) = rows
                .iter()
                .fold((0.0, 0.0), |(g, h), &row| (g + self.gradients[row as usize], h + self.hessians[row as usize]));
            let value = (-g / (h + self.params.lambda) * self.params.learning_rate) as f32;
            rows.iter().for_each(|&row| self.leaf_of_row[row as usize] = value);
            self.nodes.push(Node::Leaf { value });
            return index;
        };
        self.nodes.push(Node::Leaf { value: 0.0 });
        let (left_rows, right_rows): (Vec<u32>, Vec<u32>) = rows
            .iter()
            .partition(|&&row| usize::from(self.binned[row as usize * self.width + split.feature]) <= split.bin);
        let left = self.grow(&left_rows, depth + 1);
        let right = self.grow(&right_rows, depth + 1);
        self.nodes[index] =
            Node::Split { feature: split.feature, below: self.cuts[split.feature][split.bin], left, right };
        index
    }

    fn best_split(&self, rows: &[u32]) -> Option<Split> {
        let lambda = self.params.lambda;
        let score = |g: f64, h: f64| g * g / (h + lambda);
        let bins = self.params.bins;
        // One pass over the rows fills every selected feature's histogram: rows are read
        // front to back, which is what the cache wants with hundreds of features.
        let mut histograms = vec![(0.0f64, 0.0f64, 0u32); self.selected.len() * bins];
        let (mut g_all, mut h_all) = (0.0, 0.0);
        for &row in rows {
            let row = row as usize;
            let (g, h) = (self.gradients[row], self.hessians[row]);
            g_all += g;
            h_all += h;
            let binned = &self.binned[row * self.width..(row + 1) * self.width];
            for (slot, &feature) in self.selected.iter().enumerate() {
                let cell = &mut histograms[slot * bins + usize::from(binned[feature])];
                cell.0 += g;
                cell.1 += h;
                cell.2 += 1;
            }
        }
        let n_all = rows.len();
        let parent = score(g_all, h_all);
        let mut best: Option<Split> = None;
        for (slot, &feature) in self.selected.iter().enumerate() {
            let used = self.cuts[feature].len() + 1;
            let histogram = &histograms[slot * bins..slot * bins + used];
            let (mut g_left, mut h_left, mut n_left) = (0.0, 0.0, 0usize);
            for (bin, cell) in histogram.iter().enumerate().take(used - 1) {
                g_left += cell.0;
                h_left += cell.1;
                n_left += cell.2 as usize;
                if n_left < self.params.min_leaf || n_all - n_left < self.params.min_leaf {
                    continue;
                }
                let gain = score(g_left, h_left) + score(g_all - g_left, h_all - h_left) - parent;
                if gain > 1e-9 && best.as_ref().is_none_or(|best| gain > best.gain) {
                    best = Some(Split { feature, bin, gain });
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_a_rule_it_was_shown() {
        // label = x0 > 0.5 and x1 < 0.3, with a useless third feature.
        let mut x = Vec::new();
        let mut labels = Vec::new();
        for i in 0..2_000u32 {
            let a = (i % 97) as f32 / 97.0;
            let b = (i % 89) as f32 / 89.0;
            let noise = (i % 7) as f32;
            x.push(vec![a, b, noise]);
            labels.push(a > 0.5 && b < 0.3);
        }
        let params = BoostParams {
            rounds: 100,
            learning_rate: 0.3,
            min_leaf: 5,
            feature_fraction: 1.0,
            ..BoostParams::default()
        };
        let forest = train(&x, &labels, &["a", "b", "noise"], params);
        assert!(forest.validate().is_ok());
        let wrong = x.iter().zip(&labels).filter(|(row, label)| (forest.probability(row) >= 0.5) != **label).count();
        assert!(wrong < 20, "{wrong} of 2000 wrong");
        assert!(forest.probability(&[0.9, 0.1, 3.0]) > 0.9);
        assert!(forest.probability(&[0.9, 0.9, 3.0]) < 0.1);
    }

    #[test]
    fn bins_follow_the_cuts() {
        let cuts = quantile_cuts([1.0, 1.0, 2.0, 3.0, 4.0].into_iter(), 4);
        assert!(cuts.iter().all(|cut| *cut > 1.0), "{cuts:?}: the smallest value is never a cut");
        for value in [0.5, 1.0, 2.0, 3.5, 9.0] {
            let b = usize::from(bin(value, &cuts));
            assert!(b == cuts.len() || value < cuts[b], "{value} in bin {b} of {cuts:?}");
        }
    }
}
