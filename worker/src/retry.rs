//! Failures and the retry policy.
//!
//! Rule: every failure is either passing (`Retryable`: the database was down,
//! a lock or serialization conflict, a timeout) and is tried again later
//! through a delay queue, or permanent (`Fatal`: a malformed message, an
//! unknown reservation) and is parked at once. After `max_attempts` a passing
//! failure is parked too. Delays grow exponentially with "equal jitter": a
//! random value between half the delay and the delay.

use std::time::Duration;

use penora_ledger::LedgerError;
use penora_store::DbError;

/// How a message failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// May succeed later.
    #[error("{0}")]
    Retryable(String),
    /// Will never succeed as it is.
    #[error("{0}")]
    Fatal(String),
    /// Tried and failed; try again after this delay, whatever the attempt
    /// count (a webhook delivery, retried for a time rather than a number
    /// of attempts: its handler decides when to give up, with `Fatal`).
    #[error("{0}")]
    RetryAfter(String, Duration),
    /// Not tried (the endpoint's slots are busy or its circuit is open):
    /// come back after this delay, without counting an attempt.
    #[error("deferred for {} ms", .0.as_millis())]
    Defer(Duration),
}

impl From<DbError> for JobError {
    fn from(e: DbError) -> Self {
        if e.is_transient() {
            Self::Retryable(e.to_string())
        } else {
            Self::Fatal(e.to_string())
        }
    }
}

impl From<LedgerError> for JobError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::Db(db) => db.into(),
            busy @ LedgerError::AccountBusy => Self::Retryable(busy.to_string()),
            other => Self::Fatal(other.to_string()),
        }
    }
}

/// When to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl RetryPolicy {
    /// The delay before attempt `failed_attempt + 1`, before jitter.
    pub fn ceiling(&self, failed_attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(failed_attempt.saturating_sub(1).min(30));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The jittered delay: uniform in [ceiling / 2, ceiling]; `unit` is a
    /// random number in [0, 1).
    pub fn delay(&self, failed_attempt: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(failed_attempt);
        let half = ceiling / 2;
        // NaN would make `mul_f64` panic (clamp keeps NaN): take the middle.
        let unit = if unit.is_nan() {
            0.5
        } else {
            unit.clamp(0.0, 1.0)
        };
        half + (ceiling - half).mul_f64(unit)
    }

    /// Whether a message that failed its `attempt`-th try may be tried again.
    pub fn may_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }
}

/// A random number in [0, 1).
pub fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: RetryPolicy = RetryPolicy {
        max_attempts: 5,
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };

    #[test]
    fn delays_double_up_to_the_maximum() {
        let secs: Vec<u64> = (1..=9).map(|a| P.ceiling(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(P.ceiling(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_between_half_and_the_whole_delay() {
        for a in 1..8 {
            for u in [0.0, 0.25, 0.999, 2.0, -1.0] {
                let d = P.delay(a, u);
                assert!(d >= P.ceiling(a) / 2 && d <= P.ceiling(a), "{a} {u} {d:?}");
            }
        }
        let r = random_unit();
        assert!((0.0..1.0).contains(&r));
    }

    #[test]
    fn attempts_stop_at_the_maximum() {
        assert!(P.may_retry(1));
        assert!(P.may_retry(4));
        assert!(!P.may_retry(5));
    }

    proptest::proptest! {
        /// For any policy and attempt: the ceiling never shrinks from one
        /// attempt to the next and never passes the maximum, the jittered
        /// delay stays within [ceiling / 2, ceiling], and retries stop after
        /// exactly `max_attempts` tries.
        #[test]
        fn any_policy_keeps_its_delays_ordered_bounded_and_jittered_within_half(
            max_attempts in 1u32..50,
            initial_ms in 1u64..120_000,
            max_ms in 1u64..3_600_000,
            attempt in 1u32..100,
            unit in proptest::num::f64::ANY,
        ) {
            let p = RetryPolicy {
                max_attempts,
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(max_ms.max(initial_ms)),
            };
            let c = p.ceiling(attempt);
            proptest::prop_assert!(c <= p.max);
            proptest::prop_assert!(p.ceiling(attempt + 1) >= c);
            let d = p.delay(attempt, unit);
            proptest::prop_assert!(d >= c / 2 && d <= c, "{:?} not in [{:?}, {:?}]", d, c / 2, c);
            proptest::prop_assert_eq!(p.may_retry(attempt), attempt < max_attempts);
        }
    }

    #[test]
    fn database_outages_are_retryable_and_bad_data_is_not() {
        assert!(matches!(
            JobError::from(DbError::Unavailable("down".into())),
            JobError::Retryable(_)
        ));
        assert!(matches!(
            JobError::from(DbError::Conflict("deadlock".into())),
            JobError::Retryable(_)
        ));
        assert!(matches!(
            JobError::from(DbError::Other("bad".into())),
            JobError::Fatal(_)
        ));
        assert!(matches!(
            JobError::from(LedgerError::NotFound("x".into())),
            JobError::Fatal(_)
        ));
    }
}
