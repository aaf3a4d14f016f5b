#!/usr/bin/env python3
"""Failover cost: handshake latency (1,000 handshakes one after another, p50/p99) through a
route with one live backend, and through a route whose first backend refuses (balance =
"first", never ejected, so every handshake fails over). Loopback only; needs
target/release/wsgate (cargo build --release).

    python3 scripts/failover_latency.py
"""
import socket, subprocess, time, sys, os, statistics, re
def free():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
# live echo backend
srv=socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR,1); srv.bind(("127.0.0.1",0)); srv.listen(1024)
live=srv.getsockname()[1]
import threading
def acc():
    while True:
        c,_=srv.accept(); c.close()
threading.Thread(target=acc,daemon=True).start()
import tempfile
cfg_path=os.path.join(tempfile.mkdtemp(), "failover.toml")
def run(backends):
    port=free()
    cfg=f'[[listen]]\naddr = "127.0.0.1:{port}"\n[[route]]\npath = "/"\nbackend = [{", ".join(chr(34)+b+chr(34) for b in backends)}]\nbalance = "first"\neject_after = 1000000\n'
    open(cfg_path,"w").write(cfg)
    p=subprocess.Popen([os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "wsgate"),"--config",cfg_path],stderr=subprocess.DEVNULL)
    for _ in range(100):
        try: socket.create_connection(("127.0.0.1",port)).close(); break
        except OSError: time.sleep(0.05)
    req=b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ts=[]
    for i in range(1000):
        t=time.perf_counter()
        s=socket.create_connection(("127.0.0.1",port)); s.sendall(req); d=s.recv(12)
        ts.append(time.perf_counter()-t); s.close()
        assert d==b"HTTP/1.1 101", d
    p.terminate(); p.wait()
    ts.sort(); return statistics.median(ts)*1e3, ts[int(len(ts)*0.99)]*1e3
dead=f"tcp://127.0.0.1:{free()}"
a=run([f"tcp://127.0.0.1:{live}"]); b=run([dead, f"tcp://127.0.0.1:{live}"])
print(f"handshake p50/p99 ms: one live backend {a[0]:.3f}/{a[1]:.3f}; dead first then live {b[0]:.3f}/{b[1]:.3f}")
