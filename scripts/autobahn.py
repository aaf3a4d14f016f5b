#!/usr/bin/env python3
"""Runs the Autobahn TestSuite cases (kosoku) against wsgate and fails on any failed case.

Two runs:
  direct   kosoku → wsgate (echo route)
  chained  kosoku → wsgate A (proxy route, wss:// backend) → wsgate B (TLS listener, echo)
           (kosoku speaks plain ws only, so the chain is how wss and proxy routes are covered)
Every case must be OK (NON-STRICT and INFORMATIONAL where the suite itself says so),
permessage-deflate's 12.* and 13.* included: UNIMPLEMENTED fails the run too.
Usage: autobahn.py WSGATE_BINARY OUTDIR"""
import collections, json, os, re, subprocess, sys, threading, time

binary, outdir = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
here = os.path.dirname(os.path.abspath(__file__))
kosoku = os.path.join(os.path.dirname(sys.executable), "kosoku")
procs = []


def start(args):
    """Starts wsgate and waits (bounded) for its "listening addr=…" log line."""
    p = subprocess.Popen([binary, *args], stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "RUST_LOG": "warn,wsgate::server=info"})
    procs.append(p)
    deadline = time.monotonic() + 30
    seen = []
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(r"(?<!admin )listening addr=(\S+)", line)
        if m:
            # Keep draining the log so wsgate never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return m.group(1)
    sys.exit(f"autobahn: wsgate {args} did not report its address:\n" + "".join(seen[-5:]))


def suite(name, addr, out, extra=()):
    started = time.monotonic()
    run = subprocess.run([kosoku, "-m", "fuzzingclient", "-p", "2", "-o", out, *extra, addr],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    elapsed = time.monotonic() - started
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    counts, failed = collections.Counter(), []
    slowest = []
    for cases in index.values():
        for case, r in cases.items():
            behavior, close = r["behavior"], r["behaviorClose"]
            counts[behavior] += 1
            slowest.append((r.get("duration", 0), case))
            if behavior not in {"OK", "NON-STRICT", "INFORMATIONAL"} or close not in {"OK", "INFORMATIONAL"}:
                failed.append(f"{case}: behavior={behavior} close={close}")
            elif case.startswith("9.") and r.get("duration", 0) > 5000:
                # 9.* cases take well under a second here; one that took seconds waited on
                # something (a TLS record left unflushed once made them wait 30 s for a ping).
                failed.append(f"{case}: took {r['duration']} ms (a stall)")
    total = sum(counts.values())
    print(f"autobahn {name}: {total} cases in {elapsed:.0f}s: " +
          ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"autobahn {name}: slowest cases (ms): " +
          ", ".join(f"{c} {d}" for d, c in sorted(slowest, reverse=True)[:5]))
    for f in failed:
        print(f"autobahn {name}: FAILED {f}")
    if total < 500:
        print(f"autobahn {name}: expected the whole selection; kosoku said:\n" + run.stdout[-2000:])
        failed.append("incomplete run")
    return total - len(failed), len(failed)


try:
    os.makedirs(outdir, exist_ok=True)
    # kosoku's 12.*/13.* cases fail on a message sent without RSV1 in a compressed session
    # (legal, RFC 7692 §6; its Python case code gets a str and cannot hash it), so the echo
    # routes here compress every message: compression_min_size = 0.
    direct = os.path.join(outdir, "direct.toml")
    with open(direct, "w") as f:
        f.write('[[listen]]\naddr = "127.0.0.1:0"\n[limits]\ncompression_min_size = 0\n'
                '[[route]]\npath = "/"\nbackend = "echo"\n')
    results = [suite("direct", start(["--config", direct]), os.path.join(outdir, "direct"))]

    certs = os.path.join(outdir, "certs")
    subprocess.run([os.path.join(here, "..", "certs", "gen-dev-certs.sh"), certs, "localhost"],
                   check=True, stdout=subprocess.DEVNULL)
    b_conf = os.path.join(outdir, "b.toml")
    with open(b_conf, "w") as f:
        f.write(f'[[listen]]\naddr = "127.0.0.1:0"\n'
                f'tls = {{ cert = "{certs}/server.crt", key = "{certs}/server.key" }}\n'
                f'[limits]\ncompression_min_size = 0\n'
                f'[[route]]\npath = "/"\nbackend = "echo"\n')
    b_port = start(["--config", b_conf]).rsplit(":", 1)[1]
    a_conf = os.path.join(outdir, "a.toml")
    with open(a_conf, "w") as f:
        f.write(f'[[listen]]\naddr = "127.0.0.1:0"\n'
                f'[[route]]\npath = "/"\nbackend = "wss://localhost:{b_port}"\nca = "{certs}/ca.crt"\n')
    # permessage-deflate in the chain: B (echo) answers the offer, A passes its answer on.
    results.append(suite("chained (proxy → wss)", start(["--config", a_conf]), os.path.join(outdir, "chained")))
finally:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=60)

passed = sum(r[0] for r in results)
failed = sum(r[1] for r in results)
print(f"autobahn: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
