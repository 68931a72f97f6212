//! The refund window: when a way back of credits is judged, and whether it
//! is still open (CONTRACT §4, §11, §13).
//!
//! Rules, for every way credits come back from a reservation (an HTTP
//! refund, a `generation.failed` event, the part a settlement for less does
//! not charge, over HTTP or by a `generation.succeeded` event):
//! * an HTTP request is judged at the moment it is carried out;
//! * an event is judged at its `occurred_at` only when that lies within
//!   `MAX_EVENT_LATENESS_SECS` before the event's arrival (when a worker
//!   first took it); an older claim is not believed, and the event is
//!   judged at its arrival ([`EventTime::believed`]);
//! * an event whose time lies more than `EVENT_CLOCK_SKEW_SECS` before its
//!   reservation was made gives nothing back (it cannot be about that
//!   reservation); within the skew it counts as made with the reservation;
//! * the time is clamped to [the reservation's creation, now] and the window
//!   is open while it is not after the reservation's `refundable_until`;
//! * settling in full gives nothing back, so it is never refused for time.

use std::time::Duration;

use time::OffsetDateTime;

use penora_domain::timefmt::rfc3339_millis;

/// When an event says it happened, as far as it is believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTime {
    /// The time the event is judged at.
    pub at: OffsetDateTime,
    /// How far `at` may lie before its reservation was made.
    pub clock_skew: Duration,
}

impl EventTime {
    /// The time an event is judged at: its `occurred_at` when that is at
    /// most `max_lateness` before `received_at` (its arrival), else its
    /// arrival.
    pub fn believed(
        occurred_at: OffsetDateTime,
        received_at: OffsetDateTime,
        max_lateness: Duration,
        clock_skew: Duration,
    ) -> Self {
        // Checked arithmetic throughout: an event may name any time the
        // format allows (year 9999 included), and a setting any duration.
        let believed_from = received_at
            .checked_sub(time::Duration::try_from(max_lateness).unwrap_or(time::Duration::MAX));
        let at = match believed_from {
            Some(from) if occurred_at < from => received_at,
            _ => occurred_at,
        };
        Self { at, clock_skew }
    }

    /// The latest time a reservation may have been made for this event to
    /// be about it: `at` plus the clock skew.
    pub fn latest_creation(&self) -> OffsetDateTime {
        time::Duration::try_from(self.clock_skew)
            .ok()
            .and_then(|skew| self.at.checked_add(skew))
            .unwrap_or(self.at)
    }
}

/// Whether a return of credits from a reservation is inside its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Inside the window.
    Open,
    /// The window closed before the time the return is judged at.
    Closed,
    /// The event says it happened before the reservation was made.
    BeforeReservation,
}

/// Judges a return of credits: `event` is the event that asks for it
/// (`None` for an HTTP request, judged at `now`).
pub fn judge(
    event: Option<&EventTime>,
    created_at: OffsetDateTime,
    refundable_until: OffsetDateTime,
    now: OffsetDateTime,
) -> Verdict {
    let at = match event {
        None => now,
        Some(e) if e.latest_creation() < created_at => return Verdict::BeforeReservation,
        Some(e) => e.at.max(created_at).min(now),
    };
    if refundable_until < at {
        Verdict::Closed
    } else {
        Verdict::Open
    }
}

/// The refusal of a return of credits that [`judge`] did not find open.
pub fn refused(
    verdict: Verdict,
    project_code: &str,
    created_at: OffsetDateTime,
    refundable_until: OffsetDateTime,
) -> super::LedgerError {
    super::LedgerError::NotRefundable(match verdict {
        Verdict::BeforeReservation => format!(
            "the event says it happened before reservation {project_code:?} was made (at {}); it gives nothing back",
            rfc3339_millis(created_at)
        ),
        Verdict::Closed | Verdict::Open => format!(
            "the refund window of reservation {project_code:?} closed at {}",
            rfc3339_millis(refundable_until)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const HOUR: Duration = Duration::from_secs(3600);
    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn an_event_time_is_believed_only_within_the_lateness_bound() {
        let arrived = datetime!(2026-12-06 12:00 UTC);
        let recent = arrived - 30 * MINUTE;
        assert_eq!(
            EventTime::believed(recent, arrived, HOUR, MINUTE).at,
            recent
        );
        let old = arrived - 3 * HOUR;
        assert_eq!(EventTime::believed(old, arrived, HOUR, MINUTE).at, arrived);
        // No lateness at all: only the arrival counts.
        assert_eq!(
            EventTime::believed(recent, arrived, Duration::ZERO, MINUTE).at,
            arrived
        );
    }

    #[test]
    fn returns_are_judged_against_the_window() {
        let made = datetime!(2026-12-06 10:00 UTC);
        let until = made + HOUR;
        let now = made + 5 * HOUR;
        let at = |t| EventTime {
            at: t,
            clock_skew: MINUTE,
        };
        // HTTP: now.
        assert_eq!(judge(None, made, until, made + MINUTE), Verdict::Open);
        assert_eq!(judge(None, made, until, now), Verdict::Closed);
        // An event from inside the window, however late it is judged.
        assert_eq!(
            judge(Some(&at(made + 10 * MINUTE)), made, until, now),
            Verdict::Open
        );
        assert_eq!(
            judge(Some(&at(until + MINUTE)), made, until, now),
            Verdict::Closed
        );
        // A little before the reservation (clocks differ): made with it.
        assert_eq!(
            judge(
                Some(&at(made - 30 * Duration::from_secs(1))),
                made,
                until,
                now
            ),
            Verdict::Open
        );
        // Far before it: not about it.
        assert_eq!(
            judge(Some(&at(made - 2 * MINUTE)), made, until, now),
            Verdict::BeforeReservation
        );
        // A time in the future counts as now.
        assert_eq!(
            judge(Some(&at(now + HOUR)), made, until, now),
            Verdict::Closed
        );
        // The edges of what an event may name do not overflow.
        let end = time::macros::datetime!(9999-12-31 23:59:59.999 UTC);
        assert_eq!(judge(Some(&at(end)), made, until, now), Verdict::Closed);
        let start = time::macros::datetime!(-9999-01-01 00:00 UTC);
        assert_eq!(
            judge(Some(&at(start)), made, until, now),
            Verdict::BeforeReservation
        );
        let e = EventTime::believed(end, now, Duration::MAX, Duration::MAX);
        assert_eq!(e.at, end);
        assert_eq!(e.latest_creation(), end);
        assert_eq!(
            EventTime::believed(start, now, Duration::MAX, MINUTE).at,
            start
        );
    }
}
