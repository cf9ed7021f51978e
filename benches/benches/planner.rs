//! planner benchmark (to be written).
fn main() {}
