//! How likely a drafter's tokens are to be accepted, learned online per session: the number
//! that ranks draft nodes and decides how many are worth verifying.
//!
//! One acceptance rate per drafter is not enough. A prompt-lookup match of eight tokens in
//! code that is being copied is accepted about 95% of the time, level after level, while a
//! one-token match is right about 15% of the time; and once a branch's first tokens are
//! accepted, its next ones are more likely to be. So each drafter's estimates are kept per
//! cell: the branch's rank among the drafter's proposals (its best, or an alternative), the
//! drafter's own evidence for the branch (see [`crate::Proposal::evidence`]) in classes, and
//! the depth. A cell holds the chance that the branch's token at that depth is accepted
//! once its parent was, counted with a decay so that it follows the session. A cell with
//! few observations leans on the cell one level up; at depth 1, on what the drafter's best
//! branches' first tokens did whatever their evidence (and before any was verified, on a
//! prior). So a drafter that is mostly wrong does not get every new evidence class tried
//! at an optimistic prior: where extra rows are dear, those trials cost more than they
//! give.
//!
//! A session starts from what earlier sessions of the drafter kind measured, as a prior:
//! each cell's chance is the session's own count with the earlier sessions' estimate in
//! place of the fixed prior (at the first token, that estimate scaled by how the session's
//! best first tokens fare against the earlier sessions', so that a cell the session has not
//! tried yet starts there). So
//! a prompt on which the drafter is wrong, after prompts on which it was right, stops
//! paying for long drafts after a few steps rather than after the earlier sessions' counts
//! have decayed; a first session is estimated as before.

/// Evidence classes: 0, 1, 2, 3, 4-5, 6-7, 8-11, 12-15, 16 and more.
const EVIDENCE_CLASSES: usize = 9;
/// Rank classes: the drafter's best branch, and its alternatives.
const RANK_CLASSES: usize = 2;
/// Depth classes: 1, 2, 3, 4, 5-8, 9 and deeper.
const DEPTH_CLASSES: usize = 6;
/// Weight of a cell's prior, in observations.
const PRIOR_WEIGHT: f64 = 2.0;
/// Each observation of a cell multiplies its earlier counts by this: about the last 30
/// observations count.
const DECAY: f64 = 0.97;
/// Chance of an alternative branch's first token relative to the best branch's, before
/// alternatives are measured.
const ALTERNATIVE_PRIOR: f64 = 0.5;

fn evidence_class(evidence: u32) -> usize {
    match evidence {
        0..=3 => evidence as usize,
        4..=5 => 4,
        6..=7 => 5,
        8..=11 => 6,
        12..=15 => 7,
        _ => 8,
    }
}

fn rank_class(rank: usize) -> usize {
    rank.min(RANK_CLASSES - 1)
}

fn depth_class(depth: usize) -> usize {
    match depth {
        0..=4 => depth.max(1) - 1,
        5..=8 => 4,
        _ => 5,
    }
}

/// Decayed counts of one cell.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Cell {
    seen: f64,
    accepted: f64,
}

impl Cell {
    fn observe(&mut self, accepted: bool) {
        self.seen = self.seen * DECAY + 1.0;
        self.accepted = self.accepted * DECAY + f64::from(u8::from(accepted));
    }
}

/// A drafter's cells: per rank, evidence and depth class, and the best branches' by depth
/// whatever their evidence (what a branch is expected to do before it is drafted).
#[derive(Debug, Clone, Default, PartialEq)]
struct Counts {
    cells: [[[Cell; DEPTH_CLASSES]; EVIDENCE_CLASSES]; RANK_CLASSES],
    best: [Cell; DEPTH_CLASSES],
}

impl Counts {
    fn observe(&mut self, rank: usize, evidence: u32, depth: usize, accepted: bool) {
        self.cells[rank_class(rank)][evidence_class(evidence)][depth_class(depth)]
            .observe(accepted);
        if rank_class(rank) == 0 {
            self.best[depth_class(depth)].observe(accepted);
        }
    }
}

/// A drafter's acceptance, measured as a session goes (see the module documentation). The
/// default has measured nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AcceptanceStats {
    /// Draft tokens of this drafter that were placed in a verified tree.
    pub proposed: u64,
    /// Draft tokens of this drafter that the target accepted.
    pub accepted: u64,
    /// Every observation, this session's and the earlier sessions' it carries over.
    all: Counts,
    /// The earlier sessions' observations, as this session started from them: each cell's
    /// estimate there is the prior of the session's own count.
    earlier: Counts,
    /// This session's observations.
    session: Counts,
}

