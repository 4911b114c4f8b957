"""How long a remote image fetch can be held by a server that drips its answer.

A loopback server answers at once, then sends one byte of the body every 0.3 s, or every 0.9 s
(each byte within a per-read timeout); or it drips its status line, or its headers, one byte
every 0.3 s. The fetch must give up at its one deadline; the ratio of time taken to
``timeout_s`` shows how closely. Prints a table and a final JSON line.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from adapters.remote_images import ImageFetchError, RemoteImageFetcher

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 40\r\n\r\n"


class Dripping(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path in ("/drip-status.png", "/drip-headers.png"):
            start = 0 if self.path == "/drip-status.png" else HEAD.index(b"\r\n") + 2
            try:
                self.wfile.write(HEAD[:start])
                for byte in HEAD[start:]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.3)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        gap = 0.9 if self.path == "/slow-drip.png" else 0.3
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "40")
        self.end_headers()
        try:
            for _ in range(40):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(gap)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Dripping)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    rows = []
    for path, timeout_s in (
        ("/drip.png", 0.5),
        ("/drip.png", 1.0),
        ("/drip.png", 2.0),
        ("/slow-drip.png", 1.0),
        ("/drip-status.png", 1.0),
        ("/drip-status.png", 2.0),
        ("/drip-headers.png", 1.0),
        ("/drip-headers.png", 2.0),
    ):
        url = base + path
        fetcher = RemoteImageFetcher(allow_networks=["127.0.0.1/32"], timeout_s=timeout_s)
        started = time.perf_counter()
        try:
            fetcher.fetch(url)
            outcome = "fetched"
        except ImageFetchError as e:
            outcome = str(e)
        took = time.perf_counter() - started
        rows.append(
            {
                "timeout_s": timeout_s,
                "seconds": round(took, 3),
                "ratio": round(took / timeout_s, 2),
                "outcome": outcome,
            }
        )
        print(
            f"{path:18} timeout {timeout_s:.1f}s: gave up after {took:.2f}s "
            f"(x{took / timeout_s:.2f}): {outcome}"
        )
    server.shutdown()
    print(json.dumps({"benchmark": "fetch_deadline", "rows": rows}))


if __name__ == "__main__":
    main()
