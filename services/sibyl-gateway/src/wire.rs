//! Conversions between the gateway's request and report types ([`crate::params`]) and
//! `sibyl.v1`'s, for its two gRPC edges: the Gateway API's requests and summaries, and the
//! call to a verifier.

use crate::generation::GatewayError;
use crate::params::{
    DrafterState, DrafterStats, FinishReason, Grammar, Logprobs, Sampling, Speculation,
};
use sibyl_proto::v1 as pb;

impl Sampling {
    /// A gRPC request's sampling, checked (absent: greedy; 0 leaves `top_k`, `top_p` and
    /// `repetition_penalty` unset).
    pub(crate) fn from_wire(params: Option<pb::SamplingParams>) -> Result<Self, GatewayError> {
        let params = params.unwrap_or_default();
        let sampling = Self::new(
            params.temperature,
            (params.top_k != 0).then_some(params.top_k),
            (params.top_p != 0.0).then_some(params.top_p),
            params.seed,
        )?;
        let sampling = sampling
            .with_min_p(Some(params.min_p))?
            .with_penalties(sibyl_proto::penalties(&params))?;
        Ok(Sampling {
            filters_first: params.filters_first,
            ..sampling
        })
    }
}

impl From<Sampling> for pb::SamplingParams {
    fn from(sampling: Sampling) -> Self {
        Self {
            temperature: sampling.temperature,
            top_k: sampling.top_k.unwrap_or(0),
            top_p: sampling.top_p.unwrap_or(0.0),
            min_p: sampling.min_p.unwrap_or(0.0),
            seed: sampling.seed,
            filters_first: sampling.filters_first,
            ..pb::SamplingParams::from(&sampling.penalties)
        }
    }
}

impl Grammar {
    /// A gRPC request's grammar; one with no kind set is refused.
    pub(crate) fn from_wire(grammar: pb::OutputGrammar) -> Result<Self, GatewayError> {
        use pb::output_grammar::Kind;
        match grammar.kind {
            Some(Kind::JsonSchema(schema)) => Ok(Self::JsonSchema(schema)),
            Some(Kind::Regex(regex)) => Ok(Self::Regex(regex)),
            Some(Kind::Choice(choice)) => Ok(Self::Choice(choice.choices)),
            Some(Kind::Lark(lark)) => Ok(Self::Lark(lark)),
            None => Err(GatewayError::invalid_param(
                "grammar",
                "the output grammar sets none of its kinds",
            )),
        }
    }
}

impl From<Grammar> for pb::OutputGrammar {
    fn from(grammar: Grammar) -> Self {
        use pb::output_grammar::Kind;
        let kind = match grammar {
            Grammar::JsonSchema(schema) => Kind::JsonSchema(schema),
            Grammar::Regex(regex) => Kind::Regex(regex),
            Grammar::Choice(choices) => Kind::Choice(pb::Choices { choices }),
            Grammar::Lark(lark) => Kind::Lark(lark),
        };
        Self { kind: Some(kind) }
    }
}

impl Speculation {
    /// A gRPC request's speculation: absent, as configured; an unknown mode is refused.
    pub(crate) fn from_wire(speculation: Option<pb::Speculation>) -> Result<Self, GatewayError> {
        let Some(speculation) = speculation else {
            return Ok(Self::Default);
        };
        match pb::SpeculationMode::try_from(speculation.mode) {
            Ok(pb::SpeculationMode::Off) => Ok(Self::Off),
            Ok(pb::SpeculationMode::On | pb::SpeculationMode::Unspecified) => Ok(Self::On {
                drafters: speculation.drafters,
            }),
            Err(_) => Err(GatewayError::invalid_param(
                "speculation",
                format!("unknown speculation mode {}", speculation.mode),
            )),
        }
    }

    /// As the verifier takes it: `None` for as it is configured.
    pub(crate) fn to_wire(&self) -> Option<pb::Speculation> {
        match self {
            Self::Default => None,
            Self::Off => Some(pb::Speculation {
                mode: pb::SpeculationMode::Off as i32,
                drafters: Vec::new(),
            }),
            Self::On { drafters } => Some(pb::Speculation {
                mode: pb::SpeculationMode::On as i32,
                drafters: drafters.clone(),
            }),
        }
    }
}

impl From<pb::FinishReason> for FinishReason {
    fn from(reason: pb::FinishReason) -> Self {
        match reason {
            pb::FinishReason::Unspecified => Self::Unspecified,
            pb::FinishReason::Stop => Self::Stop,
            pb::FinishReason::Length => Self::Length,
            pb::FinishReason::Cancelled => Self::Cancelled,
        }
    }
}

impl From<FinishReason> for pb::FinishReason {
    fn from(reason: FinishReason) -> Self {
        match reason {
            FinishReason::Unspecified => Self::Unspecified,
            FinishReason::Stop => Self::Stop,
            FinishReason::Length => Self::Length,
            FinishReason::Cancelled => Self::Cancelled,
        }
    }
}

