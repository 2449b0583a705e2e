//! Verified serving. A semantic hit is right when the model would have given the answer it
//! serves, whatever the two requests look like; only the model can say so. Its caller audits
//! some hits (asks the model anyway, after serving the cached answer) and labels near misses
//! for free (the model answered those anyway: its answer is compared with the nearest
//! candidate's), and [`Cuts`] keeps, per scope, how often the two answers agreed as a function
//! of the hit's score (the learned verifier's confidence, or the cosine without one).
//!
//! From those counts each scope's cut is set so that the upper end of a 95% Wilson interval on
//! the wrong rate of the hits at or above it stays under the bound:
//! - it starts at the offline cut (calibrated on public pairs) and stays there while the audits
//!   are too few to say anything;
//! - it loosens to the highest cut below it that the audits justify (on a grid of 0.01), and
//!   only over scores audited themselves;
//! - when the interval's lower end is above the bound (the audits prove the cut wrong), it
//!   tightens at once to the lowest justified cut, or serves nothing until one is justified,
//!   and says so ([`Settled::Tightened`]).
//!
//! The counts are not weighted: near misses are all labelled while served hits are sampled,
//! which over-weights the lowest scores served. As long as agreement does not fall with the
//! score, that errs toward a tighter cut.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use serde::{Deserialize, Serialize};

/// Score bins of 0.01: the grid the cut moves on.
const BINS: usize = 100;
/// z of a two-sided 95% interval.
const Z: f64 = 1.96;
/// When a scope's counts reach this many audits, they are halved: the recent traffic weighs
/// most, and a drift in it (a new model, new kinds of requests) moves the cut.
const HALVE_AT: f64 = 20_000.0;
/// Hits audited while a scope has few audits above its cut: all of the first ones, then a
/// falling share (`WARM_UP / (audits + WARM_UP)`) until it meets the configured rate.
const WARM_UP: f64 = 10.0;

/// Whether the model's own answer agreed with the one served (or the nearest candidate's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Agree,
    Disagree,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Self::Agree => "agree",
            Self::Disagree => "disagree",
        }
    }

    pub fn of(agree: bool) -> Self {
        if agree { Self::Agree } else { Self::Disagree }
    }
}

/// A binomial proportion with its 95% Wilson interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    pub estimate: f64,
    pub lower: f64,
    pub upper: f64,
}

/// Wilson's score interval for `wrong` of `n` (counts may be fractional after halving). With
/// no observations it is the whole of [0, 1].
pub fn wilson(wrong: f64, n: f64) -> Interval {
    if n <= 0.0 {
        return Interval { estimate: 0.0, lower: 0.0, upper: 1.0 };
    }
    let p = (wrong / n).clamp(0.0, 1.0);
    let z2 = Z * Z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / (1.0 + z2 / n);
    Interval { estimate: p, lower: (centre - half).max(0.0), upper: (centre + half).min(1.0) }
}

/// Audits with no disagreement that it takes to justify a cut under `bound`.
pub fn audits_to_justify(bound: f64) -> u64 {
    let z2 = Z * Z;
    // Wilson's upper end for 0 of n is z²/(n + z²).
    (z2 / bound.max(1e-6) - z2).ceil().max(1.0) as u64
}

/// What a scope's verdicts say, bin by bin of the hit's score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    agree: Vec<f64>,
    disagree: Vec<f64>,
}

impl Default for Ledger {
    fn default() -> Self {
        Self { agree: vec![0.0; BINS + 1], disagree: vec![0.0; BINS + 1] }
    }
}

/// The bin of the grid a score is counted in (0 to 100).
pub fn bin(score: f32) -> usize {
    ((score.clamp(0.0, 1.0) * BINS as f32).floor() as usize).min(BINS)
}

/// A cut in bins: a cut on the grid is its edge (0.84 is 84, not 83.99997).
fn scaled(cut: f32) -> f32 {
    let scaled = cut.clamp(0.0, 1.0) * BINS as f32;
    if (scaled - scaled.round()).abs() < 1e-3 { scaled.round() } else { scaled }
}

