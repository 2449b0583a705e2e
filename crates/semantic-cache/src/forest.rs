//! Gradient-boosted decision trees: the learned part of the served decision.
//!
//! Small on purpose: a forest is a list of trees of threshold splits, read from JSON and
//! evaluated in a few hundred nanoseconds. Training lives in xtask (`cargo xtask calibrate`),
//! where it can read the labelled dev files; this crate only ever evaluates.

use serde::{Deserialize, Serialize};

/// One node of a tree, in a flat vector; children are indices into the same vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Node {
    /// Rows whose `feature` is below `below` go `left`, the rest (and NaN) go `right`.
    Split {
        feature: usize,
        below: f32,
        left: usize,
        right: usize,
    },
    Leaf {
        value: f32,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

impl Tree {
    fn value(&self, features: &[f32]) -> f32 {
        let mut index = 0;
        // A tree read from a file could hold a cycle: never walk more steps than it has nodes.
        for _ in 0..=self.nodes.len() {
            match self.nodes.get(index) {
                Some(Node::Split { feature, below, left, right }) => {
                    let value = features.get(*feature).copied().unwrap_or(f32::NAN);
                    index = if value < *below { *left } else { *right };
                }
                Some(Node::Leaf { value }) => return *value,
                None => return 0.0,
            }
        }
        0.0
    }

    /// Whether every split names a feature below `features` and every child index exists, and
    /// children come after their parent (so walking always ends).
    fn is_well_formed(&self, features: usize) -> bool {
        !self.nodes.is_empty()
            && self.nodes.iter().enumerate().all(|(index, node)| match node {
                Node::Split { feature, below, left, right } => {
                    *feature < features
                        && below.is_finite()
                        && (index < *left && *left < self.nodes.len())
                        && (index < *right && *right < self.nodes.len())
                }
                Node::Leaf { value } => value.is_finite(),
            })
    }
}

/// A logistic forest: the probability is the sigmoid of `bias` plus every tree's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forest {
    /// The feature names, in the order trees index them.
    pub features: Vec<String>,
    pub bias: f32,
    pub trees: Vec<Tree>,
}

impl Forest {
    pub fn probability(&self, features: &[f32]) -> f32 {
        let margin = self.bias + self.trees.iter().map(|tree| tree.value(features)).sum::<f32>();
        1.0 / (1.0 + (-margin).exp())
    }

    /// Checks what a file could get wrong, so that evaluation never has to.
    pub fn validate(&self) -> Result<(), String> {
        if !self.bias.is_finite() {
            return Err("bias is not a finite number".into());
        }
        match self.trees.iter().position(|tree| !tree.is_well_formed(self.features.len())) {
            Some(index) => Err(format!(
                "tree {index} is malformed (a split on a feature beyond the {} named, a child before its \
                 parent, or a non-finite value)",
                self.features.len()
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stump(feature: usize, below: f32, left: f32, right: f32) -> Tree {
        Tree {
            nodes: vec![
                Node::Split { feature, below, left: 1, right: 2 },
                Node::Leaf { value: left },
                Node::Leaf { value: right },
            ],
        }
    }

    #[test]
    fn sums_the_trees_through_a_sigmoid() {
        let forest = Forest {
            features: vec!["x".into(), "y".into()],
            bias: 0.5,
            trees: vec![stump(0, 0.5, -1.0, 1.0), stump(1, 2.0, 0.25, -0.25)],
        };
        assert!(forest.validate().is_ok());
        let expected = |margin: f32| 1.0 / (1.0 + (-margin).exp());
        assert!((forest.probability(&[0.0, 0.0]) - expected(0.5 - 1.0 + 0.25)).abs() < 1e-6);
        assert!((forest.probability(&[0.9, 3.0]) - expected(0.5 + 1.0 - 0.25)).abs() < 1e-6);
        assert!((forest.probability(&[f32::NAN, 3.0]) - expected(0.5 + 1.0 - 0.25)).abs() < 1e-6, "NaN goes right");
    }

    #[test]
    fn a_malformed_tree_is_refused() {
        let mut cyclic = stump(0, 0.5, 0.0, 0.0);
        cyclic.nodes[0] = Node::Split { feature: 0, below: 0.5, left: 0, right: 2 };
        let forest = Forest { features: vec!["x".into()], bias: 0.0, trees: vec![cyclic] };
        assert!(forest.validate().is_err());
        let forest = Forest { features: vec!["x".into()], bias: 0.0, trees: vec![stump(3, 0.5, 0.0, 0.0)] };
        assert!(forest.validate().unwrap_err().contains("beyond the 1 named"));
    }
}