impl AcceptanceStats {
    /// Chance assumed for the first token of a best branch in a cell not yet measured.
    pub const PRIOR: f64 = 0.6;
    /// The lowest chance a level is given: low enough that two drafters that are always
    /// wrong are not worth a node (see [`crate::MIN_GAIN`]), never zero, so that a drafter
    /// can be tried again.
    const FLOOR: f64 = 0.01;

    /// These estimates with the counters and the session's own counts reset: where a new
    /// session of the same drafter kind starts from.
    pub fn carried_over(&self) -> Self {
        Self {
            all: self.all.clone(),
            earlier: self.all.clone(),
            ..Self::default()
        }
    }

    /// Counts draft tokens placed in a verified tree and accepted (for reports; the
    /// estimates learn from [`Self::observe`]).
    pub fn count(&mut self, proposed: usize, accepted: usize) {
        self.proposed += proposed as u64;
        self.accepted += accepted as u64;
    }

    /// Records one verified token of a branch of rank `rank` (0: the drafter's best) and
    /// evidence `evidence`, at `depth` (1: the token after the root), whose parent was
    /// accepted: whether it was accepted too.
    pub fn observe(&mut self, rank: usize, evidence: u32, depth: usize, accepted: bool) {
        self.all.observe(rank, evidence, depth, accepted);
        self.session.observe(rank, evidence, depth, accepted);
    }

    /// For a branch of rank `rank` and evidence `evidence`, the estimated chance that its
    /// first 1, 2, ..., `len` tokens are all accepted. Never increasing, each in (0, 1].
    pub fn chances(&self, rank: usize, evidence: u32, len: usize) -> Vec<f64> {
        let (rank, evidence) = (rank_class(rank), evidence_class(evidence));
        // A first token of this evidence leans on the best branches' first tokens of any;
        // in this session, also on how those fare here against the earlier sessions, so
        // that a class this session has not tried yet is not taken at an estimate the
        // session's other drafts already belie.
        let earlier = Self::level(self.earlier.best[0], Self::PRIOR);
        let now = self.expected_chances(1)[0];
        let prior = if rank == 0 {
            earlier
        } else {
            earlier * ALTERNATIVE_PRIOR
        };
        self.chain(
            |counts| counts.cells[rank][evidence],
            prior,
            (earlier, now),
            len,
        )
    }

    /// [`Self::chances`] of the drafter's best branch before it is drafted, its evidence not
    /// known yet: from the latest observations of best branches of any evidence.
    pub fn expected_chances(&self, len: usize) -> Vec<f64> {
        self.chain(|counts| counts.best, Self::PRIOR, (1.0, 1.0), len)
    }

    /// The chances of a branch whose cells by depth class are `cells`: of the earlier
    /// sessions, their first leaning on `prior`, and of this session, leaning on those (the
    /// first scaled from `from` to `to`). In a first session, a cell's count with `prior`.
    fn chain(
        &self,
        cells: impl Fn(&Counts) -> [Cell; DEPTH_CLASSES],
        mut prior: f64,
        (mut from, mut to): (f64, f64),
        len: usize,
    ) -> Vec<f64> {
        let (earlier, session) = (cells(&self.earlier), cells(&self.session));
        let mut chance = 1.0;
        let mut class = usize::MAX;
        let mut level = prior;
        (1..=len)
            .map(|depth| {
                if depth_class(depth) != class {
                    class = depth_class(depth);
                    let before = Self::level(earlier[class], prior) / from * to;
                    level = Self::level(session[class], before.min(1.0));
                    prior = level;
                    (from, to) = (1.0, 1.0);
                }
                chance *= level;
                chance
            })
            .collect()
    }

    /// A cell's chance of acceptance, its observations weighed with `prior`.
    fn level(cell: Cell, prior: f64) -> f64 {
        ((cell.accepted + PRIOR_WEIGHT * prior) / (cell.seen + PRIOR_WEIGHT))
            .clamp(Self::FLOOR, 1.0)
    }