/// The first bin a cut serves from, whole (a cut inside a bin is judged with its lower
/// scores too).
fn first_bin(cut: Cut) -> usize {
    match cut {
        Cut::At(cut) => scaled(cut).floor() as usize,
        Cut::Never => BINS + 1,
    }
}

impl Ledger {
    /// A ledger of counts kept elsewhere (the replicas' shared ones), bin by bin; bins past
    /// the grid are ignored.
    pub fn from_counts(counts: impl IntoIterator<Item = (usize, Verdict, f64)>) -> Self {
        let mut ledger = Self::default();
        for (bin, verdict, count) in counts {
            let counts = match verdict {
                Verdict::Agree => &mut ledger.agree,
                Verdict::Disagree => &mut ledger.disagree,
            };
            if let Some(slot) = counts.get_mut(bin) {
                *slot += count;
            }
        }
        ledger
    }

    pub fn record(&mut self, score: f32, verdict: Verdict) {
        let counts = match verdict {
            Verdict::Agree => &mut self.agree,
            Verdict::Disagree => &mut self.disagree,
        };
        counts[bin(score)] += 1.0;
        if self.total() >= HALVE_AT {
            self.agree.iter_mut().chain(self.disagree.iter_mut()).for_each(|count| *count /= 2.0);
        }
    }

    pub fn total(&self) -> f64 {
        self.agree.iter().sum::<f64>() + self.disagree.iter().sum::<f64>()
    }

    /// Audits and disagreements of the bins at or above `cut`'s.
    fn at_or_above(&self, cut: Cut) -> (f64, f64) {
        self.between(first_bin(cut), BINS + 1)
    }

    /// Audits and disagreements of bins `from..to`.
    fn between(&self, from: usize, to: usize) -> (f64, f64) {
        let (from, to) = (from.min(BINS + 1), to.min(BINS + 1));
        if from >= to {
            return (0.0, 0.0);
        }
        let wrong: f64 = self.disagree[from..to].iter().sum();
        (self.agree[from..to].iter().sum::<f64>() + wrong, wrong)
    }

    /// The wrong rate of the hits a cut serves, as the audits say.
    pub fn wrong_rate(&self, cut: Cut) -> Interval {
        let (n, wrong) = self.at_or_above(cut);
        wilson(wrong, n)
    }
}

/// Where a scope serves from: scores at or above a value, or nothing at all.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cut {
    At(f32),
    Never,
}

impl Cut {
    pub fn serves(self, score: f32) -> bool {
        matches!(self, Self::At(cut) if score >= cut)
    }

    /// The cut as a number, above any score when it serves nothing (for gauges and bars).
    pub fn value(self) -> f32 {
        match self {
            Self::At(cut) => cut,
            Self::Never => f32::INFINITY,
        }
    }

    /// Grid cuts strictly below this one and at or above `floor`, highest first.
    fn looser(self, floor: f32) -> impl Iterator<Item = Self> {
        let below = match self {
            Self::Never => BINS + 1,
            Self::At(cut) => scaled(cut).ceil() as usize,
        };
        let lowest = scaled(floor).ceil() as usize;
        (lowest..below).rev().map(|edge| Self::At(edge as f32 / BINS as f32))
    }

    /// Grid cuts strictly above this one, lowest first.
    fn tighter(self) -> impl Iterator<Item = Self> {
        let from = match self {
            Self::Never => BINS + 1,
            Self::At(cut) => scaled(cut).floor() as usize + 1,
        };
        (from..=BINS).map(|edge| Self::At(edge as f32 / BINS as f32))
    }

    /// Whether this cut serves more than `other` does.
    fn looser_than(self, other: Self) -> bool {
        self.value() < other.value()
    }
}

/// The rules a scope keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuditSettings {
    /// The bound on the share of served hits whose answer the model would not have given.
    pub max_wrong_rate: f64,
    /// The share of hits audited once a scope has enough audits.
    pub audit_rate: f64,
    /// No cut goes below this score, however the audits agree (the floor of what is labelled
    /// for free, too).
    pub floor: f32,
}

