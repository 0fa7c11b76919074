#!/usr/bin/env bash
# Builds the minimal Linux guest used by the VM tests and caches it.
#
# Output directory: $1, else $VHOST_PUMP_GUEST_DIR, else ~/.cache/vhost-pump/guest. It ends up
# holding:
#   vmlinuz            Debian's cloud kernel (the package linux-image-cloud-amd64 points at)
#   initramfs.cpio.gz  busybox + iperf3 + ethtool + the virtio-net modules + /init
#   kernel-version     the kernel package that was used
#   stamp              cache key; the guest is rebuilt when it no longer matches
#
# Prints nothing but errors, and as its last line the output directory.
#
# The cache key covers this script and the versions of the host packages copied into the
# initramfs, so the warm path needs neither the network nor the apt lists. The kernel is fetched
# once per key; set VHOST_PUMP_GUEST_REBUILD=1 to force a rebuild (picks up a newer kernel), or
# VHOST_PUMP_GUEST_KERNEL_PKG=linux-image-<version>-cloud-amd64 to pin a kernel package.
#
# Needs root (mknod of /dev/console) and the packages of install-deps.sh (busybox-static,
# iperf3, ethtool, cpio) plus what every Debian system has (apt, dpkg, gzip, flock).
#
# The guest's /init understands these kernel command line parameters:
#   vp.ip=ADDR/PREFIX  address for eth0        vp.gw=ADDR   default gateway
#   vp.mtu=N           MTU for eth0            vp.queues=N  `ethtool -L eth0 combined N` if N > 1
# It prints `VP-READY` on the console once eth0 is up (`VP-ERROR: ...` if it cannot get there),
# then runs a root shell on the console (use console=ttyS0).
set -euo pipefail

out_dir=${1:-${VHOST_PUMP_GUEST_DIR:-$HOME/.cache/vhost-pump/guest}}
script_path=$(readlink -f "${BASH_SOURCE[0]}")

# Virtio-net and its dependencies, in load order (Debian builds them as modules).
modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         failover net_failover virtio_net)
# Host binaries copied into the guest together with their shared libraries.
binaries=(/usr/bin/iperf3 /usr/sbin/ethtool)

die() { echo "build-guest.sh: $*" >&2; exit 1; }

# Runs a command quietly; shows its output only if it fails.
quiet() {
  local log
  log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    die "failed: $*"
  fi
  rm -f "$log"
}

# ---------------------------------------------------------------------------------------------
# Cache check (under a lock, so parallel test binaries build the guest only once).

mkdir -p "$out_dir"
out_dir=$(readlink -f "$out_dir")
exec 9>"$out_dir/.lock"
flock 9

host_pkgs=$(dpkg-query -W -f='${Package}=${Version}\n' busybox-static iperf3 ethtool libc6 \
  2>/dev/null) || die "missing packages; run tests/setup/install-deps.sh"
key=$( { sha256sum "$script_path" | cut -d' ' -f1; echo "$host_pkgs";
         echo "kernel-pin=${VHOST_PUMP_GUEST_KERNEL_PKG:-}"; } | sha256sum | cut -d' ' -f1)

if [ "${VHOST_PUMP_GUEST_REBUILD:-0}" != 1 ] && [ -s "$out_dir/vmlinuz" ] &&
   [ -s "$out_dir/initramfs.cpio.gz" ] && [ "$(cat "$out_dir/stamp" 2>/dev/null)" = "$key" ]; then
  echo "$out_dir"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (the initramfs needs a /dev/console node)"
for tool in busybox cpio gzip apt-get dpkg-deb ldd; do
  command -v "$tool" >/dev/null || die "$tool not found; run tests/setup/install-deps.sh"
done
for bin in "${binaries[@]}"; do
  [ -x "$bin" ] || die "$bin not found; run tests/setup/install-deps.sh"
done

work=$(mktemp -d "$out_dir/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# ---------------------------------------------------------------------------------------------
# Kernel: download the versioned image package that the metapackage depends on.

# Prints the versioned kernel package behind linux-image-cloud-amd64 (empty if apt knows none).
kernel_pkg_name() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1 || true
}

kpkg=${VHOST_PUMP_GUEST_KERNEL_PKG:-$(kernel_pkg_name)}
if [ -z "$kpkg" ]; then
  # A fresh machine may have empty apt lists.
  quiet env DEBIAN_FRONTEND=noninteractive apt-get update -q
  kpkg=$(kernel_pkg_name)
fi
[ -n "$kpkg" ] || die "apt knows no linux-image-cloud-amd64 dependency"

