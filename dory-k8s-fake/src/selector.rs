//! Label and field selectors: the query-string forms (`labelSelector`, `fieldSelector`) and
//! the structured `LabelSelector` of a PodDisruptionBudget.

use serde_json::{Map, Value};

use crate::resources::ResourceDef;
use crate::util::{field_text, labels};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

impl Requirement {
    fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let value = labels
            .and_then(|l| l.get(&self.key))
            .and_then(Value::as_str);
        match (&self.op, value) {
            (Op::Eq(want), Some(v)) => v == want,
            (Op::In(set), Some(v)) => set.iter().any(|s| s == v),
            (Op::Eq(_) | Op::In(_), None) => false,
            // As the real server: a missing label satisfies `!=` and `notin`.
            (Op::NotEq(want), v) => v != Some(want.as_str()),
            (Op::NotIn(set), v) => v.is_none_or(|v| !set.iter().any(|s| s == v)),
            (Op::Exists, v) => v.is_some(),
            (Op::NotExists, v) => v.is_none(),
        }
    }
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// Parses the query-string syntax: `a=b,c!=d,e in (x,y),f notin (z),g,!h`.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in split_top_level(text) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(term)?);
        }
        Ok(Self { requirements })
    }

    /// The structured form (`matchLabels`, `matchExpressions`). `None` for a null selector,
    /// which matches nothing (policy/v1 PDBs); an empty object matches everything.
    pub(crate) fn from_object(sel: &Value) -> Result<Option<Self>, String> {
        let Some(obj) = sel.as_object() else {
            return Ok(None);
        };
        let mut requirements = Vec::new();
        if let Some(labels) = obj.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in labels {
                let v = v
                    .as_str()
                    .ok_or_else(|| format!("matchLabels[{k}] is not a string"))?;
                requirements.push(Requirement {
                    key: k.clone(),
                    op: Op::Eq(v.into()),
                });
            }
        }
        if let Some(exprs) = obj.get("matchExpressions").and_then(Value::as_array) {
            for e in exprs {
                let key = e
                    .get("key")
                    .and_then(Value::as_str)
                    .ok_or("matchExpressions entry without a key")?
                    .to_string();
                let values: Vec<String> = e
                    .get("values")
                    .and_then(Value::as_array)
                    .map(|vs| {
                        vs.iter()
                            .filter_map(Value::as_str)
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default();
                let op = match e.get("operator").and_then(Value::as_str) {
                    Some("In") => Op::In(values),
                    Some("NotIn") => Op::NotIn(values),
                    Some("Exists") => Op::Exists,
                    Some("DoesNotExist") => Op::NotExists,
                    other => {
                        return Err(format!("{other:?} is not a valid label selector operator"));
                    }
                };
                requirements.push(Requirement { key, op });
            }
        }
        Ok(Some(Self { requirements }))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether an object's labels satisfy every requirement.
    pub(crate) fn matches(&self, obj: &Value) -> bool {
        let l = labels(obj);
        self.requirements.iter().all(|r| r.matches(l))
    }
}

/// Splits at commas outside parentheses (`a in (x,y),b`).
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_requirement(term: &str) -> Result<Requirement, String> {
    let bad = || format!("unable to parse requirement: {term:?}");
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        check_key(key).map_err(|_| bad())?;
        return Ok(Requirement {
            key: key.into(),
            op: Op::NotExists,
        });
    }
    if let Some(open) = term.find('(') {
        let close = term
            .rfind(')')
            .filter(|&c| c > open && term[c + 1..].trim().is_empty());
        let close = close.ok_or_else(bad)?;
        let head: Vec<&str> = term[..open].split_whitespace().collect();
        let [key, op] = head.as_slice() else {
            return Err(bad());
        };
        check_key(key).map_err(|_| bad())?;
        let values: Vec<String> = term[open + 1..close]
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        let op = match *op {
            "in" => Op::In(values),
            "notin" => Op::NotIn(values),
            _ => return Err(bad()),
        };
        return Ok(Requirement {
            key: (*key).into(),
            op,
        });
    }
    let (key, op) = if let Some((k, v)) = term.split_once("!=") {
        (k, Op::NotEq(v.trim().into()))
    } else if let Some((k, v)) = term.split_once("==") {
        (k, Op::Eq(v.trim().into()))
    } else if let Some((k, v)) = term.split_once('=') {
        (k, Op::Eq(v.trim().into()))
    } else {
        (term, Op::Exists)
    };
    let key = key.trim();
    check_key(key).map_err(|_| bad())?;
    if key.contains(char::is_whitespace) {
        return Err(bad());
    }
    Ok(Requirement {
        key: key.into(),
        op,
    })
}