/// A scope's counts and cut. `prior` is the offline cut it started from; once the audits have
/// proved it wrong, it is no longer fallen back to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scope {
    pub ledger: Ledger,
    pub cut: Cut,
    pub prior: Cut,
    pub prior_trusted: bool,
    /// Times the audits tightened the cut at once.
    pub tightened: u64,
}

/// What one verdict did to a scope's cut.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Settled {
    Unchanged,
    Loosened {
        from: Cut,
        to: Cut,
    },
    /// The audits proved the cut wrong: `wrong_rate` of the hits it served disagreed.
    Tightened {
        from: Cut,
        to: Cut,
        wrong_rate: Interval,
    },
    /// A loosened cut no longer justified went back up.
    Withdrawn {
        from: Cut,
        to: Cut,
    },
}

impl Scope {
    pub fn new(prior: Cut) -> Self {
        Self { ledger: Ledger::default(), cut: prior, prior, prior_trusted: true, tightened: 0 }
    }

    fn justified(&self, cut: Cut, bound: f64) -> bool {
        let (n, wrong) = self.ledger.at_or_above(cut);
        n > 0.0 && wilson(wrong, n).upper <= bound
    }

    fn lowest_justified_above(&self, cut: Cut, bound: f64) -> Option<Cut> {
        cut.tighter().find(|&candidate| self.justified(candidate, bound))
    }

    /// Records one verdict and moves the cut as the counts now say.
    pub fn observe(&mut self, score: f32, verdict: Verdict, settings: &AuditSettings) -> Settled {
        self.ledger.record(score, verdict);
        self.settle(settings)
    }

    /// Takes counts kept elsewhere (the replicas' together) in place of its own, and moves the
    /// cut as they say.
    pub fn adopt(&mut self, ledger: Ledger, settings: &AuditSettings) -> Settled {
        self.ledger = ledger;
        self.settle(settings)
    }

    /// Moves the cut as the counts say: one move at most.
    fn settle(&mut self, settings: &AuditSettings) -> Settled {
        let bound = settings.max_wrong_rate;
        let from = self.cut;
        let wrong_rate = self.ledger.wrong_rate(from);
        if wrong_rate.lower > bound {
            self.cut = self.lowest_justified_above(from, bound).unwrap_or(Cut::Never);
            self.prior_trusted = false;
            self.tightened += 1;
            return Settled::Tightened { from, to: self.cut, wrong_rate };
        }
        let fallback = if self.prior_trusted { self.prior } else { Cut::Never };
        if from.looser_than(fallback) && !self.justified(from, bound) {
            self.cut =
                self.lowest_justified_above(from, bound).filter(|cut| cut.looser_than(fallback)).unwrap_or(fallback);
            return Settled::Withdrawn { from, to: self.cut };
        }
        match from.looser(settings.floor).find(|&looser| self.may_loosen(from, looser, bound)) {
            Some(looser) => {
                self.cut = looser;
                Settled::Loosened { from, to: looser }
            }
            None => Settled::Unchanged,
        }
    }

    /// A looser cut must be justified, and the scores it would newly serve must have been
    /// seen: [`WARM_UP`] audits of their own at most `bound` wrong. Without that, hits far
    /// above would vouch for scores nobody audited.
    fn may_loosen(&self, from: Cut, to: Cut, bound: f64) -> bool {
        let (n, wrong) = self.ledger.between(first_bin(to), first_bin(from));
        n >= WARM_UP && wrong <= bound * n && self.justified(to, bound)
    }

    /// The share of this scope's hits to audit now: all of the first ones, fewer as audits
    /// at or above the cut accumulate, never less than the configured rate.
    pub fn audit_probability(&self, settings: &AuditSettings) -> f64 {
        let (n, _) = self.ledger.at_or_above(self.cut);
        (WARM_UP / (n + WARM_UP)).max(settings.audit_rate).min(1.0)
    }
}

