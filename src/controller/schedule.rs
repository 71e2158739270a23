//! Heartbeat schedules: when is the next tick, and should a due tick run.
//!
//! Pure functions of (schedule, what status remembers, now), so that a
//! simulated day can be checked in microseconds. CronJob semantics: of the
//! ticks missed while nothing ran, only the most recent may run, and only
//! within `startingDeadlineSeconds`; the others are counted as skipped.

use std::time::Duration;

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::api::sprite::HeartbeatSpec;

/// Upper bound on ticks examined in one decision: an operator that was down
/// for a day on a per-second schedule must not spin; beyond this the count
/// of skipped ticks is a lower bound.
const MAX_TICKS_EXAMINED: usize = 100_000;

#[derive(Clone, Debug)]
pub struct Schedule {
    cron: Cron,
    tz: TimeZone,
    pub duration: Duration,
    pub starting_deadline: Option<Duration>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("invalid cron schedule {schedule:?}: {reason}")]
    Cron { schedule: String, reason: String },
    #[error("unknown time zone {0:?}")]
    TimeZone(String),
    #[error("invalid duration {0:?}")]
    Duration(String),
}

impl Schedule {
    pub fn parse(spec: &HeartbeatSpec) -> Result<Schedule, ScheduleError> {
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(&spec.schedule)
            .map_err(|e| ScheduleError::Cron {
                schedule: spec.schedule.clone(),
                reason: e.to_string(),
            })?;
        let tz = match &spec.time_zone {
            None => TimeZone::UTC,
            Some(name) => TimeZone::get(name).map_err(|_| ScheduleError::TimeZone(name.clone()))?,
        };
        let duration = humantime::parse_duration(&spec.duration)
            .map_err(|_| ScheduleError::Duration(spec.duration.clone()))?;
        Ok(Schedule {
            cron,
            tz,
            duration,
            starting_deadline: spec
                .starting_deadline_seconds
                .map(|s| Duration::from_secs(s.max(0) as u64)),
        })
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        let zoned = t.to_zoned(self.tz.clone());
        self.cron
            .find_next_occurrence(&zoned, false)
            .ok()
            .map(|z| z.timestamp())
    }

    /// The shortest gap between consecutive ticks over the next `samples`
    /// ticks after `from` (enough to see a schedule's density).
    pub fn shortest_gap(&self, from: Timestamp, samples: usize) -> Option<Duration> {
        let mut prev = self.next_after(from)?;
        let mut best: Option<Duration> = None;
        for _ in 0..samples {
            let next = self.next_after(prev)?;
            let gap = Duration::try_from(next.duration_since(prev)).ok()?;
            best = Some(best.map_or(gap, |b| b.min(gap)));
            prev = next;
        }
        best
    }
}

/// Why a due tick did not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// Older than `startingDeadlineSeconds`.
    PastDeadline,
    /// Closer to the previous heartbeat than the tier allows.
    TierInterval,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TickDecision {
    /// Run a heartbeat for this tick now.
    pub run: Option<Timestamp>,
    /// Ticks that will never run (missed or refused), counted for status.
    pub skipped: u64,
    /// Why the most recent due tick was refused, when it was.
    pub skip_reason: Option<SkipReason>,
    /// The tick to wait for next; status remembers it as the next planned tick.
    pub next: Option<Timestamp>,
}

