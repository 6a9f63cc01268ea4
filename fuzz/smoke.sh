#!/usr/bin/env bash
# Fuzz smoke test: run every cargo-fuzz target for N seconds (default 20).
#
#   fuzz/smoke.sh [SECONDS]
#
# Needs a nightly toolchain. Without one it says so loudly and exits 0, so it can sit in CI
# on machines that only have stable.
set -euo pipefail

secs="${1:-20}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -eq 0 ]; then
    echo "usage: $0 [SECONDS]  (a positive whole number, default 20)" >&2
    exit 2
fi

cd "$(dirname "${BASH_SOURCE[0]}")"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "##################################################" >&2
    echo "### fuzz smoke SKIPPED: no nightly toolchain   ###" >&2
    echo "##################################################" >&2
    exit 0
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz not found; installing it (cargo install cargo-fuzz --locked)" >&2
    cargo install cargo-fuzz --locked
fi

mapfile -t targets < <(cargo +nightly fuzz list)
if [ "${#targets[@]}" -eq 0 ]; then
    echo "fuzz smoke: no targets found" >&2
    exit 1
fi

for target in "${targets[@]}"; do
    echo "=== fuzz smoke: $target for ${secs}s ==="
    cargo +nightly fuzz run "$target" -- -max_total_time="$secs"
done
echo "=== fuzz smoke: ${#targets[@]} target(s) passed ==="
