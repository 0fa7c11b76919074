#!/usr/bin/env bash
# Runs the whole vhost-pump test suite on a fresh Debian/Ubuntu machine: installs the Debian
# packages the tests use (QEMU, DPDK's testpmd, iperf3, busybox, CNI plugins), builds the test
# guest (Debian cloud kernel + busybox initramfs, cached), then runs every test in release mode.
# Needs root (taps, network namespaces, QEMU); re-runs itself under sudo when started as a user.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E env "PATH=$PATH" "$0" "$@"
fi
export CI="${CI:-true}"   # the suite fails, rather than skips, what it cannot run
./tests/setup/install-deps.sh
./tests/setup/build-guest.sh >/dev/null
cargo fmt --all -- --check
cargo clippy --workspace --release --all-targets -- -D warnings
cargo test --workspace --release "$@"
# Fuzz the descriptor-chain data path and the vhost-user relay for a bounded time (ASan).
FUZZ_SECONDS="${FUZZ_SECONDS:-20}" ./tests/setup/fuzz.sh
