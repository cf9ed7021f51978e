//! The [`ConfigSource`] intent checks.
//!
//! Writing processors into a config source is backend specific (a SQL row, a TOML file), so
//! only the part every source shares is checked here: operator intents recorded through the
//! trait show up in the desired state and nudge subscribers.

use super::{PATIENCE, patiently, unique_name};
use crate::backend::{ConfigSource, Intent};
use crate::changes::Changes;
use crate::model::{NodeId, ProcessorId};

/// Runs the intent checks against `source`:
///
/// - a cordon shows up in [`DesiredState::cordoned`](crate::DesiredState::cordoned) (once,
///   however often it is recorded) and an uncordon removes it;
/// - when `pinnable` names a processor that is in the source's desired state, a pin sets its
///   `spec.pin` and an unpin clears it;
/// - every recorded intent nudges a subscription taken before it (within
///   [`PATIENCE`]).
///
/// For backends that keep cordons of their own (Kubernetes) and do not accept cordon intents,
/// this suite does not apply.
pub async fn config_intent_suite(source: &dyn ConfigSource, pinnable: Option<&ProcessorId>) {
    let node = NodeId::new(unique_name("cordon"));
    let mut changes = source.changes();
    for _ in 0..2 {
        record(source, &mut changes, Intent::Cordon { node: node.clone() }).await;
        let desired = source
            .desired()
            .await
            .unwrap_or_else(|e| panic!("config: desired: {e}"));
        assert!(
            desired.cordoned.contains(&node),
            "config: cordoned must contain {node} after a cordon intent"
        );
    }
    record(
        source,
        &mut changes,
        Intent::Uncordon { node: node.clone() },
    )
    .await;
    let desired = source
        .desired()
        .await
        .unwrap_or_else(|e| panic!("config: desired: {e}"));
    assert!(
        !desired.cordoned.contains(&node),
        "config: {node} must not be cordoned after an uncordon intent"
    );

    let Some(processor) = pinnable else { return };
    for pin in [Some(node.clone()), None] {
        record(
            source,
            &mut changes,
            Intent::Pin {
                processor: processor.clone(),
                node: pin.clone(),
            },
        )
        .await;
        let desired = source
            .desired()
            .await
            .unwrap_or_else(|e| panic!("config: desired: {e}"));
        let spec = desired
            .processors
            .iter()
            .find(|s| &s.id == processor)
            .unwrap_or_else(|| panic!("config: {processor} is not in the desired state; pass a processor the source holds"));
        assert_eq!(
            spec.pin, pin,
            "config: {processor}: spec.pin after a pin intent"
        );
    }
}

async fn record(source: &dyn ConfigSource, changes: &mut Changes, intent: Intent) {
    source
        .record_intent(&intent)
        .await
        .unwrap_or_else(|e| panic!("config: record {intent:?}: {e}"));
    let what = format!("config: a change nudge after recording {intent:?} (waited {PATIENCE:?})");
    patiently(&what, changes.changed()).await;
}
