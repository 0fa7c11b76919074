#!/usr/bin/env bash
# Fuzzes the data path and the vhost-user relay for a bounded time.
#
#   tests/setup/fuzz.sh [TARGET...]        (default: every target of vhost-net-backend/fuzz)
#
# Environment: FUZZ_SECONDS (default 30) per target; FUZZ_TIMEOUT (default 10) seconds before one
# input counts as a hang.
#
# Steps: install cargo-fuzz if missing; replay the regression inputs with plain `cargo test` of
# the fuzz crate; then run each target under AddressSanitizer (cargo-fuzz's default), starting
# from its corpus (vhost-net-backend/fuzz/corpus/TARGET, kept between runs, not committed) and
# the committed regression inputs. Exits non-zero on any finding; the crashing input is under
# vhost-net-backend/fuzz/artifacts/TARGET/ (minimize it with `cargo fuzz tmin`, then add it to
# vhost-net-backend/fuzz/regressions/TARGET/).
#
# cargo-fuzz passes nightly-only flags (-Zsanitizer=address, ...). Only a stable toolchain is
# installed here, so RUSTC_BOOTSTRAP=1 lets the stable compiler accept them.
set -euo pipefail

cd "$(dirname "$0")/../.."
FUZZ_DIR=vhost-net-backend/fuzz
FUZZ_SECONDS=${FUZZ_SECONDS:-30}
FUZZ_TIMEOUT=${FUZZ_TIMEOUT:-10}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list --fuzz-dir "$FUZZ_DIR")
fi

echo "fuzz.sh: replaying regression inputs (cargo test)"
cargo test --manifest-path "$FUZZ_DIR/Cargo.toml"

echo "fuzz.sh: building ${targets[*]} with AddressSanitizer"
for t in "${targets[@]}"; do
    cargo fuzz build --fuzz-dir "$FUZZ_DIR" "$t"
done

summary=()
status=0
for t in "${targets[@]}"; do
    corpus="$FUZZ_DIR/corpus/$t"
    seeds="$FUZZ_DIR/regressions/$t"
    mkdir -p "$corpus"
    log=$(mktemp)
    echo "fuzz.sh: $t for ${FUZZ_SECONDS}s"
    if cargo fuzz run --fuzz-dir "$FUZZ_DIR" "$t" "$corpus" "$seeds" -- \
        -max_total_time="$FUZZ_SECONDS" -timeout="$FUZZ_TIMEOUT" -rss_limit_mb=4096 \
        -print_final_stats=1 >"$log" 2>&1; then
        done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
        summary+=("$t: ok; ${done_line:-no DONE line}")
    else
        status=1
        tail -n 60 "$log"
        summary+=("$t: FINDING (see $FUZZ_DIR/artifacts/$t/)")
    fi
    rm -f "$log"
done

echo "fuzz.sh: summary"
printf '  %s\n' "${summary[@]}"
exit "$status"
