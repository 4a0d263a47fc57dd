use crate::constraint::TokenConstraint;
use crate::penalties::TokenHistory;
use crate::sampling::{argmax, SamplingConfig, SamplingError, TargetDistribution};
use crate::{SparseDist, TokenId, TokenTree};
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The random stream of one request, split by absolute token position: the draw that picks
/// the token at position `p` comes from stream `p`, however the steps were cut. With
/// point-mass drafts a seeded speculative run therefore emits exactly the tokens of a seeded
/// plain run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PositionRng {
    seed: u64,
}

impl PositionRng {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// The generator for the token at absolute position `position`.
    pub fn at(&self, position: usize) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(position as u64);
        rng
    }
}

/// What one verify step decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Accepted draft nodes, root excluded, from the root down.
    pub path: Vec<usize>,
    /// The target's own token after the accepted path (a correction or a bonus token).
    pub next_token: TokenId,
}

impl Outcome {
    /// Tokens emitted by this step: the accepted draft tokens, then `next_token`.
    pub fn emitted(&self, tree: &TokenTree) -> Vec<TokenId> {
        let mut tokens: Vec<TokenId> = self.path.iter().map(|&i| tree.nodes()[i].token).collect();
        tokens.push(self.next_token);
        tokens
    }
}

/// Walks `tree` with the target's logits (`target_logits`: one row of `vocab` per node, in
/// node order) and returns the accepted path and the next token.
///
/// `history` holds the tokens emitted before the root's position: with penalties in
/// `config`, each row is adjusted for them and the accepted path above its node before a
/// token is chosen from it (see [`TokenHistory::adjust`]); `constraint` then masks the
/// row for the same path.
///
/// `root_position` is the absolute position of the tree's root; the token chosen after node
/// `i` sits at `root_position + depth(i) + 1` and draws from that position's random stream.
/// Greedy: a child is accepted when it is the argmax. Sampling: point-mass children by
/// "sample the target, accept on match"; children with draft probabilities by `min(1, p/q)`
/// in turn, each rejection leaving the residual `max(0, p - q)`.
pub fn verify(
    tree: &TokenTree,
    target_logits: &[f32],
    vocab: usize,
    config: &SamplingConfig,
    root_position: usize,
    history: &TokenHistory,
    mut constraint: Option<&mut (dyn TokenConstraint + '_)>,
) -> Result<Outcome, SamplingError> {
    let rng = PositionRng::new(config.seed);
    let mut path: Vec<usize> = Vec::new();
    let mut current = 0usize;
    let mut adjusted = Vec::new();
    loop {
        let mut row = target_logits
            .get(current * vocab..(current + 1) * vocab)
            .ok_or(SamplingError::Logits {
                node: current,
                vocab,
            })?;
        let penalised = !config.penalties.is_neutral();
        if penalised || constraint.is_some() {
            let above: Vec<TokenId> = path.iter().map(|&i| tree.nodes()[i].token).collect();
            adjusted.clear();
            adjusted.extend_from_slice(row);
            if penalised {
                history.adjust(&config.penalties, &mut adjusted, &above);
            }
            if let Some(constraint) = constraint.as_deref_mut() {
                constraint
                    .mask(&above, &mut adjusted)
                    .map_err(SamplingError::Constraint)?;
            }
            row = &adjusted;
        }
        let children: Vec<usize> = tree.children(current).collect();
        let chosen = if config.is_greedy() {
            follow_match(tree, &children, argmax(row))
        } else {
            let position = root_position + tree.nodes()[current].depth + 1;
            choose_sampled(tree, &children, row, config, &mut rng.at(position))
        };
        match chosen {
            Choice::Follow(child) => {
                path.push(child);
                current = child;
            }
            Choice::Stop(next_token) => return Ok(Outcome { path, next_token }),
        }
    }
}

enum Choice {
    /// The target accepts this child: go on from it.
    Follow(usize),
    /// The step ends with the target's own token.
    Stop(TokenId),
}

/// "Accept on match": follow the child carrying the target's token, else stop with it.
fn follow_match(tree: &TokenTree, children: &[usize], token: TokenId) -> Choice {
    children
        .iter()
        .copied()
        .find(|&c| tree.nodes()[c].token == token)
        .map_or(Choice::Stop(token), Choice::Follow)
}

fn choose_sampled<R: Rng>(
    tree: &TokenTree,
    children: &[usize],
    row: &[f32],
    config: &SamplingConfig,
    rng: &mut R,
) -> Choice {
    let mut target = TargetDistribution::new(row, config);
    let nodes = tree.nodes();
    let sampled = |c: &usize| nodes[*c].candidates.iter().any(|k| k.dist.is_some());
    if !children.iter().any(sampled) {
        return follow_match(tree, children, target.sample(rng));
    }
    // Every drafter's guess is a candidate of its own, even where guesses coincide, tried
    // in branch order (fixed before any token was drawn), each against what the earlier
    // rejections left of the target (recursive rejection sampling).
    let mut candidates: Vec<(usize, usize, Option<&SparseDist>)> = children
        .iter()
        .flat_map(|&child| {
            nodes[child]
                .candidates
                .iter()
                .map(move |k| (k.branch, child, k.dist.as_ref()))
        })
        .collect();
    candidates.sort_by_key(|&(branch, _, _)| branch);
    for (_, child, dist) in candidates {
        let token = nodes[child].token;
        match dist {
            None => {
                if rng.random::<f64>() < target.prob(token) {
                    return Choice::Follow(child);
                }
                target.remove(token);
            }
            Some(q) => {
                let p = target.prob(token);
                let q_token = f64::from(q.prob(token));
                if rng.random::<f64>() < (p / q_token).min(1.0) {
                    return Choice::Follow(child);
                }
                if !target.subtract(q) {
                    target.remove(token);
                }
            }
        }
    }
    // All children rejected: the residual's sample ends the step.
    Choice::Stop(target.sample(rng))
}
