//! Correctness suites written by others, run on a migfs mount inside a
//! node of a real cluster: pjdfstest (POSIX conformance) and fsx (the file
//! system exerciser). Both come from crates.io (`cargo install pjdfstest
//! fsx`; scripts/setup.sh does it).

mod common;
use common::*;

use std::collections::BTreeSet;
use std::path::Path;

fn tool(name: &str) -> String {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = Path::new(&home).join(".cargo/bin").join(name);
    assert!(
        p.exists(),
        "{name} is not installed: run `cargo install {name}` (scripts/setup.sh does)"
    );
    p.to_string_lossy().into_owned()
}

#[test]
fn pjdfstest_passes_on_migfs() {
    if !require_priv() {
        return;
    }
    let pjd = tool("pjdfstest");
    let c = Cluster::up(2);
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("pjdfstest.toml");
    sh(&c, "n1", "mkdir -p /migfs/pjd");
    let o = c.exec(
        "n1",
        &[&pjd, "-c", cfg.to_str().unwrap(), "-p", "/migfs/pjd"],
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let summary = out
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or_else(|| panic!("no summary:\n{}", text(&o)));
    println!("pjdfstest on migfs: {summary}");
    let failed: BTreeSet<&str> = out
        .lines()
        .filter(|l| l.trim_end().ends_with("FAILED") || l.contains(" failed"))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.contains("::"))
        .collect();
    let known_text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("pjdfstest-known-failures.txt"),
    )
    .unwrap();
    let known: BTreeSet<&str> = known_text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let new: Vec<_> = failed.difference(&known).collect();
    let fixed: Vec<_> = known.difference(&failed).collect();
    if !fixed.is_empty() {
        println!("known failures that now pass (remove them from the list): {fixed:?}");
    }
    assert!(
        new.is_empty(),
        "pjdfstest failures not documented as known: {new:?}\n{summary}\n{}",
        text(&o)
    );
}

#[test]
fn fsx_100k_operations_without_failure() {
    if !require_priv() {
        return;
    }
    let fsx = tool("fsx");
    let c = Cluster::up(2);
    sh(&c, "n1", "mkdir -p /migfs/fsx");
    let artifacts = tempfile::tempdir().unwrap();
    let o = c.exec(
        "n1",
        &[
            &fsx,
            "-N",
            "100000",
            "-S",
            "4242",
            "-P",
            artifacts.path().to_str().unwrap(),
            "/migfs/fsx/file",
        ],
    );
    assert!(o.status.success(), "fsx failed:\n{}", text(&o));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        all.contains("All operations completed A-OK"),
        "fsx did not finish cleanly:\n{}",
        text(&o)
    );
}
