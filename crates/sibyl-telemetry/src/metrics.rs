//! Prometheus metrics of every role, in the process's default registry (so `sibyl serve`,
//! which runs all roles in one process, reports them all on one endpoint).
//!
//! A role calls its accessor ([`gateway`], [`verifier`], [`drafter`]) when it starts, so
//! its families are listed (at zero) before the first request. Labels are low-cardinality:
//! API, outcome and drafter kind only.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    TextEncoder,
};
use std::sync::LazyLock;

/// Registers a metric in the default registry. Names are fixed here and each family is
/// made once (behind a `LazyLock`), so registration cannot fail at run time.
fn register<M: prometheus::core::Collector + Clone + 'static>(metric: M) -> M {
    prometheus::register(Box::new(metric.clone())).expect("metric names are unique and valid");
    metric
}

fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::new(name, help).expect("valid metric"))
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

fn gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::new(name, help).expect("valid metric"))
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(Histogram::with_opts(opts).expect("valid metric"))
}

/// `sibyl_build_info{version, role}`: 1 for each role this process runs.
fn build_info() -> &'static IntGaugeVec {
    static INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
        gauge_vec(
            "sibyl_build_info",
            "The sibyl version and the roles this process runs (always 1).",
            &["version", "role"],
        )
    });
    &INFO
}

fn announce(role: &str) {
    build_info()
        .with_label_values(&[env!("CARGO_PKG_VERSION"), role])
        .set(1);
}

/// The gateway's metrics.
pub struct GatewayMetrics {
    /// By `api` (`http`, `grpc`) and `outcome` (`ok`, `invalid`, `overloaded`,
    /// `unavailable`, `error`, `cancelled`).
    pub requests: IntCounterVec,
    pub generated_tokens: IntCounter,
    pub active_requests: IntGauge,
    pub request_duration: Histogram,
    pub time_to_first_token: Histogram,
    /// 1 while the verifier answers.
    pub verifier_up: IntGauge,
}

pub fn gateway() -> &'static GatewayMetrics {
    static METRICS: LazyLock<GatewayMetrics> = LazyLock::new(|| {
        announce("gateway");
        GatewayMetrics {
            requests: counter_vec(
                "sibyl_gateway_requests_total",
                "Generation requests by API and outcome.",
                &["api", "outcome"],
            ),
            generated_tokens: counter(
                "sibyl_gateway_generated_tokens_total",
                "Tokens generated for clients.",
            ),
            active_requests: gauge("sibyl_gateway_active_requests", "Generations in progress."),
            request_duration: histogram(
                "sibyl_gateway_request_duration_seconds",
                "Time from a request's arrival to its last token.",
                &[
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                ],
            ),
            time_to_first_token: histogram(
                "sibyl_gateway_time_to_first_token_seconds",
                "Time from a request's arrival to its first generated text.",
                &[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0],
            ),
            verifier_up: gauge(
                "sibyl_gateway_verifier_up",
                "1 while the verifier answers its status check, else 0.",
            ),
        }
    });
    &METRICS
}

/// The verifier's metrics.
pub struct VerifierMetrics {
    /// By `outcome` (`completed`, `cancelled`, `refused`, `failed`).
    pub sessions: IntCounterVec,
    pub active_sessions: IntGauge,
    pub generated_tokens: IntCounter,
    pub prompt_tokens: IntCounter,
    pub steps: IntCounter,
    /// By `drafter` kind.
    pub draft_tokens_proposed: IntCounterVec,
    pub draft_tokens_accepted: IntCounterVec,
    pub accepted_tokens_per_step: Histogram,
    pub step_duration: Histogram,
    pub kv_cache_bytes: IntGauge,
    pub drafter_stream_errors: IntCounterVec,
    pub drafter_up: IntGaugeVec,
    pub model_loaded: IntGauge,
    /// Sessions in each batched forward pass.
    pub batch_sessions: Histogram,
    /// Rows (tokens) of each batched forward pass.
    pub batch_rows: Histogram,
    pub batch_prompt_tokens: Histogram,
    pub batch_draft_tokens: Histogram,
    /// Requests waiting for a session slot or KV-cache room.
    pub queued_requests: IntGauge,
    pub queue_wait: Histogram,
    /// Sessions ended because their client did not read for the idle timeout.
    pub idle_timeouts: IntCounter,
    /// Prompt tokens copied from computed prefixes instead of computed.
    pub prefix_cache_tokens: IntCounter,
    pub prefix_cache_bytes: IntGauge,
    pub prefix_cache_evictions: IntCounter,
}

