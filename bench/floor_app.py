"""The stack's floor: the same Bottle app under the same gunicorn gevent workers, with a
route that reads a POST's body and answers a small JSON hello, storing nothing. What a
broker on this stack could do at most; `make bench` measures it beside the broker.

Run by bench/floor.py as `gunicorn -k gevent -w 2 floor_app:app` (gunicorn's defaults:
no access log)."""

import bottle

app = bottle.Bottle()


@app.post("/messages/<channel>")
def hello(channel):
    bottle.request.body.read()
    bottle.response.status = 201
    return {"status": "success", "channel": channel}
