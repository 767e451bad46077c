"""Benchmark server run in a pod (the project image has python3): see netbench_client.py."""
import socket
import threading

PAYLOAD = b"d" * (1 << 20)


def handle(c: socket.socket) -> None:
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = c.makefile("rb")
    line = f.readline().split()
    try:
        if line and line[0] == b"down":
            n = int(line[1])
            while n > 0:
                k = min(n, len(PAYLOAD))
                c.sendall(PAYLOAD[:k])
                n -= k
        elif line and line[0] == b"up":
            n = int(line[1])
            while n > 0:
                data = f.read1(min(n, 1 << 20))
                if not data:
                    return
                n -= len(data)
            c.sendall(b"ok\n")
        elif line and line[0] == b"ping":
            while True:
                msg = f.read(64)
                if len(msg) < 64:
                    return
                c.sendall(msg)
    finally:
        c.close()


def main() -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 7070))
    srv.listen(128)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()


main()
