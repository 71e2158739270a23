//! VM metadata from one paginated list per interval (decision 3): a
//! converged Sprite's periodic reconcile reads its VM from here instead of a
//! `get` per Sprite. A pass that is about to act re-reads the VM with a `get`
//! (see `sprite::reconcile`), so a stale list never drives a change.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::sprites::{self, SpritesClient};

pub struct VmCache {
    entries: RwLock<Entries>,
    max_age: Duration,
    /// Names of VMs that a list found changed (gone, new, or another status,
    /// labels or id): their Sprites are reconciled, so a VM deleted out of
    /// band or woken by someone else is noticed within one list interval.
    changes: tokio::sync::broadcast::Sender<String>,
}

#[derive(Default)]
struct Entries {
    listed_at: Option<Instant>,
    vms: HashMap<String, sprites::Sprite>,
}

/// What the cache knows about one VM.
#[derive(Debug, PartialEq)]
pub enum Cached {
    /// The last list, younger than the max age, had it.
    Present(Box<sprites::Sprite>),
    /// The last list, younger than the max age, did not have it.
    Absent,
    /// No list recent enough: ask the API.
    Unknown,
}

impl VmCache {
    pub fn new(max_age: Duration) -> VmCache {
        VmCache {
            entries: RwLock::new(Entries::default()),
            max_age,
            changes: tokio::sync::broadcast::channel(4096).0,
        }
    }

    /// The names of VMs each later list finds changed.
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    pub fn lookup(&self, name: &str, now: Instant) -> Cached {
        let e = self.entries.read().unwrap_or_else(|p| p.into_inner());
        match e.listed_at {
            Some(t) if now.duration_since(t) < self.max_age => match e.vms.get(name) {
                Some(vm) => Cached::Present(Box::new(vm.clone())),
                None => Cached::Absent,
            },
            _ => Cached::Unknown,
        }
    }

    pub fn replace(&self, vms: Vec<sprites::Sprite>, at: Instant) {
        let changed = {
            let mut e = self.entries.write().unwrap_or_else(|p| p.into_inner());
            let new: HashMap<String, sprites::Sprite> =
                vms.into_iter().map(|vm| (vm.name.clone(), vm)).collect();
            // The first list only fills the cache: every Sprite is reconciled
            // when the controller starts anyway.
            let changed = match e.listed_at {
                Some(_) => changed_names(&e.vms, &new),
                None => vec![],
            };
            e.vms = new;
            e.listed_at = Some(at);
            changed
        };
        for name in changed {
            // No receiver (no controller running) is fine.
            let _ = self.changes.send(name);
        }
    }

    /// Records what a `get` (or a create or delete) just saw, so the next
    /// pass does not read an older list entry.
    pub fn record(&self, name: &str, vm: Option<sprites::Sprite>) {
        let mut e = self.entries.write().unwrap_or_else(|p| p.into_inner());
        match vm {
            Some(vm) => e.vms.insert(name.to_string(), vm),
            None => e.vms.remove(name),
        };
    }

    /// Lists every VM each `interval` until `shutdown`.
    pub async fn refresh_loop(
        &self,
        sprites: SpritesClient,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            match sprites.list_sprites(None).await {
                Ok(vms) => self.replace(vms, Instant::now()),
                Err(e) => tracing::warn!(error = %e, "cannot list VMs; reconciles fall back to get"),
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// VMs present in only one of the two lists, or with another status,
/// labels or id.
fn changed_names(
    old: &HashMap<String, sprites::Sprite>,
    new: &HashMap<String, sprites::Sprite>,
) -> Vec<String> {
    let differs = |a: &sprites::Sprite, b: &sprites::Sprite| {
        a.status != b.status || a.labels != b.labels || a.id != b.id
    };
    let mut names: Vec<String> = old
        .iter()
        .filter(|(name, vm)| new.get(*name).is_none_or(|n| differs(vm, n)))
        .map(|(name, _)| name.clone())
        .chain(new.keys().filter(|n| !old.contains_key(*n)).cloned())
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_list_announces_what_changed() {
        let c = VmCache::new(Duration::from_secs(30));
        let mut rx = c.changes();
        let t = Instant::now();
        c.replace(vec![vm("a"), vm("b")], t);
        assert!(rx.try_recv().is_err(), "the first list announces nothing");
        let mut b2 = vm("b");
        b2.status = "running".into();
        c.replace(vec![b2, vm("c")], t);
        let got: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(got, ["a", "b", "c"]);
    }

    fn vm(name: &str) -> sprites::Sprite {
        sprites::Sprite {
            name: name.into(),
            status: "warm".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_fresh_list_answers_present_and_absent() {
        let c = VmCache::new(Duration::from_secs(30));
        let t = Instant::now();
        assert_eq!(c.lookup("a", t), Cached::Unknown, "no list yet");
        c.replace(vec![vm("a")], t);
        assert_eq!(c.lookup("a", t), Cached::Present(Box::new(vm("a"))));
        assert_eq!(c.lookup("b", t), Cached::Absent);
    }

    #[test]
    fn an_old_list_answers_nothing() {
        let c = VmCache::new(Duration::from_secs(30));
        let t = Instant::now();
        c.replace(vec![vm("a")], t);
        assert_eq!(c.lookup("a", t + Duration::from_secs(31)), Cached::Unknown);
    }

    #[test]
    fn recorded_observations_override_the_list() {
        let c = VmCache::new(Duration::from_secs(30));
        let t = Instant::now();
        c.replace(vec![vm("a")], t);
        c.record("a", None);
        assert_eq!(c.lookup("a", t), Cached::Absent);
        c.record("b", Some(vm("b")));
        assert_eq!(c.lookup("b", t), Cached::Present(Box::new(vm("b"))));
    }
}
