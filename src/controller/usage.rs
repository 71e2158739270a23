//! Billing periods and usage arithmetic (decision 9): the period is the
//! calendar month in UTC, amounts are integer micro-dollars.

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::SpriteStatus;
use crate::api::session;
use crate::api::sprite::SessionBilling;
use crate::api::user::{Ledger, LedgerEntry, Usage};
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

/// The ledger of the period holding `now`: each Sprite's usage of the
/// period as last seen, kept after the Sprite is gone. A Sprite's usage only
/// grows within a period, so the larger of the two readings wins.
pub fn ledger<'a>(
    previous: Option<&Ledger>,
    sprites: impl IntoIterator<Item = (String, String, &'a Usage)>,
    now: Timestamp,
) -> Ledger {
    let start = period_start(now);
    let mut entries = match previous {
        Some(l) if l.period_start.0 == start => l.sprites.clone(),
        _ => Default::default(),
    };
    for (uid, name, u) in sprites {
        if u.period_start.0 != start {
            continue;
        }
        let seen = LedgerEntry {
            name,
            runtime_seconds: u.runtime_seconds,
            estimated_cost: u.estimated_cost.clone(),
        };
        let keep = entries.get(&uid).is_some_and(|e: &LedgerEntry| {
            e.runtime_seconds > seen.runtime_seconds
                || e.estimated_cost.parse().unwrap_or(MicroUsd::ZERO) > cost(u)
        });
        if !keep {
            entries.insert(uid, seen);
        }
    }
    Ledger {
        period_start: Time(start),
        sprites: entries,
    }
}

/// The period's usage: the sum of the ledger.
pub fn total(ledger: &Ledger) -> Usage {
    let (mut secs, mut money) = (0i64, MicroUsd::ZERO);
    for e in ledger.sprites.values() {
        secs += e.runtime_seconds;
        money = money.saturating_add(e.estimated_cost.parse().unwrap_or(MicroUsd::ZERO));
    }
    Usage {
        period_start: ledger.period_start.clone(),
        runtime_seconds: secs,
        estimated_cost: money.to_string(),
    }
}

/// Adds `seconds` of active VM time to a Sprite's period usage, its total
/// runtime and its total cost.
pub fn charge(status: &mut SpriteStatus, seconds: i64, rate: MicroUsd, now: Timestamp) {
    status.usage = Some(add(status.usage.as_ref(), now, seconds, rate));
    status.runtime_seconds += seconds;
    let before: MicroUsd = status
        .estimated_cost
        .as_deref()
        .and_then(|s| s.parse().ok())
        .unwrap_or(MicroUsd::ZERO);
    status.estimated_cost = Some(
        before
            .saturating_add(MicroUsd::for_seconds(rate, seconds))
            .to_string(),
    );
}

