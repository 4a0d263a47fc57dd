//! Drafters in the verifier's own process: they draft on the cores the target needs, so
//! each is timed and a costly one is asked only for blocks that pay for its time (the
//! `--draft-sizing adaptive` rules in README).

use super::{lock, Learned, Session, SharedLearning};
use sibyl_spec::{choose_draft_length, Drafter, DrafterId, Proposal, TokenId};
use std::time::{Duration, Instant};

/// A drafter that costs the verifier time and was not asked for this many steps in a row is
/// asked for one token, verified alone, so that its estimate follows the session even where
/// other drafters were better value. Each probe after which it is still not asked doubles
/// the wait, up to [`PROBE_AFTER_MAX`].
const PROBE_AFTER: usize = 32;
const PROBE_AFTER_MAX: usize = 512;

/// A drafter whose full-depth block is expected to take less than this share of a plain
/// step is asked at every step without weighing its cost (prompt lookup, retrieval).
const FREE_DRAFTING: f64 = 0.05;

/// What a session knows of one of its drafters' calls.
#[derive(Debug, Clone)]
pub(super) struct DrafterCalls {
    /// Steps that had its drafts.
    pub(super) asked: u64,
    /// Time it spent drafting in this process.
    pub(super) drafting_time: Duration,
    /// Steps in a row it was left out of.
    not_asked: usize,
    /// Steps left out after which it is probed next.
    probe_after: usize,
    /// Context length at its last call.
    last_asked_at: Option<usize>,
}

impl Default for DrafterCalls {
    fn default() -> Self {
        Self {
            asked: 0,
            drafting_time: Duration::ZERO,
            not_asked: 0,
            probe_after: PROBE_AFTER,
            last_asked_at: None,
        }
    }
}

/// How one call of an in-process drafter went.
#[derive(Debug, Clone, Copy)]
pub struct DraftTiming {
    /// Context tokens the drafter computed to catch up ([`Drafter::catch_up`]).
    pub computed: usize,
    pub catching_up: Duration,
    /// The block length it was asked for.
    pub asked_for: usize,
    /// Time to draft, once caught up.
    pub drafting: Duration,
}

/// Asks the drafters of this process for the next step's drafts: the cheapest first, each
/// for as many tokens as [`Session::draft_length`] says pay, timing each call.
pub(crate) fn draft(
    session: &mut Session,
    drafters: &mut [Box<dyn Drafter>],
) -> Vec<(DrafterId, Vec<Proposal>)> {
    let mut proposals = Vec::new();
    if session.draft_depth() == 0 {
        return proposals;
    }
    let order = match session.probe() {
        Some(probe) => vec![probe.0],
        None => {
            let mut order: Vec<usize> = (0..drafters.len()).collect();
            let cost = |i: usize| session.drafting_cost(DrafterId(i), 1).unwrap_or(0.0);
            order.sort_by(|&a, &b| cost(a).total_cmp(&cost(b)));
            order
        }
    };
    for i in order {
        let id = DrafterId(i);
        let length = session.draft_length(id, &proposals);
        if length == 0 {
            continue;
        }
        let (timing, drafts) = timed_call(drafters[i].as_mut(), session.context(), length);
        session.record_drafting(id, &timing, &drafts);
        proposals.push((id, drafts));
    }
    proposals.sort_by_key(|(id, _)| id.0);
    proposals
}

/// Context tokens a drafter is timed on before any session asks it: a first catch-up, then
/// that many more, so that the line of catch-up times has its fixed part and its slope.
const MEASURE_CONTEXT: [usize; 2] = [64, 16];

/// Times `drafter`, a fresh in-process drafter that costs the verifier time (a small
/// model), on a made-up context before any session asks it, and records in `learning` what
/// catching up and drafting a block of `length` tokens took. Until a kind is measured, a
/// session asks it for a full block, so the first session to run it paid for catching up
/// with its whole prompt on the target's cores whether or not that paid (1.6 s of a 0.5B
/// model's time beside a 1.5B target on 2 cores, a prompt at 0.73x plain decoding); with
/// the measure, that first call is weighed like every later one.
pub fn measure_drafter(learning: &SharedLearning, drafter: &mut dyn Drafter, length: usize) {
    // Any ids of the vocabulary do (a forward pass costs the same whatever the tokens): a
    // phrase repeated, which a model continues with confidence, so a whole block is drafted.
    let total: usize = MEASURE_CONTEXT.iter().sum();
    let context: Vec<TokenId> = (0..total as TokenId).map(|i| 1 + (i % 16) * 37).collect();
    let mut seen = 0;
    for (i, more) in MEASURE_CONTEXT.into_iter().enumerate() {
        seen += more;
        // A block after the first catch-up; the second only catches up.
        let block = if i == 0 { length } else { 0 };
        let (timing, drafts) = timed_call(drafter, &context[..seen], block);
        if timing.computed > 0 {
            record(&mut lock(learning), drafter.kind(), &timing, &drafts);
        }
    }
}

/// Asks `drafter` for `length` tokens after `context` (none: it only catches up), timing
/// its catching up and its drafting apart.
fn timed_call(
    drafter: &mut dyn Drafter,
    context: &[TokenId],
    length: usize,
) -> (DraftTiming, Vec<Proposal>) {
    let started = Instant::now();
    let computed = drafter.catch_up(context);
    let caught_up = Instant::now();
    let drafts = if length > 0 {
        drafter.propose(context, length)
    } else {
        Vec::new()
    };
    let timing = DraftTiming {
        computed,
        catching_up: caught_up - started,
        asked_for: length,
        drafting: caught_up.elapsed(),
    };
    (timing, drafts)
}

