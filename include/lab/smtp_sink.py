"""The lab's notification sinks: an SMTP sink (.eml files) and a chat-webhook sink (.json files).

Stand-ins for the on-call mailbox and a Slack-style incoming webhook, so tests can prove
that a DR failure or a CRITICAL verification really sent a notification through
Airflow's notifier mechanism. Nothing is delivered anywhere.
Usage: smtp_sink.py HOST SMTP_PORT DIRECTORY [WEBHOOK_PORT]
(webhook posts land in DIRECTORY/webhooks/<time>.json as {"path": ..., "body": ...}).
"""

from __future__ import annotations

import json
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Handler(socketserver.StreamRequestHandler):
    """Just enough SMTP (RFC 5321) for smtplib: HELO/EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT."""

    def reply(self, line: str) -> None:
        self.wfile.write((line + "\r\n").encode())

    def handle(self) -> None:
        self.reply("220 barman-dr lab SMTP sink")
        rcpts: list[str] = []
        while True:
            raw = self.rfile.readline(65536)
            if not raw:
                return
            cmd = raw.decode("utf-8", "replace").strip()
            verb = cmd[:4].upper()
            if verb in ("HELO", "EHLO"):
                self.reply("250 lab-smtp-sink")
            elif verb == "MAIL":
                rcpts = []
                self.reply("250 OK")
            elif verb == "RCPT":
                rcpts.append(cmd[8:])
                self.reply("250 OK")
            elif verb == "DATA":
                self.reply("354 end with <CRLF>.<CRLF>")
                lines = []
                while True:
                    line = self.rfile.readline(1 << 20)
                    if not line or line in (b".\r\n", b".\n"):
                        break
                    lines.append(line[1:] if line.startswith(b"..") else line)
                out = Path(self.server.mail_dir) / f"{time.time():.6f}.eml"  # type: ignore[attr-defined]
                out.write_bytes(b"X-Lab-Rcpt: " + ", ".join(rcpts).encode() + b"\r\n" + b"".join(lines))
                self.reply("250 stored")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("250 OK")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class WebhookHandler(BaseHTTPRequestHandler):
    """Accepts a POST like Slack's incoming webhooks do (answers "ok") and keeps the body."""

    def do_POST(self) -> None:
        length = min(int(self.headers.get("Content-Length") or 0), 1 << 20)
        body = self.rfile.read(length).decode("utf-8", "replace")
        try:
            parsed: object = json.loads(body)
        except ValueError:
            parsed = body
        out = Path(self.server.hook_dir) / f"{time.time():.6f}.json"  # type: ignore[attr-defined]
        out.write_text(json.dumps({"path": self.path, "body": parsed}))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        return


def serve_webhooks(host: str, port: int, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    srv = ThreadingHTTPServer((host, port), WebhookHandler)
    srv.hook_dir = str(directory)  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()


def main() -> None:
    host, port, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    Path(directory).mkdir(parents=True, exist_ok=True)
    if len(sys.argv) > 4:
        serve_webhooks(host, int(sys.argv[4]), Path(directory) / "webhooks")
    with Server((host, port), Handler) as srv:
        srv.mail_dir = directory  # type: ignore[attr-defined]
        srv.serve_forever()


if __name__ == "__main__":
    main()
