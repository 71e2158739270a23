//! Per-user connection limit: a count per (namespace, user), taken when a
//! session is admitted and given back when its permit drops, however the
//! session ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::error::Error;

type Key = (String, String);

#[derive(Default)]
pub struct ConnectionLimits {
    counts: Mutex<HashMap<Key, usize>>,
}

/// One admitted session. Dropping it frees the slot.
pub struct Permit {
    limits: Arc<ConnectionLimits>,
    key: Key,
}

impl ConnectionLimits {
    /// Admits one more session of `user` unless it already has `max`.
    pub fn acquire(self: &Arc<Self>, namespace: &str, user: &str, max: usize) -> Result<Permit, Error> {
        let key = (namespace.to_string(), user.to_string());
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(key.clone()).or_insert(0);
        if *n >= max {
            return Err(Error::TooManyConnections(max));
        }
        *n += 1;
        Ok(Permit {
            limits: self.clone(),
            key,
        })
    }

    pub fn count(&self, namespace: &str, user: &str) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts
            .get(&(namespace.to_string(), user.to_string()))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.limits.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            // No entry for users without sessions: the map stays as small as
            // the set of connected users.
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_is_per_user_and_slots_come_back() {
        let l = Arc::new(ConnectionLimits::default());
        let a1 = l.acquire("ns", "alice", 2).unwrap();
        let _a2 = l.acquire("ns", "alice", 2).unwrap();
        assert!(matches!(
            l.acquire("ns", "alice", 2),
            Err(Error::TooManyConnections(2))
        ));
        let _b = l.acquire("ns", "bob", 2).unwrap();
        let _other_ns = l.acquire("other", "alice", 2).unwrap();
        drop(a1);
        assert_eq!(l.count("ns", "alice"), 1);
        let _a3 = l.acquire("ns", "alice", 2).unwrap();
        drop(_a3);
        drop(_a2);
        assert!(
            l.counts
                .lock()
                .unwrap()
                .get(&("ns".into(), "alice".into()))
                .is_none()
        );
    }
}
