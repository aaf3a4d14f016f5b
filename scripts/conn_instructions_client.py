"""N WebSocket connections one after another to 127.0.0.1:PORT, each: the upgrade, one masked
32-byte binary message whose echo is checked, a close answered. For scripts/conn-instructions."""
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


def main():
    port, n = int(sys.argv[1]), int(sys.argv[2])
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(REQUEST)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    sys.exit("closed before the 101")
                head += chunk
            if not head.startswith(b"HTTP/1.1 101"):
                sys.exit(f"not a 101: {head[:40]!r}")
            s.sendall(MESSAGE)
            echo = read_exactly(s, 34)
            if echo[:2] != bytes([0x82, 32]) or echo[2:] != bytes([1, 2, 3, 4] * 8):
                sys.exit(f"wrong echo: {echo!r}")
            s.sendall(CLOSE)
            read_exactly(s, 4)


main()