    /// Estimated chance that this drafter's best guess for the next token is accepted.
    pub fn rate(&self) -> f64 {
        self.chances(0, 0, 1)[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_follow_what_is_accepted_per_evidence_and_depth() {
        let mut stats = AcceptanceStats::default();
        let fresh = stats.chances(0, 5, 2);
        assert!((fresh[0] - 0.6).abs() < 1e-12 && (fresh[1] - 0.36).abs() < 1e-12);
        assert!((stats.chances(1, 5, 1)[0] - 0.3).abs() < 1e-12);
        for _ in 0..100 {
            // Strong evidence: accepted at every level; weak evidence: first token wrong.
            for depth in 1..=10 {
                stats.observe(0, 8, depth, true);
            }
            stats.observe(0, 1, 1, false);
        }
        let strong = stats.chances(0, 8, 10);
        assert!(strong[9] > 0.9, "{strong:?}");
        let weak = stats.chances(0, 1, 3);
        // The prior keeps a little weight: about 2 of 35 observations.
        assert!(weak[0] < 0.05, "{weak:?}");
        // Other classes start from what the best branches' first tokens did, whatever
        // their evidence (here about half of them were accepted), not from the prior.
        let unmeasured = stats.chances(0, 3, 1)[0];
        assert_eq!(unmeasured, stats.expected_chances(1)[0]);
        assert!((unmeasured - 0.5).abs() < 0.05, "{unmeasured}");
        assert_eq!(stats.chances(1, 3, 1)[0], unmeasured * ALTERNATIVE_PRIOR);
        // Evidence 8 to 11 share a class; 16 and more share one.
        assert_eq!(stats.chances(0, 11, 4), stats.chances(0, 8, 4));
        assert_eq!(stats.chances(0, 16, 1), stats.chances(0, 1000, 1));
        // A deep level never measured leans on the one above it.
        for _ in 0..100 {
            stats.observe(0, 2, 1, true);
        }
        let chained = stats.chances(0, 2, 12);
        assert!(chained[0] > 0.95, "{chained:?}");
        assert!(
            (chained[11] - chained[0].powi(12)).abs() < 1e-12,
            "{chained:?}"
        );
    }

    #[test]
    fn estimates_move_when_the_drafter_changes_and_carry_over_without_counters() {
        let mut stats = AcceptanceStats::default();
        assert_eq!(stats.rate(), AcceptanceStats::PRIOR);
        for _ in 0..200 {
            stats.observe(0, 0, 1, true);
        }
        assert!(stats.rate() > 0.95);
        for _ in 0..200 {
            stats.observe(0, 0, 1, false);
        }
        assert!(stats.rate() < 0.05);
        stats.count(5, 2);
        let next = stats.carried_over();
        assert_eq!((next.proposed, next.accepted), (0, 0));
        assert!((next.rate() - stats.rate()).abs() < 0.01);
    }

    #[test]
    fn a_session_s_own_observations_outweigh_the_earlier_sessions() {
        let mut earlier = AcceptanceStats::default();
        for _ in 0..100 {
            for depth in 1..=8 {
                earlier.observe(0, 8, depth, true);
                earlier.observe(0, 12, depth, true);
            }
        }
        let mut next = earlier.carried_over();
        assert!(next.chances(0, 8, 1)[0] > 0.95);
        assert!(next.chances(0, 12, 1)[0] > 0.95);
        // Four first tokens rejected in this session: about half the earlier estimate;
        // counted with the earlier sessions' 33, they would leave it near 0.9.
        for _ in 0..4 {
            next.observe(0, 8, 1, false);
        }
        let now = next.chances(0, 8, 1)[0];
        assert!(now < 0.55, "{now}");
        // A class this session has not tried is taken down with it.
        let untried = next.chances(0, 12, 1)[0];
        assert!(untried < 0.6, "{untried}");
        // The next session starts from every observation, these four among them.
        let third = next.carried_over().chances(0, 8, 1)[0];
        assert!(third > 0.8 && third < 0.95, "{third}");
    }

    #[test]
    fn before_drafting_every_evidence_class_counts() {
        let mut stats = AcceptanceStats::default();
        assert_eq!(stats.expected_chances(2), stats.chances(0, 0, 2));
        // Three accepted blocks with strong evidence, one rejected with weak evidence, and
        // alternatives (rank 1) that do not count for the best branch.
        for _ in 0..30 {
            for _ in 0..3 {
                stats.observe(0, 12, 1, true);
            }
            stats.observe(0, 1, 1, false);
            stats.observe(1, 12, 1, false);
        }
        let first = stats.expected_chances(1)[0];
        assert!((first - 0.75).abs() < 0.03, "{first}");
        assert!(stats.chances(0, 12, 1)[0] > 0.9);
        assert!(stats.chances(0, 1, 1)[0] < 0.1);
    }
}