/// Records in `learned` what one call of a drafter of `kind` took.
fn record(learned: &mut Learned, kind: &str, timing: &DraftTiming, drafts: &[Proposal]) {
    let longest = drafts.iter().map(|p| p.tokens.len()).max().unwrap_or(0);
    // The first token comes with catching up; a block that stopped early (its drafter's
    // confidence fell) computed one more that it did not send.
    let passes = if longest < timing.asked_for {
        longest
    } else {
        longest.saturating_sub(1)
    };
    learned
        .drafting
        .record_catch_up(kind, timing.catching_up.as_secs_f64(), timing.computed);
    learned
        .drafting
        .record_drafting(kind, timing.drafting.as_secs_f64(), passes);
}

impl Session {
    /// Context tokens that came since `drafter` was last asked (all of them at first).
    fn new_tokens(&self, drafter: DrafterId) -> usize {
        let context = self.context.len();
        let last = self.calls.get(drafter.0).and_then(|c| c.last_asked_at);
        context - last.unwrap_or(0).min(context)
    }

    /// Seconds that `drafter`, an in-process drafter, is expected to take to catch up with
    /// the context and draft `length` tokens, once its kind was measured (adaptive sizing
    /// only).
    pub fn drafting_cost(&self, drafter: DrafterId, length: usize) -> Option<f64> {
        let learning = self.config.learning.as_ref()?;
        let kind = self.drafter_kinds.get(drafter.0)?;
        let new = self.new_tokens(drafter);
        lock(learning).drafting.estimate(kind, new, length)
    }

    /// How many tokens to ask of `drafter`, an in-process drafter, for the next step, given
    /// the drafts already gathered for it (0: leave it out). A drafter whose cost is not
    /// measured yet, or is negligible, is asked for the full [`Session::draft_depth`]; an
    /// expensive one for what [`choose_draft_length`] finds pays, from its acceptance so far
    /// and what catching up with the context and drafting would take now (so a small model
    /// that would first have to compute its cache for a long prompt, or for many tokens
    /// since it was last asked, is asked only where that step alone pays for it). Fixed
    /// sizing asks every drafter for the full depth.
    pub fn draft_length(
        &mut self,
        drafter: DrafterId,
        at_hand: &[(DrafterId, Vec<Proposal>)],
    ) -> usize {
        if drafter.0 >= self.calls.len() {
            return 0;
        }
        let depth = self.draft_depth();
        let probing = self.probing;
        let length = if probing {
            depth.min(1)
        } else {
            self.weigh_drafting(drafter, depth, at_hand)
        };
        let calls = &mut self.calls[drafter.0];
        if probing {
            calls.probe_after = (calls.probe_after * 2).min(PROBE_AFTER_MAX);
        } else if length > 0 {
            calls.probe_after = PROBE_AFTER;
        }
        calls.not_asked = if length == 0 { calls.not_asked + 1 } else { 0 };
        length
    }

    fn weigh_drafting(
        &self,
        drafter: DrafterId,
        depth: usize,
        at_hand: &[(DrafterId, Vec<Proposal>)],
    ) -> usize {
        let (Some(learning), Some(kind)) =
            (&self.config.learning, self.drafter_kinds.get(drafter.0))
        else {
            return depth;
        };
        let context = self.context.len();
        let new = self.new_tokens(drafter);
        let learned = lock(learning);
        let Some(full) = learned.drafting.estimate(kind, new, depth) else {
            return depth;
        };
        let costs = &learned.costs;
        if !costs.measured() || full <= FREE_DRAFTING * costs.estimate(1, context) {
            return depth;
        }
        let (builder, _) = self.builder(at_hand.to_vec());
        let (_, values) = builder.build_ranked();
        let chances = self.stats[drafter.0].expected_chances(depth);
        choose_draft_length(
            &values,
            &chances,
            |length| learned.drafting.estimate(kind, new, length).unwrap_or(full),
            |n| costs.estimate(n, context),
        )
    }

    /// A drafter to probe at the next step, if one that costs drafting time has not been
    /// asked for [`PROBE_AFTER`] steps (more after probes that did not change that): it
    /// alone is asked, for one token, and that token is verified, so that its estimates
    /// follow the session.
    pub fn probe(&mut self) -> Option<DrafterId> {
        if self.draft_depth() == 0 {
            return None;
        }
        let context = self.context.len();
        let plain = {
            let learned = lock(self.config.learning.as_ref()?);
            learned
                .costs
                .measured()
                .then(|| learned.costs.estimate(1, context))?
        };
        // A probe costs at most a plain step: not one that has a long context to catch up.
        let index = (0..self.calls.len()).find(|&i| {
            self.calls[i].not_asked >= self.calls[i].probe_after
                && self
                    .drafting_cost(DrafterId(i), 1)
                    .is_some_and(|probe| probe <= plain)
        })?;
        self.probing = true;
        Some(DrafterId(index))
    }

    /// Records a call of an in-process drafter: how long it took to catch up with the
    /// context and then to draft, and what it drafted.
    pub fn record_drafting(
        &mut self,
        drafter: DrafterId,
        timing: &DraftTiming,
        drafts: &[Proposal],
    ) {
        let (Some(kind), Some(calls)) = (
            self.drafter_kinds.get(drafter.0),
            self.calls.get_mut(drafter.0),
        ) else {
            return;
        };
        calls.drafting_time += timing.catching_up + timing.drafting;
        calls.last_asked_at = Some(self.context.len());
        if let Some(learning) = &self.config.learning {
            record(&mut lock(learning), kind, timing, drafts);
        }
    }
}
