//! Fault injection per endpoint class: added latency, injected error statuses, dropped
//! WebSockets. Decisions come from one seedable RNG so that a run can be repeated.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The classes faults are set for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Rest,
    Exec,
    Fs,
    Proxy,
    Checkpoint,
}

impl Class {
    /// The class of a request path under `/v1`; `None` for paths that get no faults (`/sim`).
    pub fn of_path(path: &str) -> Option<Class> {
        let rest = path.strip_prefix("/v1/")?;
        let mut segs = rest.split('/');
        if segs.next() != Some("sprites") {
            return Some(Class::Rest);
        }
        let _name = segs.next();
        Some(match segs.next() {
            Some("exec") => Class::Exec,
            Some("fs") => Class::Fs,
            Some("proxy") => Class::Proxy,
            Some("checkpoint" | "checkpoints") => Class::Checkpoint,
            _ => Class::Rest,
        })
    }
}

/// Faults of one class. JSON: `{"latency_ms": 50, "error_rate": 0.2, "error_codes": [429, 503],
/// "retry_after_secs": 1, "drop_rate": 0.1}`; every field optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassFaults {
    /// Added before every request of the class.
    pub latency_ms: u64,
    /// Probability (0–1) that a request is answered with one of `error_codes` instead.
    pub error_rate: f64,
    /// Chosen uniformly; 429 answers carry `Retry-After: retry_after_secs`.
    pub error_codes: Vec<u16>,
    pub retry_after_secs: u64,
    /// Probability (0–1) that a WebSocket of the class is closed abruptly mid-stream.
    pub drop_rate: f64,
    /// Probability (0–1) that a request is served and its answer then lost:
    /// the change is made, the caller gets a 504 (Crossplane's "create
    /// pending" case).
    pub lost_rate: f64,
    /// The next this many requests of the class (of `lost_method` only, when
    /// set) are served and their answers lost; counts down as they happen.
    pub lose_next: u32,
    pub lost_method: Option<String>,
}

impl Default for ClassFaults {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            error_rate: 0.0,
            error_codes: vec![503],
            retry_after_secs: 1,
            drop_rate: 0.0,
            lost_rate: 0.0,
            lose_next: 0,
            lost_method: None,
        }
    }
}

/// All fault settings: `{"seed": 7, "rest": {...}, "exec": {...}, "fs": {...}, "proxy": {...},
/// "checkpoint": {...}}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    pub seed: Option<u64>,
    pub rest: ClassFaults,
    pub exec: ClassFaults,
    pub fs: ClassFaults,
    pub proxy: ClassFaults,
    pub checkpoint: ClassFaults,
}

#[derive(Debug, thiserror::Error)]
pub enum FaultsError {
    #[error("cannot read faults file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("bad faults JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("bad faults: {0}")]
    Invalid(String),
}

impl Faults {
    /// `--faults` takes inline JSON or the path of a JSON file.
    pub fn from_arg(arg: &str) -> Result<Faults, FaultsError> {
        let text = if arg.trim_start().starts_with('{') {
            arg.to_string()
        } else {
            std::fs::read_to_string(arg).map_err(|source| FaultsError::Read {
                path: arg.into(),
                source,
            })?
        };
        let faults: Faults = serde_json::from_str(&text)?;
        faults.validate()?;
        Ok(faults)
    }

    pub fn validate(&self) -> Result<(), FaultsError> {
        for (name, c) in self.classes() {
            let prob = |p: f64| (0.0..=1.0).contains(&p);
            if !prob(c.error_rate) || !prob(c.drop_rate) || !prob(c.lost_rate) {
                return Err(FaultsError::Invalid(format!(
                    "{name}: rates must be within 0..=1"
                )));
            }
            if c.error_rate > 0.0 && c.error_codes.is_empty() {
                return Err(FaultsError::Invalid(format!(
                    "{name}: error_rate needs error_codes"
                )));
            }
            if let Some(code) = c.error_codes.iter().find(|c| !(400..=599).contains(*c)) {
                return Err(FaultsError::Invalid(format!(
                    "{name}: {code} is not an error status"
                )));
            }
        }
        Ok(())
    }

    fn classes(&self) -> [(&'static str, &ClassFaults); 5] {
        [
            ("rest", &self.rest),
            ("exec", &self.exec),
            ("fs", &self.fs),
            ("proxy", &self.proxy),
            ("checkpoint", &self.checkpoint),
        ]
    }

    pub fn class(&self, class: Class) -> &ClassFaults {
        match class {
            Class::Rest => &self.rest,
            Class::Exec => &self.exec,
            Class::Fs => &self.fs,
            Class::Proxy => &self.proxy,
            Class::Checkpoint => &self.checkpoint,
        }
    }
}

/// What to do to one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    pub latency: Duration,
    /// Answer with this status (and `Retry-After` for 429) instead of serving.
    pub error: Option<(u16, u64)>,
    /// Serve, then answer 504 instead of what the handler said.
    pub lose_answer: bool,
}

