"""The design of the replaced broker.py, rebuilt for the benchmark's side-by-side figures
(its source is not part of this repository; its README is, ../shared/seed): the standard
library's single-threaded http.server, one SQLite connection, each post inserted and
committed on its own (SQLite's defaults: a rollback journal, FULL sync), JSON by the json
module. Only what the publish load calls is here: POST /messages/{channel}.

Usage: old_design.py --port PORT --db PATH"""

import argparse
import datetime
import http.server
import json
import sqlite3


def serve(port, db_path):
    db = sqlite3.connect(db_path)
    db.execute(
        "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, "
        "sender TEXT NOT NULL, message TEXT NOT NULL, timestamp DATETIME DEFAULT CURRENT_TIMESTAMP, "
        "read_by TEXT DEFAULT '')"
    )
    db.commit()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            channel = self.path.rsplit("/", 1)[-1]
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            cursor = db.execute(
                "INSERT INTO messages (channel, sender, message) VALUES (?, ?, ?)",
                (channel, body.get("sender", "unknown"), body["message"]),
            )
            db.commit()
            reply = json.dumps(
                {"status": "success", "id": cursor.lastrowid, "timestamp": datetime.datetime.now().isoformat()}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):  # it logged each request to stderr
            super().log_message(*args)

    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    options = parser.parse_args()
    serve(options.port, options.db)
