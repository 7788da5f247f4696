#!/usr/bin/env bash
# docker/smoke.sh without Docker: what Dockerfile.machine does, on this host. The files the Dockerfile copies
# go to a fresh directory, `pip install .` runs there into a fresh venv of the host's Python 3.11 (the image's
# is python:3.11-slim), and the image's CMD runs from it with the image's environment: health answers, a job
# runs, SIGTERM drains and exits 0. Needs the network or a package index for the dependencies.
#   docker/rehearse.sh [python]        (default: python3.11)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3.11}
port=${SMOKE_PORT:-19090}
root=$(mktemp -d /tmp/emp-rehearse.XXXXXX)
pid=""

cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -rf "$root"
}
trap cleanup EXIT

mkdir -p "$root/app" "$root/data"
cp pyproject.toml README.md "$root/app/"                                   # COPY pyproject.toml README.md ./
cp -r emp_machine "$root/app/"                                            # COPY emp_machine ./emp_machine
find "$root/app" -name __pycache__ -prune -exec rm -rf {} +
"$python" -m venv "$root/venv"
"$root/venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
(cd "$root/app" && "$root/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir .)
ln -s "$root/app/emp_machine/machines" "$root/app/machines"               # ln -s /app/emp_machine/machines ...

# ENV of the image (EMP_MANIFEST, EMP_MACHINE__STATE_DIR on the /data volume) and Railway's PORT
run_env=(env -i "PATH=$root/venv/bin:/usr/bin:/bin" "HOME=$root" "EMP_MANIFEST=machines/simulation.yaml"
         "EMP_MACHINE__STATE_DIR=$root/data/state" "PORT=$port" "PYTHONUNBUFFERED=1")
cd "$root/app"
"${run_env[@]}" emp-machine > "$root/machine.log" 2>&1 &                   # CMD ["emp-machine"]
pid=$!

echo "waiting for /health on 127.0.0.1:$port"
deadline=$((SECONDS + 90))
until curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; do
  if [ $SECONDS -gt $deadline ] || ! kill -0 "$pid" 2>/dev/null; then
    tail -50 "$root/machine.log"; echo "rehearse: /health never answered 200"; exit 1
  fi
  sleep 1
done
echo "health: ok"

"${run_env[@]}" emp-machine ps
"${run_env[@]}" emp-machine submit --type simulation --payload '{"steps": 3, "step_ms": 100}' --wait

kill -TERM "$pid"                                                          # docker stop --time 30
for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$pid" 2>/dev/null; then
  tail -50 "$root/machine.log"; echo "rehearse: still running 30 s after SIGTERM"; exit 1
fi
code=0
wait "$pid" || code=$?
pid=""
[ "$code" = "0" ] || { tail -50 "$root/machine.log"; echo "rehearse: exit code $code after SIGTERM"; exit 1; }
echo "rehearse: passed"
