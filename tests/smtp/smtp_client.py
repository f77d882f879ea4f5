"""A raw-socket SMTP client for the tests that must send what smtplib never would."""

from __future__ import annotations

import socket
import ssl


class RawSMTP:
    def __init__(self, address: tuple[str, int], timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.file = self.sock.makefile("rb")

    def reply(self) -> tuple[int, str]:
        """One whole (possibly multi-line) reply: (code, text with lines joined by \\n)."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("connection closed")
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(entry[4:] for entry in lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.send((line if isinstance(line, bytes) else line.encode()) + b"\r\n")
        return self.reply()

    def greeting(self) -> tuple[int, str]:
        return self.reply()

    def starttls(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = context.wrap_socket(self.sock)
        self.file = self.sock.makefile("rb")

    def closed(self) -> bool:
        """True when the server has closed the connection (EOF within the timeout)."""
        try:
            return self.file.read(1) == b""
        except (ConnectionError, OSError):
            return True

    def close(self) -> None:
        self.file.close()  # the makefile() reader holds the socket open too
        self.sock.close()
