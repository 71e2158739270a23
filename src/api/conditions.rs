//! Conditions shared by both resources.
//!
//! We reuse the upstream `metav1.Condition` type so that `kubectl wait
//! --for=condition=Ready` and every generic tool understand our status. The
//! helpers keep `lastTransitionTime` stable when nothing changed, because a
//! timestamp rewritten on every pass would make each status write look like a
//! change and retrigger the controller.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const STATUS_TRUE: &str = "True";
pub const STATUS_FALSE: &str = "False";
pub const STATUS_UNKNOWN: &str = "Unknown";

/// A condition as the reconciler wants it, before timestamps are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredCondition {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl DesiredCondition {
    pub fn new(type_: &'static str, status: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// Sets (or replaces) the condition of `desired.type_` in `conditions`.
///
/// `lastTransitionTime` moves only when the status flips; reason, message and
/// observedGeneration are refreshed in place. Returns true when anything
/// changed, so callers can skip a status write that would change nothing.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    desired: DesiredCondition,
    observed_generation: Option<i64>,
    now: Time,
) -> bool {
    let status = if desired.status { STATUS_TRUE } else { STATUS_FALSE };
    match conditions.iter_mut().find(|c| c.type_ == desired.type_) {
        Some(existing) => {
            let mut changed = false;
            if existing.status != status {
                existing.status = status.to_string();
                existing.last_transition_time = now;
                changed = true;
            }
            if existing.reason != desired.reason {
                existing.reason = desired.reason.to_string();
                changed = true;
            }
            if existing.message != desired.message {
                existing.message = desired.message;
                changed = true;
            }
            if existing.observed_generation != observed_generation {
                existing.observed_generation = observed_generation;
                changed = true;
            }
            changed
        }
        None => {
            conditions.push(Condition {
                type_: desired.type_.to_string(),
                status: status.to_string(),
                reason: desired.reason.to_string(),
                message: desired.message,
                observed_generation,
                last_transition_time: now,
            });
            true
        }
    }
}

/// Drops a condition type entirely (for conditions that only make sense while
/// a problem lasts, such as `QuotaExceeded`). Returns true when one was removed.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    before != conditions.len()
}

pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == STATUS_TRUE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn new_condition_is_added_with_transition_time() {
        let mut conds = vec![];
        let changed = set_condition(
            &mut conds,
            DesiredCondition::new("Ready", false, "Provisioning", "creating"),
            Some(3),
            t(100),
        );
        assert!(changed);
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].status, "False");
        assert_eq!(conds[0].observed_generation, Some(3));
        assert_eq!(conds[0].last_transition_time, t(100));
    }

    #[test]
    fn same_condition_again_changes_nothing() {
        let mut conds = vec![];
        let d = DesiredCondition::new("Ready", true, "Active", "ok");
        set_condition(&mut conds, d.clone(), Some(1), t(100));
        let changed = set_condition(&mut conds, d, Some(1), t(200));
        assert!(!changed);
        assert_eq!(conds[0].last_transition_time, t(100));
    }

    #[test]
    fn transition_time_moves_only_on_status_flip() {
        let mut conds = vec![];
        set_condition(
            &mut conds,
            DesiredCondition::new("Ready", false, "A", "a"),
            Some(1),
            t(100),
        );
        // Reason and message change, status does not: time stays.
        assert!(set_condition(
            &mut conds,
            DesiredCondition::new("Ready", false, "B", "b"),
            Some(2),
            t(200)
        ));
        assert_eq!(conds[0].last_transition_time, t(100));
        assert_eq!(conds[0].reason, "B");
        assert_eq!(conds[0].observed_generation, Some(2));
        // Status flips: time moves.
        assert!(set_condition(
            &mut conds,
            DesiredCondition::new("Ready", true, "C", "c"),
            Some(2),
            t(300)
        ));
        assert_eq!(conds[0].last_transition_time, t(300));
        assert!(is_true(&conds, "Ready"));
    }

    #[test]
    fn remove_condition_reports_removal() {
        let mut conds = vec![];
        set_condition(
            &mut conds,
            DesiredCondition::new("QuotaExceeded", true, "Q", "q"),
            None,
            t(1),
        );
        assert!(remove_condition(&mut conds, "QuotaExceeded"));
        assert!(!remove_condition(&mut conds, "QuotaExceeded"));
        assert!(conds.is_empty());
    }
}
