#!/usr/bin/env bash
# Cell-to-cell through a cellmesh relay beside NATS with TLS, on this machine, in one run:
# the two harnesses alternate, three rounds, so both see the same machine state.
#
#   bench/compare.sh [seconds-per-size]
#
# cellmesh: crates/cellmesh/examples/relay_bench.rs (one publisher cell, one relay, one
# subscriber cell; sealed end to end, acknowledged end to end, with flow control).
# NATS: bench/nats (one publisher, nats-server with TLS, one subscriber).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-3}"
cargo build --release --locked --quiet -p cellmesh --example relay_bench
for round in 1 2 3; do
    echo "== round $round"
    ./target/release/examples/relay_bench "$secs"
    bench/nats/run.sh
done