/// The cuts of every scope an engine serves: a step, and a step within one workspace once that
/// workspace has audits enough of its own. Read on every lookup, written on every verdict.
#[derive(Debug, Default)]
pub struct Cuts {
    scopes: RwLock<HashMap<ScopeKey, Scope>>,
}

/// A step, or a step within a workspace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ScopeKey {
    pub step: String,
    pub workspace: Option<String>,
}

/// A scope's state as it is shown: on `/status`, in metrics, in reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScopeView {
    pub step: String,
    pub workspace: Option<String>,
    pub cut: Cut,
    pub prior: Cut,
    pub audits: f64,
    pub disagreements: f64,
    /// The wrong rate of the hits the current cut serves.
    pub wrong_rate: Interval,
    pub tightened: u64,
}

impl Cuts {
    /// The cut a lookup in `workspace`'s `step` serves at: the workspace's own once it has
    /// the audits to justify a cut by itself, else the step's, else `prior` (no audits yet).
    pub fn cut(&self, step: &str, workspace: &str, prior: Cut, settings: &AuditSettings) -> Cut {
        self.with_scope(step, workspace, settings, |scope| scope.map_or(prior, |scope| scope.cut))
    }

    /// The probability of auditing a hit served in `workspace`'s `step`.
    pub fn audit_probability(&self, step: &str, workspace: &str, settings: &AuditSettings) -> f64 {
        self.with_scope(step, workspace, settings, |scope| scope.map_or(1.0, |scope| scope.audit_probability(settings)))
    }

    fn with_scope<T>(
        &self,
        step: &str,
        workspace: &str,
        settings: &AuditSettings,
        then: impl FnOnce(Option<&Scope>) -> T,
    ) -> T {
        let scopes = self.scopes.read().unwrap_or_else(PoisonError::into_inner);
        let own = ScopeKey { step: step.to_owned(), workspace: Some(workspace.to_owned()) };
        let enough = audits_to_justify(settings.max_wrong_rate) as f64;
        let scope = scopes
            .get(&own)
            .filter(|scope| scope.ledger.total() >= enough)
            .or_else(|| scopes.get(&ScopeKey { step: step.to_owned(), workspace: None }));
        then(scope)
    }

    /// Records a verdict on a hit (or a near miss) of `score`, in the step's scope and the
    /// workspace's; returns what it did to the step's cut and to the workspace's.
    pub fn observe(
        &self,
        step: &str,
        workspace: &str,
        prior: Cut,
        score: f32,
        verdict: Verdict,
        settings: &AuditSettings,
    ) -> [Settled; 2] {
        let mut scopes = self.scopes.write().unwrap_or_else(PoisonError::into_inner);
        let keys = [
            ScopeKey { step: step.to_owned(), workspace: None },
            ScopeKey { step: step.to_owned(), workspace: Some(workspace.to_owned()) },
        ];
        keys.map(|key| scopes.entry(key).or_insert_with(|| Scope::new(prior)).observe(score, verdict, settings))
    }

    /// Replaces a scope's counts with the replicas' shared ones (making the scope if it is
    /// new) and settles its cut.
    pub fn adopt(&self, key: ScopeKey, ledger: Ledger, prior: Cut, settings: &AuditSettings) -> Settled {
        let mut scopes = self.scopes.write().unwrap_or_else(PoisonError::into_inner);
        scopes.entry(key).or_insert_with(|| Scope::new(prior)).adopt(ledger, settings)
    }

    /// Every scope, steps first.
    pub fn views(&self) -> Vec<ScopeView> {
        let scopes = self.scopes.read().unwrap_or_else(PoisonError::into_inner);
        let mut views: Vec<ScopeView> = scopes.iter().map(|(key, scope)| view(key, scope)).collect();
        views.sort_by(|a, b| (&a.step, &a.workspace).cmp(&(&b.step, &b.workspace)));
        views
    }

    /// A step's own scope (not a workspace's), if it has verdicts.
    pub fn step_view(&self, step: &str) -> Option<ScopeView> {
        let key = ScopeKey { step: step.to_owned(), workspace: None };
        let scopes = self.scopes.read().unwrap_or_else(PoisonError::into_inner);
        scopes.get(&key).map(|scope| view(&key, scope))
    }

