#!/usr/bin/env bash
# Build the container image and boot the simulation machine in it: health answers, a job runs, SIGTERM
# drains and exits 0. Needs Docker (our development machines have none: run this where Docker is).
#   docker/smoke.sh [image-tag]
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-emp-machine:smoke}
name=emp-machine-smoke-$$
port=${SMOKE_PORT:-19090}

cleanup() { docker rm -f "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT

docker build -f Dockerfile.machine -t "$tag" .
docker run -d --name "$name" -p "127.0.0.1:$port:9090" "$tag" >/dev/null

echo "waiting for /health on 127.0.0.1:$port"
deadline=$((SECONDS + 90))
until curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; do
  if [ $SECONDS -gt $deadline ]; then docker logs "$name" | tail -50; echo "smoke: /health never answered 200"; exit 1; fi
  sleep 1
done
echo "health: ok"

docker exec "$name" emp-machine ps
docker exec "$name" emp-machine submit --type simulation --payload '{"steps": 3, "step_ms": 100}' --wait

docker stop --time 30 "$name" >/dev/null
code=$(docker wait "$name")
[ "$code" = "0" ] || { docker logs "$name" | tail -50; echo "smoke: exit code $code after SIGTERM"; exit 1; }
echo "smoke: passed"
