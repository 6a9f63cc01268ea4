#!/usr/bin/env bash
# Cell-to-cell through a cellmesh relay beside NATS with TLS and plain NATS, on this machine,
# in one run: the harnesses alternate, three rounds, so all see the same machine state.
#
#   bench/compare.sh [seconds-per-size]
#
# cellmesh: crates/cellmesh/examples/relay_bench.rs (one publisher cell, one relay, one
# subscriber cell; sealed end to end, acknowledged end to end, with flow control). The relay
# runs as its own process (`cellmesh relay`, release build), as nats-server does.
# NATS: bench/nats (one publisher, nats-server with TLS, or without, one subscriber).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-3}"
cargo build --release --locked --quiet -p cellmesh --example relay_bench
cargo build --release --locked --quiet -p cellmesh-cli
export CELLMESH_BENCH_RELAY="$PWD/target/release/cellmesh"
for round in 1 2 3; do
    echo "== round $round"
    ./target/release/examples/relay_bench "$secs"
    NATS_TLS=1 bench/nats/run.sh
    NATS_TLS=0 bench/nats/run.sh
done
