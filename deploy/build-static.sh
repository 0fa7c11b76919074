#!/bin/sh
# Builds vhost-pump and vhost-pump-cni with glibc linked in statically, then refuses to
# finish unless both binaries really are static, so that they run on nodes whose glibc is
# older than the build machine's (a dynamically linked binary asks for the GLIBC_2.xx symbol
# versions of the machine it was built on and fails to start elsewhere).
#
#   deploy/build-static.sh                 build, then check; prints where the binaries are
#   deploy/build-static.sh --check FILE..  only check existing binaries
#
# Honours CARGO_TARGET_DIR (default: ./target) and TARGET (default: x86_64-unknown-linux-gnu).
# Run it from anywhere; it builds the workspace it lives in. Used by deploy/kubernetes/Dockerfile.
set -eu

TARGET=${TARGET:-x86_64-unknown-linux-gnu}
BINS="vhost-pump vhost-pump-cni"

# Prints one line per binary and returns non-zero if any of them would load shared libraries.
check() {
    bad=0
    for bin in "$@"; do
        if [ ! -f "$bin" ]; then
            echo "FAIL $bin: no such file"
            bad=1
            continue
        fi
        why=""
        # An ELF with an interpreter (PT_INTERP) is started by the dynamic loader.
        if readelf -lW "$bin" | grep -q 'Requesting program interpreter'; then
            why="$why; has a program interpreter"
        fi
        needed=$(readelf -dW "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
        if [ -n "$needed" ]; then
            why="$why; needs shared libraries: $needed"
        fi
        versions=$(objdump -T "$bin" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tr '\n' ' ' || true)
        if [ -n "$versions" ]; then
            why="$why; imports glibc symbol versions: $versions"
        fi
        if command -v file >/dev/null 2>&1; then
            kind=$(file -b "$bin")
            case "$kind" in
                *"statically linked"* | *"static-pie linked"*) ;;
                *) why="$why; file(1) says: $kind" ;;
            esac
        else
            kind="(file(1) not installed)"
        fi
        if [ -n "$why" ]; then
            echo "FAIL $bin${why}"
            bad=1
        else
            echo "ok   $bin: no interpreter, no NEEDED entries, no GLIBC_ symbol versions; file(1): ${kind%%,*}, $(echo "$kind" | grep -o 'static[a-z-]* linked')"
        fi
    done
    return $bad
}

if [ "${1:-}" = "--check" ]; then
    shift
    [ $# -gt 0 ] || { echo "usage: $0 --check FILE..." >&2; exit 2; }
    check "$@"
    exit
fi

cd "$(dirname "$0")/.."
out=${CARGO_TARGET_DIR:-target}/$TARGET/release

# crt-static on a -gnu target links glibc's libc.a into the executable. The programs never
# resolve user or host names through glibc's NSS (the plugin reads /etc/passwd and
# /etc/group itself; vhost-pump takes numeric ids and addresses from it), which is the one
# thing a static glibc cannot do reliably on another machine.
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
    cargo build --release --locked --target "$TARGET" --bin vhost-pump --bin vhost-pump-cni

set --
for b in $BINS; do
    set -- "$@" "$out/$b"
done
check "$@"
echo "static binaries in $out"
