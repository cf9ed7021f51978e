//! In-memory backends (placeholder).
