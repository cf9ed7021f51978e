//! The processors file: `[processors.<id>]` tables of a TOML file turned into
//! [`ProcessorSpec`]s, with errors that name the file, line, column and field.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use dory_core::{
    DesiredState, Error, InvalidEntry, NodeId, ProcessorId, ProcessorSpec, Result, SpecError,
};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// The top-level table holding the processors; every other top-level table belongs to
/// someone else (the `dory` CLI's own settings) and is ignored here.
pub(crate) const PROCESSORS: &str = "processors";

/// Parses the processors of `text` (the contents of `file`): the valid ones as specs, the
/// others as [`InvalidEntry`]s naming file, line, column and field; `pins` (recorded intents,
/// by processor id) override an entry's own `pin`.
///
/// Fails only when the file as a whole cannot be read as processors: it is not TOML, or
/// `processors` is not a table. The error ([`Error::Invalid`]) names the file and line.
pub(crate) fn parse(
    file: &Path,
    text: &str,
    pins: &BTreeMap<String, NodeId>,
) -> Result<DesiredState> {
    let doc = Doc { file, text };
    let mut desired = DesiredState::default();
    let Some(processors) = doc.processors()? else {
        return Ok(desired);
    };
    for (key, value) in processors.iter() {
        let id = key.get_ref().to_string();
        match doc.entry(&id, key.span(), value, pins.get(&id)) {
            Ok(spec) => desired.processors.push(spec),
            Err(error) => desired.invalid.push(InvalidEntry { id, error }),
        }
    }
    Ok(desired)
}

/// The ids of every entry in `text`'s processors table, valid or not.
pub(crate) fn listed(file: &Path, text: &str) -> Result<BTreeSet<String>> {
    let doc = Doc { file, text };
    Ok(doc
        .processors()?
        .map(|t| t.iter().map(|(k, _)| k.get_ref().to_string()).collect())
        .unwrap_or_default())
}

/// One file's text, for locating spans.
struct Doc<'a> {
    file: &'a Path,
    text: &'a str,
}

impl<'a> Doc<'a> {
    /// `file:line:column` of a byte offset (both 1-based; the column counts characters).
    fn at(&self, offset: usize) -> String {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        format!("{}:{line}:{column}", self.file.display())
    }

    /// The processors table, `None` when the file has none.
    fn processors(&self) -> Result<Option<DeTable<'a>>> {
        let root = DeTable::parse(self.text).map_err(|e| {
            let at = match e.span() {
                Some(span) => self.at(span.start),
                None => self.file.display().to_string(),
            };
            Error::invalid(format!("{at}: not valid TOML: {}", e.message().trim_end()))
        })?;
        let mut root = root.into_inner();
        let Some(value) = root.remove(PROCESSORS) else {
            return Ok(None);
        };
        let span = value.span();
        match value.into_inner() {
            DeValue::Table(table) => Ok(Some(table)),
            other => Err(Error::invalid(format!(
                "{}: field `{PROCESSORS}` must be a table of processors, one \
                 `[{PROCESSORS}.<id>]` per processor, not {} {}",
                self.at(span.start),
                article(other.type_str()),
                other.type_str()
            ))),
        }
    }

    /// One `[processors.<id>]` entry turned into a spec, or the reason it cannot be one.
    fn entry(
        &self,
        id: &str,
        key_span: Range<usize>,
        value: &Spanned<DeValue<'_>>,
        pin: Option<&NodeId>,
    ) -> std::result::Result<ProcessorSpec, String> {
        let entry = format!("processor {id:?}");
        let at_key = self.at(key_span.start);
        let pid = ProcessorId::new(id).map_err(|e| format!("{at_key}: {entry}: {}", e.reason()))?;
        let DeValue::Table(table) = value.get_ref() else {
            return Err(format!(
                "{}: {entry}: must be a table (`[{PROCESSORS}.{id}]`), not {} {}",
                self.at(value.span().start),
                article(value.get_ref().type_str()),
                value.get_ref().type_str()
            ));
        };
        let known = known_fields();
        let mut fields = serde_json::Map::new();
        let mut spans = BTreeMap::new();
        for (name, v) in table.iter() {
            let name_str = name.get_ref().as_ref();
            let at = self.at(name.span().start);
            if name_str == "id" {
                // The table's key is the id; a repeated one must agree with it.
                if v.get_ref().as_str() != Some(id) {
                    return Err(format!(
                        "{at}: {entry}: field `id`: the table's key is the processor id; \
                         remove this field or make it {id:?}"
                    ));
                }
                continue;
            }
            let Some(nested) = known.get(name_str) else {
                return Err(format!(
                    "{at}: {entry}: field `{name_str}` is not a processor field (known: {})",
                    known.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            };
            if let (Some(nested), DeValue::Table(inner)) = (nested, v.get_ref()) {
                for (inner_name, _) in inner.iter() {
                    let inner_str = inner_name.get_ref().as_ref();
                    if !nested.contains(inner_str) {
                        return Err(format!(
                            "{}: {entry}: field `{name_str}.{inner_str}` is not a field of \
                             `{name_str}` (known: {})",
                            self.at(inner_name.span().start),
                            nested.iter().cloned().collect::<Vec<_>>().join(", ")
                        ));
                    }
                }
            }
            let json = to_json(v, &|span, why| {
                format!(
                    "{}: {entry}: field `{name_str}`: {why}",
                    self.at(span.start)
                )
            })?;
            fields.insert(name_str.to_string(), json);
            spans.insert(name_str.to_string(), name.span());
        }
        ProcessorSpec::from_fields(&pid, fields, pin).map_err(|e| match e {
            SpecError::Field {
                name: Some(name),
                message,
            } => {
                let at = spans
                    .get(&name)
                    .map_or_else(|| at_key.clone(), |s| self.at(s.start));
                format!("{at}: {entry}: field `{name}`: {message}")
            }
            SpecError::Field {
                name: None,
                message,
            } => format!("{at_key}: {entry}: {message}"),
            SpecError::Invalid(why) => {
                // Point at the field the message names (`restart.crash_loop_failures`), as
                // deep as the file spells it out; at the entry's key when it is not written.
                let at = field_named(&why)
                    .and_then(|path| deepest_span(table, &path))
                    .map_or_else(|| at_key.clone(), |s| self.at(s.start));
                format!("{at}: {entry}: {why}")
            }
        })
    }
}

/// `a` or `an` before a TOML type name.
fn article(type_str: &str) -> &'static str {
    if type_str.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// The field names a processor entry may have, each with the names its own table may have
/// when it is a table of fixed fields (`workload`, `resources`, `restart`); free-form values
/// (`config`, `workload.env`) are not looked into. Taken from the serialized defaults, so a
/// field added to [`ProcessorSpec`] is known here at once.
fn known_fields() -> &'static BTreeMap<String, Option<BTreeSet<String>>> {
    static KNOWN: OnceLock<BTreeMap<String, Option<BTreeSet<String>>>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        let mut known = BTreeMap::new();
        let defaults = ProcessorId::new("x")
            .ok()
            .map(ProcessorSpec::new)
            .and_then(|spec| serde_json::to_value(spec).ok());
        let Some(serde_json::Value::Object(fields)) = defaults else {
            return known;
        };
        for (name, value) in fields {
            if name == "id" {
                continue;
            }
            let nested = match value {
                serde_json::Value::Object(inner) => Some(inner.keys().cloned().collect()),
                _ => None,
            };
            known.insert(name, nested);
        }
        known
    })
}

