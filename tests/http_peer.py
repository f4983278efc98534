"""A scripted HTTP server on a loopback port, for the few answers a real broker cannot be
made to give on demand (a 503 with Retry-After, then a 201; a reply carrying terminal
escapes). It answers each request with the next reply of its script and records what
it was asked; it is a peer for agent-chat's tests, not a stand-in for the broker; and the
receiver of the broker's notifications in theirs (ntfy, Gotify, a webhook)."""

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Peer:
    def __init__(self, replies, tls=None, port=0, host="127.0.0.1"):
        """replies: (status, JSON body, headers) in the order requests will get them, the
        last repeated; or a function of the request's number (0, 1, ...) and path that
        gives them. tls: (certificate file, key file) to serve HTTPS with. port: the
        port to listen on (0: any free one); host: the address (loopback, or the address
        of a bridge the test made)."""
        self.replies = replies if callable(replies) else list(replies)
        self.requests = []  # (method, path, headers, body, time.monotonic())
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                peer.requests.append((self.command, self.path, dict(self.headers), body, time.monotonic()))
                if callable(peer.replies):
                    status, reply, headers = peer.replies(len(peer.requests) - 1, self.path)
                else:
                    status, reply, headers = peer.replies[min(len(peer.requests), len(peer.replies)) - 1]
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        scheme = "http"
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
