#!/usr/bin/env bash
# Installs what building and testing migfs needs on a fresh Debian machine
# (as root): fuse3, gcc, python3, fio from Debian; pjdfstest and fsx from
# crates.io. Safe to run again: it skips what is already there.
set -euo pipefail

need_apt=()
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
command -v gcc >/dev/null || need_apt+=(gcc)
command -v python3 >/dev/null || need_apt+=(python3)
command -v fio >/dev/null || need_apt+=(fio)
command -v unshare >/dev/null || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} from Debian" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

export PATH="$HOME/.cargo/bin:$PATH"
need_cargo=()
command -v pjdfstest >/dev/null || need_cargo+=(pjdfstest)
command -v fsx >/dev/null || need_cargo+=(fsx)
if [ ${#need_cargo[@]} -gt 0 ]; then
  echo "setup: cargo install ${need_cargo[*]}" >&2
  cargo install --locked --quiet "${need_cargo[@]}"
fi

[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
[ -e /dev/fuse ] || { echo "setup: /dev/fuse is missing: this machine cannot mount FUSE filesystems" >&2; exit 1; }
