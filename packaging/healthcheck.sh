#!/usr/bin/env bash
# The container's HEALTHCHECK: exit 0 if llm-host answers GET /healthz with 200.
#
# usage: healthcheck [HOST:PORT]   (default 127.0.0.1:3000)
#
# The runtime image has no HTTP client (no curl, no wget), so this speaks HTTP over
# bash's /dev/tcp. /healthz says the process serves; it stays 200 while the host
# drains after SIGTERM (/readyz is the one that turns 503 then), so a draining
# container is not reported unhealthy and restarted.
set -euo pipefail
target="${1:-127.0.0.1:3000}"
host="${target%:*}"
port="${target##*:}"
exec 3<>"/dev/tcp/$host/$port"
printf 'GET /healthz HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$target" >&3
IFS= read -r -t 5 status <&3
exec 3<&-
case "$status" in
    "HTTP/1."[01]" 200 "*) exit 0 ;;
    *) echo "healthcheck: GET http://$target/healthz answered: ${status%$'\r'}" >&2; exit 1 ;;
esac
