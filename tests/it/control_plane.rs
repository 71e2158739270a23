//! The real apiserver accepts our CRDs and examples, rejects bad input naming
//! the field, prints our columns, and garbage-collects owned Sprites.

use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;
use sprite_operator::api::{Sprite, User};

use crate::common::{TestNs, eventually, example_docs};

fn dynamic_api(ns: &TestNs, doc: &serde_json::Value) -> Api<DynamicObject> {
    let (group, version) = match doc["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), doc["apiVersion"].as_str().unwrap().to_string()),
    };
    let gvk = GroupVersionKind::gvk(&group, &version, doc["kind"].as_str().unwrap());
    Api::namespaced_with(ns.client.clone(), &ns.name, &ApiResource::from_gvk(&gvk))
}

async fn apply(ns: &TestNs, doc: &serde_json::Value) -> Result<DynamicObject, kube::Error> {
    sprite_operator::testenv::apply_doc(&ns.client, &ns.name, doc, "it-test").await
}

#[tokio::test]
async fn every_example_applies() {
    let Some(ns) = TestNs::new("examples").await else {
        return;
    };
    let mut applied = vec![];
    for file in sprite_operator::api::EXAMPLE_FILES {
        for doc in example_docs(file) {
            let obj = apply(&ns, &doc).await.unwrap_or_else(|e| panic!("{file}: {e}"));
            applied.push(format!(
                "{}/{}",
                doc["kind"].as_str().unwrap(),
                obj.metadata.name.unwrap()
            ));
        }
    }
    applied.sort();
    assert_eq!(
        applied,
        [
            "ConfigMap/custom-runtime",
            "Secret/llm-api-keys",
            "Sprite/custom",
            "Sprite/research",
            "User/alice"
        ]
    );
    // Defaults were filled in by the apiserver from the schema.
    let s = ns.api::<Sprite>().get("custom").await.unwrap();
    assert_eq!(s.spec.template.server.port, 8765);
    assert_eq!(
        s.spec.template.deletion_policy,
        sprite_operator::api::sprite::DeletionPolicy::Retain
    );
}

