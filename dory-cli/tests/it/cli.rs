//! The command line: help, config errors and exit codes.

use crate::support::dory;

const NODES: &str =
    "[placement]\nkind = \"local\"\n[[placement.nodes]]\nid = \"n1\"\nsite = \"cloud\"\n";

#[test]
fn help_lists_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, _) = dory(&["--help"], dir.path());
    assert_eq!(code, 0);
    for command in [
        "orchestrator",
        "status",
        "nodes",
        "drain",
        "uncordon",
        "move",
        "snapshots",
        "validate",
        "sim",
        "output",
        "node",
    ] {
        assert!(out.contains(command), "{command} missing from:\n{out}");
    }
    assert!(
        !out.contains("supervise"),
        "the supervisor is internal:\n{out}"
    );
    let (code, _, err) = dory(&["drain"], dir.path());
    assert_eq!(code, 2, "{err}");
}

#[test]
fn validate_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dory.toml");
    std::fs::write(&path, format!("{NODES}colour = \"red\"\n")).unwrap();
    let (code, _, err) = dory(&["validate", "dory.toml"], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("dory.toml") && err.contains("line 6") && err.contains("colour"),
        "{err}"
    );

    std::fs::write(
        &path,
        format!("{NODES}[processors.good]\nsite = \"cloud\"\n[processors.bad]\nsite = \"moon\"\n"),
    )
    .unwrap();
    let (code, out, err) = dory(&["validate", "dory.toml"], dir.path());
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("1 processor(s) valid"), "{out}");
    assert!(
        out.contains("bad") && out.contains("site") && out.contains("dory.toml:9"),
        "{out}"
    );

    std::fs::write(
        &path,
        format!("{NODES}[processors.good]\nsite = \"cloud\"\n"),
    )
    .unwrap();
    let (code, out, err) = dory(&["validate"], dir.path());
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn an_unreachable_store_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("dory.toml"),
        format!(
            "[orchestrator]\ncall_timeout = \"2s\"\n[store]\nkind = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:1/none\"\n{NODES}"
        ),
    )
    .unwrap();
    let (code, _, err) = dory(&["status"], dir.path());
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("postgres"), "{err}");
}

#[test]
fn sim_runs_the_simulator() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = dory(&["sim", "--seed", "7", "--steps", "200"], dir.path());
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("trace-hash:"), "{out}");
}
