//! Where and when a run was made: the machine's description and the run's date.

use serde::Serialize;
use std::time::Duration;

/// The machine a run was made on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    /// Compute threads of the in-process engine (for `--gateway`, of this client's machine
    /// if set, else its cores; the verifier's own setting is not known here).
    pub threads: usize,
}

impl Machine {
    pub fn this() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, name)| name.trim().to_string())
            })
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        let threads = std::env::var("CANDLE_NUM_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(cpus);
        Self {
            cpus,
            cpu_model,
            threads,
        }
    }
}

/// `YYYY-MM-DD HH:MM UTC` of a time since the Unix epoch.
pub fn utc_date(since_epoch: Duration) -> String {
    let seconds = i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX);
    let at = time::OffsetDateTime::from_unix_timestamp(seconds)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(utc_date(Duration::ZERO), "1970-01-01 00:00 UTC");
        // 2024-02-29 12:34:56 UTC.
        assert_eq!(
            utc_date(Duration::from_secs(1_709_210_096)),
            "2024-02-29 12:34 UTC"
        );
        assert_eq!(
            utc_date(Duration::from_secs(1_795_910_400)),
            "2026-11-29 00:00 UTC"
        );
    }
}
