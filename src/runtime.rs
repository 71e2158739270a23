//! The sprite runtime deployed onto every VM: the `sprite/` folder embedded
//! in the binary, or the same layout from a ConfigMap (decision 4).
//!
//! A bundle knows where each file goes below `/workspace` and what kind of
//! file it is, because the bootstrap treats them differently: requirements
//! before pip, code after, memory templates only where the user has none yet,
//! and VERSION strictly last.

use std::collections::BTreeMap;

use include_dir::{Dir, include_dir};

static SPRITE_DIR: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/sprite");

/// The embedded runtime's version (`sprite/VERSION`).
pub const EMBEDDED_VERSION: &str = include_str!("../sprite/VERSION");

pub const WORKSPACE: &str = "/workspace";
pub const VERSION_PATH: &str = "/workspace/VERSION";
pub const REQUIREMENTS_PATH: &str = "/workspace/requirements.txt";
pub const VENV_PYTHON: &str = "/workspace/.venv/bin/python3";
pub const SERVER_ENV_PATH: &str = "/workspace/.secrets/server.env";
/// Directories of the layout (seed 000's bootstrap step 2).
pub const DIRECTORIES: [&str; 7] = [
    "/workspace/documents",
    "/workspace/ocr",
    "/workspace/artifacts",
    "/workspace/memory",
    "/workspace/transcripts",
    "/workspace/src",
    "/workspace/.secrets",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileKind {
    Requirements,
    Code,
    MemoryTemplate,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeFile {
    /// Absolute path in the VM.
    pub path: String,
    pub contents: Vec<u8>,
    pub kind: FileKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeBundle {
    pub version: String,
    pub files: Vec<RuntimeFile>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("the runtime source has no VERSION")]
    NoVersion,
    #[error("the runtime source has no requirements.txt")]
    NoRequirements,
    #[error("invalid path {0:?} in the runtime source")]
    BadPath(String),
}

impl RuntimeBundle {
    /// The runtime embedded from `sprite/`: `src/*` (code and schema.sql) to
    /// `/workspace/src/`, `schema.sql` beside the code that applies it,
    /// `memory/*` as templates, `requirements.txt`. Tests, caches and
    /// developer files stay behind.
    pub fn embedded() -> RuntimeBundle {
        let mut files = vec![];
        for file in walk(&SPRITE_DIR) {
            let rel = file.path().to_string_lossy().replace('\\', "/");
            let (path, kind) = match rel.as_str() {
                "requirements.txt" => (REQUIREMENTS_PATH.to_string(), FileKind::Requirements),
                "schema.sql" => ("/workspace/src/schema.sql".to_string(), FileKind::Code),
                r if r.starts_with("src/") && !r.contains("__pycache__") && !r.ends_with(".pyc") => {
                    (format!("{WORKSPACE}/{r}"), FileKind::Code)
                }
                r if r.starts_with("memory/") => (format!("{WORKSPACE}/{r}"), FileKind::MemoryTemplate),
                _ => continue,
            };
            files.push(RuntimeFile {
                path,
                contents: file.contents().to_vec(),
                kind,
            });
        }
        files.sort_by(|a, b| (a.kind, &a.path).cmp(&(b.kind, &b.path)));
        RuntimeBundle {
            version: EMBEDDED_VERSION.trim().to_string(),
            files,
        }
    }

    /// A runtime from a ConfigMap's data: `VERSION`, and one key per file
    /// with `/` written as `__` (ConfigMap keys cannot hold `/`).
    pub fn from_config_map(data: &BTreeMap<String, String>) -> Result<RuntimeBundle, BundleError> {
        let version = data
            .get("VERSION")
            .map(|v| v.trim().to_string())
            .ok_or(BundleError::NoVersion)?;
        if version.is_empty() {
            return Err(BundleError::NoVersion);
        }
        let mut files = vec![];
        for (key, value) in data {
            if key == "VERSION" {
                continue;
            }
            let rel = key.replace("__", "/");
            if rel
                .split('/')
                .any(|seg| seg.is_empty() || seg == "." || seg == "..")
            {
                return Err(BundleError::BadPath(key.clone()));
            }
            let kind = if rel == "requirements.txt" {
                FileKind::Requirements
            } else if rel.starts_with("memory/") {
                FileKind::MemoryTemplate
            } else {
                FileKind::Code
            };
            files.push(RuntimeFile {
                path: format!("{WORKSPACE}/{rel}"),
                contents: value.as_bytes().to_vec(),
                kind,
            });
        }
        if !files.iter().any(|f| f.kind == FileKind::Requirements) {
            return Err(BundleError::NoRequirements);
        }
        files.sort_by(|a, b| (a.kind, &a.path).cmp(&(b.kind, &b.path)));
        Ok(RuntimeBundle { version, files })
    }

    pub fn of_kind(&self, kind: FileKind) -> impl Iterator<Item = &RuntimeFile> {
        self.files.iter().filter(move |f| f.kind == kind)
    }

    /// Whether this runtime ships the database initialiser the bootstrap's
    /// schema step runs (a ConfigMap runtime may not have one).
    pub fn has_db_init(&self) -> bool {
        self.files.iter().any(|f| f.path == "/workspace/src/db.py")
    }

    /// Whether this runtime ships a heartbeat entry.
    pub fn has_heartbeat(&self) -> bool {
        self.files.iter().any(|f| f.path == "/workspace/src/heartbeat.py")
    }
}

fn walk<'a>(dir: &'a Dir<'a>) -> Vec<&'a include_dir::File<'a>> {
    let mut out: Vec<&include_dir::File> = dir.files().collect();
    for d in dir.dirs() {
        out.extend(walk(d));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_version_matches_sprite_version_file() {
        let on_disk =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sprite/VERSION")).unwrap();
        assert_eq!(RuntimeBundle::embedded().version, on_disk.trim());
        assert!(!EMBEDDED_VERSION.trim().is_empty());
    }

    #[test]
    fn embedded_bundle_has_the_documented_layout() {
        let b = RuntimeBundle::embedded();
        let paths: Vec<&str> = b.files.iter().map(|f| f.path.as_str()).collect();
        for expected in [
            "/workspace/requirements.txt",
            "/workspace/src/server.py",
            "/workspace/src/heartbeat.py",
            "/workspace/src/db.py",
            "/workspace/src/schema.sql",
            "/workspace/memory/soul.md",
            "/workspace/memory/user.md",
            "/workspace/memory/MEMORY.md",
        ] {
            assert!(paths.contains(&expected), "{expected} missing from {paths:?}");
        }
        assert!(
            !paths
                .iter()
                .any(|p| p.contains("tests/") || p.contains("__pycache__")),
            "{paths:?}"
        );
        assert!(
            !paths.iter().any(|p| p.ends_with("VERSION")),
            "VERSION is written separately, last"
        );
        assert!(b.has_db_init() && b.has_heartbeat());
        assert_eq!(b.of_kind(FileKind::MemoryTemplate).count(), 3);
    }

    #[test]
    fn config_map_keys_map_to_paths() {
        let data = BTreeMap::from([
            ("VERSION".to_string(), "2.0.0\n".to_string()),
            ("requirements.txt".to_string(), "websockets\n".to_string()),
            ("src__server.py".to_string(), "print()".to_string()),
            ("memory__soul.md".to_string(), "# soul".to_string()),
        ]);
        let b = RuntimeBundle::from_config_map(&data).unwrap();
        assert_eq!(b.version, "2.0.0");
        let kinds: Vec<(&str, FileKind)> = b.files.iter().map(|f| (f.path.as_str(), f.kind)).collect();
        assert_eq!(
            kinds,
            [
                ("/workspace/requirements.txt", FileKind::Requirements),
                ("/workspace/src/server.py", FileKind::Code),
                ("/workspace/memory/soul.md", FileKind::MemoryTemplate),
            ]
        );
        assert!(!b.has_db_init());
    }

    #[test]
    fn config_map_errors_are_specific() {
        let mut data = BTreeMap::from([("requirements.txt".to_string(), "x".to_string())]);
        assert_eq!(RuntimeBundle::from_config_map(&data), Err(BundleError::NoVersion));
        data.insert("VERSION".into(), "1".into());
        data.insert("src____etc__passwd".into(), "x".into());
        assert!(matches!(
            RuntimeBundle::from_config_map(&data),
            Err(BundleError::BadPath(_))
        ));
        let data = BTreeMap::from([("VERSION".to_string(), "1".to_string())]);
        assert_eq!(
            RuntimeBundle::from_config_map(&data),
            Err(BundleError::NoRequirements)
        );
    }
}