    /// Every scope's state, to be saved and loaded again ([`Cuts::restore`]).
    pub fn snapshot(&self) -> Vec<(ScopeKey, Scope)> {
        let scopes = self.scopes.read().unwrap_or_else(PoisonError::into_inner);
        scopes.iter().map(|(key, scope)| (key.clone(), scope.clone())).collect()
    }

    /// Takes back saved scopes. A scope whose prior changed since (the offline cut was
    /// recalibrated, the step's configured cut changed) starts again from the new one.
    pub fn restore(&self, saved: Vec<(ScopeKey, Scope)>, prior_of: impl Fn(&str) -> Option<Cut>) -> usize {
        let mut scopes = self.scopes.write().unwrap_or_else(PoisonError::into_inner);
        let mut restored = 0;
        for (key, scope) in saved {
            if prior_of(&key.step) == Some(scope.prior) {
                scopes.insert(key, scope);
                restored += 1;
            }
        }
        restored
    }
}

fn view(key: &ScopeKey, scope: &Scope) -> ScopeView {
    let (audits, disagreements) = scope.ledger.at_or_above(Cut::At(0.0));
    ScopeView {
        step: key.step.clone(),
        workspace: key.workspace.clone(),
        cut: scope.cut,
        prior: scope.prior,
        audits,
        disagreements,
        wrong_rate: scope.ledger.wrong_rate(scope.cut),
        tightened: scope.tightened,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: AuditSettings = AuditSettings { max_wrong_rate: 0.02, audit_rate: 0.02, floor: 0.5 };

    #[test]
    fn wilson_matches_its_closed_form() {
        let none = wilson(0.0, 100.0);
        assert!((none.upper - 3.8416 / 103.8416).abs() < 1e-9, "{none:?}");
        let some = wilson(10.0, 100.0);
        assert!((some.lower - 0.0552).abs() < 1e-3 && (some.upper - 0.1744).abs() < 1e-3, "{some:?}");
        assert_eq!(wilson(0.0, 0.0).upper, 1.0);
        assert_eq!(audits_to_justify(0.02), 189);
    }

    #[test]
    fn agreement_loosens_the_cut_only_as_far_as_the_audits_justify() {
        let mut scope = Scope::new(Cut::At(0.846));
        // 400 agreeing audits at 0.80-0.99: each move goes to the highest cut justified then.
        for i in 0..400 {
            let score = 0.80 + (i % 20) as f32 / 100.0;
            if let Settled::Loosened { from, to } = scope.observe(score, Verdict::Agree, &SETTINGS) {
                assert!(to.looser_than(from));
                assert!(scope.ledger.wrong_rate(to).upper <= 0.02, "{to:?} not justified");
            }
        }
        assert_eq!(scope.cut, Cut::At(0.80));
        // Nothing was audited below 0.80: the cut does not go there, however many agree above.
        for _ in 0..1000 {
            scope.observe(0.95, Verdict::Agree, &SETTINGS);
        }
        assert_eq!(scope.cut, Cut::At(0.80));
    }

    #[test]
    fn too_few_audits_leave_the_offline_cut_where_it_is() {
        let mut scope = Scope::new(Cut::At(0.846));
        for _ in 0..50 {
            assert_eq!(scope.observe(0.9, Verdict::Agree, &SETTINGS), Settled::Unchanged);
        }
        assert_eq!(scope.observe(0.9, Verdict::Disagree, &SETTINGS), Settled::Unchanged);
        assert_eq!(scope.cut, Cut::At(0.846));
    }

    #[test]
    fn disagreements_tighten_at_once_to_a_justified_cut_or_to_serving_nothing() {
        let mut scope = Scope::new(Cut::At(0.5));
        // Above 0.9 the answers agree; between 0.5 and 0.9 a third disagree.
        for i in 0..1500 {
            let score = 0.5 + (i % 50) as f32 / 100.0;
            let verdict = Verdict::of(score >= 0.9 || i % 3 != 0);
            if let Settled::Tightened { wrong_rate, .. } = scope.observe(score, verdict, &SETTINGS) {
                assert!(wrong_rate.lower > 0.02);
            }
        }
        assert!(scope.tightened >= 1);
        assert_eq!(scope.cut, Cut::At(0.9));
        assert!(scope.ledger.wrong_rate(scope.cut).upper <= 0.02);
        // The offline cut was proved wrong: it is not fallen back to.
        assert!(!scope.prior_trusted);
    }

    #[test]
    fn a_loosened_cut_that_stops_being_justified_is_withdrawn() {
        let mut scope = Scope::new(Cut::At(0.9));
        for i in 0..1000 {
            scope.observe(0.85 + (i % 15) as f32 / 100.0, Verdict::Agree, &SETTINGS);
        }
        assert_eq!(scope.cut, Cut::At(0.85));
        // Disagreements just below the prior: enough to unjustify 0.85, not to condemn it.
        let mut withdrawn = false;
        for _ in 0..15 {
            withdrawn |= matches!(scope.observe(0.86, Verdict::Disagree, &SETTINGS), Settled::Withdrawn { .. });
        }
        assert!(withdrawn);
        assert!(!scope.cut.looser_than(Cut::At(0.87)), "{:?}", scope.cut);
    }

    #[test]
    fn the_first_hits_are_all_audited_then_fewer() {
        let mut scope = Scope::new(Cut::At(0.8));
        assert_eq!(scope.audit_probability(&SETTINGS), 1.0);
        for _ in 0..90 {
            scope.observe(0.9, Verdict::Agree, &SETTINGS);
        }
        assert!((scope.audit_probability(&SETTINGS) - 0.1).abs() < 1e-9);
        for _ in 0..2000 {
            scope.observe(0.9, Verdict::Agree, &SETTINGS);
        }
        assert_eq!(scope.audit_probability(&SETTINGS), 0.02);
    }

    #[test]
    fn a_workspace_uses_its_own_cut_once_it_has_audits_enough() {
        let cuts = Cuts::default();
        let prior = Cut::At(0.9);
        assert_eq!(cuts.cut("classifier", "acme", prior, &SETTINGS), prior);
        for _ in 0..300 {
            cuts.observe("classifier", "acme", prior, 0.95, Verdict::Agree, &SETTINGS);
        }
        for _ in 0..20 {
            cuts.observe("classifier", "globex", prior, 0.95, Verdict::Disagree, &SETTINGS);
        }
        // Acme's own audits agree; globex's disagreements tightened the step's cut.
        assert_eq!(cuts.cut("classifier", "acme", prior, &SETTINGS), Cut::At(0.9));
        assert_eq!(cuts.cut("classifier", "globex", prior, &SETTINGS), Cut::Never);
        assert_eq!(cuts.views().len(), 3);
    }

    #[test]
    fn adopted_counts_move_a_cut_as_its_own_would() {
        let cuts = Cuts::default();
        let key = ScopeKey { step: "classifier".into(), workspace: None };
        let shared = Ledger::from_counts([(95, Verdict::Agree, 300.0), (85, Verdict::Agree, 40.0)]);
        let settled = cuts.adopt(key, shared, Cut::At(0.9), &SETTINGS);
        assert_eq!(settled, Settled::Loosened { from: Cut::At(0.9), to: Cut::At(0.85) });
        assert_eq!(cuts.cut("classifier", "acme", Cut::At(0.9), &SETTINGS), Cut::At(0.85));
    }

    #[test]
    fn cuts_restore_only_under_the_prior_they_were_learned_from() {
        let cuts = Cuts::default();
        cuts.observe("classifier", "acme", Cut::At(0.9), 0.95, Verdict::Agree, &SETTINGS);
        let saved = cuts.snapshot();
        let again = Cuts::default();
        assert_eq!(again.restore(saved.clone(), |_| Some(Cut::At(0.8))), 0);
        assert_eq!(again.restore(saved, |_| Some(Cut::At(0.9))), 2);
    }
}
