use rand::SeedableRng;
use rand::rngs::StdRng;
use telemetry::ModelPrice;

use super::*;

fn model(name: &str, input: f64, output: f64, window: u32, tier: u8) -> Arc<ModelSpec> {
    Arc::new(ModelSpec {
        name: name.into(),
        provider: "p".into(),
        upstream: name.into(),
        price: ModelPrice::new(input, output),
        context_window: Some(window),
        tier,
        json: true,
        tools: true,
        guard_model: name.into(),
    })
}

fn candidates() -> Vec<Arc<ModelSpec>> {
    vec![
        model("strong", 2.5, 10.0, 128_000, 3),
        model("small", 0.15, 0.6, 16_000, 1),
        model("middle", 0.4, 1.6, 1_000_000, 2),
    ]
}

fn needs<'a>(candidates: &'a [Arc<ModelSpec>], weights: &'a [f64], strategy: RouteStrategy) -> Needs<'a> {
    Needs {
        strategy,
        candidates,
        weights,
        min_tier: None,
        json: true,
        prompt_tokens: 1_000,
        max_output_tokens: 500,
        window_above: None,
        max_cost_usd: None,
    }
}

fn snapshot(n: usize) -> Snapshot {
    Snapshot { candidates: vec![CandidateState::default(); n], ..Snapshot::default() }
}

fn rng() -> StdRng {
    StdRng::seed_from_u64(7)
}

#[test]
fn ordered_keeps_the_configured_order() {
    let candidates = candidates();
    let decision = route(&needs(&candidates, &[1.0; 3], RouteStrategy::Ordered), &snapshot(3), &mut rng());
    assert_eq!(decision.order, vec![0, 1, 2]);
    assert!(decision.excluded.is_empty());
}

#[test]
fn cheapest_meets_the_tier() {
    let candidates = candidates();
    let mut needs = needs(&candidates, &[1.0; 3], RouteStrategy::Cheapest);
    assert_eq!(route(&needs, &snapshot(3), &mut rng()).order, vec![1, 2, 0]);
    needs.min_tier = Some(2);
    let decision = route(&needs, &snapshot(3), &mut rng());
    assert_eq!(decision.order, vec![2, 0]);
    assert_eq!(decision.excluded, vec![(1, RouteExclusion::Tier)]);
}

#[test]
fn each_filter_names_its_reason_in_order() {
    let mut candidates = candidates();
    candidates.push(Arc::new(ModelSpec { json: false, ..(*model("no-json", 0.0, 0.0, 128_000, 3)).clone() }));
    let weights = [1.0; 4];
    let mut needs = needs(&candidates, &weights, RouteStrategy::Ordered);
    needs.prompt_tokens = 20_000;
    let mut state = snapshot(4);
    state.candidates[0].breaker_open = true;
    // The breaker is not the reason when the window already is.
    state.candidates[1].throttled = true;
    let decision = route(&needs, &state, &mut rng());
    assert_eq!(
        decision.excluded,
        vec![(0, RouteExclusion::BreakerOpen), (1, RouteExclusion::ContextWindow), (3, RouteExclusion::Capability)]
    );
    assert_eq!(decision.order, vec![2]);

    let mut state = snapshot(4);
    state.candidates[2].throttled = true;
    needs.max_cost_usd = Some(0.01);
    let decision = route(&needs, &state, &mut rng());
    assert_eq!(decision.excluded[0], (0, RouteExclusion::CostCeiling));
    assert!(decision.excluded.contains(&(2, RouteExclusion::RateLimited)));
    assert_eq!(decision.held_by_guard(), Some(2));
}

#[test]
fn a_context_length_error_leaves_only_larger_windows() {
    let candidates = candidates();
    let mut needs = needs(&candidates, &[1.0; 3], RouteStrategy::Ordered);
    needs.window_above = Some(128_000);
    let mut state = snapshot(3);
    state.candidates[0].failed = true;
    let decision = route(&needs, &state, &mut rng());
    assert_eq!(decision.order, vec![2]);
    assert_eq!(decision.excluded, vec![(0, RouteExclusion::Failed), (1, RouteExclusion::ContextWindow)]);
}

#[test]
fn budgets_downgrade_then_stop_what_costs_anything() {
    let mut candidates = candidates();
    candidates.push(model("local", 0.0, 0.0, 8_000, 1));
    let weights = [1.0; 4];
    let mut needs = needs(&candidates, &weights, RouteStrategy::Ordered);
    needs.min_tier = Some(3);
    let mut state = snapshot(4);
    state.downgrade = true;
    // Past the soft share: the cheapest first, whatever the tier.
    let decision = route(&needs, &state, &mut rng());
    assert!(decision.downgraded);
    assert_eq!(decision.order, vec![3, 1, 2, 0]);
    // At the limit: only the free model is left.
    state.budget_left_usd = Some(0.0);
    let decision = route(&needs, &state, &mut rng());
    assert_eq!(decision.order, vec![3]);
    needs.candidates = &candidates[..3];
    let decision = route(&needs, &state, &mut rng());
    assert!(decision.order.is_empty() && decision.stopped_by_budget());
    // A little left: what fits goes.
    state.budget_left_usd = Some(0.001);
    assert_eq!(route(&needs, &state, &mut rng()).order, vec![1]);
}

#[test]
fn fastest_prefers_the_lighter_and_measures_the_unknown_first() {
    let candidates = candidates();
    let needs = needs(&candidates, &[1.0; 3], RouteStrategy::Fastest);
    let mut state = snapshot(3);
    state.candidates[0].latency = Some(0.2);
    state.candidates[1].latency = Some(0.05);
    // Never measured: chosen whenever it is in the pair.
    let mut rng = rng();
    let firsts: Vec<usize> = (0..100).map(|_| route(&needs, &state, &mut rng).order[0]).collect();
    assert!(firsts.iter().filter(|first| **first == 2).count() > 50);
    state.candidates[2].latency = Some(0.1);
    let firsts: Vec<usize> = (0..300).map(|_| route(&needs, &state, &mut rng).order[0]).collect();
    let count = |index: usize| firsts.iter().filter(|first| **first == index).count();
    // The slowest is never the lighter of a pair; the fastest wins every pair it is in.
    assert_eq!(count(0), 0);
    assert!(count(1) > count(2) && count(1) > 150, "{} {}", count(1), count(2));
    // Calls in flight weigh: with 4 in flight the fastest is the heaviest, never chosen.
    state.candidates[1].in_flight = 4;
    for _ in 0..50 {
        assert_ne!(route(&needs, &state, &mut rng).order[0], 1);
    }
}

#[test]
fn weighted_shares_follow_the_weights_and_the_seed_repeats_them() {
    let candidates = candidates();
    let weights = [3.0, 1.0, 0.0001];
    let needs = needs(&candidates, &weights, RouteStrategy::Weighted);
    let picks = |seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..4_000).map(|_| route(&needs, &snapshot(3), &mut rng).order[0]).collect::<Vec<_>>()
    };
    let first = picks(11);
    let share = first.iter().filter(|pick| **pick == 0).count() as f64 / first.len() as f64;
    assert!((share - 0.75).abs() < 0.03, "{share}");
    assert_eq!(first, picks(11));
    assert_ne!(first, picks(12));
}
