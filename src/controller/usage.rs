//! Billing periods and usage arithmetic (decision 9): the period is the
//! calendar month in UTC, amounts are integer micro-dollars.

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::user::Usage;
use crate::money::MicroUsd;

/// Start of the UTC month holding `now`.
pub fn period_start(now: Timestamp) -> Timestamp {
    let d = now.to_zoned(TimeZone::UTC).date();
    month_start(d.year(), d.month())
}

/// Start of the UTC month after the one holding `now`.
pub fn next_period_start(now: Timestamp) -> Timestamp {
    let d = now.to_zoned(TimeZone::UTC).date();
    if d.month() == 12 {
        month_start(d.year() + 1, 1)
    } else {
        month_start(d.year(), d.month() + 1)
    }
}

fn month_start(year: i16, month: i8) -> Timestamp {
    Date::new(year, month, 1)
        .and_then(|d| d.to_zoned(TimeZone::UTC))
        .map(|z| z.timestamp())
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

/// `usage` after `seconds` more at `rate`, starting a new period when the
/// recorded one is over.
pub fn add(usage: Option<&Usage>, now: Timestamp, seconds: i64, rate: MicroUsd) -> Usage {
    let start = period_start(now);
    let (base_secs, base_cost) = match usage {
        Some(u) if u.period_start.0 == start => (u.runtime_seconds, cost(u)),
        _ => (0, MicroUsd::ZERO),
    };
    Usage {
        period_start: Time(start),
        runtime_seconds: base_secs + seconds,
        estimated_cost: base_cost
            .saturating_add(MicroUsd::for_seconds(rate, seconds))
            .to_string(),
    }
}

/// The sum of the usages that belong to the period holding `now` (older
/// periods count as nothing).
pub fn roll_up<'a>(usages: impl IntoIterator<Item = &'a Usage>, now: Timestamp) -> Usage {
    let start = period_start(now);
    let (mut secs, mut total) = (0i64, MicroUsd::ZERO);
    for u in usages.into_iter().filter(|u| u.period_start.0 == start) {
        secs += u.runtime_seconds;
        total = total.saturating_add(cost(u));
    }
    Usage {
        period_start: Time(start),
        runtime_seconds: secs,
        estimated_cost: total.to_string(),
    }
}

pub fn cost(u: &Usage) -> MicroUsd {
    u.estimated_cost.parse().unwrap_or(MicroUsd::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn periods_are_utc_months() {
        assert_eq!(
            period_start(ts("2026-11-23T08:00:00Z")),
            ts("2026-11-01T00:00:00Z")
        );
        assert_eq!(
            next_period_start(ts("2026-11-23T08:00:00Z")),
            ts("2026-12-01T00:00:00Z")
        );
        assert_eq!(
            next_period_start(ts("2026-12-31T23:59:59Z")),
            ts("2027-01-01T00:00:00Z")
        );
        assert_eq!(
            period_start(ts("2028-02-29T12:00:00Z")),
            ts("2028-02-01T00:00:00Z")
        );
    }

    #[test]
    fn month_boundaries_do_not_follow_local_time_zones() {
        // 20:30 on 31 January in New York is already February in UTC...
        let ny = jiff::civil::date(2026, 1, 31)
            .at(20, 30, 0, 0)
            .in_tz("America/New_York")
            .unwrap();
        assert_eq!(period_start(ny.timestamp()), ts("2026-02-01T00:00:00Z"));
        // ...and 08:00 on 1 March in Tokyo is still February.
        let tokyo = jiff::civil::date(2026, 3, 1)
            .at(8, 0, 0, 0)
            .in_tz("Asia/Tokyo")
            .unwrap();
        assert_eq!(period_start(tokyo.timestamp()), ts("2026-02-01T00:00:00Z"));
    }

    #[test]
    fn usage_accumulates_within_a_period_and_resets_after() {
        let rate = MicroUsd(180_000);
        let u = add(None, ts("2026-11-30T23:59:00Z"), 150, rate);
        let u = add(Some(&u), ts("2026-11-30T23:59:30Z"), 150, rate);
        assert_eq!((u.runtime_seconds, u.estimated_cost.as_str()), (300, "0.015000"));
        let u = add(Some(&u), ts("2026-12-01T00:00:10Z"), 60, rate);
        assert_eq!((u.runtime_seconds, u.estimated_cost.as_str()), (60, "0.003000"));
        assert_eq!(u.period_start.0, ts("2026-12-01T00:00:00Z"));
    }

    #[test]
    fn roll_up_counts_only_the_current_period_exactly() {
        let rate = MicroUsd(180_000);
        let now = ts("2026-11-15T00:00:00Z");
        let a = add(None, now, 1, rate);
        let b = add(None, now, 3599, rate);
        let old = add(None, ts("2026-10-31T00:00:00Z"), 999_999, rate);
        let total = roll_up([&a, &b, &old], now);
        assert_eq!(total.runtime_seconds, 3600);
        // 50 + 179950 micro-dollars: no float drift.
        assert_eq!(total.estimated_cost, "0.180000");
    }
}
