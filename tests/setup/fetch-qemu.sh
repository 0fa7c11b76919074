#!/usr/bin/env bash
# Fetches QEMU 10 from Debian's bookworm-backports suite and unpacks it into a cache, beside the
# system's QEMU (nothing is installed, the system's apt sources are left alone).
#
# Why: the live-migration tests need QEMU 8.0 or later. Under TCG, QEMU 7.2 (Debian 12's)
# corrupts the memory of a guest that receives network traffic while it migrates, whatever the
# backend: its own tap device does it too (wrong checksum of a received file, or a hung guest,
# on the destination). QEMU 10.0.2 from bookworm-backports migrates the same guest intact.
#
# Output directory: $1, else $VHOST_PUMP_QEMU_DIR, else ~/.cache/vhost-pump/qemu-backports. It
# ends up holding the unpacked packages (usr/bin/qemu-system-x86_64, usr/share/qemu,
# usr/share/seabios) and a stamp. Run the binary with `-L DIR/usr/share/qemu -L
# DIR/usr/share/seabios`; the shared libraries it needs are those of Debian 12's own QEMU.
#
# Prints nothing but errors, and as its last line the output directory.
set -euo pipefail

out_dir=${1:-${VHOST_PUMP_QEMU_DIR:-$HOME/.cache/vhost-pump/qemu-backports}}
suite=bookworm-backports
mirror=${VHOST_PUMP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
pkgs=(qemu-system-x86 qemu-system-data seabios)

die() { echo "fetch-qemu.sh: $*" >&2; exit 1; }

works() {
  [ -f "$out_dir/stamp" ] && "$out_dir/usr/bin/qemu-system-x86_64" --version >/dev/null 2>&1
}

mkdir -p "$out_dir"
exec 9>"$out_dir.lock"
flock 9
if works; then
  echo "$out_dir"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/debs"
echo "deb $mirror $suite main" >"$work/sources.list"
# A private package list: only the backports suite, in a scratch directory.
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::State::Lists=$work/lists" -o "Debug::NoLocking=1" -q)
if ! out=$(apt-get "${apt_opts[@]}" update 2>&1); then
  die "cannot read the $suite package list from $mirror: $out"
fi
chmod 777 "$work/debs"
for p in "${pkgs[@]}"; do
  if ! out=$(cd "$work/debs" && apt-get "${apt_opts[@]}" download "$p/$suite" 2>&1); then
    die "cannot download $p from $suite: $out"
  fi
done

rm -rf "$out_dir.new"
mkdir -p "$out_dir.new"
for deb in "$work"/debs/*.deb; do
  dpkg-deb -x "$deb" "$out_dir.new"
done
"$out_dir.new/usr/bin/qemu-system-x86_64" --version >/dev/null 2>&1 ||
  die "the unpacked QEMU does not run (missing shared libraries?): $(ldd "$out_dir.new/usr/bin/qemu-system-x86_64" | grep 'not found' || true)"
(cd "$work/debs" && ls) >"$out_dir.new/stamp"
rm -rf "$out_dir"
mv "$out_dir.new" "$out_dir"
echo "$out_dir"
