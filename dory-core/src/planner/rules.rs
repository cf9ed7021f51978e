//! The planning rules.

use super::{Observed, Plan, PlannerConfig};
use crate::model::{DesiredState, Timestamp};

/// Plans the next actions. Pure: the same inputs give the same plan.
pub fn plan(
    _desired: &DesiredState,
    _observed: &Observed,
    _now: Timestamp,
    _config: &PlannerConfig,
) -> Plan {
    Plan::default()
}
