#!/usr/bin/env bash
# NATS loopback benchmark: one publisher, one nats-server, one subscriber; over TLS, or
# over plain TCP with NATS_TLS=0.
#
#   bench/nats/run.sh [extra nats-bench args, e.g. --count 64=3000000 --rtt 20000]
#
# Environment: NATS_MAX_PENDING (server max_pending, default 2GB); NATS_TLS (1, default: TLS
# required; 0: plain TCP, lines labelled nats-plain).
#
# Installs Debian's nats-server if missing, makes a throwaway CA + server certificate,
# starts nats-server (TLS required) on a free 127.0.0.1 port, runs the client
# (src/main.rs, built with cargo --release), stops the server and cleans up.
# Prints one line per measurement:
#   nats-tls size=64 msgs_per_s=... mb_per_s=...
#   nats-tls rtt size=64 p50_us=... p99_us=...
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if ! command -v nats-server >/dev/null 2>&1; then
    echo "run.sh: installing nats-server (Debian)" >&2
    if ! apt-get install -y nats-server >/dev/null 2>&1; then
        apt-get update >/dev/null
        apt-get install -y nats-server >/dev/null
    fi
fi
tls="${NATS_TLS:-1}"
[[ "$tls" == 0 || "$tls" == 1 ]] || { echo "run.sh: NATS_TLS is 0 or 1" >&2; exit 2; }
command -v openssl >/dev/null || { echo "run.sh: openssl is required" >&2; exit 1; }

echo "run.sh: building client" >&2
(cd "$here" && cargo build --release --locked --quiet)
client="$here/target/release/nats-bench"

tmp="$(mktemp -d)"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# Throwaway CA and a server certificate for 127.0.0.1 / localhost (P-256).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=nats-bench throwaway CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$tmp/ca.key" -out "$tmp/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=localhost" -keyout "$tmp/server.key" -out "$tmp/server.csr" 2>/dev/null
cat >"$tmp/server.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
EXT
openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
    -CAcreateserial -days 2 -extfile "$tmp/server.ext" -out "$tmp/server.pem" 2>/dev/null

# Server: TLS required; port -1 = a free port, reported through the ports file.
# max_payload: 1 MB (the default, stated) fits 16 KiB messages.
# max_pending: per-connection outbound buffer on the server before it cuts a slow
#   consumer; raised from the default 64 MB to 2 GB (NATS_MAX_PENDING) so the
#   subscriber is never cut.
# write_deadline: raised from the default (10 s in 2.9) to 60 s for the same reason.
cat >"$tmp/nats.conf" <<CONF
host: 127.0.0.1
port: -1
ports_file_dir: "$tmp"
max_payload: 1MB
max_pending: ${NATS_MAX_PENDING:-2GB}
write_deadline: "60s"
CONF
if [[ "$tls" == 1 ]]; then
    cat >>"$tmp/nats.conf" <<CONF
tls {
  cert_file: "$tmp/server.pem"
  key_file: "$tmp/server.key"
  timeout: 5
}
CONF
fi

nats-server -c "$tmp/nats.conf" >"$tmp/server.log" 2>&1 &
server_pid=$!

url=""
for _ in $(seq 1 100); do
    pf="$tmp/nats-server_${server_pid}.ports"
    if [[ -s "$pf" ]]; then
        port="$(grep -o '127\.0\.0\.1:[0-9]*' "$pf" | head -1 | cut -d: -f2)"
        if [[ -n "$port" ]]; then
            if [[ "$tls" == 1 ]]; then url="tls://127.0.0.1:$port"; else url="nats://127.0.0.1:$port"; fi
            break
        fi
    fi
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
done
if [[ -z "$url" ]]; then
    echo "run.sh: nats-server did not start" >&2
    cat "$tmp/server.log" >&2
    exit 1
fi
echo "run.sh: nats-server $(nats-server --version | awk '{print $2}') on $url" >&2

rc=0
if [[ "$tls" == 1 ]]; then
    "$client" --url "$url" --ca "$tmp/ca.pem" "$@" || rc=$?
else
    "$client" --url "$url" --plain "$@" || rc=$?
fi

if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "run.sh: nats-server died during the run" >&2
    rc=1
fi
if grep -qi "slow consumer" "$tmp/server.log"; then
    echo "run.sh: server reported a slow consumer:" >&2
    grep -i "slow consumer" "$tmp/server.log" | head -3 >&2
    rc=1
fi
exit "$rc"
