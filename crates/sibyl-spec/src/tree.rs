use crate::{DrafterId, TokenId};

/// A drafter's probability distribution at one draft position, kept sparse (top-k).
/// Tokens not listed have probability zero.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseDist {
    entries: Vec<(TokenId, f32)>,
}

impl SparseDist {
    /// Builds a distribution from `(token, probability)` pairs. Returns `None` when a
    /// probability is not finite or negative, a token repeats, or the total exceeds one
    /// (beyond rounding): such a distribution cannot be used for rejection sampling.
    pub fn new(mut entries: Vec<(TokenId, f32)>) -> Option<Self> {
        entries.sort_by_key(|&(token, _)| token);
        let repeats = entries.windows(2).any(|w| w[0].0 == w[1].0);
        let valid = entries.iter().all(|&(_, p)| p.is_finite() && p >= 0.0);
        let total: f64 = entries.iter().map(|&(_, p)| f64::from(p)).sum();
        (valid && !repeats && total <= 1.0 + 1e-3).then_some(Self { entries })
    }

    /// Probability of `token`.
    pub fn prob(&self, token: TokenId) -> f32 {
        self.entries
            .binary_search_by_key(&token, |&(t, _)| t)
            .map_or(0.0, |i| self.entries[i].1)
    }

    /// The listed `(token, probability)` pairs, by token id.
    pub fn entries(&self) -> &[(TokenId, f32)] {
        &self.entries
    }
}

/// One block of candidate tokens continuing the current sequence, as a drafter sent it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Proposal {
    /// Candidate tokens; the first one follows the last accepted token.
    pub tokens: Vec<TokenId>,
    /// For each token, the drafter's distribution it was sampled from; `None` for a
    /// deterministic guess (treated as a point mass).
    pub probs: Option<Vec<SparseDist>>,
    /// The drafter's own measure of how strong this guess is, larger for stronger (the
    /// n-gram and retrieval drafters: the length of the context suffix that matched). Its
    /// scale is the drafter's: the verifier learns each drafter's acceptance separately per
    /// class of evidence, so a drafter that overstates it only misleads its own estimates.
    pub evidence: u32,
}

impl Proposal {
    /// A deterministic proposal (point masses), without evidence.
    pub fn greedy(tokens: Vec<TokenId>) -> Self {
        Self {
            tokens,
            probs: None,
            evidence: 0,
        }
    }

    /// This proposal with `evidence` (see [`Proposal::evidence`]).
    pub fn with_evidence(mut self, evidence: u32) -> Self {
        self.evidence = evidence;
        self
    }
}

/// One node of a [`TokenTree`].
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub token: TokenId,
    /// Index of the parent node; `None` only for the root.
    pub parent: Option<usize>,
    /// Distance from the root (root: 0). The node's absolute position is the root's plus this.
    pub depth: usize,
    /// The drafter that first proposed this node (`None` for the root).
    pub source: Option<DrafterId>,
    /// Every proposal of this token at this place, the first drafter's included: several
    /// drafters may guess the same token, and for rejection sampling each guess is a
    /// candidate of its own, tried in the order of their branches.
    pub candidates: Vec<Candidate>,
}

/// One drafter's guess of a node's token.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The branch it came from, in the order branches were added: candidates are tried in
    /// this order, which is fixed before any token is drawn.
    pub branch: usize,
    /// The distribution it was sampled from; `None` is a point mass.
    pub dist: Option<SparseDist>,
}

/// Candidate continuations merged into a tree. Node 0 is the root: the last token that the
/// target has emitted but not yet processed. Every parent comes before its children, so
/// the ancestors of a node are in increasing index order and increasing depth.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenTree {
    nodes: Vec<Node>,
}

impl TokenTree {
    /// A tree with the root only: an ordinary decoding step.
    pub fn root_only(root: TokenId) -> Self {
        Self {
            nodes: vec![Node {
                token: root,
                parent: None,
                depth: 0,
                source: None,
                candidates: Vec::new(),
            }],
        }
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Number of nodes, root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a tree has at least its root.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Draft nodes (all but the root).
    pub fn draft_len(&self) -> usize {
        self.nodes.len() - 1
    }

    pub fn tokens(&self) -> Vec<TokenId> {
        self.nodes.iter().map(|n| n.token).collect()
    }

    pub fn parents(&self) -> Vec<Option<usize>> {
        self.nodes.iter().map(|n| n.parent).collect()
    }

    /// Children of `node`, in index order.
    pub fn children(&self, node: usize) -> impl Iterator<Item = usize> + '_ {
        (node + 1..self.nodes.len()).filter(move |&i| self.nodes[i].parent == Some(node))
    }

    /// Keeps the first `len` nodes (at least the root). Every parent comes before its
    /// children, so what is left is a tree.
    pub fn truncate(&mut self, len: usize) {
        self.nodes.truncate(len.max(1));
    }

