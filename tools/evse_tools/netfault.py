"""A TCP proxy that can blackhole a connection, for fault injection on
loopback (benchmarks and tests): the charger connects to the proxy, the
proxy to the broker. ``blackhole = True`` keeps every socket open but
forwards nothing in either direction, like a dead WiFi path; False forwards
again. Only 127.0.0.1 is used."""
from __future__ import annotations

import socket
import threading


class Proxy:
    """Listens on 127.0.0.1 (``port``, 0 = any free one) and forwards to
    ``upstream`` (host, port). Use as a context manager or call :meth:`close`."""

    def __init__(self, upstream: tuple[str, int], port: int = 0):
        self.upstream = upstream
        self.blackhole = False
        self._stop = False
        self._lsock = socket.socket()
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", port))
        self._lsock.listen(8)
        self._lsock.settimeout(0.2)
        self.port = self._lsock.getsockname()[1]
        self.host = "127.0.0.1"
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                client, _ = self._lsock.accept()
            except (socket.timeout, OSError):
                continue
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            self._socks += [client, up]
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket):
        src.settimeout(0.2)
        while not self._stop:
            try:
                data = src.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            if self.blackhole:
                continue                      # swallowed: the path is dead
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def close(self):
        self._stop = True
        self._lsock.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
