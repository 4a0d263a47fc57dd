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

/// A drafter's acceptance, measured as a session goes (see the module documentation). The
/// default has measured nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AcceptanceStats {
    /// Draft tokens of this drafter that were placed in a verified tree.
    pub proposed: u64,
    /// Draft tokens of this drafter that the target accepted.
    pub accepted: u64,
    cells: [[[Cell; DEPTH_CLASSES]; EVIDENCE_CLASSES]; RANK_CLASSES],
    /// The best branches' cells by depth, whatever their evidence: what a branch is
    /// expected to do before it is drafted.
    best: [Cell; DEPTH_CLASSES],
}

impl AcceptanceStats {
    /// Chance assumed for the first token of a best branch in a cell not yet measured.
    pub const PRIOR: f64 = 0.6;
    /// The lowest chance a level is given: low enough that two drafters that are always
    /// wrong are not worth a node (see [`crate::MIN_GAIN`]), never zero, so that a drafter
    /// can be tried again.
    const FLOOR: f64 = 0.01;

    /// These estimates with the counters reset: where a new session of the same drafter
    /// kind starts from.
    pub fn carried_over(&self) -> Self {
        Self {
            proposed: 0,
            accepted: 0,
            ..self.clone()
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
        let cell = &mut self.cells[rank_class(rank)][evidence_class(evidence)][depth_class(depth)];
        cell.observe(accepted);
        if rank_class(rank) == 0 {
            self.best[depth_class(depth)].observe(accepted);
        }
    }

    /// For a branch of rank `rank` and evidence `evidence`, the estimated chance that its
    /// first 1, 2, ..., `len` tokens are all accepted. Never increasing, each in (0, 1].
    pub fn chances(&self, rank: usize, evidence: u32, len: usize) -> Vec<f64> {
        let cells = &self.cells[rank_class(rank)][evidence_class(evidence)];
        // A first token of this evidence leans on the best branches' first tokens of any
        // (their `expected_chances(1)`).
        let first = Self::level(self.best[0], Self::PRIOR);
        let prior = if rank_class(rank) == 0 {
            first
        } else {
            first * ALTERNATIVE_PRIOR
        };
        Self::chain(|class| cells[class], prior, len)
    }

    /// [`Self::chances`] of the drafter's best branch before it is drafted, its evidence not
    /// known yet: from the latest observations of best branches of any evidence.
    pub fn expected_chances(&self, len: usize) -> Vec<f64> {
        Self::chain(|class| self.best[class], Self::PRIOR, len)
    }

    /// The chances of a branch whose cells by depth class are `cell`, its first token's
    /// cell leaning on `prior`.
    fn chain(cell: impl Fn(usize) -> Cell, mut prior: f64, len: usize) -> Vec<f64> {
        let mut chance = 1.0;
        let mut class = usize::MAX;
        let mut level = prior;
        (1..=len)
            .map(|depth| {
                if depth_class(depth) != class {
                    class = depth_class(depth);
                    level = Self::level(cell(class), prior);
                    prior = level;
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
        assert_eq!(next.rate(), stats.rate());
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
