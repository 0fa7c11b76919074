#!/usr/bin/env bash
# Installs the Debian packages the test suite and the lab need on a fresh Debian 12 / Ubuntu machine.
# Idempotent: packages already present are skipped quickly.
set -euo pipefail
pkgs=(qemu-system-x86 busybox-static iperf3 dpdk-dev containernetworking-plugins ethtool iproute2 cpio kmod procps
      libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