/// The field path an error message names in backticks (``field `restart.backoff_max` ``).
fn field_named(message: &str) -> Option<Vec<String>> {
    let start = message.find("field `")? + "field `".len();
    let len = message[start..].find('`')?;
    Some(
        message[start..start + len]
            .split('.')
            .map(str::to_string)
            .collect(),
    )
}

/// The span of the deepest key along `path` that the table spells out.
fn deepest_span(table: &DeTable<'_>, path: &[String]) -> Option<Range<usize>> {
    let (first, rest) = path.split_first()?;
    let (key, value) = table
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == first.as_str())?;
    match value.get_ref() {
        DeValue::Table(inner) if !rest.is_empty() => {
            deepest_span(inner, rest).or_else(|| Some(key.span()))
        }
        _ => Some(key.span()),
    }
}

/// A TOML value as the JSON value serde reads a [`ProcessorSpec`] from. Datetimes become
/// strings (no spec field is a datetime; `config` passes them on as text).
fn to_json(
    value: &Spanned<DeValue<'_>>,
    error: &dyn Fn(Range<usize>, String) -> String,
) -> std::result::Result<serde_json::Value, String> {
    use serde_json::Value as J;
    Ok(match value.get_ref() {
        DeValue::String(s) => J::String(s.to_string()),
        DeValue::Integer(i) => {
            let n = i64::from_str_radix(i.as_str(), i.radix())
                .map_err(|e| error(value.span(), format!("integer {i}: {e}")))?;
            J::Number(n.into())
        }
        DeValue::Float(f) => {
            let x: f64 = f
                .as_str()
                .parse()
                .map_err(|e| error(value.span(), format!("float {f}: {e}")))?;
            J::Number(
                serde_json::Number::from_f64(x).ok_or_else(|| {
                    error(value.span(), format!("float {f} is not a finite number"))
                })?,
            )
        }
        DeValue::Boolean(b) => J::Bool(*b),
        DeValue::Datetime(d) => J::String(d.to_string()),
        DeValue::Array(items) => J::Array(
            items
                .iter()
                .map(|item| to_json(item, error))
                .collect::<std::result::Result<_, _>>()?,
        ),
        DeValue::Table(table) => {
            let mut map = serde_json::Map::new();
            for (k, v) in table.iter() {
                map.insert(k.get_ref().to_string(), to_json(v, error)?);
            }
            J::Object(map)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<DesiredState> {
        parse(Path::new("/etc/dory.toml"), text, &BTreeMap::new())
    }

    #[test]
    fn entries_parse_with_defaults_and_other_tables_are_ignored() {
        let text = r#"
[orchestrator]
name = "cli-owns-this"

[processors.counter]
site = "edge"
checkpoint_interval = 5000
workload = { command = ["counter", "--fast"], env = { RUST_LOG = "info" } }
config = { start = 1970-01-01T00:00:00Z, ratio = 0.5, tags = ["a", "b"] }

[processors.counter.restart]
mode = "always"

[processors.idle]
"#;
        let desired = parse_str(text).expect("parses");
        assert!(desired.invalid.is_empty(), "{:?}", desired.invalid);
        assert_eq!(desired.processors.len(), 2);
        let counter = &desired.processors[0];
        assert_eq!(counter.id.as_str(), "counter");
        assert_eq!(counter.site, dory_core::SitePreference::Edge);
        assert_eq!(counter.checkpoint_interval.as_millis(), 5000);
        assert_eq!(counter.workload.command, ["counter", "--fast"]);
        assert_eq!(counter.restart.mode, dory_core::RestartMode::Always);
        assert_eq!(counter.config["ratio"], serde_json::json!(0.5));
        assert_eq!(
            counter.config["start"],
            serde_json::json!("1970-01-01T00:00:00Z")
        );
        assert_eq!(desired.processors[1].id.as_str(), "idle");
    }

    #[test]
    fn bad_entries_name_file_line_column_and_field() {
        let text = "[processors.good]\n\
                    \n\
                    [processors.Bad_Id]\n\
                    \n\
                    [processors.bad-type]\n\
                    fallback = \"yes\"\n\
                    \n\
                    [processors.typo]\n\
                    checkpoint_intervall = 5\n\
                    \n\
                    [processors.zero]\n\
                    checkpoint_interval = 0\n\
                    \n\
                    [processors.loop]\n\
                    restart = { crash_loop_failures = 0 }\n\
                    \n\
                    [processors.nested]\n\
                    resources = { cpu_millis = -1, memory_mib = 1 }\n\
                    \n\
                    [processors]\n\
                    scalar = 3\n";
        let desired = parse_str(text).expect("bad entries never fail the list");
        assert_eq!(desired.processors.len(), 1, "{desired:?}");
        for (id, at, field) in [
            ("Bad_Id", "/etc/dory.toml:3:13", "field `id`"),
            ("bad-type", "/etc/dory.toml:6:1", "field `fallback`"),
            ("typo", "/etc/dory.toml:9:1", "field `checkpoint_intervall`"),
            ("zero", "/etc/dory.toml:12:1", "field `checkpoint_interval`"),
            (
                "loop",
                "/etc/dory.toml:15:13",
                "field `restart.crash_loop_failures`",
            ),
            ("nested", "/etc/dory.toml:18:1", "field `resources`"),
            ("scalar", "/etc/dory.toml:21:10", "must be a table"),
        ] {
            let entry = desired
                .invalid
                .iter()
                .find(|e| e.id == id)
                .unwrap_or_else(|| panic!("{id} is not reported: {:?}", desired.invalid));
            assert!(entry.error.starts_with(at), "{id}: {}", entry.error);
            assert!(entry.error.contains(field), "{id}: {}", entry.error);
            assert!(entry.error.contains(id), "{id}: {}", entry.error);
        }
    }

    #[test]
    fn a_file_that_is_not_toml_names_the_line() {
        let e = parse_str("[processors.a]\nsite = \n").unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        assert!(e.to_string().contains("/etc/dory.toml:2:"), "{e}");
        let e = parse_str("processors = 3\n").unwrap_err();
        assert!(e.to_string().contains("/etc/dory.toml:1:14"), "{e}");
        let e = parse_str("[[processors]]\nid = \"a\"\n").unwrap_err();
        assert!(e.to_string().contains("field `processors`"), "{e}");
    }

    #[test]
    fn pins_override_and_a_repeated_id_must_agree() {
        let pins = BTreeMap::from([("a".to_string(), NodeId::new("n2"))]);
        let text = "[processors.a]\npin = \"n1\"\nid = \"a\"\n[processors.b]\nid = \"c\"\n";
        let desired = parse(Path::new("f.toml"), text, &pins).expect("parses");
        assert_eq!(desired.processors[0].pin, Some(NodeId::new("n2")));
        assert_eq!(desired.invalid.len(), 1, "{desired:?}");
        assert!(desired.invalid[0].error.contains("field `id`"));
        let ids = listed(Path::new("f.toml"), text).expect("lists");
        assert_eq!(ids, BTreeSet::from(["a".to_string(), "b".to_string()]));
        assert!(parse_str("").expect("empty").processors.is_empty());
    }
}
