//! The patch formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and a strategic
//! merge patch that merges the lists Dory and its tests patch by their merge key.

use serde_json::{Map, Value};

/// A patch as the `Content-Type` of the request names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PatchKind {
    Merge,
    Strategic,
    Json,
    Apply,
}

impl PatchKind {
    pub(crate) fn from_content_type(ct: &str) -> Option<Self> {
        let base = ct.split(';').next().unwrap_or("").trim();
        match base {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/json-patch+json" => Some(Self::Json),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// Applies `patch` of `kind` to `target`. Errors are the messages of a 422 (the patch does
/// not apply) or, for a body that is not a patch at all, of a 400 (`Err((400, …))`).
pub(crate) fn apply(
    kind: PatchKind,
    target: &mut Value,
    patch: &Value,
) -> Result<(), (u16, String)> {
    match kind {
        PatchKind::Merge => {
            json_patch::merge(target, patch);
            Ok(())
        }
        PatchKind::Strategic | PatchKind::Apply => {
            if !patch.is_object() {
                return Err((
                    400,
                    "the body of a strategic merge patch must be an object".into(),
                ));
            }
            strategic(target, patch, "");
            Ok(())
        }
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| (400, format!("invalid JSON patch: {e}")))?;
            json_patch::patch(target, &ops).map_err(|e| (422, e.to_string()))
        }
    }
}

/// The merge key of a list under strategic merge, by the list's path with indices dropped.
/// Lists not named here are replaced whole, as lists without a `patchMergeKey` are.
fn merge_key(path: &str) -> Option<&'static str> {
    let key = match path {
        "metadata.ownerReferences" => "uid",
        "status.conditions" | "status.addresses" => "type",
        "spec.containers"
        | "spec.initContainers"
        | "spec.ephemeralContainers"
        | "spec.volumes"
        | "spec.imagePullSecrets"
        | "spec.containers.env"
        | "spec.initContainers.env"
        | "spec.template.spec.containers" => "name",
        "spec.containers.ports" | "spec.initContainers.ports" => "containerPort",
        "spec.containers.volumeMounts" | "spec.initContainers.volumeMounts" => "mountPath",
        _ => return None,
    };
    Some(key)
}

/// Lists of scalars merged as sets (`patchStrategy: merge` on a primitive list).
fn is_set_list(path: &str) -> bool {
    path == "metadata.finalizers"
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Strategic merge: objects merge field by field, `null` deletes, keyed lists merge by key
/// (with `$patch: delete` removing an element), other lists are replaced. Other directives
/// (`$setElementOrder`, `$retainKeys`) are ignored.
fn strategic(target: &mut Value, patch: &Value, path: &str) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        *target = strip_directives(patch);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (key, value) in p {
        if let Some(list) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(have)), Some(drop)) = (t.get_mut(list), value.as_array()) {
                have.retain(|v| !drop.contains(v));
            }
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        let child = join(path, key);
        match value {
            Value::Null => {
                t.remove(key);
            }
            Value::Array(items) => {
                let existing = t.get_mut(key).and_then(Value::as_array_mut);
                match (existing, merge_key(&child)) {
                    (Some(have), Some(mk)) => merge_keyed(have, items, mk, &child),
                    (Some(have), None) if is_set_list(&child) => {
                        for item in items {
                            if !have.contains(item) {
                                have.push(item.clone());
                            }
                        }
                    }
                    _ => {
                        let items = items
                            .iter()
                            .filter(|i| i.get("$patch").and_then(Value::as_str) != Some("delete"))
                            .map(strip_directives)
                            .collect();
                        t.insert(key.clone(), Value::Array(items));
                    }
                }
            }
            Value::Object(_) => {
                let slot = t.entry(key.clone()).or_insert(Value::Null);
                strategic(slot, value, &child);
            }
            scalar => {
                t.insert(key.clone(), scalar.clone());
            }
        }
    }
}

fn merge_keyed(have: &mut Vec<Value>, items: &[Value], mk: &str, path: &str) {
    for item in items {
        let Some(id) = item.get(mk) else {
            have.push(strip_directives(item));
            continue;
        };
        let pos = have.iter().position(|h| h.get(mk) == Some(id));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                have.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic(&mut have[i], item, path),
            (None, false) => have.push(strip_directives(item)),
        }
    }
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merges_conditions_by_type() {
        let mut pod = json!({ "status": { "phase": "Pending", "conditions": [
            { "type": "PodScheduled", "status": "True" },
            { "type": "Ready", "status": "False" }
        ]}});
        let patch = json!({ "status": { "phase": "Running", "conditions": [
            { "type": "Ready", "status": "True" }
        ]}});
        apply(PatchKind::Strategic, &mut pod, &patch).unwrap();
        assert_eq!(pod["status"]["phase"], "Running");
        assert_eq!(pod["status"]["conditions"].as_array().unwrap().len(), 2);
        assert_eq!(pod["status"]["conditions"][1]["status"], "True");

        // A merge patch replaces the list whole.
        apply(PatchKind::Merge, &mut pod, &patch).unwrap();
        assert_eq!(pod["status"]["conditions"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn strategic_directives() {
        let mut obj = json!({ "metadata": {
            "finalizers": ["a"],
            "ownerReferences": [{ "uid": "1", "name": "x" }, { "uid": "2", "name": "y" }]
        }, "spec": { "taints": [{ "key": "a" }] } });
        let patch = json!({ "metadata": {
            "finalizers": ["b"],
            "ownerReferences": [{ "uid": "1", "$patch": "delete" }],
            "labels": { "k": "v" }
        }, "spec": { "taints": [{ "key": "b" }] } });
        apply(PatchKind::Strategic, &mut obj, &patch).unwrap();
        assert_eq!(obj["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(
            obj["metadata"]["ownerReferences"],
            json!([{ "uid": "2", "name": "y" }])
        );
        assert_eq!(obj["metadata"]["labels"]["k"], "v");
        assert_eq!(obj["spec"]["taints"], json!([{ "key": "b" }]));
    }

    #[test]
    fn json_patch_failures_are_422() {
        let mut obj = json!({ "a": 1 });
        let ok = json!([{ "op": "replace", "path": "/a", "value": 2 }]);
        apply(PatchKind::Json, &mut obj, &ok).unwrap();
        assert_eq!(obj["a"], 2);
        let failing = json!([{ "op": "test", "path": "/a", "value": 1 }]);
        assert_eq!(
            apply(PatchKind::Json, &mut obj, &failing).unwrap_err().0,
            422
        );
        let garbage = json!({ "op": "nope" });
        assert_eq!(
            apply(PatchKind::Json, &mut obj, &garbage).unwrap_err().0,
            400
        );
    }
}