mkdir -p "$work/deb" "$work/kernel"
# apt drops privileges to _apt for downloads; let it write into the directory.
if getent passwd _apt >/dev/null; then chown _apt "$work/deb"; fi
(cd "$work/deb" && quiet apt-get download -q "$kpkg")
deb=$(ls "$work/deb"/*.deb 2>/dev/null | head -n1 || true)
[ -n "$deb" ] || die "apt-get download $kpkg produced no .deb"
quiet dpkg-deb -x "$deb" "$work/kernel"

vmlinuz=$(ls "$work/kernel"/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
[ -n "$vmlinuz" ] || die "no boot/vmlinuz-* in $kpkg"
moddir=$(ls -d "$work/kernel"/lib/modules/* "$work/kernel"/usr/lib/modules/* 2>/dev/null |
         head -n1 || true)
[ -n "$moddir" ] || die "no lib/modules/<version> in $kpkg"

# ---------------------------------------------------------------------------------------------
# Initramfs tree.

root=$work/root
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,root,lib/modules}
chmod 1777 "$root/tmp"

# The kernel opens /dev/console before /init runs; without the node, init has no stdio.
mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3

# busybox: one static binary, every applet as a symlink to it.
cp "$(command -v busybox)" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

# Dynamic binaries: copy each one and every library ldd resolves, at the same paths as on the
# host (the loader finds them in its default directories; no ld.so.cache needed).
copy_with_libs() {
  local bin=$1 lib
  mkdir -p "$root$(dirname "$bin")"
  cp -L "$bin" "$root$bin"
  # ldd lines look like "libx.so.1 => /path/libx.so.1 (0x...)" or "/lib64/ld-linux... (0x...)".
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    [ -e "$root$lib" ] && continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}
for bin in "${binaries[@]}"; do copy_with_libs "$bin"; done

# Kernel modules, flattened into /lib/modules/<name>.ko and decompressed if needed.
for mod in "${modules[@]}"; do
  # Module file names may use '-' where the module name has '_'.
  pattern="$(echo "$mod" | sed 's/_/[-_]/g').ko*"
  src=$(find "$moddir" -name "$pattern" -print | head -n1)
  if [ -z "$src" ]; then
    # Built into this kernel: nothing to load.
    if grep -Eq "/$(echo "$mod" | sed 's/_/[-_]/g')\.ko\$" "$moddir/modules.builtin" 2>/dev/null
    then continue; fi
    die "module $mod not found in $kpkg"
  fi
  dst=$root/lib/modules/$mod.ko
  case "$src" in
    *.ko)     cp "$src" "$dst" ;;
    *.ko.xz)  "$root/bin/busybox" xzcat "$src" >"$dst" ;;
    *.ko.gz)  gzip -dc "$src" >"$dst" ;;
    *.ko.zst) command -v zstd >/dev/null || die "$src needs zstd (apt-get install zstd)"
              zstd -qdc "$src" >"$dst" ;;
    *)        die "unexpected module file $src" ;;
  esac
done

cat >"$root/init" <<'INIT'
#!/bin/sh
# /init of the vhost-pump test guest (generated by tests/setup/build-guest.sh).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
# Keep kernel messages off the console: tests parse what the shell prints there.
dmesg -n 1

# Problems are collected and reported on the console just before the shell starts.
errors=
fail() { errors="$errors $*;"; }

# Modules in dependency order (no modules.dep here, so insmod, not modprobe).
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
         failover net_failover virtio_net; do
  [ -e "/lib/modules/$m.ko" ] || continue   # built into the kernel
  insmod "/lib/modules/$m.ko" || fail "insmod $m"
done

# vp.* parameters from the kernel command line.
ip_addr= gw= mtu= queues=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    vp.ip=*)     ip_addr=${arg#vp.ip=} ;;
    vp.gw=*)     gw=${arg#vp.gw=} ;;
    vp.mtu=*)    mtu=${arg#vp.mtu=} ;;
    vp.queues=*) queues=${arg#vp.queues=} ;;
  esac
done

ip link set lo up

# virtio_net probes asynchronously after insmod: give eth0 a moment to appear.
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do usleep 50000; n=$((n + 1)); done

if [ ! -e /sys/class/net/eth0 ]; then
  fail "no eth0"
else
  [ -n "$mtu" ] && { ip link set eth0 mtu "$mtu" || fail "mtu $mtu"; }
  if [ -n "$queues" ] && [ "$queues" -gt 1 ]; then
    ethtool -L eth0 combined "$queues" || fail "ethtool -L eth0 combined $queues"
  fi
  [ -n "$ip_addr" ] && { ip addr add "$ip_addr" dev eth0 || fail "ip addr $ip_addr"; }
  ip link set eth0 up || fail "link up"
  [ -n "$gw" ] && { ip route add default via "$gw" || fail "gateway $gw"; }
  # operstate is "up" once the carrier is on ("unknown" when the device has no link status).
  n=0
  while [ $n -lt 200 ]; do
    state=$(cat /sys/class/net/eth0/operstate)
    [ "$state" = up ] || [ "$state" = unknown ] && break
    usleep 50000; n=$((n + 1))
  done
  [ "$state" = up ] || [ "$state" = unknown ] || fail "eth0 operstate $state"
fi

# A wide terminal keeps busybox's line editor from wrapping (and redrawing) long typed commands.
stty cols 1000 rows 50 2>/dev/null

# The marker comes last, so that whatever a test types after it goes to the shell.
if [ -z "$errors" ]; then echo VP-READY; else echo "VP-ERROR:$errors"; fi

# Interactive root shell on the console, with the console as controlling tty (job control).
export PS1='vp# '
while true; do
  setsid cttyhack sh
done
INIT
chmod 755 "$root/init"

(cd "$root" && find . -print | LC_ALL=C sort |
   cpio --quiet -o -H newc -R 0:0 | gzip -6 >"$work/initramfs.cpio.gz")

# ---------------------------------------------------------------------------------------------
# Publish: files first, stamp last, so an interrupted build is never taken as complete.

rm -f "$out_dir/stamp"
cp "$vmlinuz" "$work/vmlinuz"
echo "$kpkg" >"$work/kernel-version"
for f in vmlinuz initramfs.cpio.gz kernel-version; do mv -f "$work/$f" "$out_dir/$f"; done
echo "$key" >"$out_dir/stamp"

echo "$out_dir"
