#!/usr/bin/env bash
# Runs the whole vhost-pump test suite on a fresh Debian/Ubuntu machine: installs the Debian
# packages the tests use (QEMU, DPDK's testpmd, iperf3, busybox, CNI plugins), builds the test
# guest (Debian cloud kernel + busybox initramfs, cached) and, where the system's QEMU is older
# than 8.0, unpacks QEMU 10 from bookworm-backports for the live-migration test (cached), then
# runs every test in release mode.
# Needs root (taps, network namespaces, QEMU); re-runs itself under sudo when started as a user.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E env "PATH=$PATH" "$0" "$@"
fi
export CI="${CI:-true}"   # the suite fails, rather than skips, what it cannot run
./tests/setup/install-deps.sh
./tests/setup/build-guest.sh >/dev/null
qemu_major=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p;q')
if [ "${qemu_major:-0}" -lt 8 ] && [ -z "${VHOST_PUMP_MIGRATION_QEMU:-}" ]; then
  ./tests/setup/fetch-qemu.sh >/dev/null
fi
cargo fmt --all -- --check
cargo clippy --workspace --release --all-targets -- -D warnings
cargo test --workspace --release "$@"
# Fuzz the descriptor-chain data path and the vhost-user relay for a bounded time (ASan).
FUZZ_SECONDS="${FUZZ_SECONDS:-20}" ./tests/setup/fuzz.sh
