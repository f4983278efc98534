"""The gunicorn worker class: gevent, with gunicorn's own answers to malformed requests
(bad request line, bad header, headers too large) given as JSON like every other error.

gevent because watchers (SSE streams, long-polls) hold their connection for minutes: a
greenlet costs a few KiB where a thread or a process would cost far more.
"""

import json
import ssl

import gevent
from gevent.hub import Hub
from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker

from .headers import security_headers

# Set by the worker from its config: HSTS too when it serves TLS.
_refusal_headers = security_headers(tls=False)


def write_json_error(sock, status_int, reason, mesg):
    body = json.dumps({"error": f"{reason.lower()}: {mesg}"}).encode()
    security = "".join(f"{name}: {value}\r\n" for name, value in _refusal_headers)
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n{security}Cache-Control: no-store\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


class BrokerWorker(GeventWorker):
    def init_process(self):
        global _refusal_headers
        _refusal_headers = security_headers(tls=bool(self.cfg.certfile))
        util.write_error = write_json_error
        # A client that gives up on the TLS handshake (wrong CA, plain HTTP to the HTTPS
        # port) is the client's problem: no traceback in the broker's log for it.
        Hub.NOT_ERROR = (*Hub.NOT_ERROR, ssl.SSLError)
        super().init_process()

    def handle_request(self, listener_name, req, sock, addr):
        keepalive = super().handle_request(listener_name, req, sock, addr)
        # A keep-alive client with its next request already buffered would otherwise be
        # served again at once, starving the other connections (p99 in the hundreds of ms).
        gevent.sleep(0)
        return keepalive
