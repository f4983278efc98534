"""The access log, cheap enough to leave on: gunicorn's logger with the broker's one line
per request formatted directly and written in batches.

gunicorn's own access logging builds a dictionary of some forty atoms per request, copies
it to escape quotes, and goes through the logging module to a write and a flush of its
own: a fifth of a worker's time under a load of small posts. Here each line is one string
format into a buffer, written out (one write, one flush) when the worker's flusher comes
by (every FLUSH_INTERVAL) or when the buffer holds FLUSH_BYTES, and when the worker exits
or the logs are reopened (SIGUSR1). A worker killed outright loses at most the lines of
its last FLUSH_INTERVAL. Lines are the same as gunicorn would write with the broker's
access_log_format (gunicorn.conf.py); with any other format, or a handler that is not a
stream (syslog), gunicorn's own path is taken.
"""

import logging

from gunicorn import glogging

FLUSH_INTERVAL = 0.2
FLUSH_BYTES = 64 << 10
# gunicorn.conf.py's access_log_format: agent= is what the client claims (X-Agent-ID,
# quoted and escaped by the access plugin: it cannot forge a field); token= the token it
# proved, and its agent.
FORMAT = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms agent=%({agent_comms.agent}e)s token=%({agent_comms.token}e)s'


def _safe(value):
    """As gunicorn's atoms are: double quotes escaped."""
    return value.replace('"', '\\"') if '"' in value else value


class AccessLogger(glogging.Logger):
    def setup(self, cfg):
        super().setup(cfg)
        self._lines = []
        self._size = 0
        self._stream = None
        handlers = self.access_log.handlers
        if cfg.access_log_format == FORMAT and len(handlers) == 1 and isinstance(handlers[0], logging.StreamHandler):
            self._stream = handlers[0]

    # Called with (environ, status, seconds) for every answered request: the metrics.
    observer = None

    def access(self, resp, req, environ, request_time):
        status = resp.status
        if isinstance(status, str):
            status = status.split(None, 1)[0]
        if self.observer is not None:
            self.observer(environ, status, request_time.total_seconds())
        stream = self._stream
        if stream is None or not self.access_log_enabled:
            super().access(resp, req, environ, request_time)
            return
        if not self.access_log.isEnabledFor(logging.INFO):
            return
        sent = getattr(resp, "sent", None)
        remote = _safe(environ.get("REMOTE_ADDR", "-"))
        request_line = _safe(f"{environ['REQUEST_METHOD']} {environ['RAW_URI']} {environ['SERVER_PROTOCOL']}")
        length = "-" if sent is None else sent
        milliseconds = request_time.seconds * 1000 + request_time.microseconds // 1000
        agent = _safe(environ.get("agent_comms.agent", "-"))
        token = _safe(environ.get("agent_comms.token", "-"))
        line = f'{remote} "{request_line}" {status} {length} {milliseconds}ms agent={agent} token={token}\n'
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()

    def flush(self):
        """Write the buffered lines out: one write, one flush."""
        stream = self._stream
        if stream is None or not self._lines:
            return
        text = "".join(self._lines)
        self._lines.clear()
        self._size = 0
        stream.acquire()
        try:
            stream.stream.write(text)
            stream.stream.flush()
        except (OSError, ValueError):  # the log's pipe or file is gone: as logging would, go on
            pass
        finally:
            stream.release()

    def reopen_files(self):
        self.flush()
        super().reopen_files()


def keep_flushing(logger, alive, sleep, interval=FLUSH_INTERVAL):
    """The worker's flusher: every `interval` while alive(), then once more."""
    while alive():
        sleep(interval)
        logger.flush()
    logger.flush()
