#!/usr/bin/env python3
"""Runs the Autobahn TestSuite cases (kosoku) against a wsgate echo route and fails on any
failed case. Cases 12.* and 13.* (permessage-deflate, which wsgate does not offer) may report
UNIMPLEMENTED. Usage: autobahn.py WSGATE_BINARY OUTDIR"""
import json, os, re, subprocess, sys, time, collections

binary, outdir = sys.argv[1], sys.argv[2]
kosoku = os.path.join(os.path.dirname(sys.executable), "kosoku")
server = subprocess.Popen([binary, "127.0.0.1:0", "echo"], stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "RUST_LOG": "warn,wsgate::server=info"})
addr = None
deadline = time.monotonic() + 30
try:
    # wsgate logs "listening addr=127.0.0.1:PORT" once bound; wait for that line (bounded).
    while addr is None and time.monotonic() < deadline:
        line = server.stderr.readline()
        if not line:
            break
        m = re.search(r"addr=(127\.0\.0\.1:\d+).*listening|listening.*addr=(127\.0\.0\.1:\d+)", line)
        if m:
            addr = m.group(1) or m.group(2)
    if addr is None:
        sys.exit("autobahn: wsgate did not report its address")
    # Keep draining wsgate's log so it never blocks on a full pipe.
    import threading
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    started = time.monotonic()
    run = subprocess.run([kosoku, "-m", "fuzzingclient", "-p", "2", "-o", outdir, addr],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    elapsed = time.monotonic() - started
finally:
    server.terminate()
    server.wait(timeout=60)

with open(os.path.join(outdir, "index.json")) as f:
    index = json.load(f)
ok_behavior = {"OK", "NON-STRICT", "INFORMATIONAL"}
ok_close = {"OK", "INFORMATIONAL"}
counts = collections.Counter()
failed = []
for agent, cases in index.items():
    for case, r in cases.items():
        behavior, close = r["behavior"], r["behaviorClose"]
        counts[behavior] += 1
        deflate = case.split(".")[0] in ("12", "13")
        if deflate and behavior == "UNIMPLEMENTED":
            continue
        if behavior not in ok_behavior or close not in ok_close:
            failed.append(f"{case}: behavior={behavior} close={close}")
total = sum(counts.values())
print(f"autobahn: {total} cases in {elapsed:.0f}s: " +
      ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
for f in failed:
    print("autobahn: FAILED " + f)
if total < 500:
    print("autobahn: expected the whole suite (517 cases); kosoku said:\n" + run.stdout[-2000:])
    sys.exit(1)
skipped = sum(1 for cases in index.values() for c, r in cases.items()
              if c.split(".")[0] in ("12", "13") and r["behavior"] == "UNIMPLEMENTED")
print(f"autobahn: {total - len(failed) - skipped} passed, {len(failed)} failed, {skipped} skipped")
sys.exit(1 if failed else 0)
