"""N WebSocket connections one after another to 127.0.0.1:PORT, each: the upgrade, one masked
32-byte binary message whose echo is checked, a close answered. With a third argument R: one
connection that makes N round trips of R-byte messages (each echo checked, every message
different from the last), then closes. For scripts/conn-instructions."""
import socket
import sys

REQUEST = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
MESSAGE = bytes([0x82, 0x80 | 32, 1, 2, 3, 4]) + bytes(32)  # masked: 32 bytes of 1,2,3,4
CLOSE = bytes([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8])


def read_exactly(s, n):
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            sys.exit("connection closed early")
        got += chunk
    return got


def upgrade(s):
    s.sendall(REQUEST)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit("closed before the 101")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        sys.exit(f"not a 101: {head[:40]!r}")


def round_trips(port, n, size):
    """One connection, n round trips of size-byte binary messages (size < 126)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upgrade(s)
        mask = bytes([1, 2, 3, 4])
        for i in range(n):
            payload = bytes((i + j) & 0xFF for j in range(size))
            masked = bytes(b ^ mask[j % 4] for j, b in enumerate(payload))
            s.sendall(bytes([0x82, 0x80 | size]) + mask + masked)
            echo = read_exactly(s, 2 + size)
            if echo != bytes([0x82, size]) + payload:
                sys.exit(f"wrong echo at round trip {i}: {echo!r}")
        s.sendall(CLOSE)
        read_exactly(s, 4)


def main():
    port, n = int(sys.argv[1]), int(sys.argv[2])
    if len(sys.argv) > 3:
        round_trips(port, n, int(sys.argv[3]))
        return
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            upgrade(s)
            s.sendall(MESSAGE)
            echo = read_exactly(s, 34)
            if echo[:2] != bytes([0x82, 32]) or echo[2:] != bytes([1, 2, 3, 4] * 8):
                sys.exit(f"wrong echo: {echo!r}")
            s.sendall(CLOSE)
            read_exactly(s, 4)


main()