/// Decides what to do about heartbeats at `now`.
///
/// `planned` is the tick status remembered as next (None before the first
/// decision: then nothing runs, and the first tick after `now` is planned,
/// so that creating a Sprite does not wake it for a tick it never had).
/// `last_run` is the tick the previous heartbeat ran for.
pub fn decide(
    schedule: &Schedule,
    planned: Option<Timestamp>,
    last_run: Option<Timestamp>,
    now: Timestamp,
    min_interval: Duration,
) -> TickDecision {
    let Some(planned) = planned else {
        return TickDecision {
            run: None,
            skipped: 0,
            skip_reason: None,
            next: schedule.next_after(now),
        };
    };
    if planned > now {
        return TickDecision {
            run: None,
            skipped: 0,
            skip_reason: None,
            next: Some(planned),
        };
    }
    // Walk the due ticks: planned, ..., latest <= now.
    let mut latest = planned;
    let mut due: u64 = 1;
    let mut next = schedule.next_after(planned);
    while let Some(t) = next {
        if t > now || due as usize >= MAX_TICKS_EXAMINED {
            break;
        }
        latest = t;
        due += 1;
        next = schedule.next_after(t);
    }
    if next.is_some_and(|t| t <= now) {
        // Gave up counting: plan from now rather than from a stale tick.
        next = schedule.next_after(now);
    }
    let late = Duration::try_from(now.duration_since(latest)).unwrap_or(Duration::ZERO);
    let skip_reason = if schedule.starting_deadline.is_some_and(|d| late > d) {
        Some(SkipReason::PastDeadline)
    } else if last_run.is_some_and(|lr| {
        Duration::try_from(latest.duration_since(lr)).unwrap_or(Duration::ZERO) < min_interval
    }) {
        Some(SkipReason::TierInterval)
    } else {
        None
    };
    TickDecision {
        run: skip_reason.is_none().then_some(latest),
        skipped: due - u64::from(skip_reason.is_none()),
        skip_reason,
        next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(schedule: &str, tz: Option<&str>, deadline: Option<i64>) -> HeartbeatSpec {
        HeartbeatSpec {
            schedule: schedule.into(),
            time_zone: tz.map(Into::into),
            duration: "2m".into(),
            starting_deadline_seconds: deadline,
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn five_and_six_field_schedules_parse() {
        let five = Schedule::parse(&spec("*/15 * * * *", None, None)).unwrap();
        assert_eq!(
            five.next_after(ts("2026-01-01T00:07:00Z")),
            Some(ts("2026-01-01T00:15:00Z"))
        );
        let six = Schedule::parse(&spec("*/10 * * * * *", None, None)).unwrap();
        assert_eq!(
            six.next_after(ts("2026-01-01T00:00:01Z")),
            Some(ts("2026-01-01T00:00:10Z"))
        );
        assert_eq!(five.duration, Duration::from_secs(120));
    }

    #[test]
    fn invalid_input_is_a_clear_error() {
        let e = Schedule::parse(&spec("every five minutes", None, None)).unwrap_err();
        assert!(matches!(e, ScheduleError::Cron { .. }), "{e}");
        assert!(e.to_string().contains("every five minutes"));
        let e = Schedule::parse(&spec("* * * * *", Some("Mars/Olympus"), None)).unwrap_err();
        assert_eq!(e, ScheduleError::TimeZone("Mars/Olympus".into()));
    }

    #[test]
    fn time_zone_moves_the_tick() {
        // 09:00 in New York is 14:00 UTC in winter, 13:00 in summer.
        let s = Schedule::parse(&spec("0 9 * * *", Some("America/New_York"), None)).unwrap();
        assert_eq!(
            s.next_after(ts("2026-01-10T00:00:00Z")),
            Some(ts("2026-01-10T14:00:00Z"))
        );
        assert_eq!(
            s.next_after(ts("2026-07-10T00:00:00Z")),
            Some(ts("2026-07-10T13:00:00Z"))
        );
    }

    #[test]
    fn first_decision_plans_without_running() {
        let s = Schedule::parse(&spec("*/15 * * * *", None, None)).unwrap();
        let d = decide(&s, None, None, ts("2026-01-01T00:07:00Z"), Duration::ZERO);
        assert_eq!(d.run, None);
        assert_eq!(d.next, Some(ts("2026-01-01T00:15:00Z")));
    }

    #[test]
    fn a_due_tick_runs_and_plans_the_next() {
        let s = Schedule::parse(&spec("*/15 * * * *", None, None)).unwrap();
        let d = decide(
            &s,
            Some(ts("2026-01-01T00:15:00Z")),
            None,
            ts("2026-01-01T00:15:01Z"),
            Duration::ZERO,
        );
        assert_eq!(d.run, Some(ts("2026-01-01T00:15:00Z")));
        assert_eq!(d.skipped, 0);
        assert_eq!(d.next, Some(ts("2026-01-01T00:30:00Z")));
    }

    #[test]
    fn missed_ticks_run_once_within_the_deadline() {
        let s = Schedule::parse(&spec("*/15 * * * *", None, Some(300))).unwrap();
        // Operator down from 00:14 to 01:02: ticks 00:15, 00:30, 00:45, 01:00 due.
        let d = decide(
            &s,
            Some(ts("2026-01-01T00:15:00Z")),
            None,
            ts("2026-01-01T01:02:00Z"),
            Duration::ZERO,
        );
        assert_eq!(d.run, Some(ts("2026-01-01T01:00:00Z")));
        assert_eq!(d.skipped, 3);
        assert_eq!(d.next, Some(ts("2026-01-01T01:15:00Z")));
    }

    #[test]
    fn missed_ticks_past_the_deadline_are_all_skipped() {
        let s = Schedule::parse(&spec("*/15 * * * *", None, Some(60))).unwrap();
        let d = decide(
            &s,
            Some(ts("2026-01-01T00:15:00Z")),
            None,
            ts("2026-01-01T01:02:00Z"),
            Duration::ZERO,
        );
        assert_eq!(d.run, None);
        assert_eq!(d.skipped, 4);
        assert_eq!(d.skip_reason, Some(SkipReason::PastDeadline));
        assert_eq!(d.next, Some(ts("2026-01-01T01:15:00Z")));
    }

    #[test]
    fn ticks_closer_than_the_tier_allows_are_skipped() {
        // Every 5 minutes, but the tier allows one heartbeat per 15 minutes.
        let s = Schedule::parse(&spec("*/5 * * * *", None, None)).unwrap();
        let min = Duration::from_secs(15 * 60);
        let last = Some(ts("2026-01-01T00:00:00Z"));
        let mut ran = vec![];
        let mut planned = Some(ts("2026-01-01T00:05:00Z"));
        let mut last_run = last;
        let mut skipped = 0;
        for minute in (5..=60).step_by(5) {
            let now = ts("2026-01-01T00:00:00Z") + jiff::SignedDuration::from_mins(minute);
            let d = decide(&s, planned, last_run, now, min);
            if let Some(t) = d.run {
                ran.push(t);
                last_run = Some(t);
            }
            skipped += d.skipped;
            planned = d.next;
        }
        assert_eq!(
            ran,
            [
                ts("2026-01-01T00:15:00Z"),
                ts("2026-01-01T00:30:00Z"),
                ts("2026-01-01T00:45:00Z"),
                ts("2026-01-01T01:00:00Z")
            ]
        );
        assert_eq!(skipped, 8);
    }

    #[test]
    fn shortest_gap_sees_dense_schedules() {
        let s = Schedule::parse(&spec("0,1 * * * *", None, None)).unwrap();
        assert_eq!(
            s.shortest_gap(ts("2026-01-01T00:30:00Z"), 10),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn a_simulated_day_on_a_per_second_schedule_is_bounded() {
        let s = Schedule::parse(&spec("* * * * * *", None, Some(5))).unwrap();
        let d = decide(
            &s,
            Some(ts("2026-01-01T00:00:00Z")),
            None,
            ts("2026-01-02T00:00:00Z"),
            Duration::ZERO,
        );
        assert_eq!(d.run, Some(ts("2026-01-02T00:00:00Z")));
        assert_eq!(d.skipped, 86_400);
        assert_eq!(d.next, Some(ts("2026-01-02T00:00:01Z")));
    }
}
