#!/usr/bin/env bash
# The test command: installs what the tests need, builds, and runs every
# test of the workspace (unit, integration and end-to-end on a real local
# cluster). Needs root, /dev/fuse, ptrace and userfaultfd; with
# MIGFS_REQUIRE_PRIV=1 (set here) a missing one is a failure, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
export MIGFS_REQUIRE_PRIV=1
cargo build --workspace --bins
# End-to-end tests each start a cluster; two at a time fit a 2-core machine.
cargo test --workspace -- --test-threads=2