fn check_key(key: &str) -> Result<(), ()> {
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok { Ok(()) } else { Err(()) }
}

/// A parsed field selector: `metadata.name=x,spec.nodeName!=`.
#[derive(Clone, Debug, Default)]
pub(crate) struct FieldSelector {
    terms: Vec<(String, bool, String)>,
}

impl FieldSelector {
    /// Parses and checks every field is selectable on `def`, as the real server does
    /// (`field label not supported: …`).
    pub(crate) fn parse(text: &str, def: &ResourceDef) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in text.split(',') {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let (field, eq, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{text}'; can't understand '{term}'"
                ));
            };
            let field = field.trim();
            if !def.selectable(field) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_string(), eq, value.trim().to_string()));
        }
        Ok(Self { terms })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.terms
            .iter()
            .all(|(field, eq, value)| (field_text(obj, field) == *value) == *eq)
    }
}

/// A label and a field selector together, as list and watch requests carry them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Selectors {
    pub(crate) labels: LabelSelector,
    pub(crate) fields: FieldSelector,
}

impl Selectors {
    pub(crate) fn matches(&self, obj: &Value) -> bool {
        (self.labels.is_empty() || self.labels.matches(obj))
            && (self.fields.is_empty() || self.fields.matches(obj))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({ "metadata": { "name": "p", "labels": labels }, "spec": { "nodeName": "n1" } })
    }

    #[test]
    fn label_selector_operators() {
        let o = obj(json!({ "app": "web", "tier": "front" }));
        let yes = [
            "app=web",
            "app==web",
            "app!=db",
            "missing!=x",
            "app in (web, db)",
            "app notin (db)",
            "missing notin (db)",
            "tier",
            "!missing",
            "app=web,tier in (front)",
            "",
        ];
        for s in yes {
            assert!(
                LabelSelector::parse(s).unwrap().matches(&o),
                "{s} should match"
            );
        }
        let no = [
            "app=db",
            "app!=web",
            "app in (db)",
            "app notin (web,db)",
            "missing",
            "!app",
        ];
        for s in no {
            assert!(
                !LabelSelector::parse(s).unwrap().matches(&o),
                "{s} should not match"
            );
        }
        for bad in ["a b", "in (x", "=x", "a in x)"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn structured_selectors() {
        let o = obj(json!({ "app": "web" }));
        assert!(LabelSelector::from_object(&Value::Null).unwrap().is_none());
        assert!(
            LabelSelector::from_object(&json!({}))
                .unwrap()
                .unwrap()
                .matches(&o)
        );
        let sel = json!({
            "matchLabels": { "app": "web" },
            "matchExpressions": [{ "key": "tier", "operator": "DoesNotExist" }]
        });
        assert!(
            LabelSelector::from_object(&sel)
                .unwrap()
                .unwrap()
                .matches(&o)
        );
        let sel =
            json!({ "matchExpressions": [{ "key": "app", "operator": "In", "values": ["db"] }] });
        assert!(
            !LabelSelector::from_object(&sel)
                .unwrap()
                .unwrap()
                .matches(&o)
        );
    }

    #[test]
    fn field_selectors() {
        let pods = &ResourceDef::builtins()[0];
        let o = obj(json!({}));
        assert!(
            FieldSelector::parse("spec.nodeName=n1", pods)
                .unwrap()
                .matches(&o)
        );
        assert!(
            FieldSelector::parse("metadata.name!=q", pods)
                .unwrap()
                .matches(&o)
        );
        assert!(
            FieldSelector::parse("status.phase=", pods)
                .unwrap()
                .matches(&o)
        );
        assert!(
            !FieldSelector::parse("spec.nodeName=n2", pods)
                .unwrap()
                .matches(&o)
        );
        let err = FieldSelector::parse("spec.image=x", pods).unwrap_err();
        assert_eq!(err, "field label not supported: spec.image");
    }
}
