//! Calendar periods in UTC (contract §16): the one spelling of "which day,
//! week or month an instant is in" and "when the next one starts", for spend
//! limits and recurring allowances.
//!
//! Rules:
//! * a day starts at 00:00 UTC, a week on Monday 00:00 UTC, a month on the
//!   1st at 00:00 UTC; a period runs from its start (included) to the next
//!   one's start (excluded);
//! * a period is never "a start plus a length": the month after 31 January
//!   starts on 1 February and the one after that on 1 March, whatever the
//!   months' lengths, so there is no "31 January plus a month" to get wrong
//!   (an allowance that starts on the 31st runs to the 1st, then calendar
//!   month by calendar month);
//! * instants are compared exactly; an instant on a boundary belongs to the
//!   period it starts.

use time::{Date, Duration, Month, OffsetDateTime, Time};

crate::text_enum! {
    /// A calendar period in UTC.
    #[derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum Period {
        /// From 00:00 UTC.
        Day => "day",
        /// From Monday 00:00 UTC.
        Week => "week",
        /// From the 1st at 00:00 UTC.
        Month => "month",
    }
}

impl Period {
    /// Reads a period named in a request.
    pub fn parse(raw: &str) -> Result<Self, crate::ValidationError> {
        Self::from_db(raw).ok_or_else(|| {
            crate::ValidationError::new("period", "must be one of `day`, `week`, `month`")
        })
    }

    /// The start of the period `at` is in.
    pub fn start_of(self, at: OffsetDateTime) -> OffsetDateTime {
        let at = at.to_offset(time::UtcOffset::UTC);
        let day = at.date();
        let first = match self {
            Period::Day => day,
            Period::Week => {
                day - Duration::days(i64::from(day.weekday().number_days_from_monday()))
            }
            Period::Month => day.replace_day(1).unwrap_or(day),
        };
        first.with_time(Time::MIDNIGHT).assume_utc()
    }

    /// The start of the period after the one `at` is in.
    pub fn next_start(self, at: OffsetDateTime) -> OffsetDateTime {
        let start = self.start_of(at);
        let day = start.date();
        let next = match self {
            Period::Day => day.next_day(),
            Period::Week => Some(day + Duration::days(7)),
            Period::Month => next_month(day),
        };
        // Past year 9999 there is no next period: the far end of time.
        next.map_or(Date::MAX.with_time(Time::MIDNIGHT).assume_utc(), |d| {
            d.with_time(Time::MIDNIGHT).assume_utc()
        })
    }
}

/// The 1st of the month after the one `first` is in.
fn next_month(first: Date) -> Option<Date> {
    let (year, month) = match first.month() {
        Month::December => (first.year() + 1, Month::January),
        m => (first.year(), m.next()),
    };
    Date::from_calendar_date(year, month, 1).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use time::macros::datetime;

    #[test]
    fn days_weeks_and_months_start_on_utc_calendar_boundaries() {
        let t = datetime!(2026-12-06 17:45:12.5 UTC); // a Sunday
        assert_eq!(Period::Day.start_of(t), datetime!(2026-12-06 00:00 UTC));
        assert_eq!(Period::Day.next_start(t), datetime!(2026-12-07 00:00 UTC));
        assert_eq!(Period::Week.start_of(t), datetime!(2026-11-30 00:00 UTC));
        assert_eq!(Period::Week.next_start(t), datetime!(2026-12-07 00:00 UTC));
        assert_eq!(Period::Month.start_of(t), datetime!(2026-12-01 00:00 UTC));
        assert_eq!(Period::Month.next_start(t), datetime!(2027-01-01 00:00 UTC));
    }

    #[test]
    fn an_instant_on_a_boundary_belongs_to_the_period_it_starts() {
        let t = datetime!(2027-01-01 00:00 UTC);
        assert_eq!(Period::Month.start_of(t), t);
        assert_eq!(Period::Day.start_of(t), t);
        let just_before = t - Duration::nanoseconds(1);
        assert_eq!(
            Period::Month.start_of(just_before),
            datetime!(2026-12-01 00:00 UTC)
        );
        assert_eq!(Period::Month.next_start(just_before), t);
    }

    #[test]
    fn months_end_on_the_first_whatever_their_length() {
        let jan31 = datetime!(2028-01-31 23:59 UTC);
        assert_eq!(
            Period::Month.next_start(jan31),
            datetime!(2028-02-01 00:00 UTC)
        );
        // A leap February runs 29 days.
        let feb29 = datetime!(2028-02-29 12:00 UTC);
        assert_eq!(
            Period::Month.start_of(feb29),
            datetime!(2028-02-01 00:00 UTC)
        );
        assert_eq!(
            Period::Month.next_start(feb29),
            datetime!(2028-03-01 00:00 UTC)
        );
        assert_eq!(
            Period::Day.next_start(feb29),
            datetime!(2028-03-01 00:00 UTC)
        );
        let feb28 = datetime!(2027-02-28 12:00 UTC);
        assert_eq!(
            Period::Day.next_start(feb28),
            datetime!(2027-03-01 00:00 UTC)
        );
        let apr30 = datetime!(2027-04-30 23:00 UTC);
        assert_eq!(
            Period::Month.next_start(apr30),
            datetime!(2027-05-01 00:00 UTC)
        );
    }

    #[test]
    fn an_instant_in_another_offset_is_judged_in_utc() {
        let t = datetime!(2026-12-07 01:00 +03:00); // 2026-12-06 22:00 UTC
        assert_eq!(Period::Day.start_of(t), datetime!(2026-12-06 00:00 UTC));
    }

    proptest! {
        #[test]
        fn every_instant_is_in_exactly_one_period_of_each_kind(secs in 0i64..4_102_444_800, p in 0usize..3) {
            let period = Period::ALL[p];
            let t = OffsetDateTime::from_unix_timestamp(secs).unwrap();
            let start = period.start_of(t);
            let next = period.next_start(t);
            prop_assert!(start <= t && t < next);
            prop_assert_eq!(start.time(), Time::MIDNIGHT);
            prop_assert_eq!(next.time(), Time::MIDNIGHT);
            // The next period starts where this one ends.
            prop_assert_eq!(period.start_of(next), next);
            prop_assert_eq!(period.start_of(next - Duration::nanoseconds(1)), start);
            match period {
                Period::Day => prop_assert_eq!(next - start, Duration::days(1)),
                Period::Week => {
                    prop_assert_eq!(start.weekday(), time::Weekday::Monday);
                    prop_assert_eq!(next - start, Duration::days(7));
                }
                Period::Month => {
                    prop_assert_eq!(start.day(), 1);
                    prop_assert!((28..=31).contains(&(next - start).whole_days()));
                }
            }
        }
    }
}