/// Relay session time not yet accounted, from the session Lease (decision
/// 9): the time from the start of its run of sessions (or from what was
/// accounted already) to its last renewal, and once the run has ended the
/// idle tail. Returns the seconds to charge, the upstream connects not yet
/// counted as wakes, and the new accounting state.
pub fn session_time(
    billed: Option<&SessionBilling>,
    live: &session::Live,
    now: Timestamp,
    idle_tail: std::time::Duration,
) -> (i64, u32, SessionBilling) {
    // Relay replicas each keep their own start of a run, so the Lease's
    // acquireTime can move back and forth within one run: a run is new only
    // when it started after everything accounted so far.
    let new_run = billed.is_none_or(|b| live.acquired > b.billed_until.0);
    let from = billed.map_or(live.acquired, |b| b.billed_until.0.max(live.acquired));
    let to = live.renewed.max(from);
    let mut seconds = to.duration_since(from).as_secs().max(0);
    let mut tail_billed = !new_run && billed.is_some_and(|b| b.tail_billed);
    if live.until <= now && !tail_billed {
        seconds += i64::try_from(idle_tail.as_secs()).unwrap_or(0);
        tail_billed = true;
    }
    // Another replica's Lease may count fewer: never less than counted.
    let counted = if new_run {
        0
    } else {
        billed.map_or(0, |b| b.connects)
    };
    let new_connects = live.connects.saturating_sub(counted);
    (
        seconds,
        new_connects,
        SessionBilling {
            acquired: Time(live.acquired),
            billed_until: Time(to),
            tail_billed,
            connects: counted.max(live.connects),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_deleted_sprites_spend_stays_in_the_ledger_until_the_month_ends() {
        let now = ts("2026-11-20T10:00:00Z");
        let u = |secs: i64, cost: &str| Usage {
            period_start: Time(ts("2026-11-01T00:00:00Z")),
            runtime_seconds: secs,
            estimated_cost: cost.into(),
        };
        let (a, b) = (u(100, "0.005000"), u(50, "0.002500"));
        let l1 = ledger(
            None,
            [("1".into(), "a".into(), &a), ("2".into(), "b".into(), &b)],
            now,
        );
        assert_eq!(total(&l1).runtime_seconds, 150);
        // b is deleted; a goes on.
        let a2 = u(160, "0.008000");
        let l2 = ledger(Some(&l1), [("1".into(), "a".into(), &a2)], now);
        let t = total(&l2);
        assert_eq!((t.runtime_seconds, t.estimated_cost.as_str()), (210, "0.010500"));
        // A stale reading does not lower an entry.
        let l3 = ledger(Some(&l2), [("1".into(), "a".into(), &a)], now);
        assert_eq!(total(&l3).runtime_seconds, 210);
        // The next month starts empty.
        let next = ts("2026-12-01T00:00:01Z");
        assert_eq!(total(&ledger(Some(&l3), [], next)).runtime_seconds, 0);
    }

    #[test]
    fn charging_adds_exact_money() {
        let mut s = SpriteStatus::default();
        let now = ts("2026-11-23T10:00:00Z");
        charge(&mut s, 150, MicroUsd(180_000), now);
        charge(&mut s, 150, MicroUsd(180_000), now);
        assert_eq!(s.usage.as_ref().unwrap().runtime_seconds, 300);
        assert_eq!(s.runtime_seconds, 300);
        assert_eq!(s.estimated_cost.as_deref(), Some("0.015000"));
    }

    #[test]
    fn session_time_is_accounted_once_with_one_tail_per_run() {
        let tail = std::time::Duration::from_secs(30);
        let live = |acq: &str, renewed: &str, until: &str| session::Live {
            acquired: ts(acq),
            renewed: ts(renewed),
            until: ts(until),
            connects: 0,
        };
        // A live run: its time so far, no tail yet.
        let l1 = live(
            "2026-01-01T10:00:00Z",
            "2026-01-01T10:05:00Z",
            "2026-01-01T10:07:00Z",
        );
        let (s1, _, b1) = session_time(None, &l1, ts("2026-01-01T10:05:10Z"), tail);
        assert_eq!((s1, b1.tail_billed), (300, false));
        // Renewed again: only the new part.
        let l2 = live(
            "2026-01-01T10:00:00Z",
            "2026-01-01T10:06:00Z",
            "2026-01-01T10:08:00Z",
        );
        let (s2, _, b2) = session_time(Some(&b1), &l2, ts("2026-01-01T10:06:05Z"), tail);
        assert_eq!(s2, 60);
        // Seen twice without a renewal: nothing more.
        assert_eq!(
            session_time(Some(&b2), &l2, ts("2026-01-01T10:06:30Z"), tail).0,
            0
        );
        // Run out: the tail, once.
        let (s3, _, b3) = session_time(Some(&b2), &l2, ts("2026-01-01T10:09:00Z"), tail);
        assert_eq!((s3, b3.tail_billed), (30, true));
        assert_eq!(
            session_time(Some(&b3), &l2, ts("2026-01-01T10:10:00Z"), tail).0,
            0
        );
        // A new run starts its own count.
        let l3 = live(
            "2026-01-01T11:00:00Z",
            "2026-01-01T11:01:00Z",
            "2026-01-01T11:03:00Z",
        );
        let (s4, _, b4) = session_time(Some(&b3), &l3, ts("2026-01-01T11:01:00Z"), tail);
        assert_eq!(s4, 60);
        // Another relay replica renews the same run with its own, earlier
        // start: only the new time counts, and no second tail.
        let other = live(
            "2026-01-01T10:59:30Z",
            "2026-01-01T11:02:00Z",
            "2026-01-01T11:02:01Z",
        );
        let (s5, _, b5) = session_time(Some(&b4), &other, ts("2026-01-01T11:05:00Z"), tail);
        assert_eq!((s5, b5.tail_billed), (60 + 30, true));
        assert_eq!(
            session_time(Some(&b5), &other, ts("2026-01-01T11:06:00Z"), tail).0,
            0
        );
    }

    #[test]
    fn upstream_connects_count_once_as_session_wakes() {
        let tail = std::time::Duration::from_secs(30);
        let live = |acq: &str, connects: u32| session::Live {
            acquired: ts(acq),
            renewed: ts("2026-01-01T10:05:00Z"),
            until: ts("2026-01-01T10:07:00Z"),
            connects,
        };
        let now = ts("2026-01-01T10:05:10Z");
        let (_, w1, b1) = session_time(None, &live("2026-01-01T10:00:00Z", 2), now, tail);
        assert_eq!(w1, 2);
        let (_, w2, b2) = session_time(Some(&b1), &live("2026-01-01T10:00:00Z", 3), now, tail);
        assert_eq!(w2, 1);
        // A replica that counted fewer does not take any back.
        let (_, w3, b3) = session_time(Some(&b2), &live("2026-01-01T09:59:00Z", 1), now, tail);
        assert_eq!((w3, b3.connects), (0, 3));
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
