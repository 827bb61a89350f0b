#!/usr/bin/env bash
# See migfs work in one command (as root, with /dev/fuse): builds the
# `migfs` binary, starts a 2-node cluster on this machine, writes a file on
# n1 and reads it back on n2, then moves a running counter process from n1
# to n2 with its open file intact (`migfs move`, lazy memory), and
# tears everything down on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "demo: run me as root (namespaces, mounts, /dev/fuse)" >&2; exit 1; }
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
[ -e /dev/fuse ] || { echo "demo: /dev/fuse is missing: this machine cannot mount FUSE filesystems" >&2; exit 1; }
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || { echo "demo: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }

if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }

step "building migfs"
cargo build --bin migfs
migfs="$(realpath "${CARGO_TARGET_DIR:-target}/debug/migfs")"

dir="$(mktemp -d /tmp/migfs-demo.XXXXXX)"
cleanup() {
  step "tearing down"
  "$migfs" cluster --dir "$dir" down || true
  rm -rf "$dir"
}
trap cleanup EXIT
cluster() { "$migfs" cluster --dir "$dir" "$@"; }

step "starting a metadata server and 2 nodes (each in its own namespaces)"
cluster up --nodes 2

step "n1 writes /migfs/hello.txt"
cluster exec n1 -- sh -c 'echo "hello from $(hostname), pid $$ in its namespace" > /migfs/hello.txt'
printf 'n1 wrote: %s\n' "$(cluster exec n1 -- cat /migfs/hello.txt)"

step "n2 reads it back"
printf 'n2 reads: %s\n' "$(cluster exec n2 -- cat /migfs/hello.txt)"
printf 'host sees it at %s\n' "$(cluster path n2 hello.txt)"

step "n1 starts a counter that appends to /migfs/counter.txt through an open descriptor"
pid=$(cluster exec --detach n1 -- python3 -c '
import time
f = open("/migfs/counter.txt", "a", buffering=1)
i = 0
while True:
    i += 1
    f.write(f"{i}\n")
    time.sleep(0.05)
')
sleep 1
printf 'counter runs on n1 as pid %s; last line: %s\n' "$pid" "$(tail -1 "$(cluster path n1 counter.txt)")"

step "move it live: migfs-move on n1 (memory follows by copy-on-reference)"
cluster exec n1 -- "$migfs" checkpoint --check "$pid"
cluster exec n1 -- "$migfs" move "$pid" n2
newpid=$(cluster exec n2 -- "$migfs" ps --json | python3 -c 'import json,sys; print([t["pid"] for t in json.load(sys.stdin) if t["node"] == "n2"][0])')
cluster exec n2 -- "$migfs" ps
sleep 1
printf 'counter now runs on n2 as pid %s, its descriptor 3: %s\n' "$newpid" \
  "$(cluster exec n2 -- readlink "/proc/$newpid/fd/3")"
python3 - "$(cluster path n2 counter.txt)" <<'PY'
import sys
n = [int(x) for x in open(sys.argv[1])]
breaks = [i for i in range(1, len(n)) if n[i] != n[i - 1] + 1]
print(f"{len(n)} lines, counting 1..{n[-1]}: " + ("no gap, no duplicate" if not breaks else f"BROKEN at {breaks[:5]}"))
sys.exit(1 if breaks else 0)
PY
cluster exec n2 -- kill "$newpid"

step "status"
cluster status
