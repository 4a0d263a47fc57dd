//! How a role stops: on SIGTERM or Ctrl-C it stops taking requests and drains its open
//! streams for at most `--drain-timeout-ms`, then what is left is cut.

use clap::Args;
use sibyl_proto::server::ShutdownSwitch;
use std::time::Duration;

/// How a role stops.
#[derive(Debug, Clone, Args)]
pub struct DrainArgs {
    /// On SIGTERM or Ctrl-C a role stops taking requests and finishes the streams it has
    /// for at most this many milliseconds; then each one still open ends with an error
    /// that says the server is shutting down (keep it below the pod's grace period).
    #[arg(long, env = "SIBYL_DRAIN_TIMEOUT_MS", default_value_t = 30_000)]
    pub drain_timeout_ms: u64,
}

/// Time a role has, past its drain timeout, to end what is left before it is cut.
pub(crate) const DRAIN_GRACE: Duration = Duration::from_secs(2);

impl DrainArgs {
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    /// A switch triggered by SIGTERM or Ctrl-C.
    pub(crate) fn on_signal(&self) -> ShutdownSwitch {
        let stop = ShutdownSwitch::default();
        let trigger = stop.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            trigger.trigger();
        });
        stop
    }

    /// Runs a role's server until it ends, or until the drain timeout (and a moment more)
    /// has passed since `stop` was triggered: what is still open is then cut.
    pub(crate) async fn bounded<E>(
        &self,
        stop: &ShutdownSwitch,
        serve: impl std::future::Future<Output = Result<(), E>>,
    ) -> Result<(), E> {
        let deadline = {
            let stopped = stop.stopped();
            let timeout = self.timeout() + DRAIN_GRACE;
            async move {
                stopped.await;
                tokio::time::sleep(timeout).await;
            }
        };
        tokio::select! {
            result = serve => result,
            () = deadline => {
                tracing::warn!(
                    drain_timeout_ms = self.drain_timeout_ms,
                    "streams were still open when the drain time ran out; they are cut"
                );
                Ok(())
            }
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}