impl From<pb::DrafterStats> for DrafterStats {
    fn from(stats: pb::DrafterStats) -> Self {
        let state = match stats.state() {
            pb::DrafterState::Unspecified => DrafterState::Unspecified,
            pb::DrafterState::Connected => DrafterState::Connected,
            pb::DrafterState::Refused => DrafterState::Refused,
            pb::DrafterState::Failed => DrafterState::Failed,
            pb::DrafterState::Connecting => DrafterState::Connecting,
        };
        Self {
            kind: stats.kind,
            endpoint: stats.endpoint,
            proposed_tokens: stats.proposed_tokens,
            accepted_tokens: stats.accepted_tokens,
            blocks_received: stats.blocks_received,
            blocks_dropped: stats.blocks_dropped,
            state,
            error: stats.error,
        }
    }
}

impl From<DrafterStats> for pb::DrafterStats {
    fn from(stats: DrafterStats) -> Self {
        let state = match stats.state {
            DrafterState::Unspecified => pb::DrafterState::Unspecified,
            DrafterState::Connected => pb::DrafterState::Connected,
            DrafterState::Refused => pb::DrafterState::Refused,
            DrafterState::Failed => pb::DrafterState::Failed,
            DrafterState::Connecting => pb::DrafterState::Connecting,
        };
        Self {
            kind: stats.kind,
            endpoint: stats.endpoint,
            proposed_tokens: stats.proposed_tokens,
            accepted_tokens: stats.accepted_tokens,
            blocks_received: stats.blocks_received,
            blocks_dropped: stats.blocks_dropped,
            state: state as i32,
            error: stats.error,
        }
    }
}

impl From<&Logprobs> for pb::TokenLogprobs {
    fn from(p: &Logprobs) -> Self {
        Self {
            token: p.chosen.token,
            logprob: p.chosen.logprob,
            top: p
                .top
                .iter()
                .map(|t| pb::TokenLogprob {
                    token: t.token,
                    logprob: t.logprob,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_grammar_crosses_as_it_came_and_an_empty_one_is_refused() {
        for grammar in [
            Grammar::JsonSchema(r#"{"type": "object"}"#.into()),
            Grammar::Regex("[a-z]+".into()),
            Grammar::Choice(vec!["yes".into(), "no".into()]),
            Grammar::Lark("start: \"x\"".into()),
        ] {
            let wire = pb::OutputGrammar::from(grammar.clone());
            assert_eq!(Grammar::from_wire(wire).unwrap(), grammar);
        }
        let empty = Grammar::from_wire(pb::OutputGrammar { kind: None });
        assert!(matches!(
            empty,
            Err(GatewayError::InvalidParam {
                param: "grammar",
                ..
            })
        ));
    }

    #[test]
    fn a_request_crosses_to_the_verifier_as_it_came() {
        let params = || pb::SamplingParams {
            temperature: 0.7,
            top_k: 0,
            top_p: 0.9,
            seed: Some(3),
            presence_penalty: 0.5,
            frequency_penalty: -0.25,
            repetition_penalty: 1.1,
            logit_bias: [(7, -100.0), (2, 3.5)].into_iter().collect(),
            min_p: 0.05,
            filters_first: true,
        };
        let sampling = Sampling::from_wire(Some(params())).unwrap();
        assert_eq!(sampling.top_k, None);
        assert_eq!(sampling.penalties.logit_bias, vec![(2, 3.5), (7, -100.0)]);
        assert_eq!(pb::SamplingParams::from(sampling), params());
        assert_eq!(
            Sampling::from_wire(None).unwrap(),
            Sampling::new(0.0, None, None, None).unwrap()
        );
        for speculation in [
            None,
            Some(pb::Speculation {
                mode: pb::SpeculationMode::Off as i32,
                drafters: Vec::new(),
            }),
            Some(pb::Speculation {
                mode: pb::SpeculationMode::On as i32,
                drafters: vec!["ngram".into()],
            }),
        ] {
            let ours = Speculation::from_wire(speculation.clone()).unwrap();
            assert_eq!(ours.to_wire(), speculation);
        }
        let unknown = pb::Speculation {
            mode: 9,
            drafters: Vec::new(),
        };
        assert!(Speculation::from_wire(Some(unknown)).is_err());
    }

    #[test]
    fn drafter_figures_come_back_unchanged() {
        let stats = pb::DrafterStats {
            kind: "ngram".into(),
            endpoint: "10.0.0.7:50061".into(),
            proposed_tokens: 40,
            accepted_tokens: 31,
            blocks_received: 12,
            blocks_dropped: 2,
            state: pb::DrafterState::Refused as i32,
            error: "tokenizer".into(),
        };
        assert_eq!(
            pb::DrafterStats::from(DrafterStats::from(stats.clone())),
            stats
        );
        for reason in [
            pb::FinishReason::Unspecified,
            pb::FinishReason::Stop,
            pb::FinishReason::Length,
            pb::FinishReason::Cancelled,
        ] {
            assert_eq!(pb::FinishReason::from(FinishReason::from(reason)), reason);
        }
    }
}
