//! [`ErrorLog`]: how the store writer reports a failing disk without
//! flooding the log.
//!
//! Every submission that fails is answered (its client gets an error code)
//! and counted (`WriterStats::failed`); the log only needs to say that the
//! disk fails, why, and when it works again. A disk that is nearly full
//! fails and succeeds by turns (a write fails, the next fits), and its
//! apply and sync fail with the same cause: reported per operation and per
//! turn, a few seconds of a full disk were dozens of lines. So a cause is
//! reported when it first appears, then at most once per [`REPORT_EVERY`]
//! with the count of failures in between, and the recovery once writes have
//! succeeded at least that long after the last report.

use std::time::{Duration, Instant};

use crate::error::StoreError;

/// Least time between two lines about the same failing cause, and between
/// the last of them and the line that says the store works again.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// The writer's failure reporting; see the module documentation.
#[derive(Default)]
pub(crate) struct ErrorLog {
    failing: Option<Failing>,
}

struct Failing {
    /// What fails (the error's kind, not the operation's name).
    cause: String,
    /// When the last line about it was written.
    reported_at: Instant,
    /// Failures since that line.
    unreported: u64,
}

impl ErrorLog {
    /// `op` (apply or sync) failed with `e` at `now`.
    pub(crate) fn failed(&mut self, op: &'static str, e: &StoreError, now: Instant) {
        if let Some(repeats) = self.on_failure(cause_of(e), now) {
            tracing::error!(op, error = %e, repeats, "store {op} failed; affected submissions get the error");
        }
    }

    /// `op` succeeded at `now`.
    pub(crate) fn ok(&mut self, op: &'static str, now: Instant) {
        if let Some((cause, repeats)) = self.on_success(now) {
            tracing::info!(op, previous = %cause, repeats, "store {op} succeeds again");
        }
    }

    /// Whether to report a failure now: `Some(failures since the last
    /// report)`.
    fn on_failure(&mut self, cause: String, now: Instant) -> Option<u64> {
        match &mut self.failing {
            Some(f) if f.cause == cause => {
                f.unreported += 1;
                if now < f.reported_at + REPORT_EVERY {
                    return None;
                }
                f.reported_at = now;
                Some(std::mem::take(&mut f.unreported))
            }
            _ => {
                self.failing = Some(Failing {
                    cause,
                    reported_at: now,
                    unreported: 0,
                });
                Some(0)
            }
        }
    }

    /// Whether to report a recovery now: `Some((cause, failures since the
    /// last report))`. A success soon after a failure is not one yet.
    fn on_success(&mut self, now: Instant) -> Option<(String, u64)> {
        let f = self.failing.as_ref()?;
        if now < f.reported_at + REPORT_EVERY {
            return None;
        }
        let f = self.failing.take()?;
        Some((f.cause, f.unreported))
    }
}

/// The part of an error that names its cause, without per-batch details.
fn cause_of(e: &StoreError) -> String {
    match e {
        StoreError::Io(io) => format!("io {:?}", io.kind()),
        StoreError::InvalidBatch(_) => "invalid batch".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> String {
        "io StorageFull".into()
    }

    #[test]
    fn a_disk_that_fails_by_turns_is_reported_once_per_period() {
        let mut log = ErrorLog::default();
        let t0 = Instant::now();
        assert_eq!(log.on_failure(full(), t0), Some(0), "a new cause");
        // Apply and sync fail and succeed by turns for a few seconds.
        let mut lines = 0;
        for ms in (100..9_900).step_by(100) {
            let now = t0 + Duration::from_millis(ms);
            if ms % 200 == 0 {
                lines += usize::from(log.on_success(now).is_some());
            } else {
                lines += usize::from(log.on_failure(full(), now).is_some());
            }
        }
        assert_eq!(lines, 0, "no line before the period is over");
        let later = t0 + REPORT_EVERY;
        assert_eq!(log.on_failure(full(), later), Some(50), "with the count");
        assert_eq!(log.on_success(later + Duration::from_secs(1)), None);
        assert_eq!(
            log.on_success(later + REPORT_EVERY),
            Some((full(), 0)),
            "the recovery, once writes kept succeeding"
        );
        assert_eq!(log.on_success(later + REPORT_EVERY * 2), None);
    }

    #[test]
    fn another_cause_is_reported_at_once() {
        let mut log = ErrorLog::default();
        let t0 = Instant::now();
        assert_eq!(log.on_failure(full(), t0), Some(0));
        assert_eq!(log.on_failure("injected".into(), t0), Some(0));
        assert_eq!(log.on_failure("injected".into(), t0), None);
    }
}