    fn child_with_token(&self, node: usize, token: TokenId) -> Option<usize> {
        self.children(node).find(|&i| self.nodes[i].token == token)
    }
}

/// Merges proposals into one [`TokenTree`] under a node budget.
///
/// How large a step's draft tree may grow, and which of its nodes are worth verifying: set
/// once (the `--draft-*` flags) for every session of a process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TreeLimits {
    /// Most draft nodes verified per step (the tree budget; 0: no speculation).
    pub budget: usize,
    /// Most draft tokens on one branch.
    pub max_depth: usize,
    /// Draft nodes whose estimated chance of acceptance is below this are not verified...
    pub min_value: f64,
    /// ...except this many most likely ones (at least one), which cost little to verify.
    pub exempt_nodes: usize,
}

impl TreeLimits {
    /// No draft tree at all: plain decoding.
    pub const NONE: Self = Self {
        budget: 0,
        max_depth: 0,
        min_value: 0.0,
        exempt_nodes: 1,
    };
}

impl Default for TreeLimits {
    /// 16 nodes, 10 deep, none under a 15% chance but the likeliest.
    fn default() -> Self {
        Self {
            budget: 16,
            max_depth: 10,
            min_value: 0.15,
            exempt_nodes: 1,
        }
    }
}

/// Proposals are untrusted: a token outside the vocabulary cuts its branch there, a branch
/// longer than `max_depth` is cut, malformed probabilities make the branch a point mass
/// (which keeps verification lossless). When the budget is short, the nodes with the highest
/// estimated chance of acceptance go in first.
#[derive(Debug, Clone)]
pub struct TreeBuilder {
    root: TokenId,
    vocab_size: usize,
    budget: usize,
    max_depth: usize,
    branches: Vec<Branch>,
    min_value: f64,
    exempt_nodes: usize,
}

#[derive(Debug, Clone)]
struct Branch {
    drafter: DrafterId,
    /// Chance that the first 1, 2, ... tokens are all accepted, never increasing.
    chances: Vec<f64>,
    tokens: Vec<TokenId>,
    probs: Option<Vec<SparseDist>>,
}

impl TreeBuilder {
    /// `budget` is the most draft nodes (root excluded) the tree may hold.
    pub fn new(root: TokenId, vocab_size: usize, budget: usize, max_depth: usize) -> Self {
        Self {
            root,
            vocab_size,
            budget,
            max_depth,
            branches: Vec::new(),
            min_value: 0.0,
            exempt_nodes: 1,
        }
    }

    /// Leaves out nodes whose estimated chance of acceptance is below `min_value`:
    /// a node costs verify time whether or not it is accepted. The `exempt_nodes` most
    /// valuable nodes (at least one) are kept whatever their value, so a drafter whose
    /// estimate fell low can still prove itself, and nodes that cost almost nothing to
    /// verify are not wasted.
    pub fn with_min_value(mut self, min_value: f64, exempt_nodes: usize) -> Self {
        self.min_value = min_value;
        self.exempt_nodes = exempt_nodes.max(1);
        self
    }

    /// Adds one proposal of `drafter`, whose tokens are accepted with estimated probability
    /// `score` each, so its token at depth d with probability `score ^ d`.
    pub fn add(&mut self, drafter: DrafterId, score: f64, proposal: Proposal) -> Option<usize> {
        let chances = (1..=proposal.tokens.len())
            .map(|d| score.powi(d as i32))
            .collect();
        self.add_with_chances(drafter, chances, proposal)
    }

    /// Adds one proposal of `drafter`; `chances[d]` estimates the probability that its
    /// first d + 1 tokens are all accepted (see [`crate::AcceptanceStats::chances`]). Tokens
    /// past the end of `chances` are left out. Returns the branch's index, by which the
    /// tree's [`Candidate::branch`] refers to it, or `None` when nothing of it is usable.
    pub fn add_with_chances(
        &mut self,
        drafter: DrafterId,
        mut chances: Vec<f64>,
        proposal: Proposal,
    ) -> Option<usize> {
        let Proposal {
            mut tokens, probs, ..
        } = proposal;
        let valid_len = tokens
            .iter()
            .position(|&t| t as usize >= self.vocab_size)
            .unwrap_or(tokens.len())
            .min(self.max_depth);
        tokens.truncate(valid_len.min(chances.len()));
        if tokens.is_empty() {
            return None;
        }
        let probs = probs.and_then(|mut probs| {
            let usable = probs.len() >= tokens.len()
                && tokens.iter().zip(&probs).all(|(&t, q)| q.prob(t) > 0.0);
            probs.truncate(tokens.len());
            usable.then_some(probs)
        });
        // In (0, 1] and never increasing, so that parents always outrank their children.
        chances.truncate(tokens.len());
        let mut ceiling = 1.0f64;
        for chance in &mut chances {
            let valid = if chance.is_finite() { *chance } else { 0.0 };
            ceiling = valid.clamp(1e-6, ceiling);
            *chance = ceiling;
        }
        self.branches.push(Branch {
            drafter,
            chances,
            tokens,
            probs,
        });
        Some(self.branches.len() - 1)
    }

