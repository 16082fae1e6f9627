"""The lab's SMTP sink: accepts every message and stores it as a .eml file (no delivery).

Stand-in for the on-call mailbox, so tests can prove that a DR failure or a CRITICAL
verification really sent a notification through Airflow's notifier mechanism.
Usage: smtp_sink.py HOST PORT DIRECTORY
"""

from __future__ import annotations

import socketserver
import sys
import time
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


def main() -> None:
    host, port, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    Path(directory).mkdir(parents=True, exist_ok=True)
    with Server((host, port), Handler) as srv:
        srv.mail_dir = directory  # type: ignore[attr-defined]
        srv.serve_forever()


if __name__ == "__main__":
    main()