pub fn verifier() -> &'static VerifierMetrics {
    static METRICS: LazyLock<VerifierMetrics> = LazyLock::new(|| {
        announce("verifier");
        VerifierMetrics {
            sessions: counter_vec(
                "sibyl_verifier_sessions_total",
                "Generation sessions by outcome.",
                &["outcome"],
            ),
            active_sessions: gauge(
                "sibyl_verifier_active_sessions",
                "Sessions running now.",
            ),
            generated_tokens: counter(
                "sibyl_verifier_generated_tokens_total",
                "Tokens the target model accepted and emitted.",
            ),
            prompt_tokens: counter(
                "sibyl_verifier_prompt_tokens_total",
                "Prompt tokens computed (those copied from the prefix cache are counted apart).",
            ),
            steps: counter(
                "sibyl_verifier_steps_total",
                "Verify steps (forward passes over a draft tree, or plain decoding steps).",
            ),
            draft_tokens_proposed: counter_vec(
                "sibyl_verifier_draft_tokens_proposed_total",
                "Draft tokens verified, by drafter kind.",
                &["drafter"],
            ),
            draft_tokens_accepted: counter_vec(
                "sibyl_verifier_draft_tokens_accepted_total",
                "Draft tokens accepted, by drafter kind.",
                &["drafter"],
            ),
            accepted_tokens_per_step: histogram(
                "sibyl_verifier_accepted_tokens_per_step",
                "Tokens emitted per verify step (1 for plain decoding).",
                &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0, 32.0],
            ),
            step_duration: histogram(
                "sibyl_verifier_step_duration_seconds",
                "Duration of one verify step (forward pass, verification, cache update).",
                &[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0],
            ),
            kv_cache_bytes: gauge(
                "sibyl_verifier_kv_cache_bytes",
                "Bytes held by the KV caches of running sessions.",
            ),
            drafter_stream_errors: counter_vec(
                "sibyl_verifier_drafter_stream_errors_total",
                "Draft streams that failed (unreachable, reset, refused), by drafter kind.",
                &["drafter"],
            ),
            drafter_up: gauge_vec(
                "sibyl_verifier_drafter_up",
                "Configured drafter endpoints of this kind with an address that answers health checks.",
                &["drafter"],
            ),
            model_loaded: gauge(
                "sibyl_verifier_model_loaded",
                "1 once the target model is loaded and warmed up.",
            ),
            batch_sessions: histogram(
                "sibyl_verifier_batch_sessions",
                "Sessions in one batched forward pass (decoding or processing their prompt).",
                &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0],
            ),
            batch_rows: histogram(
                "sibyl_verifier_batch_tokens",
                "Rows (tokens) of one batched forward pass: roots, draft nodes and prompt tokens.",
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            ),
            batch_prompt_tokens: histogram(
                "sibyl_verifier_batch_prompt_tokens",
                "Prompt tokens in one batched forward pass.",
                &[0.0, 1.0, 4.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            ),
            batch_draft_tokens: histogram(
                "sibyl_verifier_batch_draft_tokens",
                "Draft tokens verified in one batched forward pass, all sessions together.",
                &[0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
            ),
            queued_requests: gauge(
                "sibyl_verifier_queued_requests",
                "Requests waiting for a session slot or KV-cache room.",
            ),
            queue_wait: histogram(
                "sibyl_verifier_queue_wait_seconds",
                "Time a request waited for a session slot or KV-cache room (admitted or not).",
                &[0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0],
            ),
            idle_timeouts: counter(
                "sibyl_verifier_idle_timeouts_total",
                "Sessions ended because their client did not read its stream for the idle timeout.",
            ),
            prefix_cache_tokens: counter(
                "sibyl_verifier_prefix_cache_tokens_total",
                "Prompt tokens whose keys and values were copied from a computed prefix (another \
                 session's or the prefix cache's) instead of computed.",
            ),
            prefix_cache_bytes: gauge(
                "sibyl_verifier_prefix_cache_bytes",
                "Bytes of keys and values the prefix cache keeps from ended sessions.",
            ),
            prefix_cache_evictions: counter(
                "sibyl_verifier_prefix_cache_evictions_total",
                "Sequences evicted from the prefix cache to stay within its budget.",
            ),
        }
    });
    &METRICS
}

/// The drafter role's metrics.
pub struct DrafterMetrics {
    /// By `outcome` (`completed`, `refused`, `failed`).
    pub sessions: IntCounterVec,
    pub active_sessions: IntGauge,
    pub blocks_sent: IntCounter,
    pub draft_tokens_sent: IntCounter,
    pub stream_errors: IntCounter,
    pub draft_duration: Histogram,
    /// Finished generations shared between suffix drafters, by `outcome` (`sent` and
    /// `failed`, per peer; `received`; `dropped` from a full queue).
    pub shared_documents: IntCounterVec,
    /// What the suffix index holds.
    pub suffix_tokens: IntGauge,
    pub suffix_documents: IntGauge,
    pub suffix_evictions: IntCounter,
    pub suffix_lookup_duration: Histogram,
    /// Snapshot writes by `outcome` (`saved`, `failed`).
    pub suffix_snapshots: IntCounterVec,
}

