#!/usr/bin/env bash
# End-to-end browser test: MQTT.js in headless Chromium (driven by
# playwright-core) talks to Tern over WebSocket and exchanges messages with a
# TCP client. Installs what it needs on a bare Debian machine (as root, or
# with sudo): Debian's `chromium`, Node.js >= 20, the npm packages in
# package-lock.json. Never downloads a browser through playwright.
#
#   TERN_BIN=target/debug/tern tests/browser/run.sh
#
# Starts its own broker (`--bind 127.0.0.1:0 --ws-bind 127.0.0.1:0`), reads
# the ports from the broker's log, and stops it by pid on every exit path.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}
apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

: "${TERN_BIN:?set TERN_BIN to the tern binary (for example target/debug/tern)}"
case "$TERN_BIN" in /*) ;; *) TERN_BIN="$OLDPWD/$TERN_BIN" ;; esac
[ -x "$TERN_BIN" ] || { echo "run.sh: $TERN_BIN is not an executable" >&2; exit 2; }

if ! command -v chromium >/dev/null 2>&1; then
    echo "==> installing chromium (Debian package)"
    apt_install chromium
fi
node_major() { node -e 'console.log(process.versions.node.split(".")[0])' 2>/dev/null || echo 0; }
if ! command -v npm >/dev/null 2>&1 || [ "$(node_major)" -lt 20 ]; then
    echo "==> installing nodejs and npm (Debian packages)"
    apt_install nodejs npm
fi
if [ "$(node_major)" -lt 20 ]; then
    echo "run.sh: playwright-core needs Node.js >= 20, found $(node --version 2>/dev/null || echo none)" >&2
    exit 2
fi
if [ ! -d node_modules/playwright-core ] || [ ! -f node_modules/mqtt/dist/mqtt.min.js ]; then
    echo "==> npm ci"
    timeout 300 npm ci --no-audit --no-fund --loglevel=error
fi

log="$(mktemp -t tern-browser-XXXXXX.log)"
broker_pid=
cleanup() {
    if [ -n "$broker_pid" ] && kill -0 "$broker_pid" 2>/dev/null; then
        kill -TERM "$broker_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$broker_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$broker_pid" 2>/dev/null || true
        wait "$broker_pid" 2>/dev/null || true
    fi
    rm -f "$log"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

certs="$(cd .. && pwd)/certs"
NO_COLOR=1 "$TERN_BIN" serve --bind 127.0.0.1:0 --ws-bind 127.0.0.1:0 --admin-bind 127.0.0.1:0 --log-level info --durability memory \
    --wss-bind 127.0.0.1:0 --tls-cert "$certs/server.pem" --tls-key "$certs/server.key" \
    </dev/null >/dev/null 2>"$log" &
broker_pid=$!

tcp_port= ws_port= ws_path= wss_port=
for _ in $(seq 100); do
    tcp_port=$(sed -n 's/.*MQTT\/TCP listener ready addr=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log" | head -n1)
    ws_port=$(sed -n 's/.*MQTT\/WebSocket listener ready addr=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log" | head -n1)
    ws_path=$(sed -n 's/.*MQTT\/WebSocket listener ready .* path=\([^ ]*\).*/\1/p' "$log" | head -n1)
    wss_port=$(sed -n 's/.*MQTT\/WSS listener ready addr=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log" | head -n1)
    [ -n "$tcp_port" ] && [ -n "$ws_port" ] && [ -n "$wss_port" ] && break
    kill -0 "$broker_pid" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$tcp_port" ] || [ -z "$ws_port" ] || [ -z "$wss_port" ]; then
    echo "run.sh: the broker did not report its TCP, WebSocket and WSS listeners within 10 s; log:" >&2
    cat "$log" >&2
    exit 1
fi
echo "==> browser test against tern (tcp :$tcp_port, ws :$ws_port$ws_path, wss :$wss_port)"
status=0
TCP_PORT="$tcp_port" WS_PORT="$ws_port" WS_PATH="${ws_path:-/mqtt}" \
    timeout 120 node browser-test.mjs || status=$?
if [ "$status" = 0 ]; then
    TCP_PORT="$tcp_port" WS_PORT="$ws_port" BROKER_URL="wss://localhost:$wss_port${ws_path:-/mqtt}" \
        timeout 120 node browser-test.mjs || status=$?
fi
if [ "$status" != 0 ]; then
    echo "--- broker log ---" >&2
    cat "$log" >&2
fi
exit "$status"