/// Creates `doc` and returns the apiserver's error message (panics when the
/// apiserver accepts it).
async fn rejected(ns: &TestNs, doc: serde_json::Value) -> String {
    let obj: DynamicObject = serde_json::from_value(doc.clone()).unwrap();
    match dynamic_api(ns, &doc).create(&PostParams::default(), &obj).await {
        Ok(_) => panic!("apiserver accepted an invalid object: {doc}"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            status.message
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// A Sprite; without a `userRef` in `spec` it names the User `owner`.
fn sprite(name: &str, mut spec: serde_json::Value) -> serde_json::Value {
    if spec.get("userRef").is_none() {
        spec["userRef"] = json!({"name": "owner"});
    }
    json!({"apiVersion": "sprite-operator.dev/v1alpha1", "kind": "Sprite", "metadata": {"name": name}, "spec": spec})
}

fn user(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "sprite-operator.dev/v1alpha1", "kind": "User", "metadata": {"name": name}, "spec": spec})
}

#[tokio::test]
async fn invalid_specs_are_rejected_naming_the_field() {
    let Some(ns) = TestNs::new("invalid").await else {
        return;
    };

    let msg = rejected(&ns, sprite("bad-name", json!({"spriteName": "Not_A_Name"}))).await;
    assert!(msg.contains("spec.spriteName"), "{msg}");

    let msg = rejected(
        &ns,
        user(
            "bad-tier",
            json!({"email": "a@example.com", "subject": "s", "tier": "platinum"}),
        ),
    )
    .await;
    assert!(msg.contains("spec.tier") && msg.contains("platinum"), "{msg}");

    let msg = rejected(&ns, sprite("bad-enum", json!({"deletionPolicy": "Destroy"}))).await;
    assert!(msg.contains("spec.deletionPolicy"), "{msg}");

    let msg = rejected(&ns, user("no-email", json!({"subject": "s", "tier": "free"}))).await;
    assert!(msg.contains("spec.email"), "{msg}");

    let msg = rejected(
        &ns,
        sprite(
            "env-both",
            json!({"server": {"env": [{"name": "A", "value": "x",
            "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}}),
        ),
    )
    .await;
    assert!(
        msg.contains("spec.server.env[0]") && msg.contains("exactly one of value and valueFrom"),
        "{msg}"
    );

    let msg = rejected(&ns, sprite("bad-port", json!({"server": {"port": 70000}}))).await;
    assert!(msg.contains("spec.server.port"), "{msg}");

    // Every Sprite counts against a User: one that names none is refused.
    let mut no_user = sprite("no-user", json!({}));
    no_user["spec"].as_object_mut().unwrap().remove("userRef");
    let msg = rejected(&ns, no_user).await;
    assert!(msg.contains("userRef is required"), "{msg}");
}

#[tokio::test]
async fn sprite_name_is_immutable() {
    let Some(ns) = TestNs::new("immutable").await else {
        return;
    };
    let api = ns.api::<Sprite>();
    let doc = sprite("fixed", json!({"spriteName": "first-name"}));
    api.create(&PostParams::default(), &serde_json::from_value(doc).unwrap())
        .await
        .unwrap();

    let change = |name: Option<&str>| {
        let spec = match name {
            Some(n) => json!({"spriteName": n}),
            None => json!({"spriteName": null}),
        };
        json!({"spec": spec})
    };
    for attempt in [Some("second-name"), None] {
        let err = api
            .patch("fixed", &PatchParams::default(), &Patch::Merge(change(attempt)))
            .await
            .expect_err("spriteName changed");
        let kube::Error::Api(status) = err else {
            panic!("{err}")
        };
        assert!(
            status.message.contains("spriteName is immutable"),
            "{}",
            status.message
        );
        assert!(status.message.contains("spec.spriteName"), "{}", status.message);
    }
    // Setting it on a Sprite created without one would rename the VM too.
    api.create(
        &PostParams::default(),
        &serde_json::from_value(sprite("unnamed", json!({}))).unwrap(),
    )
    .await
    .unwrap();
    let err = api
        .patch(
            "unnamed",
            &PatchParams::default(),
            &Patch::Merge(change(Some("late-name"))),
        )
        .await
        .expect_err("spriteName added after creation");
    assert!(err.to_string().contains("spriteName is immutable"), "{err}");
}

#[tokio::test]
async fn kubectl_shows_the_printer_columns() {
    let Some(ns) = TestNs::new("columns").await else {
        return;
    };
    for doc in example_docs("user.yaml")
        .into_iter()
        .chain(example_docs("sprite.yaml"))
    {
        apply(&ns, &doc).await.unwrap();
    }
    let out = ns.kubectl(&["get", "sprites"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "PHASE",
            "VERSION",
            "USER",
            "LAST",
            "HEARTBEAT",
            "COST",
            "AGE"
        ],
        "{text}"
    );
    assert!(text.contains("research") && text.contains("alice"), "{text}");
    // Decision 12: `kubectl get sprites` must not list Users.
    assert_eq!(text.lines().count(), 2, "{text}");

    let out = ns.kubectl(&["get", "users"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "TIER", "SPRITES", "USAGE", "PHASE", "AGE"],
        "{text}"
    );
    assert!(text.contains("starter"), "{text}");

    // The category lists both kinds.
    let out = ns.kubectl(&["get", "sprite-operator", "-o", "name"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("sprite.sprite-operator.dev/research"), "{text}");
    assert!(text.contains("user.sprite-operator.dev/alice"), "{text}");
}

#[tokio::test]
async fn deleting_a_user_garbage_collects_its_sprites() {
    let Some(ns) = TestNs::new("gc").await else { return };
    let users = ns.api::<User>();
    let u = users
        .create(
            &PostParams::default(),
            &serde_json::from_value(user(
                "bob",
                json!({"email": "bob@example.com", "subject": "bob", "tier": "free"}),
            ))
            .unwrap(),
        )
        .await
        .unwrap();
    let mut doc = sprite("bob-primary", json!({"userRef": {"name": "bob"}}));
    doc["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "sprite-operator.dev/v1alpha1", "kind": "User", "name": "bob",
        "uid": u.metadata.uid.clone().unwrap(), "controller": true, "blockOwnerDeletion": true
    }]);
    let sprites = ns.api::<Sprite>();
    sprites
        .create(&PostParams::default(), &serde_json::from_value(doc).unwrap())
        .await
        .unwrap();
    let standalone = sprite("unowned", json!({}));
    sprites
        .create(
            &PostParams::default(),
            &serde_json::from_value(standalone).unwrap(),
        )
        .await
        .unwrap();

    // The garbage collector picks up new resource types on its discovery
    // resync (every 30 s), so this can take that long on a fresh plane.
    users.delete("bob", &DeleteParams::background()).await.unwrap();
    eventually("the owned Sprite to be garbage-collected", 90, || async {
        match sprites.get_opt("bob-primary").await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err("still there".to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    assert!(
        sprites.get_opt("unowned").await.unwrap().is_some(),
        "GC took a Sprite it did not own"
    );
}
