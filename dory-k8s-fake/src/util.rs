//! Small helpers shared by the store and the HTTP layer: timestamps, identifiers and access
//! to an object's `metadata` as JSON.

use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// An RFC 3339 timestamp at second precision in UTC, the format of `metav1.Time`.
pub(crate) fn rfc3339(at: SystemTime) -> String {
    let secs = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// `now` as an RFC 3339 timestamp.
pub(crate) fn now() -> String {
    rfc3339(SystemTime::now())
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day). Written
/// out rather than pulling a date crate for the one conversion the fake needs.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    // Both are in range by construction (1..=31, 1..=12).
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

/// A 64-bit value that differs between calls and between processes. Not cryptographic: uids
/// and generated names only need to be unique, not unguessable.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_nanos(),
    );
    hasher.finish()
}

/// A fresh uid in the canonical UUID text form (version 4 layout).
pub(crate) fn new_uid() -> String {
    let hi = random_u64();
    let lo = random_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0x0fff,
        0x8000 | ((lo >> 48) & 0x3fff),
        lo & 0xffff_ffff_ffff
    )
}

/// The random suffix `generateName` gets: five characters from the alphabet the real server
/// uses (`k8s.io/apimachinery/pkg/util/rand`: no vowels, no confusable digits).
pub(crate) fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut bits = random_u64();
    let len = ALPHABET.len() as u64;
    (0..5)
        .map(|_| {
            let c = ALPHABET[usize::try_from(bits % len).unwrap_or(0)];
            bits /= len;
            char::from(c)
        })
        .collect()
}

/// `metadata` of an object, if it has one.
pub(crate) fn meta(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}

/// `metadata` of an object, created empty if missing or not an object.
pub(crate) fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    let map = obj.as_object_mut().expect("made an object above");
    let entry = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    entry.as_object_mut().expect("made an object above")
}

/// A string field of `metadata`.
pub(crate) fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    meta(obj).and_then(|m| m.get(field)).and_then(Value::as_str)
}

/// `metadata.labels` as a map, if any.
pub(crate) fn labels(obj: &Value) -> Option<&Map<String, Value>> {
    meta(obj)
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
}

/// The value at a dotted path (`spec.nodeName`), if every step is an object field.
pub(crate) fn at_path<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(obj, |v, step| v.get(step))
}

/// A field's value as a field selector sees it: strings as they are, booleans and numbers in
/// their text form, anything missing as the empty string.
pub(crate) fn field_text(obj: &Value, path: &str) -> String {
    match at_path(obj, path) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

/// An integer resourceVersion. The fake's versions are integers; a client that sends
/// anything else gets a 400 from the caller.
pub(crate) fn parse_rv(rv: &str) -> Option<u64> {
    rv.parse().ok()
}

/// Whether the pod's `Ready` condition is `True`.
pub(crate) fn pod_ready(pod: &Value) -> bool {
    condition_status(pod, "Ready") == Some("True")
}

/// The status of a condition in `status.conditions`.
pub(crate) fn condition_status<'a>(obj: &'a Value, kind: &str) -> Option<&'a str> {
    at_path(obj, "status.conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
}

/// Sets a condition in `status.conditions`, keeping `lastTransitionTime` when the status does
/// not change, as controllers do.
pub(crate) fn set_condition(
    obj: &mut Value,
    kind: &str,
    status: &str,
    reason: Option<&str>,
    message: Option<&str>,
) {
    let root = obj
        .as_object_mut()
        .expect("objects in the store are JSON objects");
    let status_obj = root
        .entry("status")
        .or_insert_with(|| Value::Object(Map::new()));
    if !status_obj.is_object() {
        *status_obj = Value::Object(Map::new());
    }
    let conditions = status_obj
        .as_object_mut()
        .expect("made an object above")
        .entry("conditions")
        .or_insert_with(|| Value::Array(Vec::new()));
    if !conditions.is_array() {
        *conditions = Value::Array(Vec::new());
    }
    let list = conditions.as_array_mut().expect("made an array above");
    let mut cond = Map::new();
    cond.insert("type".into(), kind.into());
    cond.insert("status".into(), status.into());
    cond.insert("lastProbeTime".into(), Value::Null);
    if let Some(reason) = reason {
        cond.insert("reason".into(), reason.into());
    }
    if let Some(message) = message {
        cond.insert("message".into(), message.into());
    }
    match list
        .iter_mut()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
    {
        Some(existing) => {
            let same = existing.get("status").and_then(Value::as_str) == Some(status);
            let transition = if same {
                existing
                    .get("lastTransitionTime")
                    .cloned()
                    .unwrap_or(Value::Null)
            } else {
                now().into()
            };
            cond.insert("lastTransitionTime".into(), transition);
            *existing = Value::Object(cond);
        }
        None => {
            cond.insert("lastTransitionTime".into(), now().into());
            list.push(Value::Object(cond));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // 2024-02-29 12:34:56
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56Z");
    }

    #[test]
    fn uids_are_distinct_uuids() {
        let a = new_uid();
        let b = new_uid();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4');
    }

    #[test]
    fn generated_suffixes_use_the_alphabet() {
        let s = name_suffix();
        assert_eq!(s.len(), 5);
        assert!(
            s.bytes()
                .all(|c| b"bcdfghjklmnpqrstvwxz2456789".contains(&c))
        );
    }
}