    /// Builds the tree: shared prefixes are stored once, the most valuable nodes first.
    pub fn build(self) -> TokenTree {
        self.build_ranked().0
    }

    /// [`TreeBuilder::build`], also giving each draft node's estimated chance of acceptance
    /// (that of the branch that placed it), in node order. Nodes come in order of
    /// decreasing value with parents first, so [`TokenTree::truncate`] to any length keeps
    /// the most valuable tree of that size.
    pub fn build_ranked(self) -> (TokenTree, Vec<f64>) {
        let mut tree = TokenTree::root_only(self.root);
        let mut values = Vec::new();
        // (value, branch, depth index); parents never rank below their children because
        // chances never increase along a branch, and ties go to the shallower node, then
        // the earlier branch.
        let mut order: Vec<(f64, usize, usize)> = self
            .branches
            .iter()
            .enumerate()
            .flat_map(|(b, branch)| {
                branch
                    .chances
                    .iter()
                    .enumerate()
                    .map(move |(d, &c)| (c, b, d))
            })
            .collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.2.cmp(&b.2)).then(a.1.cmp(&b.1)));
        // For each branch, the tree node its prefix so far ends at (None: cut).
        let mut ends: Vec<Option<usize>> = vec![Some(0); self.branches.len()];
        let mut placed = 0usize;
        for (rank, (value, b, d)) in order.into_iter().enumerate() {
            let Some(parent) = ends[b] else { continue };
            if value < self.min_value && rank >= self.exempt_nodes {
                ends[b] = None;
                continue;
            }
            let branch = &self.branches[b];
            let token = branch.tokens[d];
            let candidate = Candidate {
                branch: b,
                dist: branch.probs.as_ref().map(|p| p[d].clone()),
            };
            if let Some(existing) = tree.child_with_token(parent, token) {
                tree.nodes[existing].candidates.push(candidate);
                ends[b] = Some(existing);
                continue;
            }
            if placed >= self.budget {
                ends[b] = None;
                continue;
            }
            tree.nodes.push(Node {
                token,
                parent: Some(parent),
                depth: d + 1,
                source: Some(branch.drafter),
                candidates: vec![candidate],
            });
            placed += 1;
            values.push(value);
            ends[b] = Some(tree.nodes.len() - 1);
        }
        (tree, values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens_by_depth(tree: &TokenTree) -> Vec<(TokenId, Option<usize>)> {
        tree.nodes().iter().map(|n| (n.token, n.parent)).collect()
    }

    #[test]
    fn shared_prefixes_are_stored_once() {
        let mut builder = TreeBuilder::new(9, 100, 16, 8);
        builder.add(DrafterId(0), 1.0, Proposal::greedy(vec![1, 2, 3]));
        builder.add(DrafterId(1), 1.0, Proposal::greedy(vec![1, 2, 4]));
        let tree = builder.build();
        assert_eq!(tree.len(), 5);
        let nodes = tokens_by_depth(&tree);
        assert_eq!(nodes[0], (9, None));
        assert_eq!(nodes[1], (1, Some(0)));
        assert_eq!(nodes[2], (2, Some(1)));
        // both leaves hang from the shared "2"
        assert!(nodes[3..].contains(&(3, Some(2))));
        assert!(nodes[3..].contains(&(4, Some(2))));
    }

    #[test]
    fn budget_keeps_the_nodes_most_likely_to_be_accepted() {
        let mut builder = TreeBuilder::new(0, 100, 3, 8);
        builder.add(DrafterId(0), 0.2, Proposal::greedy(vec![10, 11, 12]));
        builder.add(DrafterId(1), 0.9, Proposal::greedy(vec![20, 21, 22]));
        let tree = builder.build();
        assert_eq!(tree.tokens(), vec![0, 20, 21, 22]);
    }

    #[test]
    fn nodes_unlikely_to_be_accepted_are_left_out() {
        let mut builder = TreeBuilder::new(0, 100, 16, 8).with_min_value(0.3, 1);
        builder.add(DrafterId(0), 0.6, Proposal::greedy(vec![1, 2, 3]));
        builder.add(DrafterId(1), 0.2, Proposal::greedy(vec![4]));
        // 0.6, 0.36 stay; 0.216 and 0.2 go
        assert_eq!(builder.build().tokens(), vec![0, 1, 2]);
        let mut weak = TreeBuilder::new(0, 100, 16, 8).with_min_value(0.3, 1);
        weak.add(DrafterId(0), 0.1, Proposal::greedy(vec![5, 6]));
        weak.add(DrafterId(1), 0.2, Proposal::greedy(vec![7]));
        // the best node stays whatever its value
        assert_eq!(weak.build().tokens(), vec![0, 7]);
    }

    #[test]
    fn values_come_best_first_and_any_prefix_is_a_tree() {
        let mut builder = TreeBuilder::new(0, 100, 16, 8);
        builder.add(DrafterId(0), 0.5, Proposal::greedy(vec![1, 2, 3]));
        builder.add(DrafterId(1), 0.9, Proposal::greedy(vec![4, 5]));
        let (mut tree, values) = builder.build_ranked();
        assert_eq!(values.len(), tree.draft_len());
        assert!(values.windows(2).all(|w| w[0] >= w[1]), "{values:?}");
        assert!((values[0] - 0.9).abs() < 1e-12);
        tree.truncate(3);
        assert_eq!(tree.tokens(), vec![0, 4, 5]);
        tree.truncate(0);
        assert_eq!(tree.tokens(), vec![0]);
    }

    #[test]
    fn out_of_vocabulary_tokens_cut_their_branch() {
        let mut builder = TreeBuilder::new(0, 50, 16, 8);
        builder.add(DrafterId(0), 1.0, Proposal::greedy(vec![1, 2, 99, 3]));
        builder.add(DrafterId(0), 1.0, Proposal::greedy(vec![u32::MAX]));
        let tree = builder.build();
        assert_eq!(tree.tokens(), vec![0, 1, 2]);
    }

    #[test]
    fn branches_deeper_than_the_limit_are_cut() {
        let mut builder = TreeBuilder::new(0, 50, 16, 2);
        builder.add(DrafterId(0), 1.0, Proposal::greedy(vec![1, 2, 3, 4]));
        assert_eq!(builder.build().tokens(), vec![0, 1, 2]);
    }

    #[test]
    fn malformed_probabilities_become_point_masses() {
        let mut builder = TreeBuilder::new(0, 50, 16, 8);
        let wrong = SparseDist::new(vec![(7, 1.0)]).unwrap();
        builder.add(
            DrafterId(0),
            1.0,
            Proposal {
                tokens: vec![1],
                probs: Some(vec![wrong]),
                evidence: 0,
            },
        );
        assert_eq!(builder.build().nodes()[1].candidates[0].dist, None);
        assert!(SparseDist::new(vec![(1, 0.7), (2, 0.7)]).is_none());
        assert!(SparseDist::new(vec![(1, f32::NAN)]).is_none());
        assert!(SparseDist::new(vec![(1, 0.2), (1, 0.2)]).is_none());
    }

    #[test]
    fn chances_rank_nodes_and_never_increase_along_a_branch() {
        let mut builder = TreeBuilder::new(0, 50, 3, 8);
        // A copy run, likely for three tokens, and a guess less likely than its third.
        let run = Proposal::greedy(vec![1, 2, 3]);
        assert_eq!(
            builder.add_with_chances(DrafterId(0), vec![0.95, 0.9, 0.85], run),
            Some(0)
        );
        let guess = Proposal::greedy(vec![4, 5]);
        assert_eq!(
            builder.add_with_chances(DrafterId(1), vec![0.5, 0.4], guess),
            Some(1)
        );
        let no_chances = Proposal::greedy(vec![6]);
        assert_eq!(
            builder.add_with_chances(DrafterId(1), Vec::new(), no_chances),
            None
        );
        let (tree, values) = builder.build_ranked();
        assert_eq!(tree.tokens(), vec![0, 1, 2, 3]);
        assert_eq!(values, vec![0.95, 0.9, 0.85]);
        // A chance above its parent's is capped by it; one that is not a number is tiny.
        let mut builder = TreeBuilder::new(0, 50, 16, 8);
        let rising = Proposal::greedy(vec![1, 2, 3]);
        builder.add_with_chances(DrafterId(0), vec![0.5, 0.9, f64::NAN], rising);
        assert_eq!(builder.build_ranked().1, vec![0.5, 0.5, 1e-6]);
    }

    #[test]
    fn parents_precede_children() {
        let mut builder = TreeBuilder::new(0, 100, 64, 8);
        for (i, score) in [0.3, 0.9, 0.5, 0.7].into_iter().enumerate() {
            let base = i as u32 * 10;
            builder.add(
                DrafterId(i),
                score,
                Proposal::greedy(vec![1, base + 2, base + 3, base + 4]),
            );
        }
        let tree = builder.build();
        for (i, node) in tree.nodes().iter().enumerate().skip(1) {
            let parent = node.parent.unwrap();
            assert!(parent < i);
            assert_eq!(tree.nodes()[parent].depth + 1, node.depth);
        }
    }
}
