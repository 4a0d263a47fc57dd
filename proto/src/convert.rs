//! Conversions between wire messages and the domain types of `sibyl-spec`, done once at
//! the gRPC adapters. Conversions from the wire validate; conversions to it cannot fail.

use crate::v1 as pb;
use sibyl_spec::{
    AnchoredBlock, Penalties, Proposal, SamplingConfig, SparseDist, TokenId, TokenLogprobs,
};

/// A wire message that does not describe a valid value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("a token distribution lists {tokens} tokens but {probabilities} probabilities")]
    DistributionLengths { tokens: usize, probabilities: usize },
    #[error("a token distribution has a repeated token, a probability outside [0, 1], or a total over 1")]
    Distribution,
    #[error("anchor {0} does not fit in this machine's address space")]
    Anchor(u64),
    #[error("top_k {0} does not fit in this machine's address space")]
    TopK(u32),
}

impl From<&AnchoredBlock> for pb::DraftBlock {
    fn from(block: &AnchoredBlock) -> Self {
        Self {
            anchor: block.anchor as u64,
            branches: block
                .branches
                .iter()
                .map(|branch| pb::DraftBranch {
                    tokens: branch.tokens.clone(),
                    distributions: branch
                        .probs
                        .iter()
                        .flatten()
                        .map(|dist| pb::TokenDistribution {
                            tokens: dist.entries().iter().map(|&(t, _)| t).collect(),
                            probabilities: dist.entries().iter().map(|&(_, p)| p).collect(),
                        })
                        .collect(),
                    evidence: branch.evidence,
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::DraftBlock> for AnchoredBlock {
    type Error = WireError;

    fn try_from(block: pb::DraftBlock) -> Result<Self, WireError> {
        let anchor = usize::try_from(block.anchor).map_err(|_| WireError::Anchor(block.anchor))?;
        let branches = block
            .branches
            .into_iter()
            .map(|branch| {
                let probs = if branch.distributions.is_empty() {
                    None
                } else {
                    Some(
                        branch
                            .distributions
                            .into_iter()
                            .map(SparseDist::try_from)
                            .collect::<Result<Vec<_>, _>>()?,
                    )
                };
                Ok(Proposal {
                    tokens: branch.tokens,
                    probs,
                    evidence: branch.evidence,
                })
            })
            .collect::<Result<Vec<_>, WireError>>()?;
        Ok(Self { anchor, branches })
    }
}

impl TryFrom<pb::TokenDistribution> for SparseDist {
    type Error = WireError;

    fn try_from(dist: pb::TokenDistribution) -> Result<Self, WireError> {
        if dist.tokens.len() != dist.probabilities.len() {
            return Err(WireError::DistributionLengths {
                tokens: dist.tokens.len(),
                probabilities: dist.probabilities.len(),
            });
        }
        SparseDist::new(dist.tokens.into_iter().zip(dist.probabilities).collect())
            .ok_or(WireError::Distribution)
    }
}

/// The sampling configuration of `params` (absent: greedy), with `seed` filling an unset
/// seed. The result still needs [`SamplingConfig::validate`].
pub fn sampling_config(
    params: Option<&pb::SamplingParams>,
    seed: impl FnOnce() -> u64,
) -> Result<SamplingConfig, WireError> {
    let Some(params) = params else {
        return Ok(SamplingConfig {
            seed: seed(),
            ..SamplingConfig::greedy()
        });
    };
    let top_k = match params.top_k {
        0 => None,
        k => Some(usize::try_from(k).map_err(|_| WireError::TopK(k))?),
    };
    Ok(SamplingConfig {
        temperature: params.temperature,
        top_k,
        top_p: (params.top_p != 0.0).then_some(params.top_p),
        min_p: (params.min_p != 0.0).then_some(params.min_p),
        seed: params.seed.unwrap_or_else(seed),
        penalties: penalties(params),
        filters_first: params.filters_first,
    })
}

/// The bias and penalties of `params` (a repetition penalty of 0 is unset: 1), biased
/// tokens in id order. The result still needs [`Penalties::validate`].
pub fn penalties(params: &pb::SamplingParams) -> Penalties {
    let mut logit_bias: Vec<(TokenId, f32)> =
        params.logit_bias.iter().map(|(&t, &b)| (t, b)).collect();
    logit_bias.sort_by_key(|&(token, _)| token);
    Penalties {
        presence: params.presence_penalty,
        frequency: params.frequency_penalty,
        repetition: match params.repetition_penalty {
            0.0 => 1.0,
            r => r,
        },
        logit_bias,
    }
}

impl From<&TokenLogprobs> for pb::TokenLogprobs {
    fn from(p: &TokenLogprobs) -> Self {
        Self {
            token: p.token,
            logprob: p.logprob,
            top: p
                .top
                .iter()
                .map(|&(token, logprob)| pb::TokenLogprob { token, logprob })
                .collect(),
        }
    }
}

impl From<&SamplingConfig> for pb::SamplingParams {
    fn from(config: &SamplingConfig) -> Self {
        Self {
            temperature: config.temperature,
            top_k: config
                .top_k
                .map_or(0, |k| u32::try_from(k).unwrap_or(u32::MAX)),
            top_p: config.top_p.unwrap_or(0.0),
            min_p: config.min_p.unwrap_or(0.0),
            seed: Some(config.seed),
            filters_first: config.filters_first,
            ..pb::SamplingParams::from(&config.penalties)
        }
    }
}

impl From<&Penalties> for pb::SamplingParams {
    /// The penalties' fields, the rest unset.
    fn from(penalties: &Penalties) -> Self {
        Self {
            presence_penalty: penalties.presence,
            frequency_penalty: penalties.frequency,
            repetition_penalty: penalties.repetition,
            logit_bias: penalties.logit_bias.iter().copied().collect(),
            ..Self::default()
        }
    }
}

/// A tokenizer fingerprint in its wire form (16 lower-case hex digits).
pub fn fingerprint(value: u64) -> String {
    format!("{value:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_survive_the_round_trip() {
        let block = AnchoredBlock {
            anchor: 12,
            branches: vec![
                Proposal::greedy(vec![1, 2, 3]).with_evidence(8),
                Proposal {
                    tokens: vec![4],
                    probs: Some(vec![SparseDist::new(vec![(4, 0.75), (9, 0.25)]).unwrap()]),
                    evidence: 0,
                },
            ],
        };
        let wire = pb::DraftBlock::from(&block);
        assert_eq!(AnchoredBlock::try_from(wire).unwrap(), block);
    }

    #[test]
    fn malformed_distributions_are_refused() {
        let bad = [
            pb::TokenDistribution {
                tokens: vec![1, 2],
                probabilities: vec![0.5],
            },
            pb::TokenDistribution {
                tokens: vec![1, 1],
                probabilities: vec![0.5, 0.5],
            },
            pb::TokenDistribution {
                tokens: vec![1],
                probabilities: vec![f32::NAN],
            },
            pb::TokenDistribution {
                tokens: vec![1, 2],
                probabilities: vec![0.9, 0.9],
            },
        ];
        for dist in bad {
            assert!(SparseDist::try_from(dist).is_err());
        }
    }

    #[test]
    fn unset_sampling_is_greedy_with_the_given_seed() {
        let config = sampling_config(None, || 7).unwrap();
        assert_eq!(config.temperature, 0.0);
        assert_eq!(config.seed, 7);
        let params = pb::SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.0,
            seed: Some(3),
            ..Default::default()
        };
        let config = sampling_config(Some(&params), || 7).unwrap();
        assert_eq!(
            (config.top_k, config.top_p, config.seed),
            (Some(40), None, 3)
        );
    }
}