pub fn drafter() -> &'static DrafterMetrics {
    static METRICS: LazyLock<DrafterMetrics> = LazyLock::new(|| {
        announce("drafter");
        DrafterMetrics {
            sessions: counter_vec(
                "sibyl_drafter_sessions_total",
                "Draft streams by outcome.",
                &["outcome"],
            ),
            active_sessions: gauge("sibyl_drafter_active_sessions", "Draft streams open now."),
            blocks_sent: counter(
                "sibyl_drafter_blocks_sent_total",
                "Draft blocks sent to verifiers.",
            ),
            draft_tokens_sent: counter(
                "sibyl_drafter_draft_tokens_sent_total",
                "Draft tokens sent to verifiers (all branches).",
            ),
            stream_errors: counter(
                "sibyl_drafter_stream_errors_total",
                "Draft streams that ended with an error (bad message, client gone mid-write).",
            ),
            draft_duration: histogram(
                "sibyl_drafter_draft_duration_seconds",
                "Time to compute one draft block.",
                &[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                ],
            ),
            shared_documents: counter_vec(
                "sibyl_drafter_shared_documents_total",
                "Finished generations shared with peer drafters, by outcome (sent and failed \
                 count per peer).",
                &["outcome"],
            ),
            suffix_tokens: gauge(
                "sibyl_suffix_index_tokens",
                "Tokens the suffix index holds (documents and their ends).",
            ),
            suffix_documents: gauge(
                "sibyl_suffix_index_documents",
                "Finished generations the suffix index holds.",
            ),
            suffix_evictions: counter(
                "sibyl_suffix_index_evictions_total",
                "Finished generations evicted from the suffix index to keep it in bounds.",
            ),
            suffix_lookup_duration: histogram(
                "sibyl_suffix_lookup_duration_seconds",
                "Time of one suffix drafter lookup (index and the session's own context).",
                &[
                    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01,
                ],
            ),
            suffix_snapshots: counter_vec(
                "sibyl_suffix_snapshots_total",
                "Suffix index snapshot writes, by outcome.",
                &["outcome"],
            ),
        }
    });
    &METRICS
}

/// Everything in the registry, in the Prometheus text format.
pub fn render() -> String {
    let mut buffer = Vec::new();
    // Encoding into a Vec only fails on metric families that break the format, which the
    // constructors above cannot make.
    let _ = TextEncoder::new().encode(&prometheus::gather(), &mut buffer);
    String::from_utf8(buffer).unwrap_or_default()
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Keeps a gauge raised by one for as long as it lives.
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Adds a changing amount to a gauge shared with others (a session's KV-cache bytes to the
/// total), and takes it back when dropped.
pub struct GaugeShare {
    gauge: IntGauge,
    value: i64,
}

impl GaugeShare {
    pub fn new(gauge: &IntGauge) -> Self {
        Self {
            gauge: gauge.clone(),
            value: 0,
        }
    }

    pub fn set(&mut self, value: i64) {
        self.gauge.add(value - self.value);
        self.value = value;
    }
}

impl Drop for GaugeShare {
    fn drop(&mut self) {
        self.gauge.sub(self.value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_lists_its_families_in_the_text_format() {
        gateway().requests.with_label_values(&["http", "ok"]).inc();
        verifier()
            .draft_tokens_accepted
            .with_label_values(&["ngram"])
            .inc_by(3);
        drafter().blocks_sent.inc();
        let text = render();
        for family in [
            "sibyl_gateway_requests_total{api=\"http\",outcome=\"ok\"} 1",
            "# TYPE sibyl_gateway_request_duration_seconds histogram",
            "sibyl_verifier_draft_tokens_accepted_total{drafter=\"ngram\"} 3",
            "# TYPE sibyl_verifier_step_duration_seconds histogram",
            "sibyl_drafter_blocks_sent_total 1",
            "sibyl_build_info{role=\"verifier\",version=",
        ] {
            assert!(text.contains(family), "{family} missing from:\n{text}");
        }
    }

    #[test]
    fn shares_and_guards_give_back_what_they_added() {
        let total = IntGauge::new("t", "t").unwrap();
        {
            let _active = GaugeGuard::new(&total);
            let mut share = GaugeShare::new(&total);
            share.set(100);
            share.set(40);
            assert_eq!(total.get(), 41);
        }
        assert_eq!(total.get(), 0);
    }
}
