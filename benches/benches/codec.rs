//! codec benchmark (to be written).
fn main() {}
