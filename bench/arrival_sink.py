"""A small SMTP sink that records when each message arrives.

    python arrival_sink.py --port PORT --out FILE

Listens on 127.0.0.1:PORT and accepts every message (EHLO offers
PIPELINING and 8BITMIME; no STARTTLS, no AUTH).  For each message it
appends one line to FILE:

    SENT ARRIVED

SENT is the float in the message's ``X-Bench-Sent:`` header (time.time()
in the sender just before it called send_email); ARRIVED is time.time()
taken right after the recv() that brought the final dot, before the
sink parses anything or answers 250.  Both are the same clock
(CLOCK_REALTIME) on the same machine, so ARRIVED - SENT is the latency
from send_email to arrival.

Why not smtp-sink with a dump directory and file mtimes: Linux stamps
files with the coarse clock (one timer tick, up to 4 ms here), too coarse
for a 5 ms target.  This sink is one thread with select(): per message it
does a few recv() calls, one bytes.find and one line write, tens of
microseconds on its own CPU.
"""

import argparse
import os
import selectors
import signal
import socket
import sys
import time

EHLO = (b"250-arrival-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
        b"250 ENHANCEDSTATUSCODES\r\n")
MARK = b"\r\nX-Bench-Sent: "


class Conn:
    """One SMTP session: command mode, or data mode until CRLF.CRLF."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.data = False
        self.body = bytearray()

    def feed(self, chunk: bytes, arrived: float, out) -> bool:
        """Handle what came in; return False when the session is over."""
        replies = []
        self.buf += chunk
        while self.buf:
            if self.data:
                # The body so far starts with CRLF (added at DATA), so a
                # message that ends right after DATA is found as well.
                start = max(0, len(self.body) - 4)
                self.body += self.buf
                self.buf = b""
                end = self.body.find(b"\r\n.\r\n", start)
                if end < 0:
                    break
                self.buf = bytes(self.body[end + 5:])
                self._record(self.body[:end + 2], arrived, out)
                self.body = bytearray()
                self.data = False
                replies.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            line, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                break
            self.buf = rest
            verb = line[:4].upper()
            if verb == b"DATA":
                self.data = True
                self.body = bytearray(b"\r\n")
                replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"EHLO":
                replies.append(EHLO)
            elif verb == b"QUIT":
                replies.append(b"221 2.0.0 Bye\r\n")
                self.sock.sendall(b"".join(replies))
                return False
            elif verb == b"MAIL":
                replies.append(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                replies.append(b"250 2.1.5 Ok\r\n")
            elif verb in (b"HELO", b"RSET", b"NOOP"):
                replies.append(b"250 2.0.0 Ok\r\n")
            else:
                replies.append(b"502 5.5.2 Error: command not recognized\r\n")
        if replies:
            self.sock.sendall(b"".join(replies))
        return True

    @staticmethod
    def _record(body: bytearray, arrived: float, out) -> None:
        at = body.find(MARK)
        if at < 0:
            return          # not one of ours: nothing to time
        start = at + len(MARK)
        sent = body[start:body.find(b"\r\n", start)].decode("ascii", "replace")
        out.write("%s %.6f\n" % (sent.strip(), arrived))
        out.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(128)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    with open(args.out, "a") as out:
        while True:
            for key, _ in sel.select():
                if key.data is None:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        continue
                    sock.setblocking(True)  # select() says when recv() has data
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.sendall(b"220 arrival-sink ESMTP\r\n")
                    sel.register(sock, selectors.EVENT_READ, Conn(sock))
                    continue
                conn = key.data
                try:
                    chunk = conn.sock.recv(1 << 16)
                except OSError:
                    chunk = b""
                arrived = time.time()
                if not chunk or not conn.feed(chunk, arrived, out):
                    sel.unregister(conn.sock)
                    conn.sock.close()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        os._exit(0)
