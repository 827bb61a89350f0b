//! Helpers shared by the filesystem end-to-end tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Output;

pub use migfs_e2e::harness::{Cluster, require_priv};

/// Compiles `tests/progs/<name>.c` once per test binary; returns the binary.
pub fn c_prog(name: &str) -> PathBuf {
    migfs_e2e::progs::prog(name, false)
}

/// Stdout and stderr of a finished command, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `sh -c script` inside `node`; panics with the output unless it succeeds.
pub fn sh(c: &Cluster, node: &str, script: &str) -> String {
    let o = c.exec(node, &["sh", "-c", script]);
    assert!(o.status.success(), "on {node}: {script}\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Polls `cond` every 5 ms for up to `ms` milliseconds.
pub fn within(ms: u64, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_millis(ms);
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() > end {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
