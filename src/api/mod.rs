//! The custom resources (group `sprite-operator.dev`, version `v1alpha1`).
//! Types only: the controllers that act on them live in `controller/`.

pub mod conditions;
pub mod session;
pub mod sprite;
pub mod user;

pub use sprite::{Sprite, SpriteSpec, SpriteStatus};
pub use user::{Tier, User, UserSpec, UserStatus};

pub const GROUP: &str = "sprite-operator.dev";
pub const VERSION: &str = "v1alpha1";

/// The files of `examples/`, in the order to apply them (a Secret before the
/// Sprite that reads it). The list of files is fixed here so that a renamed or vanished example fails a test
/// instead of silently shrinking what is tested.
pub const EXAMPLE_FILES: [&str; 4] = [
    "user.yaml",
    "secret-api-keys.yaml",
    "sprite.yaml",
    "sprite-configmap-runtime.yaml",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::sprite::{DeletionPolicy, UpdateType};
    use serde_json::Value;

    fn example_docs() -> Vec<(String, Value)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".yaml"))
            .collect();
        on_disk.sort();
        let mut expected: Vec<String> = EXAMPLE_FILES.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(
            on_disk, expected,
            "examples/ holds other files than the ones tests expect"
        );
        let mut docs = vec![];
        for f in EXAMPLE_FILES {
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            for doc in serde_saphyr::from_multiple::<Value>(&text).unwrap() {
                docs.push((f.to_string(), doc));
            }
        }
        docs
    }

    #[test]
    fn every_example_deserialises_into_its_type() {
        let docs = example_docs();
        let mut sprites = 0;
        let mut users = 0;
        for (file, doc) in docs {
            match doc["kind"].as_str().unwrap() {
                "Sprite" => {
                    let s: Sprite = serde_json::from_value(doc).unwrap_or_else(|e| panic!("{file}: {e}"));
                    assert!(s.metadata.name.is_some(), "{file}");
                    sprites += 1;
                }
                "User" => {
                    let _: User = serde_json::from_value(doc).unwrap_or_else(|e| panic!("{file}: {e}"));
                    users += 1;
                }
                "ConfigMap" | "Secret" => {}
                other => panic!("{file}: unexpected kind {other}"),
            }
        }
        assert_eq!((sprites, users), (2, 1));
    }

    #[test]
    fn defaults_are_applied_as_documented() {
        let s: Sprite = serde_json::from_value(serde_json::json!({
            "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "Sprite",
            "metadata": {"name": "x", "namespace": "team-a"},
            "spec": {"userRef": {"name": "u"}, "heartbeat": {"schedule": "*/15 * * * *"}}
        }))
        .unwrap();
        assert_eq!(s.vm_name(), sprite::default_vm_name("team-a", "x"));
        assert_eq!(s.spec.template.server.port, 8765);
        assert_eq!(
            s.spec.template.server.command,
            vec!["/workspace/.venv/bin/python3", "/workspace/src/server.py"]
        );
        assert_eq!(s.spec.template.heartbeat.as_ref().unwrap().duration, "2m");
        assert_eq!(s.spec.template.update_policy.type_, UpdateType::OnWake);
        assert!(s.spec.template.update_policy.checkpoint_before_update);
        assert!(s.spec.template.update_policy.rollback_on_failure);
        assert_eq!(s.spec.template.deletion_policy, DeletionPolicy::Delete);
        assert!(!s.spec.suspend);
        assert!(s.spec.template.runtime.source.is_none());
    }

    #[test]
    fn explicit_sprite_name_wins() {
        let docs = example_docs();
        let (_, doc) = docs
            .into_iter()
            .find(|(f, d)| f == "sprite.yaml" && d["kind"] == "Sprite")
            .unwrap();
        let s: Sprite = serde_json::from_value(doc).unwrap();
        assert_eq!(s.vm_name(), "alice-research");
    }

    #[test]
    fn a_sprite_stored_without_a_user_reads_as_naming_none() {
        let s: Sprite = serde_json::from_value(serde_json::json!({
            "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "Sprite",
            "metadata": {"name": "x", "namespace": "team-a"}, "spec": {}
        }))
        .unwrap();
        assert_eq!(s.spec.user_ref.name, "");
    }

    #[test]
    fn unknown_tier_does_not_deserialise() {
        let r: Result<UserSpec, _> =
            serde_json::from_value(serde_json::json!({"email": "a@b.c", "subject": "s", "tier": "platinum"}));
        assert!(r.is_err());
    }
}
