//! Reading a SQL state store's columns back into Dory's types.
//!
//! SQL databases keep epochs, sequences, sizes and times in signed 64-bit integer columns;
//! every SQL-backed store reads them back the same way, with the same checks and messages,
//! so the conversions live here rather than in each backend. The row conversions built on them
//! sit beside the types they build: [`Ownership::from_columns`](crate::Ownership::from_columns),
//! [`OwnershipRules::from_columns`](crate::ownership::OwnershipRules::from_columns),
//! [`SnapshotMeta::from_columns`](crate::SnapshotMeta::from_columns) and
//! [`StoredSnapshot::from_columns`](crate::StoredSnapshot::from_columns).

use crate::error::{Error, Result};
use crate::model::{Epoch, Sequence, Timestamp};

/// A number read from an integer column that holds an epoch, a sequence or a size, which is
/// never negative: a negative one was written by something other than Dory, an
/// [`Error::Invalid`] naming `what`.
pub fn count(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::invalid(format!("{what}: negative value {v} stored")))
}

/// A stored time in milliseconds since the Unix epoch.
pub fn timestamp(ms: i64) -> Timestamp {
    // A time before 1970 cannot come from a store's clock.
    Timestamp(u64::try_from(ms).unwrap_or(0))
}

/// The committed checkpoint from its two columns, which are set together: `None` unless both
/// are.
pub fn committed(
    epoch: Option<i64>,
    sequence: Option<i64>,
    what: &str,
) -> Result<Option<(Epoch, Sequence)>> {
    match (epoch, sequence) {
        (Some(e), Some(s)) => Ok(Some((Epoch(count(e, what)?), Sequence(count(s, what)?)))),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_counts_are_invalid_and_times_clamp() {
        assert_eq!(count(7, "x").unwrap(), 7);
        let e = count(-1, "row of p").unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        assert!(e.to_string().contains("row of p"), "{e}");
        assert_eq!(timestamp(-5), Timestamp(0));
        assert_eq!(committed(Some(2), None, "x").unwrap(), None);
        assert_eq!(
            committed(Some(2), Some(3), "x").unwrap(),
            Some((Epoch(2), Sequence(3)))
        );
    }
}
