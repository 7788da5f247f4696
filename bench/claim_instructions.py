"""Instructions the server runs per claim at 50k pending (1/3 matching), counted by valgrind's callgrind.

    .venv/bin/python bench/claim_instructions.py [--claims N]      (about 15 s; needs valgrind)

`bench/jobs.py` times the claim in microseconds of Redis time, which this shared VM moves by tens of percent
within minutes (59-98 us for the same code in one hour). `perf stat` counts instructions where the CPU's
counters are exposed; on VMs that hide them ("instructions: not supported") this script counts them with
callgrind instead: the same code gives the same count to within a fraction of a percent, so it shows what a
change to the scripts did, whatever the VM is doing. It is a count, not a speed: a cache miss costs none.

How: a private server is filled through the submit script and saved; a second server loads that file under
callgrind with collection off, takes a few claims (the function library's memo warms up), then collection is
switched on for N claims (`callgrind_control -i`). Printed: instructions per claim inside FCALL (the script and
the commands it calls), and the parts of it that callgrind can name: the commands run by redis.call, turning
their replies into Lua values, Lua's garbage collector, the allocator, cjson.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis as redis_lib

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jobs as bench_jobs  # noqa: E402 (the fill and the worker capabilities of bench/jobs.py)

from emp_machine.runtime.jobs import JobStore  # noqa: E402
from emp_machine.runtime.redis_server import PrivateRedis, find_server_binary, free_port  # noqa: E402

# (label, callgrind function names whose inclusive counts make it up)
PARTS = [
    ("FCALL in all", ["fcallCommand"]),
    ("  commands run by redis.call / pcall", ["call'2"]),
    ("  their replies made Lua values", ["parseReply"]),
    ("  Lua's garbage collector", ["luaC_step"]),
    ("  cjson.encode", ["json_encode"]),
    ("the whole server (also reading the request, replying)", ["aeMain"]),
    ("  malloc / free / realloc, all callers", ["malloc", "free", "realloc"]),
]


def inclusive(profile: Path) -> dict[str, int]:
    """Function name -> inclusive instruction count, from callgrind_annotate."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(profile)],
                         capture_output=True, text=True, check=True).stdout
    counts: dict[str, int] = {}
    for line in out.splitlines():
        match = re.match(r"\s*([\d,]+) \([\s\d.]+%\)\s+(\S+)", line)
        if match:
            name = match.group(2).rsplit(":", 1)[-1]
            counts.setdefault(name, int(match.group(1).replace(",", "")))
    return counts


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--claims", type=int, default=200)
    parser.add_argument("--pending", type=int, default=50_000)
    args = parser.parse_args()
    if not (shutil.which("valgrind") and shutil.which("callgrind_control") and shutil.which("callgrind_annotate")):
        print("valgrind (callgrind) is not installed: nothing counted")
        return 0  # (as bench/instructions.py without perf: `./dev bench` goes on to the next)
    work = Path(tempfile.mkdtemp(prefix="emp-claim-instructions-"))
    try:
        with PrivateRedis(work / "fill") as server:
            client = redis_lib.Redis.from_url(server.url, decode_responses=True)
            store = JobStore(client)
            bench_jobs.fill(client, store, args.pending, "third")
            client.save()
            saved = Path(client.config_get("dir")["dir"]) / client.config_get("dbfilename")["dbfilename"]
            (work / "load").mkdir()
            shutil.copy(saved, work / "load" / "dump.rdb")
        profile = work / "callgrind.out"
        port = free_port()
        server = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={profile}",
             find_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work / "load"),
             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis_lib.Redis(port=port, decode_responses=True)
            deadline = time.monotonic() + 300
            while True:
                try:
                    if client.info("persistence")["loading"] == 0 and client.dbsize() > 0:
                        break
                except redis_lib.ConnectionError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    print("the server under valgrind did not come up")
                    return 1
                time.sleep(0.2)
            store = JobStore(client)
            for _ in range(10):  # loads the library, warms its memo
                store.claim(bench_jobs.SIM, start=True)
            subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], check=True, capture_output=True)
            claimed = sum(store.claim(bench_jobs.SIM, start=True) is not None for _ in range(args.claims))
            subprocess.run(["callgrind_control", "-i", "off", str(server.pid)], check=True, capture_output=True)
            client.shutdown(nosave=True)
        except redis_lib.ConnectionError:
            pass  # the shutdown closes the connection
        finally:
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
        if claimed != args.claims:
            print(f"only {claimed} of {args.claims} claims took a job: the count would not be of a claim")
            return 1
        counts = inclusive(profile)
        print(f"Server instructions per claim, {args.pending} pending, 1/3 matching, {claimed} claims "
              f"(callgrind; steady whatever the VM's speed)")
        for label, names in PARTS:
            total = sum(counts.get(name, 0) for name in names)
            print(f"  {label:55s} {total / claimed / 1000:8.1f}k")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
