//! Watches the configured drafters: every [`INTERVAL`] each endpoint's addresses are
//! resolved and asked for their gRPC health. The result goes to the
//! `sibyl_verifier_drafter_up` metric and to the verifier's own health under the entry
//! [`DRAFTERS_HEALTH`] (SERVING while every configured drafter answers); the verifier itself
//! stays SERVING, since it decodes without drafters, losslessly, only slower. A drafter that
//! stops answering is logged once, and again when it is back.

use crate::config::DrafterEndpoint;
use sibyl_proto::server::Health;
use sibyl_proto::tls::ClientTls;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How often drafters are checked.
pub(crate) const INTERVAL: Duration = Duration::from_secs(2);
/// Longest one check may take.
const TIMEOUT: Duration = Duration::from_secs(1);
/// The verifier's health entry that says whether all its drafters answer.
pub const DRAFTERS_HEALTH: &str = "sibyl.v1.Drafter";

/// Starts the watch; it ends with the runtime.
pub(crate) fn spawn(drafters: Vec<DrafterEndpoint>, tls: Option<Arc<ClientTls>>, health: Health) {
    if drafters.is_empty() {
        return;
    }
    let up = &sibyl_telemetry::metrics::verifier().drafter_up;
    for endpoint in &drafters {
        up.with_label_values(&[endpoint.kind.as_str()]).set(0);
    }
    tokio::spawn(async move {
        // Whether each endpoint answered last time (None before the first check).
        let mut answered: Vec<Option<bool>> = vec![None; drafters.len()];
        loop {
            let mut per_kind: BTreeMap<&str, i64> = BTreeMap::new();
            for (endpoint, last) in drafters.iter().zip(&mut answered) {
                let address = &endpoint.address;
                let tls = tls.as_deref().filter(|_| address.tls);
                let result = sibyl_proto::client::check_serving(
                    &address.host,
                    address.port,
                    "",
                    tls,
                    TIMEOUT,
                )
                .await;
                let now = result.is_ok();
                *per_kind.entry(endpoint.kind.as_str()).or_default() += i64::from(now);
                match (&result, *last) {
                    (Err(reason), Some(true) | None) => tracing::warn!(
                        drafter = %endpoint.kind,
                        address = %address,
                        %reason,
                        "drafter does not answer; speculating without it until it does"
                    ),
                    (Ok(()), Some(false)) => tracing::info!(
                        drafter = %endpoint.kind,
                        address = %address,
                        "drafter answers again"
                    ),
                    _ => {}
                }
                *last = Some(now);
            }
            for (kind, count) in per_kind {
                up.with_label_values(&[kind]).set(count);
            }
            let all = answered.iter().all(|a| *a == Some(true));
            health.set_entry(DRAFTERS_HEALTH, all).await;
            tokio::time::sleep(INTERVAL).await;
        }
    });
}