/// The faults and their RNG.
#[derive(Debug)]
pub struct Injector {
    faults: Faults,
    rng: StdRng,
}

impl Injector {
    pub fn new(faults: Faults) -> Self {
        let rng = match faults.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self { faults, rng }
    }

    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Replaces the settings; a new seed restarts the sequence.
    pub fn set(&mut self, faults: Faults) {
        if let Some(seed) = faults.seed {
            self.rng = StdRng::seed_from_u64(seed);
        }
        self.faults = faults;
    }

    pub fn decide(&mut self, class: Class, method: &str) -> Decision {
        let c = self.faults.class(class).clone();
        let mut d = Decision {
            latency: Duration::from_millis(c.latency_ms),
            error: None,
            lose_answer: false,
        };
        if c.error_rate > 0.0 && !c.error_codes.is_empty() && self.rng.random_bool(c.error_rate) {
            let code = c.error_codes[self.rng.random_range(0..c.error_codes.len())];
            d.error = Some((code, c.retry_after_secs));
            return d;
        }
        let method_matches = c
            .lost_method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method));
        if method_matches && c.lose_next > 0 {
            self.class_mut(class).lose_next -= 1;
            d.lose_answer = true;
        } else if method_matches && c.lost_rate > 0.0 && self.rng.random_bool(c.lost_rate) {
            d.lose_answer = true;
        }
        d
    }

    fn class_mut(&mut self, class: Class) -> &mut ClassFaults {
        match class {
            Class::Rest => &mut self.faults.rest,
            Class::Exec => &mut self.faults.exec,
            Class::Fs => &mut self.faults.fs,
            Class::Proxy => &mut self.faults.proxy,
            Class::Checkpoint => &mut self.faults.checkpoint,
        }
    }

    /// For a WebSocket of the class: after how long to cut it, if at all.
    pub fn drop_after(&mut self, class: Class) -> Option<Duration> {
        let rate = self.faults.class(class).drop_rate;
        (rate > 0.0 && self.rng.random_bool(rate))
            .then(|| Duration::from_millis(self.rng.random_range(0..=50)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_of_paths() {
        assert_eq!(Class::of_path("/v1/sprites"), Some(Class::Rest));
        assert_eq!(Class::of_path("/v1/sprites/a"), Some(Class::Rest));
        assert_eq!(Class::of_path("/v1/sprites/a/exec/3/kill"), Some(Class::Exec));
        assert_eq!(Class::of_path("/v1/sprites/a/fs/read"), Some(Class::Fs));
        assert_eq!(Class::of_path("/v1/sprites/a/proxy"), Some(Class::Proxy));
        assert_eq!(
            Class::of_path("/v1/sprites/a/checkpoints/v1/restore"),
            Some(Class::Checkpoint)
        );
        assert_eq!(Class::of_path("/sim/stats"), None);
    }

    #[test]
    fn parses_inline_json_and_validates() {
        let f = Faults::from_arg(r#"{"seed":1,"rest":{"error_rate":0.2,"error_codes":[429,503]}}"#)
            .expect("valid");
        assert_eq!(f.rest.error_codes, vec![429, 503]);
        assert_eq!(f.exec, ClassFaults::default());
        assert!(Faults::from_arg(r#"{"rest":{"error_rate":2}}"#).is_err());
        assert!(Faults::from_arg(r#"{"rest":{"error_codes":[200]}}"#).is_err());
        assert!(Faults::from_arg(r#"{"bogus":1}"#).is_err());
        assert!(Faults::from_arg("/no/such/file.json").is_err());
    }

    #[test]
    fn same_seed_same_decisions() {
        let f =
            Faults::from_arg(r#"{"seed":9,"fs":{"error_rate":0.5,"error_codes":[500,503],"drop_rate":0.5}}"#)
                .expect("valid");
        let run = |f: &Faults| {
            let mut inj = Injector::new(f.clone());
            (0..50)
                .map(|_| (inj.decide(Class::Fs, "GET"), inj.drop_after(Class::Fs)))
                .collect::<Vec<_>>()
        };
        let a = run(&f);
        assert_eq!(a, run(&f));
        let errors = a.iter().filter(|(d, _)| d.error.is_some()).count();
        assert!((10..=40).contains(&errors), "{errors}");
        let mut quiet = Injector::new(Faults::default());
        assert_eq!(quiet.decide(Class::Rest, "GET"), Decision::default());
        assert_eq!(quiet.drop_after(Class::Exec), None);
    }

    #[test]
    fn lose_next_loses_that_many_answers_of_its_method() {
        let mut f = Faults::default();
        f.rest.lose_next = 2;
        f.rest.lost_method = Some("POST".into());
        let mut inj = Injector::new(f);
        assert!(!inj.decide(Class::Rest, "GET").lose_answer, "another method");
        assert!(inj.decide(Class::Rest, "POST").lose_answer);
        assert!(inj.decide(Class::Rest, "post").lose_answer);
        assert!(!inj.decide(Class::Rest, "POST").lose_answer, "only two");
        assert_eq!(inj.faults().rest.lose_next, 0);
    }
}
