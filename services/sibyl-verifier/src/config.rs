use sibyl_proto::client::{AddressError, ServiceAddress};
use sibyl_spec::TreeLimits;
use std::str::FromStr;
use std::time::Duration;

/// A drafter the verifier drafts with: `KIND=http://HOST:PORT`. A host name that resolves to
/// several addresses (a Kubernetes headless Service) spreads sessions over all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrafterEndpoint {
    /// Drafter kind (`ngram`, `retrieval`, `lm`): what requests select by.
    pub kind: String,
    pub address: ServiceAddress,
}

/// A `--drafter` value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("drafter `{0}`: expected KIND=http://HOST:PORT, e.g. ngram=http://127.0.0.1:50061")]
    Shape(String),
    #[error("drafter `{0}`: the kind must be a non-empty name of letters, digits, - and _")]
    Kind(String),
    #[error("drafter `{value}`: {source}")]
    Address {
        value: String,
        #[source]
        source: AddressError,
    },
}

impl FromStr for DrafterEndpoint {
    type Err = EndpointError;

    fn from_str(value: &str) -> Result<Self, EndpointError> {
        let (kind, address) = value
            .split_once('=')
            .ok_or_else(|| EndpointError::Shape(value.to_string()))?;
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if kind.is_empty() || !kind.chars().all(valid) {
            return Err(EndpointError::Kind(value.to_string()));
        }
        let address = address.parse().map_err(|source| EndpointError::Address {
            value: value.to_string(),
            source,
        })?;
        Ok(Self {
            kind: kind.to_string(),
            address,
        })
    }
}

/// How the verifier speculates.
#[derive(Debug, Clone)]
pub struct SpeculationConfig {
    /// How large each step's draft tree may grow.
    pub tree: TreeLimits,
    /// Verify the number of draft nodes expected to give the most tokens per second (none
    /// when no draft pays), by step costs measured as the verifier runs; else every node
    /// the drafts fill, up to the budget.
    pub adaptive_tree: bool,
    /// Longest a step waits for drafts that have not arrived yet.
    pub step_wait: Duration,
    /// Most blocks held per drafter and session.
    pub inbox_capacity: usize,
    /// Most branches per block.
    pub max_branches: usize,
}

impl Default for SpeculationConfig {
    fn default() -> Self {
        Self {
            tree: TreeLimits::default(),
            adaptive_tree: true,
            step_wait: Duration::from_millis(5),
            inbox_capacity: 16,
            max_branches: 4,
        }
    }
}

/// Everything the verifier service needs besides the model.
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// Name the model is served under.
    pub model_name: String,
    pub drafters: Vec<DrafterEndpoint>,
    pub speculation: SpeculationConfig,
    /// Most sessions at once; more wait in the queue.
    pub max_sessions: usize,
    /// Most requests waiting for a session slot or KV-cache room; more are refused at once
    /// with RESOURCE_EXHAUSTED.
    pub max_queue: usize,
    /// Longest a request waits in the queue before it is refused with RESOURCE_EXHAUSTED.
    pub queue_timeout: Duration,
    /// KV-cache bytes all sessions together may reserve (each reserves room for its prompt,
    /// its output and one step's draft nodes); `None`: no budget beyond the session slots.
    pub kv_cache_bytes: Option<usize>,
    /// Most tokens of prompt and output of one session, below the model's context window:
    /// longer prompts are refused, outputs stop there. `None`: the model's window.
    pub max_model_len: Option<usize>,
    /// A session whose client has not read its stream for this long is ended.
    pub idle_timeout: Duration,
    /// The token drafters and the gateway show each other (`--internal-token-file`): calls
    /// to this verifier must carry it, and its draft streams carry it.
    pub internal_token: Option<sibyl_proto::auth::InternalToken>,
    /// The certificate authorities `https://` drafters are checked against (`--tls-ca`).
    pub drafter_tls: Option<std::sync::Arc<sibyl_proto::tls::ClientTls>>,
    /// How the step scheduler fills each forward pass.
    pub scheduler: sibyl_decode::SchedulerConfig,
}

impl VerifierConfig {
    /// A verifier of `model_name` drafting with `drafters`, with the default speculation,
    /// limits and scheduling (those of `sibyl verifier --help`).
    pub fn new(model_name: String, drafters: Vec<DrafterEndpoint>) -> Self {
        Self {
            model_name,
            drafters,
            speculation: SpeculationConfig::default(),
            max_sessions: 16,
            max_queue: 64,
            queue_timeout: Duration::from_secs(30),
            kv_cache_bytes: None,
            max_model_len: None,
            idle_timeout: Duration::from_secs(30),
            internal_token: None,
            drafter_tls: None,
            scheduler: sibyl_decode::SchedulerConfig {
                prefix_cache_bytes: 1 << 30,
                ..sibyl_decode::SchedulerConfig::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_bad_ones_say_why() {
        let endpoint: DrafterEndpoint = "ngram=http://drafters.sibyl.svc:50061".parse().unwrap();
        assert_eq!(endpoint.kind, "ngram");
        assert_eq!(endpoint.address.port, 50061);
        assert!(matches!(
            "http://x:1".parse::<DrafterEndpoint>(),
            Err(EndpointError::Shape(_))
        ));
        assert!(matches!(
            "=http://x:1".parse::<DrafterEndpoint>(),
            Err(EndpointError::Kind(_))
        ));
        assert!(matches!(
            "ngram=http://x".parse::<DrafterEndpoint>(),
            Err(EndpointError::Address { .. })
        ));
    }
}
