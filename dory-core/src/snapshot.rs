//! The snapshot codec (to be written).
