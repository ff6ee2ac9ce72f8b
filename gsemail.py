"""gsemail: send email from a web application the way a careful MTA would.

One standard-library file that replaces GroupServer's ``gs.email`` and
``zope.sendmail``.  A request handler calls::

    from gsemail import send_email
    send_email('bounces@lists.example.org', ['a@example.com'], message,
               xverp=True)

``send_email`` writes the message to a durable Maildir queue (fsynced,
renamed into ``new/``, directory fsynced) and returns.  A background
processor thread, or a separate ``python -m gsemail`` process, delivers the
queue over SMTP:

* one connection carries many messages, pipelined (RFC 2920) when the
  relay allows: each message's MAIL, RCPT and DATA go out with the previous
  message's final dot, one round trip a message; ``sessions = N`` keeps N
  connections busy;
* every RCPT reply is read, so a 5xx for one recipient never loses the
  others and a 4xx keeps only that recipient queued;
* transient failures (4xx, 421, a dropped connection, a timeout, TLS or
  AUTH trouble) are retried with exponential backoff for up to 5 days;
  permanent ones become dead letters (``.rejected-NAME``) with the reason;
* XVERP is used when asked for and offered by the relay, and never costs a
  message when it is not;
* the queue format is zope.sendmail's, so an existing ``gs.email`` queue
  drains as it is and zope.sendmail can drain ours.

Configuration is GroupServer's ``gsconfig.ini``::

    [config-main]
    smtp = outgoing

    [smtp-outgoing]
    hostname = localhost
    port = 25
    queuepath = /var/spool/gsemail/main
    xverp = True

Use ``configure('gsconfig.ini', 'main')`` once per process, or set
``$GSEMAIL_CONFIG`` and ``$GSEMAIL_INSTANCE``.  Run a queue processor in
the foreground with ``python -m gsemail --config gsconfig.ini --instance
main``.  The same command's operator tools (list, show, status, flush,
retry, purge, check, send) call Queue and Mailer methods that scripts may
call too.  README.rst is the full manual; its "lower layer" section
documents the Queue, Mailer and QueueProcessor methods that embedders use.
The public names are those in ``__all__``; everything else is private.

The file reads top-down as a message travels, each helper before its first
user:

1. Errors and replies: GsEmailError and its subclasses, Reply.
2. Small helpers: one-line texts, times of any year, relay names, files
   opened safely (never a FIFO, never through a link).
3. Configuration: SMTPConfig and load_config (gsconfig.ini).
4. Messages and addresses: the checks and the preparation that send_email,
   ``gsemail send`` and Mailer.send share (_prepared).
5. The queue: whose it is; creating files; a queue file's head (zope's
   envelope, our dead-letter lines); a message's record; claims
   (_Claims); Queue itself, with the operator's views and actions.
6. The SMTP connection: the redacted transcript (debug = true), then
   _Connection, one socket and its pipelined replies, with a picture of the
   pipelined dot.
7. The mailer: Mailer connects (TLS, pinned or verified, AUTH with a
   password or an OAuth2 token from password_command, failover), delivers
   one message at a time (with XVERP, or making the VERP addresses itself)
   and returns an Outcome; RelayCheck for ``gsemail check``.
8. The queue processor: the delivery lines, _plan (the pure decision for
   an outcome), the shared rate limits (_RateLimiter), and QueueProcessor,
   which waits for the rates, claims, sends, pauses a relay that throttles,
   records and runs the thread.
9. send_email: configure, send_email (queued when the Zope transaction
   commits, with transactional = true: _MailDataManager), outbox() for an
   application's tests, shutdown, forks and uWSGI.
10. Django: EmailBackend, Django's messages queued as send_email queues.
11. The command line: main and one _cmd_ function per command; the
    sink, an SMTP server for development that keeps what it is given and
    delivers nothing; and sendmail mode (main run as sendmail or mailq, for
    cron, PHP, git and mutt).

Words that mean one thing throughout:

queue id     a message's file name in new/ or cur/ (also its record's name
             in state/, and what the commands show); a dead letter's is the
             id of the message it was.
claim        cur/.sending-ID (or new/.sending-ID), a hard link to the
             claiming process's claimer file: whoever holds it is the only
             one sending the message; a claim whose holder is gone is broken.
outcome      what one attempt did with each recipient: delivered, refused
             or deferred (an Outcome; its ``failed`` are the refused).
deferred     to be tried again later, after a 4xx reply or trouble on the
             way (a lost connection, a relay down); a deferred message waits
             in cur/, due at its file's mtime.
refused      answered with 5xx (or unsendable as it is): never asked again,
             and written to the message's dead letter at once.
dead letter  cur/.rejected-ID: the refused recipients, each with its reply,
             then every byte of the message; ``gsemail retry`` queues it
             again.
record       state/ID, the JSON advice kept beside a message (attempts,
             history, refusals so far); never needed to send it.
"""

import argparse
import atexit
import base64
import configparser
import contextlib
import dataclasses
import difflib
import email.headerregistry
import email.message
import email.parser
import email.policy
import email.utils
import errno
import fcntl
import functools
import grp
import hashlib
import heapq
import hmac
import importlib
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import pwd
import random
import re
import select
import shlex
import signal
import smtplib
import socket
import socketserver
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Mapping,
                    NamedTuple, NoReturn, Optional, Set, TextIO, Tuple, TypedDict, Union,
                    cast)

__version__ = "1.0.0"
__all__ = [
    "send_email", "configure", "shutdown", "load_config", "SMTPConfig",
    "Queue", "QueuedMessage", "QueueEntry", "Mailer", "Outcome", "RelayCheck",
    "QueueProcessor", "Reply", "main", "outbox",
    "GsEmailError", "ConfigError", "QueueError", "MessageError",
    "DeliveryError", "TLSError", "EmailBackend",
]

log = logging.getLogger("gsemail")


# ---------------------------------------------------------------------------
# Errors.  Every error carries an RFC 3463 enhanced status code (what went
# wrong, for the log and for stderr) and a sysexits.h code (for the CLI).
# ---------------------------------------------------------------------------

class GsEmailError(Exception):
    """Base class of every error gsemail raises on purpose."""

    status = "4.3.0"
    exit_code = os.EX_SOFTWARE

    def __init__(self, message: str, status: Optional[str] = None,
                 exit_code: Optional[int] = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(GsEmailError):
    """The configuration file is missing or wrong.  Nothing was queued."""

    status = "4.3.5"
    exit_code = os.EX_CONFIG


class QueueError(GsEmailError):
    """The queue directory cannot be created, used or written."""

    status = "4.3.0"
    exit_code = os.EX_CANTCREAT


class MessageError(GsEmailError, ValueError):
    """An address or message given to send_email is unusable.

    It is a ValueError, as the seed documents, so existing callers that
    catch ValueError keep working.  Nothing was queued.
    """

    status = "5.6.0"
    exit_code = os.EX_DATAERR


# An RFC 3463 enhanced status code at the start of a reply's text.
_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s|$)")


class Reply(NamedTuple):
    """An SMTP reply: the three-digit code and its text.

    ``status`` is the RFC 3463 enhanced code from the text (``5.1.1``), or
    one made from the reply code (``5.0.0``) when the server gave none.
    """

    code: int
    text: str

    @property
    def status(self) -> str:
        match = _ENHANCED.match(self.text)
        if match and match.group(1)[0] == str(self.code)[0]:
            return match.group(1)
        return "%d.0.0" % (self.code // 100)

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        text = self.text
        if not _ENHANCED.match(text):
            text = "%s %s" % (self.status, text)
        return "%d %s" % (self.code, text)

    def as_transient(self) -> "Reply":
        """The same reason, as a reason to try again later (a relay that
        cannot be used now: its AUTH or TLS refusal is no verdict on the
        message)."""
        if not self.permanent:
            return self
        status = "4" + self.status[1:]
        text = _ENHANCED.sub("", self.text, count=1).strip()
        return Reply(451, "%s %s (was %d)" % (status, text, self.code))

    @classmethod
    def parse(cls, line: str) -> "Reply":
        """Read back a reply written by ``str(reply)``."""
        match = re.match(r"(\d{3}) (.*)", line.strip(), re.S)
        if not match:
            return cls(451, "4.3.0 " + line.strip())
        return cls(int(match.group(1)), match.group(2))


class DeliveryError(GsEmailError):
    """SMTP delivery failed.  ``reply`` says why; ``refused`` maps each
    refused recipient to its Reply.  Transient when ``reply.code`` < 500."""

    def __init__(self, reply: Reply, message: Optional[str] = None,
                 refused: Optional[Dict[str, Reply]] = None) -> None:
        super().__init__(message or str(reply), status=reply.status,
                         exit_code=(os.EX_UNAVAILABLE if reply.permanent
                                    else os.EX_TEMPFAIL))
        self.reply = reply
        self.refused = refused or {}

    @property
    def transient(self) -> bool:
        return not self.reply.permanent


class TLSError(DeliveryError, RuntimeError):
    """TLS was required and could not be had (no STARTTLS, a failed
    handshake or an unverified certificate).  A RuntimeError, as the seed
    documents for ``force_tls``.  Queued mail is deferred, never sent in
    plain text."""


# ---------------------------------------------------------------------------
# Small helpers: texts, times, relay names and files opened safely, used
# from the configuration to the command line.
# ---------------------------------------------------------------------------

def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# Stored times (file mtimes, state and status files) can be anything: tmpfs
# keeps an mtime in the year 97036, and a damaged state file may hold NaN.
# datetime stops at the year 9999, so times become text here, with integer
# arithmetic that takes any year.

def _civil(days: int) -> Tuple[int, int, int]:
    """(year, month, day) of a day counted from 1970-01-01, in the proleptic
    Gregorian calendar, for any year (H. Hinnant's civil_from_days)."""
    z = days + 719468
    era, doe = divmod(z, 146097)
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, doy - (153 * mp + 2) // 5 + 1


def _days(year: int, month: int, day: int) -> int:
    """The inverse of _civil (days_from_civil)."""
    year -= month <= 2
    era, yoe = divmod(year, 400)
    doy = (153 * (month - 3 if month > 2 else month + 9) + 2) // 5 + day - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


def _iso(when: object) -> str:
    """A Unix time as ISO 8601 UTC text to the second, whatever it is: a year
    outside 0000-9999 has a sign (ISO 8601's expanded years, "+97036-..."),
    and what is no time (NaN, infinite) says so."""
    try:
        # when may be any object (hence the ignore): floor() raising is the check
        seconds = math.floor(when)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return "(not a time: %r)" % (when,)
    days, rest = divmod(seconds, 86400)
    year, month, day = _civil(days)
    return "%s-%02d-%02dT%02d:%02d:%02dZ" % (
        "%04d" % year if 0 <= year <= 9999 else "%+05d" % year, month, day,
        rest // 3600, rest % 3600 // 60, rest % 60)


def _parse_iso(text: str) -> Optional[float]:
    """What _iso wrote, as a Unix time; None for anything else."""
    match = re.fullmatch(r"\s*([+-][0-9]{4,}|[0-9]{4})-([0-9]{2})-([0-9]{2})"
                         r"T([0-9]{2}):([0-9]{2}):([0-9]{2})Z\s*", str(text))
    if not match:
        return None
    year, month, day, hour, minute, second = map(int, match.groups())
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and
            second < 60) or _civil(_days(year, month, day)) != (year, month, day):
        return None     # 2026-02-30, 25:00 and the like
    try:
        return float(_days(year, month, day) * 86400 + hour * 3600 + minute * 60 + second)
    except OverflowError:
        return None


def _whole_seconds(value: float) -> Optional[int]:
    """A number of seconds as an int; None when it is no number (NaN, inf)."""
    try:
        return math.floor(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _age(seconds: float) -> str:
    """45s, 12m, 3h05m, 2d04h; '?' for what is no number of seconds."""
    s = _whole_seconds(seconds)
    if s is None:
        return "?"
    s = max(0, s)
    if s < 60:
        return "%ds" % s
    if s < 3600:
        return "%dm" % (s // 60)
    if s < 86400:
        return "%dh%02dm" % (s // 3600, s % 3600 // 60)
    return "%dd%02dh" % (s // 86400, s % 86400 // 3600)


def _span(seconds: float) -> str:
    """How long something took, in words that fit the span: "4 s", "12 min",
    "3.5 h", "5.0 days" (a dead letter's "gave up after N attempts in ...")."""
    s = _whole_seconds(seconds)
    if s is None:
        return "? s"
    if s < 120:
        return "%d s" % max(0, s)
    if s < 2 * 3600:
        return "%d min" % (s // 60)
    if s < 2 * 86400:
        return "%.1f h" % (seconds / 3600)
    return "%.1f days" % (seconds / 86400)


def _where(host: str, port: int) -> str:
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


class _NotRegular(OSError):
    """A queue, config or secret file that is not a regular file: a FIFO
    (which would block the open or the read), a link, a directory."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(errno.EINVAL, "%s is %s, not a regular file" % (path, what), path)
        self.what = what

    def __str__(self) -> str:
        return str(self.strerror)


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a regular file"


def _opened(path: str, follow: bool = False) -> Tuple[int, os.stat_result]:
    """_open_regular's fd, with the fstat that checked it (see there)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError:
        # ELOOP (a link, with O_NOFOLLOW), ENXIO (a socket): say what it is
        try:
            st = os.stat(path) if follow else os.lstat(path)
        except OSError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise _NotRegular(path, _kind(st.st_mode)) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _NotRegular(path, _kind(st.st_mode))
    return fd, st


def _open_regular(path: str, follow: bool = False) -> int:
    """A read-only fd on the regular file at path, or _NotRegular.

    O_NONBLOCK, so that opening a FIFO returns at once instead of waiting
    for a writer (SIGTERM would not end that wait); O_NOFOLLOW unless
    follow, so that no link in the queue leads outside it.  The check is
    fstat on what was opened, so a file swapped after a look cannot pass.
    """
    return _opened(path, follow)[0]


def _open_file(path: str) -> io.BufferedReader:
    """The regular file at path, open for reading (see _open_regular)."""
    return os.fdopen(_open_regular(path), "rb")


def _read_regular(path: str) -> Tuple[bytes, os.stat_result]:
    """All of the regular file at path (opened as _open_regular opens it)
    and its fstat.  For the files read once per message (the message, its
    state): os.read on the fd, with no file object, costs 5 system calls
    fewer than _open_file's read (fdopen's fstat, isatty and lseek calls, and
    the read that finds the end).  A read of the fstat's size and one byte
    more that returns less has found the end of a regular file; one that
    fills the buffer (the file grew) or comes short of the size (it shrank
    meanwhile) goes on to an empty read, as a file object's read() would.
    """
    fd, st = _opened(path)
    try:
        chunk = os.read(fd, st.st_size + 1)
        if len(chunk) == st.st_size:
            return chunk, st
        chunks = [chunk]
        while chunk:
            chunk = os.read(fd, max(st.st_size, 65536))
            chunks.append(chunk)
        return b"".join(chunks), st
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Configuration: GroupServer's gsconfig.ini.
# ---------------------------------------------------------------------------

# Postfix's default verp_delimiter_filter: the characters XVERP=.. may use.
_VERP_DELIMITERS = "-=+"
# The largest value of each numeric option (README's option table).  port's
# is 65535, and every lower bound is above zero.
_LIMITS: Dict[str, float] = {
    "timeout": 3600.0, "min_backoff_time": 86400.0, "max_backoff_time": 86400.0,
    "max_queue_lifetime": 30 * 86400.0, "poll_interval": 3600.0,
    "messages_per_connection": 100000, "recipients_per_transaction": 100000,
    "sessions": 100,
    # message_rate and recipient_rate, per second (and at least 1/d)
    "message_rate": 100000.0, "recipient_rate": 100000.0,
}


# auth_mechanism's values: auto picks among the three password mechanisms
# (Mailer._mechanism says in which order); XOAUTH2 is used only when asked
# for, since what it sends is a token, not a password.
_MECHANISMS = ("auto", "plain", "login", "cram-md5", "xoauth2")


def _command_words(command: str, where: str) -> List[str]:
    """password_command as the argv it runs (no shell), or a ConfigError."""
    def bad(why: str) -> ConfigError:
        return ConfigError("option password_command = %r%s: %s" % (command, where, why))
    if not isinstance(command, str):
        raise bad("must be a command line (a string)")
    try:
        words = shlex.split(command)
    except ValueError as e:     # an unclosed quote, a lone backslash at the end
        raise bad("cannot be split into words as a shell would (%s)" % e) from None
    if not words or not words[0]:
        raise bad("is empty: give the command that prints the password or token")
    return words


def _whole(value: object) -> Optional[int]:
    """value if it is an int (not a bool, which is one to Python), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _integer(text: str) -> int:
    """A whole number written with ASCII digits (int() also takes '1_000' and
    other scripts' digits)."""
    if not re.fullmatch(r"\s*[0-9]+\s*", text):
        raise ValueError(text)
    return int(text)


def _duration(text: str) -> float:
    """'90', '90s', '5m', '1h', '5d' or '1w' as seconds (ASCII digits only)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*", text.lower())
    if not match:
        raise ValueError(text)
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    return float(match.group(1)) * scale[match.group(2)]


class _Rate(NamedTuple):
    """A rate limit (message_rate, recipient_rate): number per unit seconds,
    as the option wrote it (text)."""

    number: float
    unit: float
    text: str

    @property
    def interval(self) -> float:
        """Seconds one message (or recipient) takes of the limit."""
        return self.unit / self.number

    @property
    def per_second(self) -> float:
        return self.number / self.unit


_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _rate(text: str) -> _Rate:
    """'14/s', '200/m', '10000/h' or '50000/d' (ASCII digits, N above zero,
    spaces allowed around each part) as a _Rate; ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*([smhd])\s*", text.lower())
    if not match or not float(match.group(1)) > 0:
        raise ValueError(text)
    return _Rate(float(match.group(1)), _RATE_UNITS[match.group(2)],
                 "%s/%s" % (match.group(1), match.group(2)))


def _rate_option(text: str) -> Optional[str]:
    """An option's rate, checked (SMTPConfig keeps the text and parses it
    again, as it must for a config built directly); empty is no limit."""
    if not text.strip():
        return None
    return _rate(text).text


@functools.cache
def _fqdn() -> str:
    # getfqdn() can take seconds on a badly configured resolver, and
    # smtplib calls it per connection when local_hostname is not given.
    return socket.getfqdn() or "localhost"


def _ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _fingerprints(text: str) -> Tuple[str, ...]:
    """The SHA-256 fingerprints in a tls_fingerprint value, each as
    "AB:CD:..." (upper case, colons): 'sha256:AB:CD:..., abcd...' with or
    without the prefix (msmtp writes none), with or without colons (dma
    writes none), upper or lower case.  Raises ValueError saying why not."""
    found = []
    for entry in text.split(","):
        entry = entry.strip()
        bare = entry[7:] if entry[:7].lower() == "sha256:" else entry
        digits = bare.replace(":", "")
        if not entry or not re.fullmatch(r"[0-9A-Fa-f]*", digits) or (
                ":" in bare and not re.fullmatch(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})*", bare)):
            raise ValueError("%r is not a fingerprint: write sha256: and 32 hexadecimal "
                             "pairs, as gsemail check prints them" % entry)
        if len(digits) in (32, 40):     # MD5, SHA-1: what older tools print
            raise ValueError("%r is an MD5 or SHA-1 fingerprint: give the SHA-256 one "
                             "(gsemail check prints it)" % entry)
        if len(digits) != 64:
            raise ValueError("%r has %d hexadecimal digits, not the 64 of a SHA-256 "
                             "fingerprint" % (entry, len(digits)))
        found.append(":".join(re.findall("..", digits.upper())))
    return tuple(found)


def _servername(name: str) -> bool:
    """name can be verified in a certificate and sent as SNI: an ASCII host
    name (an internationalised one in its xn-- form) or an IP address."""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return len(name) <= 253 and re.fullmatch(
        r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
        r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?", name) is not None


def _relays(hostname: str, port: int) -> List[Tuple[str, int]]:
    """'a.example.org, b.example.org:2525, [2001:db8::1]:25' as (host, port)
    pairs; an entry without a port has the port option's.  Raises ValueError
    saying what is wrong."""
    found = []
    for entry in hostname.split(","):
        entry = entry.strip()
        match = re.fullmatch(r"\[([^\]]+)\](?::(\w*))?|([^:\s\[\]]+)(?::(\w*))?", entry)
        if not match:
            if entry.count(":") > 1 and _ipv6(entry):
                found.append((entry, port))     # a bare IPv6 address
                continue
            raise ValueError("relay %r is not HOST or HOST:PORT (write an IPv6 address "
                             "as [ADDRESS]:PORT)" % entry)
        host = match.group(1) or match.group(3)
        number = match.group(2) if match.group(1) else match.group(4)
        if number is None:
            found.append((host, port))
        elif re.fullmatch(r"[0-9]+", number) and 1 <= int(number) <= 65535:  # ASCII only
            found.append((host, int(number)))
        else:
            raise ValueError("relay %r: the port must be a whole number from 1 to "
                             "65535" % entry)
    return found


@dataclasses.dataclass(frozen=True)
class SMTPConfig:
    """How to reach the relay and where the queue lives.

    ``load_config`` makes one from gsconfig.ini; tests and embedders may
    build one directly.  Every field is checked when it is made.
    """

    hostname: str
    port: int
    username: Optional[str] = None
    password: Optional[str] = dataclasses.field(default=None, repr=False)
    no_tls: bool = False
    force_tls: bool = False
    queuepath: str = "/tmp/mailqueue"
    processorthread: bool = True
    xverp: bool = False
    timeout: float = 60.0
    implicit_tls: Optional[bool] = None
    tls_verify: Optional[bool] = None
    cafile: Optional[str] = None
    ehlo_name: Optional[str] = None
    messages_per_connection: int = 100
    recipients_per_transaction: int = 1000
    min_backoff_time: float = 60.0
    max_backoff_time: float = 3600.0
    max_queue_lifetime: float = 5 * 86400.0
    poll_interval: float = 1.0
    sessions: int = 1
    #: the domain that sendmail mode gives a bare name (root, a cron job's
    #: MAILTO, the invoking user as sender): root -> root@DOMAIN.  None:
    #: this host's fully qualified name (_fqdn), read when it is needed.
    default_domain: Optional[str] = None
    #: send_email joins the current Zope transaction (the ``transaction``
    #: package): queued at its commit, dropped by its abort
    transactional: bool = False
    #: a command (split as a shell would, run without one) that prints the
    #: password or OAuth2 token on its first line; run for each connection.
    #: Not in repr: its arguments may hold a secret (a client secret).
    password_command: Optional[str] = dataclasses.field(default=None, repr=False)
    auth_mechanism: str = "auto"
    #: log every command and reply, redacted, on the gsemail.smtp logger
    #: (TurboMail's option; -vvv sets it for one run)
    debug: bool = False
    #: what a message asking for VERP does on a relay without XVERP:
    #: "client" (gsemail makes each recipient's bounce address itself, one
    #: transaction per recipient) or "plain" (sent once, without VERP)
    verp_fallback: str = "client"
    #: VERP's two delimiters, as Postfix's XVERP=+= (each from -=+)
    verp_delimiters: str = "+="
    tls_fingerprint: Optional[str] = None
    tls_servername: Optional[str] = None
    message_rate: Optional[str] = None
    recipient_rate: Optional[str] = None
    source: str = dataclasses.field(default="", compare=False)
    # hostname parsed, once, by __post_init__: not an argument, and left out
    # of comparison and repr (hostname says it); dataclasses.replace makes a
    # new instance, so a new hostname is parsed anew.
    _relay_list: Tuple[Tuple[str, int], ...] = dataclasses.field(
        default=(), init=False, repr=False, compare=False)
    # message_rate and recipient_rate parsed, by __post_init__ (None: no limit)
    _message_limit: Optional[_Rate] = dataclasses.field(
        default=None, init=False, repr=False, compare=False)
    _recipient_limit: Optional[_Rate] = dataclasses.field(
        default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = (" in %s" % self.source) if self.source else ""

        def bad(option: str, value: object, why: str) -> ConfigError:
            return ConfigError("option %s = %r%s: %s" % (option, value, where, why))

        if not isinstance(self.hostname, str) or not self.hostname.strip():
            raise bad("hostname", self.hostname, "a host name or address is required")
        if _whole(self.port) is None or not 1 <= self.port <= 65535:
            raise bad("port", self.port, "must be a whole number of at least 1 and at "
                      "most 65535")
        try:
            relays = tuple(_relays(self.hostname, self.port))
        except ValueError as e:
            raise bad("hostname", self.hostname, str(e)) from None
        object.__setattr__(self, "_relay_list", relays)     # hostname is frozen
        if self.password_command is not None:
            _command_words(self.password_command, where)    # raises ConfigError
            if self.password:
                raise ConfigError("options password and password_command are both set%s: "
                                  "give the password in one of them only" % where)
        if bool(self.username) != bool(self.password or self.password_command):
            option = "password (or password_command)" if self.username else "username"
            raise ConfigError("option %s is missing%s: username and password go "
                              "together (leave both empty for no AUTH)" % (option, where))
        mechanism = self.auth_mechanism.strip().lower() \
            if isinstance(self.auth_mechanism, str) else self.auth_mechanism
        if mechanism not in _MECHANISMS:
            raise bad("auth_mechanism", self.auth_mechanism, "must be one of %s"
                      % ", ".join(_MECHANISMS))
        object.__setattr__(self, "auth_mechanism", mechanism)
        if mechanism != "auto" and not self.username:
            raise bad("auth_mechanism", self.auth_mechanism, "says how to log in, but "
                      "username is not set (set username and the password, or remove it)")
        if self.no_tls and self.force_tls:
            raise ConfigError("options no_tls and force_tls are both true%s: "
                              "choose one" % where)
        if self.no_tls and self.implicit_tls:
            raise ConfigError("options no_tls and implicit_tls are both true%s: "
                              "choose one" % where)
        if not self.queuepath:
            raise bad("queuepath", self.queuepath, "must name a directory")
        object.__setattr__(self, "queuepath",
                           os.path.abspath(os.path.expanduser(self.queuepath)))
        if self.cafile is not None and not os.path.isfile(self.cafile):
            raise bad("cafile", self.cafile, "no such file")
        if self.tls_fingerprint not in (None, ""):     # empty means unset
            try:
                _fingerprints(self.tls_fingerprint)
            except (ValueError, AttributeError) as e:     # AttributeError: not a str
                raise bad("tls_fingerprint", self.tls_fingerprint, str(e)) from None
            # A pin is a promise that this relay talks TLS: without TLS it
            # pins nothing (as Postfix's "fingerprint" level, which is mandatory TLS).
            if self.no_tls:
                raise ConfigError("options no_tls and tls_fingerprint are both set%s: "
                                  "a pinned certificate needs TLS; choose one" % where)
            if self.tls_verify is False:
                raise ConfigError("options tls_verify = false and tls_fingerprint are "
                                  "both set%s: the fingerprint is a check; choose one"
                                  % where)
        if self.tls_servername not in (None, "") and (
                not isinstance(self.tls_servername, str) or
                not _servername(self.tls_servername)):
            raise bad("tls_servername", self.tls_servername, "must be a host name (an "
                      "internationalised one in its xn-- form) or an IP address")
        # Every number has an upper bound (README's option table): a huge
        # value would otherwise fail later, at a socket or a wait, where it
        # can only defer mail or stop a processor.
        for name in ("timeout", "min_backoff_time", "max_backoff_time",
                     "max_queue_lifetime", "poll_interval"):
            value, most = getattr(self, name), _LIMITS[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not 0 < value <= most:      # NaN fails this too
                raise bad(name, value, "must be a duration above zero and at most %d "
                          "(%s)" % (most, _age(most)))
        for name in ("messages_per_connection", "recipients_per_transaction", "sessions"):
            value, most = getattr(self, name), _LIMITS[name]
            if _whole(value) is None or not 1 <= value <= most:
                raise bad(name, value, "must be a whole number of at least 1 and at "
                          "most %d" % most)
        if self.max_backoff_time < self.min_backoff_time:
            raise bad("max_backoff_time", self.max_backoff_time,
                      "must not be less than min_backoff_time")
        fallback = self.verp_fallback
        if not isinstance(fallback, str) or fallback.lower() not in ("client", "plain"):
            raise bad("verp_fallback", fallback, "must be client or plain")
        object.__setattr__(self, "verp_fallback", fallback.lower())
        # Postfix's verp_delimiter_filter (-=+ by default) is what a relay
        # that offers XVERP takes; the same rule here, so that client VERP
        # makes only addresses Postfix would have made.
        delims = self.verp_delimiters
        if not isinstance(delims, str) or len(delims) != 2 or \
                not all(c in _VERP_DELIMITERS for c in delims):
            raise bad("verp_delimiters", delims, "must be two characters, each one of "
                      "%s (as Postfix's verp_delimiter_filter)" % _VERP_DELIMITERS)
        for name, parsed in (("message_rate", "_message_limit"),
                             ("recipient_rate", "_recipient_limit")):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                limit = _rate(value) if isinstance(value, str) else None
            except ValueError:
                limit = None
            if limit is None:
                raise bad(name, value, "must be a rate such as 14/s, 200/m, 10000/h or "
                          "50000/d (N above zero)")
            # At least one a day: a slower limit would hold mail for longer
            # than max_queue_lifetime allows it to wait.
            if not 1 / 86400.0 <= limit.per_second <= _LIMITS[name]:
                raise bad(name, value, "must be at least 1/d and at most %d/s"
                          % _LIMITS[name])
            object.__setattr__(self, parsed, limit)     # frozen, as _relay_list
        domain = self.default_domain
        if domain is not None:
            if isinstance(domain, str):
                domain = domain.strip()
            if domain == "":
                domain = None       # empty means unset, as for the other options
            elif not isinstance(domain, str) or "@" in domain or \
                    _address_problem("postmaster@" + domain):
                raise bad("default_domain", self.default_domain, "must be a domain such as "
                          "example.org, which completes a bare name (root -> "
                          "root@example.org)")
            object.__setattr__(self, "default_domain", domain)

    @property
    def relays(self) -> List[Tuple[str, int]]:
        """The relays in hostname, in the order they are tried, as (host, port)."""
        return list(self._relay_list)

    @property
    def use_implicit_tls(self) -> bool:
        """SMTPS: TLS from the first byte (port 465 unless set)."""
        if self.implicit_tls is None:
            return self.port == 465 and not self.no_tls
        return self.implicit_tls

    @property
    def tls_required(self) -> bool:
        """TLS or nothing: force_tls, implicit TLS or a pinned certificate."""
        return self.force_tls or self.use_implicit_tls or bool(self.fingerprints)

    @property
    def fingerprints(self) -> Tuple[str, ...]:
        """tls_fingerprint's SHA-256 fingerprints, each as "AB:CD:..."."""
        return _fingerprints(self.tls_fingerprint) if self.tls_fingerprint else ()

    @property
    def verify_certificates(self) -> bool:
        """Whether the certificate is verified against the CAs, for every
        relay: where TLS is required, unless tls_verify says otherwise or a
        pinned fingerprint decides instead.  (Mailer also verifies it, even
        when TLS is only opportunistic, before AUTH to a relay that is not
        loopback: see README's tls_verify.)"""
        if self.tls_verify is not None:
            return self.tls_verify
        return self.tls_required and not self.fingerprints

    @property
    def local_hostname(self) -> str:
        return self.ehlo_name or _fqdn()

    @property
    def claim_timeout(self) -> float:
        """How old a claim by another host must be before it is broken.

        The owner refreshes its claim while it works; no SMTP step waits
        longer than ``timeout``, so three of them plus a margin is safe.
        """
        return 3 * self.timeout + 60


def _boolean(text: str) -> bool:
    """true/false, yes/no, on/off or 1/0, as configparser reads them."""
    state = configparser.ConfigParser.BOOLEAN_STATES.get(text.lower())
    if state is None:
        raise ValueError(text)
    return state


# Options, their parser and whether they are required.  The first nine are
# gs.email's; the rest are ours.
_OPTIONS: Dict[str, Callable[[str], object]] = {
    "hostname": str, "port": _integer, "username": str, "password": str,
    "no_tls": _boolean, "force_tls": _boolean, "queuepath": str,
    "processorthread": _boolean, "xverp": _boolean,
    "timeout": _duration, "implicit_tls": _boolean, "tls_verify": _boolean,
    "cafile": str, "ehlo_name": str, "messages_per_connection": _integer,
    "recipients_per_transaction": _integer, "min_backoff_time": _duration,
    "max_backoff_time": _duration, "max_queue_lifetime": _duration,
    "poll_interval": _duration, "sessions": _integer, "password_env": str,
    "password_file": str, "password_command": str, "auth_mechanism": str,
    "debug": _boolean, "verp_fallback": str, "verp_delimiters": str,
    "tls_fingerprint": str, "tls_servername": str,
    "message_rate": _rate_option, "recipient_rate": _rate_option,
    "default_domain": str,
    "transactional": _boolean,
}
# What a value that its parser refuses should have been.
_WANTED: Dict[Callable[[str], object], str] = {
    _boolean: "boolean (use true/false, yes/no, on/off or 1/0)",
    _integer: "whole number",
    _duration: "duration such as 60, 5m, 1h or 5d",
    _rate_option: "rate such as 14/s, 200/m, 10000/h or 50000/d",
}
_REQUIRED = ("hostname", "port")
# The four ways to give the password: at most one of them (_resolve_password).
_SECRET_OPTIONS = ("password", "password_env", "password_file", "password_command")


class _IniParser(configparser.ConfigParser):
    """gsconfig.ini as gs.config reads it: strict, with % interpolation."""

    def optionxform(self, optionstr: str) -> str:
        return optionstr    # option names as written, like gs.config


def _unreadable(path: str, e: Exception) -> ConfigError:
    """The ConfigError for an error reading the config file at path."""
    if isinstance(e, FileNotFoundError):
        return ConfigError("%s: no such config file" % path)
    if isinstance(e, _NotRegular):
        return ConfigError("%s: is %s, not a config file" % (path, e.what))
    if isinstance(e, PermissionError):
        return ConfigError("%s: cannot read the config file (permission "
                           "denied)" % path)
    if isinstance(e, UnicodeDecodeError):
        return ConfigError("%s: not a UTF-8 text file (byte %d)" % (path, e.start))
    if isinstance(e, configparser.DuplicateSectionError):
        return ConfigError("%s, line %s: section [%s] appears twice"
                           % (path, e.lineno, e.section))
    if isinstance(e, configparser.DuplicateOptionError):
        return ConfigError("%s, line %s: option %s appears twice in [%s]"
                           % (path, e.lineno, e.option, e.section))
    if isinstance(e, configparser.MissingSectionHeaderError):
        return ConfigError("%s, line %s: text before the first [section] header"
                           % (path, e.lineno))
    if isinstance(e, configparser.ParsingError):
        # Lines are not quoted: they might hold a password.
        lines = ", ".join(str(n) for n, _ in e.errors)
        return ConfigError("%s: cannot parse line %s (not 'option = value')"
                           % (path, lines))
    return ConfigError("%s: cannot read the config file: %s"
                       % (path, getattr(e, "strerror", None)))


def _read_ini(path: str) -> configparser.ConfigParser:
    """The parsed file at path; ConfigError saying why it cannot be read."""
    parser = _IniParser(interpolation=configparser.BasicInterpolation(), strict=True)
    try:
        # A link to the config is fine (configuration management makes
        # them); what it leads to must be a regular file: a FIFO would hang
        # every command.  utf-8-sig: Windows editors start the file with a BOM.
        with open(_open_regular(path, follow=True), encoding="utf-8-sig") as f:
            parser.read_file(f, source=path)
    except (OSError, UnicodeDecodeError, configparser.DuplicateSectionError,
            configparser.DuplicateOptionError, configparser.ParsingError) as e:
        raise _unreadable(path, e) from None
    return parser


def _get(parser: configparser.ConfigParser, path: str, section: str,
         option: str) -> str:
    try:
        return parser.get(section, option)
    except configparser.InterpolationError:
        raise ConfigError("%s [%s]: option %s has a lone %%: write %%%% for a "
                          "literal %%" % (path, section, option)) from None


def _smtp_section(parser: configparser.ConfigParser, path: str, instance: str) -> str:
    """The [smtp-NAME] section of instance: the one its [config-INSTANCE]
    names, or else [smtp-INSTANCE]."""
    pointer = "config-%s" % instance
    if parser.has_section(pointer):
        if not parser.has_option(pointer, "smtp"):
            raise ConfigError("%s: section [%s] has no option smtp naming its "
                              "[smtp-NAME] section" % (path, pointer))
        section = "smtp-%s" % _get(parser, path, pointer, "smtp").strip()
        if not parser.has_section(section):
            raise ConfigError("%s: section [%s] (named by smtp in [%s]) is "
                              "missing" % (path, section, pointer))
    else:
        section = "smtp-%s" % instance
        if not parser.has_section(section):
            raise ConfigError("%s: neither section [%s] nor [%s] exists (instance "
                              "%r)" % (path, pointer, section, instance))
    return section


def _option_values(parser: configparser.ConfigParser, path: str, section: str,
                   where: str) -> Dict[str, Any]:
    """SMTPConfig's arguments from the options set in section, each
    converted by its parser (SMTPConfig checks them); unknown options are
    skipped, with a warning when they look like a known one mistyped."""
    values: Dict[str, Any] = {"source": where}
    for option in parser.options(section):
        convert = _OPTIONS.get(option)
        raw = _get(parser, path, section, option)
        if convert is None:
            close = difflib.get_close_matches(option, _OPTIONS, n=1, cutoff=0.8)
            if close:
                log.warning("4.3.5 %s: option %s is not known; did you mean %s?",
                            where, option, close[0])
            continue
        value = raw.strip()
        if option in ("username", "cafile", "ehlo_name") + _SECRET_OPTIONS and not value:
            continue    # empty means unset, as in gs.email
        if convert is str:
            values[option] = raw if option == "password" else value
            continue
        try:
            values[option] = convert(value)
        except ValueError:
            shown = "(hidden)" if option == "password" else repr(value)
            raise ConfigError("%s: option %s = %s is not a %s"
                              % (where, option, shown, _WANTED[convert])) from None
    return values


def _port_of_relays(hostname: str) -> Optional[int]:
    """The first relay's port when every relay in hostname names its own
    (then the port option is not needed); else None."""
    try:
        relays = _relays(hostname, 0)   # 0: no port given
    except ValueError:
        return None     # SMTPConfig says what is wrong with it
    if any(port == 0 for _, port in relays):
        return None
    return relays[0][1]


def _password_from_env(name: str, where: str) -> str:
    secret = os.environ.get(name)
    if not secret:
        raise ConfigError("%s: option password_env = %r: the environment variable %s "
                          "is %s" % (where, name, name, "empty" if secret == "" else "not set"))
    return secret


def _password_from_file(path: str, where: str) -> str:
    """The password in the file at path: one line, not world-readable."""
    bad = "%s: option password_file = %r: " % (where, path)
    try:
        # A symbolic link to the secret is followed: Kubernetes mounts each
        # secret as a link (NAME -> ..data/NAME) and Docker's and systemd's
        # credentials may be links too.  That gives no one more than the
        # file itself does: the file opened must be a regular file (checked
        # on the open file, not on the name) that is not world-readable, and
        # reading it needs the same permissions, link or not.  O_NONBLOCK: a
        # FIFO (or a link to one) must be refused, not wait for a writer.
        fd = _open_regular(path, follow=True)
    except FileNotFoundError:
        raise ConfigError(bad + "no such file") from None
    except _NotRegular as e:
        raise ConfigError(bad + "it is %s, not a regular file" % e.what) from None
    except OSError as e:
        raise ConfigError(bad + "cannot read it: %s" % e.strerror) from None
    try:
        st = os.fstat(fd)
        if st.st_mode & stat.S_IROTH:
            # A secret every local user can read is no secret: refuse to use it.
            raise ConfigError(bad + "the file is readable by every user (mode %04o): "
                              "chmod o-rwx it" % stat.S_IMODE(st.st_mode))
        raw = os.read(fd, 65536)
    finally:
        os.close(fd)
    try:
        secret = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(bad + "not UTF-8 text") from None
    if not secret:
        raise ConfigError(bad + "the file is empty")
    if "\n" in secret or "\r" in secret:
        raise ConfigError(bad + "the file has more than one line (only the password "
                          "goes in it)")
    return secret


def _resolve_password(values: Dict[str, Any], path: str, where: str) -> None:
    """Replace password_env or password_file in values by the password it
    names (a file relative to the config at path); only one of the four
    ways (with password and password_command) may be given.
    password_command stays as it is: it runs for each connection, when the
    password is needed (Mailer._password), and its output is never kept."""
    given = [o for o in _SECRET_OPTIONS if o in values]
    if len(given) > 1:
        raise ConfigError("%s: options %s are %s set: give the password in one of "
                          "them only" % (where, " and ".join(given),
                                         "both" if len(given) == 2 else "all"))
    if "password_env" in values:
        values["password"] = _password_from_env(str(values.pop("password_env")), where)
    elif "password_file" in values:
        values["password"] = _password_from_file(
            os.path.join(os.path.dirname(os.path.abspath(path)),
                         os.path.expanduser(str(values.pop("password_file")))), where)


def load_config(path: str, instance: str = "default") -> SMTPConfig:
    """Read the SMTP settings of ``instance`` from the gsconfig.ini at path.

    ``[config-<instance>]`` with ``smtp = NAME`` selects ``[smtp-NAME]``;
    without a ``[config-<instance>]`` section ``[smtp-<instance>]`` is used.
    Raises ConfigError naming the file, section and option at fault.
    """
    parser = _read_ini(path)
    section = _smtp_section(parser, path, instance)
    where = "%s [%s]" % (path, section)
    values = _option_values(parser, path, section, where)
    if "port" not in values and "hostname" in values:
        # Not needed when every relay in hostname names its port.
        port = _port_of_relays(str(values["hostname"]))
        if port is not None:
            values["port"] = port
    for option in _REQUIRED:
        if option not in values:
            raise ConfigError("%s: required option %s is missing" % (where, option))
    _resolve_password(values, path, where)
    return SMTPConfig(**values)


# ---------------------------------------------------------------------------
# Messages and addresses: the checks and the preparation that send_email,
# the send command and Mailer.send share (_prepared), so that a message is
# made one way (its Message-ID, its line ends) whoever sends it.  An address
# must also come back as itself from zope.sendmail's envelope, so how zope
# reads one is here too.
# ---------------------------------------------------------------------------

# Control characters: C0 (CR, LF, NUL, ...), DEL and C1 (U+0080..U+009F,
# U+0085 NEL among them), and the line and paragraph separators that
# str.splitlines() and many log viewers break lines at.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# RFC 5321's Quoted-string local part ("a b"@example.org): any character but
# a control, '"' and '\', or a quoted pair.
_QUOTED_LOCAL = re.compile(r'"(?:[^"\\]|\\.)*"')


# Characters that make an envelope line more than bare addresses and commas:
# then it is read with email.utils, as zope.sendmail reads it.
_ENVELOPE_SPECIAL = re.compile(r'["()<>:;\[\]\\\s]')


def _zope_sender(text: str) -> str:
    """X-Zope-From as zope.sendmail 7.3 sends it: smtplib's quoteaddr, that
    is email.utils.parseaddr, takes the address out of 'Name <address>'."""
    text = text.strip()
    if not _ENVELOPE_SPECIAL.search(text) or _CONTROL.search(text):
        return text     # a bare address; or a broken one, refused as it is
    address = email.utils.parseaddr(text)[1]
    if address:
        return address
    return "" if text == "<>" else text     # as quoteaddr: sent as it is


def _zope_recipients(text: str) -> List[str]:
    """X-Zope-To as zope.sendmail 7.3 reads it (email.utils.getaddresses,
    so display names and quoted commas are understood), once each."""
    if not _ENVELOPE_SPECIAL.search(text.strip().replace(", ", ",")) or \
            _CONTROL.search(text):
        # Bare addresses (what we write) need no parser; and from a line with
        # CR or another control character no address may be pieced together
        # (getaddresses would find one after a CR): split, and each piece
        # is refused or sent as it is.
        found = [r.strip() for r in text.split(",")]
    else:
        found = [address for _, address in email.utils.getaddresses([text])]
    return list(dict.fromkeys(r for r in found if r))


def _envelope_problem(address: str) -> Optional[str]:
    """Why address would not be read back as itself from zope's envelope."""
    if not _ENVELOPE_SPECIAL.search(address):
        return None
    for read in (_zope_recipients(address), [_zope_sender(address)]):
        if read != [address]:
            return ("would be read back from zope.sendmail's envelope as %s" %
                    (", ".join("<%s>" % r for r in read) or "no address"))
    return None


def _address_problem(address: str) -> Optional[str]:
    """Why address cannot go in MAIL FROM or RCPT TO, or None if it can.

    A quoted local part may hold spaces, as RFC 5321 allows and Postfix
    accepts; anywhere else a space or a '"' is refused."""
    if _CONTROL.search(address):
        return "contains a control character (CR, LF, NUL, U+0085, ...)"
    if len(address.encode("utf-8")) > 254:
        return "is longer than 254 octets"
    if "," in address:
        return "contains a comma (give each address as its own item of the list)"
    if "<" in address or ">" in address:
        return "contains < or > (give the bare address, not 'Name <address>')"
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "is not of the form local-part@domain"
    if " " in domain:
        return "contains a space in its domain"
    if local.startswith('"'):
        if not _QUOTED_LOCAL.fullmatch(local):
            return "has a local part that is not a whole quoted string (\"...\")"
    elif " " in local:
        return "contains a space (outside a quoted local part such as \"a b\"@...)"
    elif '"' in local:
        return "contains a '\"' outside a quoted local part"
    return _envelope_problem(address)


@functools.lru_cache(maxsize=64)
def _sender_problem(sender: str) -> Optional[str]:
    """_address_problem for a sender: a queue's mail comes from a few
    senders, so each is checked once (Mailer._preflight, every message)."""
    return _address_problem(sender)


def _shown(address: str) -> str:
    """address for a log line or an error, its control characters escaped
    as Python does, so that none can start a forged line."""
    return _CONTROL.sub(lambda m: "\\x%02x" % ord(m.group()) if ord(m.group()) < 256
                        else "\\u%04x" % ord(m.group()), address)


def _crlf(data: bytes) -> bytes:
    """data with every line ending in CRLF (bare CR and bare LF included)."""
    # Most messages have CRLF already: looking is much cheaper than
    # rewriting.  One pass finds the CRLFs; a CR or LF left between them is
    # bare (memchr finds none at once).  A third cheaper than counting CR,
    # LF and CRLF in three passes: every delivery pays it (_wire).
    rest = b"".join(data.split(b"\r\n"))
    if b"\r" in rest or b"\n" in rest:
        data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    return data


def _check_recipients(recipients: Union[str, Iterable[str]]) -> List[str]:
    if isinstance(recipients, str):
        recipients = [recipients]
    elif isinstance(recipients, (bytes, bytearray)) or \
            not isinstance(recipients, Iterable):
        raise TypeError("recipients must be a str or an iterable of str, not %s"
                        % type(recipients).__name__)
    found: Dict[str, None] = {}
    for rcpt in recipients:
        if not isinstance(rcpt, str):
            raise TypeError("each recipient must be a str, not %s: %r"
                            % (type(rcpt).__name__, rcpt))
        address = rcpt.strip(" \t")
        problem = _address_problem(address)
        if problem:
            raise MessageError("recipient %r %s" % (rcpt, problem), status="5.1.3")
        found[address] = None
    if not found:
        raise MessageError("no recipients given", status="5.1.3")
    return list(found)


def _check_sender(sender: str, xverp: bool) -> None:
    if not isinstance(sender, str):
        raise TypeError("sender must be a str, not %s" % type(sender).__name__)
    if not sender:
        if xverp:
            raise MessageError("an empty sender (<>) cannot be used with xverp=True: "
                               "XVERP rewrites the sender", status="5.1.7")
        return
    problem = _address_problem(sender)
    if problem:
        raise MessageError("sender %r %s" % (sender, problem), status="5.1.7")


_HEADER_LINE = re.compile(rb"[!-9;-~]+:")


def _prepare_message(message: Union[bytes, str, email.message.Message],
                     sender: str = "") -> bytes:
    """The message as bytes with CRLF line ends, Message-ID and Date added
    when missing (so every copy and every retry carries the same id)."""
    if isinstance(message, email.message.Message):
        try:
            data = message.as_bytes()
        except (UnicodeError, LookupError, TypeError, ValueError) as e:
            raise MessageError("the email.message.Message cannot be serialised: %s"
                               % e) from None
    elif isinstance(message, str):
        data = message.encode("utf-8")
    elif isinstance(message, (bytes, bytearray, memoryview)):
        data = bytes(message)
    else:
        raise TypeError("email must be bytes, str or email.message.Message, not %s"
                        % type(message).__name__)
    data = _crlf(data.lstrip(b"\r\n"))
    if not data.strip():
        raise MessageError("the message is empty", status="5.6.0")
    nul = data.find(b"\0")
    if nul >= 0:
        raise MessageError("the message has a NUL byte (line %d), which SMTP cannot "
                           "carry: encode that part (base64)"
                           % (data.count(b"\r\n", 0, nul) + 1), status="5.6.0")
    lines = data.split(b"\r\n")
    if max(map(len, lines)) > 998:
        raise MessageError("line %d of the message is longer than the 998 octets "
                           "RFC 5322 allows: encode that part (quoted-printable or "
                           "base64)" % (next(n for n, line in enumerate(lines, 1)
                                              if len(line) > 998)), status="5.6.0")
    if not _HEADER_LINE.match(data):
        raise MessageError("the message does not start with a header line "
                           "('Name: value'); give a whole RFC 5322 message",
                           status="5.6.0")
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end + 2]
    if not re.search(rb"(?im)^date:", head):
        data = b"Date: " + email.utils.formatdate(localtime=True).encode() + b"\r\n" + data
    if not re.search(rb"(?im)^message-id:", head):
        domain = sender.rpartition("@")[2] if "@" in sender else _fqdn()
        try:
            domain.encode("ascii")
        except UnicodeError:
            domain = _fqdn()
        msgid = email.utils.make_msgid(domain=domain)
        data = b"Message-ID: " + msgid.encode("ascii") + b"\r\n" + data
    return data


class _Prepared(NamedTuple):
    """A message checked and ready to queue or send."""
    recipients: List[str]       # stripped, each once, in the order given
    data: bytes                 # CRLF line ends, with Date and Message-ID


def _prepared(sender: str, recipients: Union[str, Iterable[str]],
              message: Union[bytes, str, email.message.Message],
              xverp: bool) -> _Prepared:
    """The one way a message is checked and prepared, for send_email,
    ``gsemail send`` and Mailer.send alike: recipients, then sender, then the
    message, whose Message-ID (when it has none) takes the sender's domain."""
    rcpts = _check_recipients(recipients)
    _check_sender(sender, xverp)
    return _Prepared(rcpts, _prepare_message(message, sender))


def _with_xverp(xverp: bool, sender: str, config: SMTPConfig) -> bool:
    """Whether a message goes (or is queued asking to go) with XVERP: when
    the caller or the config asks, and never for the empty sender.  (A
    processor decides again, with its own config, when it claims a queued
    message: Queue._wants_xverp.)"""
    return bool((xverp or config.xverp) and sender)

# ---------------------------------------------------------------------------
# The queue: a Maildir in zope.sendmail's format, with no transactions.
#
#   new/NAME            queued, due now (written by send_email)
#   cur/NAME            deferred; the file's mtime is the next attempt
#   new|cur/.sending-NAME   a claim: a process is delivering NAME
#   new|cur/.rejected-NAME  a dead letter, with the reason in its headers
#   tmp/                files being written
#   state/NAME          JSON: attempts, first queued, last error, failures
#
# A message file is "X-Zope-From: <sender>\n", "X-Zope-To: <a>, <b>\n" and
# the message with CRLF line ends.  zope.sendmail reads new/ and cur/ and
# skips dot files, so it drains this queue, and we drain its queue.  Every
# change is a rename or an unlink, so a crash leaves either the old or the
# new file, never half of one.
#
# The format is written and read in one place each: the names' markers
# just below, the envelope (_envelope / _read_head), the dead letter's head
# (_dead_letter_lines / _read_dead_letter) and the state file (_Record,
# _write_state / _read_state).  Claims are _Claims's.
# ---------------------------------------------------------------------------

_CLAIM = ".sending-"        # new|cur/.sending-NAME: NAME is claimed (zope.sendmail's too)
_DEAD = ".rejected-"        # new|cur/.rejected-NAME[.N]: NAME's dead letter (zope's too)
_CLAIMER = ".claimer-"      # tmp/.claimer-HOST-PID-N: a process's claimer file
_STATE_TMP = ".state-"      # tmp/.state-NAME: a state file being written
# A name ending in :2,X (Maildir's "info" with our flag X) asks for XVERP.
# That flag and the config's xverp are the only sources of truth (see
# _asks_xverp and Queue._wants_xverp); the state's old "xverp" key is not.
_XVERP_FLAG = ":2,X"
_FROM, _TO = b"X-Zope-From:", b"X-Zope-To:"     # the envelope's two lines
#: QueueEntry.state, in the order list and status count them: due now,
#: waiting in cur/, claimed by a process, a dead letter
_STATES = ("new", "deferred", "sending", "dead")

_counter = itertools.count(1)    # a part of each file name we make: unique in the process
_claiming: "weakref.WeakSet[Queue]" = weakref.WeakSet()  # queues that may make claims
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
_STALE_TMP = 36 * 3600      # Maildir's rule for abandoned tmp/ files
_CUR_RESCAN = 300.0         # read all of cur/ at least this often (as Postfix's
                            # queue_run_delay), and within _CUR_CHANGED of a change
_CUR_CHANGED = 60.0
_cli: Optional[List[str]] = None     # the command line main() runs, for "sudo -u" advice


# -- whose queue it is: owners, modes and the directory's identity ------------

def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "uid %d" % uid


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return "gid %d" % gid


def _as_user(uid: int) -> str:
    """The command to run instead, as the user uid."""
    command = " ".join(shlex.quote(a) for a in _cli) if _cli else "python3 -m gsemail ..."
    return "sudo -u %s %s" % (shlex.quote(_user_name(uid)), command)


def _unsafe_dir(st: os.stat_result) -> Optional[str]:
    """Why a user other than root and us could rename or replace what is in
    the directory (and so swap the queue for their own), or None."""
    if st.st_uid not in (0, os.geteuid()):
        return "it is owned by uid %d (%s)" % (st.st_uid, _user_name(st.st_uid))
    if st.st_mode & stat.S_ISVTX:
        return None     # sticky, as /tmp: others cannot rename or remove what is ours
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        return "it is writable by every user (mode %04o, without the sticky bit)" % mode
    if mode & stat.S_IWGRP:
        return "it is writable by group %s (mode %04o, without the sticky bit)" % (
            _group_name(st.st_gid), mode)
    return None


def _ancestors(path: str) -> Iterator[str]:
    while True:
        yield path
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def _chmod_dir(path: str) -> None:
    """Make the directory we have just made mode 0700, whatever the umask."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _make_dirs(path: str) -> None:
    """Make path and its missing parents, each mode 0700 whatever the umask
    (os.makedirs gives the parents the umask's mode: 0777 under umask 0)."""
    missing = []
    head = path
    while True:
        try:
            st = os.stat(head)
        except FileNotFoundError:
            parent = os.path.dirname(head)
            if parent == head:
                raise
            missing.append(head)
            head = parent
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), head)
        break
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            if os.path.isdir(d):
                continue    # made by a process beside us
            raise           # a dangling link, say: nothing can be made here
        _chmod_dir(d)


def _identity(st: os.stat_result) -> Tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_uid, st.st_mode)


def _describe(identity: Tuple[int, int, int, int]) -> str:
    dev, ino, uid, mode = identity
    return "device %d inode %d, %s owned by %s, mode %04o" % (
        dev, ino, "a directory" if stat.S_ISDIR(mode) else _kind(mode), _user_name(uid),
        stat.S_IMODE(mode))


# -- creating files: exclusively, never through a link, synced ----------------

# The flags of every file gsemail creates: a new file only (O_EXCL), never
# through a symbolic link (O_NOFOLLOW; O_EXCL refuses a link as well).
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: str, chunks: List[bytes], exclusive: bool = False,
                  sync: bool = True) -> None:
    """Write chunks to a new file of mode 0600 (whatever the umask) and fsync it.

    The file is always created new (O_EXCL|O_NOFOLLOW), so nothing is ever
    written through a link or into a file that was there.  Not exclusive:
    whatever has the name (a crash's leftover, a planted link) is unlinked
    first; unlink removes a link, never what it points to.
    """
    if not exclusive:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    fd = os.open(path, _CREATE, 0o600)
    try:
        os.fchmod(fd, 0o600)
        written = os.writev(fd, chunks)     # one system call for the usual case
        if written < sum(map(len, chunks)):
            view = memoryview(b"".join(chunks))[written:]
            while view:
                view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


_LINE_MAX = 1 << 16         # longest X-Zope-From or dead-letter line we read
_NO_ENVELOPE = ("5.6.0 queue file does not start with the X-Zope-From and X-Zope-To "
                "envelope lines")
_NO_RECIPIENT = "(no recipient)"    # the failure of a file that names none
_DEAD_LETTER, _FAILED = b"X-Gsemail-Dead-Letter: ", b"X-Gsemail-Failed: "


# -- a queue file's head: zope's envelope, then our dead-letter lines ---------

def _queue_id(name: str) -> str:
    """The queue id of the file name: the name, a dead letter's without
    .rejected- (QueueEntry.id)."""
    return name[len(_DEAD):] if name.startswith(_DEAD) else name


class _DeadLetter(NamedTuple):
    """Our X-Gsemail-Dead-Letter line, as _read_dead_letter reads it."""

    when: Optional[float]           # when it was written (None: not a time we wrote)
    summary: str                    # the free text after the fields
    text: str                       # the fields but id=, then the summary, for people
    attempts: Optional[int]         # attempts=, None when absent or odd
    first_queued: Optional[float]   # first-queued=


@dataclasses.dataclass
class _Head:
    """What a queue file holds before its message (see _read_head)."""

    sender: str = ""
    recipients: List[str] = dataclasses.field(default_factory=list)
    #: why the file cannot be sent (a 554 Reply), or None
    problem: Optional[Reply] = None
    start: int = 0          # where the message begins (0: the file is kept whole)
    id: str = ""            # a dead letter of ours: the message it was
    dead: Optional[_DeadLetter] = None   # our dead-letter line, if it is this file's
    failed: Dict[str, str] = dataclasses.field(default_factory=dict)
    #: the message's bytes, when the whole file was read (_read_file)
    data: bytes = b""


# Written: the envelope (_envelope), and the dead letter's lines after it
# (_dead_letter_lines).

def _envelope(sender: str, recipients: List[str]) -> bytes:
    """zope.sendmail's two envelope lines, bare addresses (read by _read_head).

    Every address written here has passed _address_problem, which refuses
    any that _read_head (and so zope.sendmail) would read back differently.
    """
    return b"%s %s\n%s %s\n" % (_FROM, sender.encode("utf-8"), _TO,
                                  ", ".join(recipients).encode("utf-8"))


def _escape_address(address: str) -> str:
    return address.replace("\\", "\\\\").replace(">", "\\>")


def _dead_letter_lines(sender: str, failures: Dict[str, str], name: str, when: float,
                       attempts: int, first_queued: float, summary: str) -> bytes:
    """A dead letter's head, read back by _read_dead_letter: zope's envelope
    with the failed recipients, then our lines.  The first names the message
    (id=) and counts the X-Gsemail-Failed lines that follow, so a reader
    takes off exactly these and never a line of the message."""
    lines = ["%s %s" % (_FROM.decode(), sender),
             "%s %s" % (_TO.decode(), ", ".join(r for r in failures if r != _NO_RECIPIENT
                                                and not _envelope_problem(r))),
             "%s%s; id=%s; attempts=%d; first-queued=%s; failed=%d; %s"
             % (_DEAD_LETTER.decode(), _iso(when), name, attempts, _iso(first_queued),
                len(failures), _one_line(summary)[:4000])]
    # each line well below the _LINE_MAX that _read_head reads
    lines += ["%s<%s> %s" % (_FAILED.decode(), _escape_address(rcpt), _one_line(why)[:4000])
              for rcpt, why in failures.items()]
    return ("\n".join(lines) + "\n").encode("utf-8", "replace")


# Read back, in one pass over the head (_read_head): the envelope, then our
# dead-letter lines if they are this file's (_read_dead_letter).

def _belongs(dead_id: str, name: str) -> bool:
    """Whether our dead-letter line naming dead_id is in file name's own
    head: a dead letter (.rejected-ID, or .rejected-ID.N beside zope's), or
    one an operator moved back into new/ or cur/ by hand."""
    name = _queue_id(name)
    return bool(dead_id) and (name == dead_id or (
        name.startswith(dead_id + ".") and name[len(dead_id) + 1:].isdigit()))


def _read_dead_letter(head: _Head, line: bytes, readline: Callable[..., bytes],
                      name: str) -> None:
    """Our dead-letter lines, into head, if they are whole and this file's."""
    when, *parts = line[len(_DEAD_LETTER):].decode("utf-8", "replace").rstrip(
        "\r\n").split("; ")
    fields: Dict[str, str] = {}
    while parts and parts[0].partition("=")[0] in ("id", "attempts", "first-queued",
                                                   "failed"):
        key, _, value = parts.pop(0).partition("=")
        fields[key] = value
    count = fields.get("failed", "")
    if not (_belongs(fields.get("id", ""), name) and count.isascii() and count.isdigit()):
        return
    failed: Dict[str, str] = {}
    size = len(line)
    for _ in range(int(count)):
        line = readline(_LINE_MAX)
        if not (line.startswith(_FAILED + b"<") and line.endswith(b"\n")):
            return
        size += len(line)
        text = line[len(_FAILED) + 1:].decode("utf-8", "replace").rstrip("\r\n")
        address, i = [], 0
        while i < len(text) and text[i] != ">":     # <address>, \ escaping \ and >
            i += text[i] == "\\"
            address.append(text[i:i + 1])
            i += 1
        if text[i:i + 1] != ">":
            return
        failed["".join(address)] = text[i + 1:].strip()
    head.start += size
    head.id, head.failed = fields["id"], failed
    attempts = fields.get("attempts", "")
    head.dead = _DeadLetter(
        when=_parse_iso(when), summary="; ".join(parts),
        text="; ".join(["%s=%s" % kv for kv in fields.items() if kv[0] != "id"] + parts),
        attempts=int(attempts) if attempts.isascii() and attempts.isdigit() else None,
        first_queued=_parse_iso(fields.get("first-queued", "")))


def _read_head(readline: Callable[..., bytes], name: str) -> _Head:
    """Read a queue file's head with readline (a file's, or io.BytesIO's).

    The one reader of what _envelope and _dead_letter_lines write, for
    delivery, retry, show, list and status alike.  The envelope is read as
    zope.sendmail reads it.  A file without a whole, UTF-8 envelope keeps
    all of its bytes as its message (start 0), so its dead letter loses
    none.  Our dead-letter lines are taken off only when they name this
    very file (id=) and are all there: any other line, an application's
    X-Gsemail-... header included, is the message's.
    """
    head = _Head()
    first = readline(_LINE_MAX)
    second = readline() if first.startswith(_FROM) and first.endswith(b"\n") else b""
    if not (second.startswith(_TO) and second.endswith(b"\n")):
        head.problem = Reply(554, _NO_ENVELOPE)
        return head
    try:
        sender = first[len(_FROM):].decode("utf-8").rstrip("\r\n")
        to = second[len(_TO):].decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        head.problem = Reply(554, "5.6.0 queue file envelope is not UTF-8")
        return head
    head.sender, head.recipients = _zope_sender(sender), _zope_recipients(to)
    head.start = len(first) + len(second)
    line = readline(_LINE_MAX)
    if line.startswith(_DEAD_LETTER) and line.endswith(b"\n"):
        _read_dead_letter(head, line, readline, name)
    if not head.recipients:
        head.problem = Reply(554, "5.1.3 queue file has no recipients in X-Zope-To")
    return head


def _read_file(raw: bytes, name: str) -> _Head:
    """A whole queue file's head and message, read from its bytes (as
    _read_head reads it).  A file that cannot be sent gets a problem; its
    data is every byte after what _read_head took off (all of them when it
    found no envelope), so its dead letter keeps them."""
    head = _read_head(io.BytesIO(raw).readline, name)
    head.data = raw[head.start:]
    if not head.problem and not head.data.strip():
        head.problem = Reply(554, "5.6.0 queue file holds no message (empty or truncated)")
    return head


# The Message-ID, for the log lines (_Fields): looked for in the message's
# header block only, and in at most its first _HEAD_SCAN bytes, with
# bytes.find on the head in lower case and one anchored regular expression
# (no email.parser on the hot path: 3 microseconds for a usual head, 6 after
# 40 Received lines).
_HEAD_SCAN = 65536
_HEAD_END = re.compile(rb"\n\r?\n")
_MESSAGE_ID = re.compile(rb"message-id[ \t]*:[ \t]*([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)", re.I)
_BRACKETED = re.compile(r"<[^<>]*>")
_MSGID_MAX = 250    # characters of a Message-ID shown: RFC 5322 lines are at most 998


def _message_id(data: bytes) -> str:
    """The Message-ID of the message data (``<...>``, as the header has it,
    unfolded), its control characters escaped; "" when it has none."""
    head = data[:_HEAD_SCAN]
    if head.startswith((b"\n", b"\r\n")):
        return ""           # no header at all
    end = _HEAD_END.search(head)
    if end:
        head = head[:end.start() + 1]
    # lower[n] is the byte before head[n]: a "\n" found at n starts a line at n
    lower = b"\n" + head.lower()
    at = lower.find(b"\nmessage-id")
    while at >= 0:
        found = _MESSAGE_ID.match(head, at)
        if found:
            text = _one_line(found.group(1).decode("utf-8", "replace"))
            bracketed = _BRACKETED.search(text)
            return _shown((bracketed.group() if bracketed else text)[:_MSGID_MAX])
        at = lower.find(b"\nmessage-id", at + 1)     # Message-IDs: or the like
    return ""


def _detail(reply: Reply) -> str:
    """A reply's text without its enhanced status code (MessageError has
    the code apart)."""
    match = _ENHANCED.match(reply.text)
    return reply.text[match.end():] if match else reply.text


def _asks_xverp(name: str, head: _Head) -> bool:
    """Whether the message in file name asks for XVERP: its queue name ends
    in :2,X (a dead letter of ours: the name of the message it was, id=).
    Queue._wants_xverp adds the config and decides."""
    return (head.id or _queue_id(name)).endswith(_XVERP_FLAG)


# -- a message's record, state/NAME: read as advice, never trusted ------------

_TIME_MAX = 253402300799.0      # 9999-12-31T23:59:59Z, the last time _iso can show
_ATTEMPTS_MAX = 1000000


def _when(value: object) -> Optional[float]:
    """A time read from an advisory file (status.json, a state file): a Unix
    time, or an ISO time as ``status --json`` prints them; None for anything
    else (NaN, a huge number, a list, a bool), so that no such file, however
    edited, can make a reader raise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()[:64]
        try:
            value = float(text)
        except ValueError:
            value = _parse_iso(text)
    if not isinstance(value, (int, float)):
        return None
    try:
        when = float(value)
    except OverflowError:
        return None
    return when if 0.0 <= when <= _TIME_MAX else None     # False for NaN


def _attempts(value: object) -> int:
    """A count of attempts read from a state file: 0 for anything odd."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    try:
        return max(0, min(int(value), _ATTEMPTS_MAX))
    except (OverflowError, ValueError):     # inf, NaN
        return 0


class _Record(TypedDict, total=False):
    """A message's state file, state/NAME (JSON): what gsemail knows of a
    message beyond its file.  Every key may be missing (a message not yet
    tried has no state file at all); _sane_state checks each key that
    gsemail reads, as the file is read, and keeps the keys of other tools
    (or of an operator) as they are.  Written by Queue._write_state."""

    attempts: int                   # attempts made so far (0 to _ATTEMPTS_MAX)
    first_queued: float             # when first queued, a Unix time (else: _first_queued)
    failed: Dict[str, str]          # recipients refused so far -> str(their Reply)
    dead_letter: bool               # those refusals are in its dead letter already
    last_error: str                 # the reply that last deferred it (list, show)
    history: List[Dict[str, object]]    # last _HISTORY attempts and operator
    #                                     actions, as read: see _history_of
    # For people reading state/ and for other tools only (README's queue
    # section names the next attempt among the state): written, never read
    # by gsemail.  The next attempt that counts is the file's mtime in cur/.
    next_attempt: float             # when it is due again
    last_attempt: float             # when it was last tried
    retried_from: str               # the dead letter an operator's retry queued it from
    # Only in files of older versions: never read, and dropped at the next
    # record, for the name's :2,X flag and the config decide XVERP (see
    # _XVERP_FLAG).
    xverp: bool


def _sane_state(state: object) -> _Record:
    """A message's state as read from its file, each field we use checked:
    the file is advice (an operator or a tool may have edited it), and its
    content must never stop a delivery from being recorded.  Fields it does
    not know are kept as they are."""
    if not isinstance(state, dict):
        return {}
    state = dict(state)
    if "attempts" in state:
        state["attempts"] = _attempts(state["attempts"])
    for key in ("first_queued", "next_attempt", "last_attempt"):
        if key in state:
            when = _when(state[key])
            if when is None:
                del state[key]
            else:
                state[key] = when
    failed = state.get("failed")
    if "failed" in state:
        if isinstance(failed, dict):
            state["failed"] = {str(k): str(v) for k, v in failed.items()}
        else:
            del state["failed"]
    if "xverp" in state:
        state["xverp"] = state["xverp"] is True
    for key in ("last_error", "retried_from"):
        if key in state and not isinstance(state[key], str):
            del state[key]
    # a cast, not a check: the keys we read are checked above, and the
    # others (another tool's) are kept as they are
    return cast(_Record, state)


_MAILDIR_TIME = re.compile(r"(?:%s)?([0-9]{9,})\." % re.escape(_DEAD))


def _named_time(name: str) -> Optional[float]:
    """The time a queue file's name begins with (see _first_queued), or None."""
    # The usual name ("1733050000.M...") without the regular expression:
    # status reads one a message, 100,000 of them on a queue whose relay
    # has been down.  The same answer as _MAILDIR_TIME's, for ASCII digits.
    head, dot, _ = name.partition(".")
    if dot and len(head) >= 9 and head.isdigit() and head.isascii():
        when = float(head)
        return when if when <= _TIME_MAX else None
    match = _MAILDIR_TIME.match(name)
    return _when(float(match.group(1))) if match else None


def _first_queued(name: str, state: _Record, mtime: float) -> float:
    """When a message was first queued: its state says, else its name (a
    Maildir name starts with the time), else its file's mtime."""
    when = _when(state["first_queued"]) if "first_queued" in state else None
    if when is None:
        when = _named_time(name)
    return mtime if when is None else when


_HISTORY = 10       # attempts and operator actions kept in a message's state


def _history_of(state: _Record) -> List[Dict[str, object]]:
    """The history in a message's state (whatever a damaged file holds)."""
    old: object = state.get("history")
    return [e for e in old if isinstance(e, dict)] if isinstance(old, list) else []


def _history_with(state: _Record, event: Dict[str, object]) -> List[Dict[str, object]]:
    """The history in state with event appended: the last _HISTORY kept."""
    return (_history_of(state) + [event])[-_HISTORY:]


# -- claims: who is sending which message (_Claims) ---------------------------

class _ClaimerFile(NamedTuple):
    """This process's claimer file, tmp/.claimer-HOST-PID-N: every claim the
    process takes is a hard link to it, and it holds an flock on it for as
    long as it lives."""

    pid: int        # the process that made it (a forked child has its parent's)
    fd: int         # open, locked
    path: str


class _Owner(NamedTuple):
    """The gsemail process whose claim it is, as its claimer file names it."""

    host: str
    pid: str

    @property
    def here(self) -> bool:
        """On this host, so its flock says whether it lives."""
        return self.host == _HOST


def _claimer_name(host: str, pid: int, n: int) -> str:
    """The name of a claimer file in tmp/ (read back by _Claims.owner)."""
    return "%s%s-%d-%d" % (_CLAIMER, host, pid, n)


def _claimer_text(host: str, pid: int) -> bytes:
    """What a claimer file says (read back by _Claims.owner)."""
    return ("gsemail %s %d\n" % (host, pid)).encode()


class _Claims:
    """A queue's claims: ``new|cur/.sending-NAME``, each a hard link to a
    process's claimer file.

    ``link`` takes one, ``break_stale`` removes one whose owner is gone,
    ``owner`` and ``describe`` say whose one is, ``forget_after_fork`` lets
    a child go of its parent's claimer file and ``close`` removes ours.
    """

    def __init__(self, path: str, timeout: float,
                 report_odd: Callable[[str, str], None]) -> None:
        self.tmp = os.path.join(path, "tmp")
        self.timeout = timeout      # a claim not ours is stale after this long untouched
        self._report_odd = report_odd
        self._lock = threading.Lock()
        self.file: Optional[_ClaimerFile] = None

    def link(self, claim_path: str) -> Optional[int]:
        """Take the claim at claim_path: the fd that holds it, or None.

        A claim is a hard link to this process's claimer file, which says
        "gsemail HOST PID" and on which the process holds an flock for as
        long as it lives.  link() is atomic and fails if the name exists
        (zope.sendmail claims by linking the same name), so a claim is whole
        or absent, even when the process is killed while it claims, and it
        costs one system call to take and one to give back.
        """
        for _ in range(3):
            made = self._claimer()
            try:
                os.link(made.path, claim_path)
                return made.fd
            except FileExistsError:
                if not self.break_stale(claim_path):
                    return None
            except FileNotFoundError:
                if os.path.exists(made.path):
                    raise               # the claim's directory has gone
                # Removed under us (by hand): make another.  The old fd stays
                # open: its lock still guards the claims linked to it.
                self.file = None
        return None

    def _claimer(self) -> _ClaimerFile:
        """This process's locked claimer file (made once, again after fork)."""
        with self._lock:
            made = self.file
            if made is not None and made.pid == os.getpid():
                return made
            if made is not None:
                os.close(made.fd)   # a parent's, forked without hooks: see forget_after_fork
            private = os.path.join(self.tmp, _claimer_name(_HOST, os.getpid(), next(_counter)))
            fd = os.open(private, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, _claimer_text(_HOST, os.getpid()))
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    os.close(fd)
                    os.unlink(private)
                    raise
                # A full disk must not stop the sending that empties it: the
                # claims hold, and still name their owner by this file's
                # name, which needs no data block (see owner).
            self.file = _ClaimerFile(os.getpid(), fd, private)
            return self.file

    def ours(self) -> Optional[_ClaimerFile]:
        """This process's claimer file, if it has made one."""
        made = self.file
        return made if made is not None and made.pid == os.getpid() else None

    def forget_after_fork(self) -> None:
        """In a forked child: let go of the parent's lock, or the parent's
        claims would look alive for as long as the child lives."""
        self._lock = threading.Lock()
        made, self.file = self.file, None
        if made is not None and made.pid != os.getpid():
            os.close(made.fd)

    def close(self) -> None:
        """Remove this process's claimer file (claims it made are released)."""
        with self._lock:
            made, self.file = self.file, None
        if made is not None and made.pid == os.getpid():
            try:
                os.unlink(made.path)
            except FileNotFoundError:
                pass
            os.close(made.fd)

    def break_stale(self, claim_path: str) -> bool:
        """Remove a claim whose owner is gone.  True if it was removed.

        Our claims hold an flock while their owner lives, so a claim we can
        lock that names this host belongs to a dead process.  Any other claim
        (another host, or zope.sendmail's hard link) is stale only when it
        has not been touched for timeout seconds.
        """
        try:
            fd = _open_regular(claim_path)
        except FileNotFoundError:
            return True
        except _NotRegular as e:
            # No claim anyone makes (ours and zope's are links to regular
            # files): say so, and leave its message alone.
            self._report_odd(claim_path, e.what)
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False        # its owner is alive
            st = os.fstat(fd)
            try:
                if os.stat(claim_path).st_ino != st.st_ino:
                    return False    # replaced by a new claim meanwhile
            except FileNotFoundError:
                return True
            # ours names its owner; zope's is a link to the message
            owner = self.owner(fd, st)
            ours = owner is not None and owner.here
            # link() and utime() both set ctime: a zope claim's age is its ctime.
            age = time.time() - max(st.st_mtime, st.st_ctime)
            if not ours and age < self.timeout:
                return False
            log.warning("4.4.7 %s: breaking a stale claim (%s)", claim_path,
                        "its process has died" if ours
                        else "untouched for %d s" % age)
            try:
                os.unlink(claim_path)
            except FileNotFoundError:
                pass
            return True
        finally:
            os.close(fd)    # after the unlink: see QueuedMessage.release

    def owner(self, fd: int, st: os.stat_result) -> Optional[_Owner]:
        """The gsemail process whose claim fd is, or None (zope.sendmail's
        claim, or an owner that can no longer be named).  The one reader of
        _claimer_text and _claimer_name.

        A claim is a hard link to its owner's claimer file,
        tmp/.claimer-HOST-PID-N, whose content says "gsemail HOST PID".  On
        a full disk that content could not be written; the file's name needs
        no data block, so the owner is also found by name: the claimer file
        in tmp/ with the claim's inode."""
        words = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
        if len(words) == 3 and words[0] == "gsemail":
            return _Owner(words[1], words[2])
        if st.st_nlink < 2:
            return None     # its claimer file has gone
        try:
            with os.scandir(self.tmp) as it:
                for entry in it:
                    if not entry.name.startswith(_CLAIMER) or entry.inode() != st.st_ino:
                        continue
                    try:
                        found = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if (found.st_dev, found.st_ino) == (st.st_dev, st.st_ino):
                        host, pid, _ = (entry.name[len(_CLAIMER):].rsplit("-", 2)
                                        + ["", ""])[:3]
                        if host and pid.isdigit():
                            return _Owner(host, pid)
        except OSError:
            pass
        return None

    def describe(self, claim_path: str) -> str:
        """Who holds a claim, and whether they still live, in words."""
        return self.holder(claim_path)[0]

    def holder(self, claim_path: str) -> Tuple[str, Optional[bool]]:
        """describe's words, and whether the holder lives: False for a
        process on this host that has died (its claimer file's lock is not
        held), None when that cannot be told (another host, zope.sendmail)."""
        try:
            fd, st = _opened(claim_path)
        except FileNotFoundError:
            return "nobody now (the claim has just gone)", None
        except _NotRegular as e:
            return "no process: %s (remove it)" % e, None
        try:
            head = os.pread(fd, 200, 0)
            if head.startswith(_FROM):
                # zope.sendmail claims with a hard link to the message itself
                return "zope.sendmail, touched %d s ago" % (time.time() - st.st_ctime), None
            owner = self.owner(fd, st)
            if owner is not None and owner.here:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError:
                    return "process %s on this host, running" % owner.pid, True
                return "process %s on this host, which has died (the claim is broken " \
                       "at a processor's next pass)" % owner.pid, False
            return "%s, touched %d s ago" % (
                "process %s on %s" % (owner.pid, owner.host) if owner else
                "an owner that can no longer be named",
                time.time() - max(st.st_mtime, st.st_ctime)), None
        finally:
            os.close(fd)


# -- the queue: adding, taking due messages, settling them; the operator's ---
# -- views and actions --------------------------------------------------------

class QueuedMessage:
    """A message claimed for delivery.  Nobody else will send it until it is
    settled with Queue.remove, Queue.defer or Queue.dead_letter, or released.
    """

    def __init__(self, path: str, claim_path: str, fd: int) -> None:
        self.path = path
        self.name = os.path.basename(path)
        self.claim_path = claim_path
        self._fd = fd       # the process's claimer file's (locked), not this claim's
        self._beat = time.monotonic()
        self.sender = ""
        self.recipients: List[str] = []
        self.data = b""
        self.xverp = self.name.endswith(_XVERP_FLAG)   # claim() decides: _wants_xverp
        self.state: _Record = {}
        self._stateful = True    # a state file may exist (claim() knows for sure)
        #: why it cannot be sent (a 554 reply: a file we cannot read), or None
        self.problem: Optional[Reply] = None
        self._message_id: Optional[str] = None     # see message_id
        self._mtime = 0.0    # its file's, when claimed (first_queued falls back on it)

    @property
    def message_id(self) -> str:
        """Its Message-ID header (``<...>``), "" if it has none: for the log.
        Read from data when first asked for, which is only when a line that
        names it is logged: a delivery at the CLI's default level logs
        nothing, and reading the head costs as much as the claim's reads."""
        if self._message_id is None:
            self._message_id = _message_id(self.data)
        return self._message_id

    @message_id.setter
    def message_id(self, value: str) -> None:
        self._message_id = value

    @property
    def first_queued(self) -> float:
        return _first_queued(self.name, self.state, self._mtime)

    @property
    def attempts(self) -> int:
        return _attempts(self.state.get("attempts", 0))

    def heartbeat(self) -> None:
        """Show that the claim's owner is alive (for claims seen over NFS)."""
        # _fd is the process's claimer file, shared by all its claims: each
        # claim is a hard link to it, so one touch refreshes every claim.
        now = time.monotonic()
        if now - self._beat >= 1.0 and self._fd >= 0:
            self._beat = now
            try:
                os.utime(self._fd)
            except OSError:
                pass    # a heartbeat is advice; the flock is what counts

    def release(self) -> None:
        """Give the message back to the queue, unchanged."""
        if self._fd < 0:
            return
        self._fd = -1       # the lock belongs to the queue's claimer, not to us
        try:
            os.unlink(self.claim_path)
        except FileNotFoundError:
            pass

    def __repr__(self) -> str:
        return "<QueuedMessage %s>" % self.name


@dataclasses.dataclass
class QueueEntry:
    """One message as an operator sees it (``Queue.entries``): a snapshot.

    ``state`` is "new" (due now), "deferred" (waiting for next_attempt),
    "sending" (a processor holds its claim: ``claim`` says which) or "dead"
    (a dead letter).  ``id`` is the file's name (a dead letter's without
    ``.rejected-``); ``size`` is the message's, without the envelope.
    ``recipients`` are those still to do (for a dead letter: those that
    failed), ``failed`` the refused ones with their reasons, ``history``
    the last attempts and operator actions.  ``xverp`` is whether it goes
    with XVERP (its name asks, or the queue's xverp).  Times are Unix times.
    """

    id: str
    state: str
    path: str
    size: int
    sender: str
    recipients: List[str]
    queued: float
    attempts: int
    next_attempt: Optional[float]
    xverp: bool
    last_error: str = ""
    claim: str = ""
    failed: Dict[str, str] = dataclasses.field(default_factory=dict)
    history: List[Dict[str, object]] = dataclasses.field(default_factory=list)
    dead_since: Optional[float] = None
    # whether claim's process lives: False when it has died on this host
    # (the claim is broken at a processor's next pass), None when unknown
    claim_alive: Optional[bool] = None


def _fill_from_dead_letter(entry: QueueEntry, head: _Head, mtime: float) -> None:
    """Complete entry, a dead letter, from our dead-letter lines in its head
    (when they are this file's: see _read_dead_letter)."""
    entry.next_attempt = None
    dead = head.dead
    entry.dead_since = (dead.when if dead else None) or mtime
    if dead:
        if dead.attempts is not None:
            entry.attempts = dead.attempts
        entry.queued = dead.first_queued or entry.queued
        entry.history.append({"at": entry.dead_since, "event": "dead letter: " + dead.text})
    entry.failed = dict(head.failed)
    entry.last_error = next(iter(entry.failed.values()), entry.last_error)


def _fill_from_state(entry: QueueEntry, state: _Record, mtime: float) -> None:
    """Complete entry, a message still to send, from its state file."""
    entry.queued = _first_queued(os.path.basename(entry.path), state, mtime)
    attempts = state.get("attempts")
    entry.attempts = attempts if isinstance(attempts, int) else 0
    entry.last_error = str(state.get("last_error") or entry.last_error)
    failed = state.get("failed")
    if isinstance(failed, dict):
        entry.failed = {str(k): str(v) for k, v in failed.items()}
    entry.history = _history_of(state)


class _Listing(NamedTuple):
    """new/ and cur/ as Queue._listing's scan found them: no file read."""
    names: Dict[str, List[str]]     # sub -> its messages' and dead letters' names
    claimed: Dict[str, set[str]]    # sub -> the names that have a claim (.sending-NAME)
    stated: Optional[Set[str]]      # the names that have a state file (None: look at each)


# A name that begins with ten digits and a dot: its time, as _first_queued
# reads it, orders such names as the strings themselves do.
_TEN_DIGITS = re.compile(r"[0-9]{10}\.")


def _plain_run(names: List[str], sub: str) -> Iterator[Tuple[float, str, str, str]]:
    """Sorted names of _TEN_DIGITS in sub/ as Queue._stream merges them:
    (time, id, sub, name), made one at a time."""
    for name in names:
        yield float(name[:10]), name, sub, name


class _Recorded(TypedDict, total=False):
    """What processors noted in status.json (see Queue._note), as checked:
    a group is there with its time, or not at all."""
    delivered_at: float
    delivered_id: Optional[str]
    delivered_via: Optional[str]
    error_at: float
    error: Optional[str]
    error_id: Optional[str]


class _StatusFacts(TypedDict):
    """Queue.status(): the queue's health, for ``gsemail status``."""
    queue: str
    counts: Dict[str, int]
    waiting: int
    due: int
    oldest_id: Optional[str]
    oldest_queued: Optional[float]
    oldest_due_id: Optional[str]    # of those due now, the one due longest
    oldest_due: Optional[float]     # and since when (its file's mtime)
    refused: int                    # recipients refused in messages still waiting
    processors: Optional[int]       # live processors; None: tmp/ cannot be read
    delivered_at: Optional[float]
    delivered_id: Optional[str]
    delivered_via: Optional[str]
    error_at: Optional[float]
    error: Optional[str]
    error_id: Optional[str]


# status reads each message's state file by its bytes (Queue._quick_state):
# the top-level first_queued, and "failed": {} when none was refused, as
# json.dumps writes them; anything else is parsed.
_STATE_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_QUICK_FIRST = re.compile(rb'"first_queued": (-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)[,}]')
_QUICK_NONE = b'"failed": {}'


def _lock_held(path: str) -> Optional[bool]:
    """Whether a live process holds an flock on the file at path (a claimer
    file: see _Claims); None when it cannot be told (gone, not ours to
    open, not a regular file).  A shared lock, let go at once: the test
    never keeps a processor from breaking a stale claim for longer."""
    try:
        fd = _open_regular(path)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return True if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
    finally:
        os.close(fd)
    return False


class Queue:
    """The durable Maildir queue at ``path``.

    With ``create=False`` (the operator's commands) a queue that does not
    exist is an error, so a wrong queuepath is not reported as an empty
    queue.  ``xverp`` is the config's: then every message with a sender is
    claimed (and listed) with XVERP, whoever queued it.  With
    ``readonly=True`` (``list``, ``show``, ``status``) any user who can read
    the queue may open it; nothing is created or written.

    A queue that another user could replace is refused: it must be a real
    directory owned by this user, and no parent directory may be writable
    by a user other than root and this one (unless it has the sticky bit,
    as /tmp).  The directory's identity (device, inode, owner, mode) is
    taken when it is opened, and ``check()`` (before each processor pass;
    ``add`` and every claim and record check the identity) refuses a queue
    that is no longer the one opened.

    ``claim_timeout`` (240 s: SMTPConfig's for its default timeout of 60 s)
    is how long a claim that is not ours must go untouched to be stale.
    """

    def __init__(self, path: str, claim_timeout: float = 240.0,
                 create: bool = True, xverp: bool = False,
                 readonly: bool = False) -> None:
        self.path = os.path.abspath(path)
        # add's directories, joined once: add is on every request's path
        self._tmp_dir, self._new_dir = (os.path.join(self.path, d) for d in ("tmp", "new"))
        self._state_dir = os.path.join(self.path, "state", "")     # see _state_path
        self._odd: set[str] = set()     # non-regular files reported (once each)
        self._claims = _Claims(self.path, claim_timeout, self._report_odd)
        #: the config's xverp: every message with a sender goes with XVERP,
        #: whoever queued it (see _wants_xverp)
        self.xverp = xverp
        self.readonly = readonly
        self._identity: Tuple[int, int, int, int] = (0, 0, 0, 0)
        # The rescan schedule is on the monotonic clock, so a step of the
        # wall clock (NTP, a VM restore) neither stops nor floods it.
        self._cur_scan_at = -math.inf   # when cur/ must be read again (monotonic)
        self._cur_scanned = -math.inf   # when it was last read (monotonic)
        self._cur_seen: object = None   # its mtime then
        self._beat = -math.inf          # monotonic: the last _heartbeat's touch
        self._setup(create)
        if not readonly:
            _claiming.add(self)     # a forked child lets go of our claimer file: _after_fork

    @property
    def claim_timeout(self) -> float:
        """Seconds after which a claim that is not ours (zope.sendmail's, or
        another host's) is stale when it has not been touched."""
        return self._claims.timeout

    @claim_timeout.setter
    def claim_timeout(self, seconds: float) -> None:
        self._claims.timeout = seconds

    def _setup(self, create: bool = True) -> None:
        if not create and not os.path.lexists(self.path):
            raise QueueError("queue %s does not exist: is queuepath right, and has "
                             "gsemail run there yet?" % self.path, exit_code=os.EX_NOINPUT)
        if self.readonly:
            self._open_readonly()
            return
        try:
            st: Optional[os.stat_result] = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise self._error("cannot look at the queue directory", e) from None
        if st is not None:
            self._check_dir(st)
        st_before = st
        self._check_parents()
        made = st is None
        if made:
            try:
                _make_dirs(os.path.dirname(self.path))
            except OSError as e:
                raise self._error("cannot create the parent of the queue", e) from None
            try:
                os.mkdir(self.path, 0o700)
            except FileExistsError:
                made = False    # made by a process beside us
            except OSError as e:
                raise self._error("cannot create the queue directory", e) from None
        # The directory itself, not whatever the name leads to: its identity
        # is what check() compares with from now on.
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                self._check_dir(os.lstat(self.path))
            raise self._error("cannot open the queue directory", e) from None
        try:
            st = os.fstat(fd)
            self._check_dir(st)
            if stat.S_IMODE(st.st_mode) & 0o077 or (made and stat.S_IMODE(st.st_mode) != 0o700):
                os.fchmod(fd, 0o700)
                st = os.fstat(fd)
        finally:
            os.close(fd)
        self._identity = _identity(st)
        made_new = False
        for sub in ("new", "cur", "tmp", "state"):
            full = os.path.join(self.path, sub)
            try:
                os.mkdir(full, 0o700)
                _chmod_dir(full)
                made_new = made_new or sub == "new"
            except FileExistsError:
                if not os.path.isdir(full) or os.path.islink(full):
                    raise QueueError("queue %s: %s is not a directory" % (self.path, full))
            except OSError as e:
                raise self._error("cannot create %s" % full, e) from None
        if made_new:
            # Never silent: a wrong queuepath, or a process that sees another
            # /tmp than the web application (systemd's PrivateTmp=), would
            # otherwise deliver an empty queue and report all well.
            log.warning("4.3.0 queue %s %s, empty, owned by %s%s. If mail should be waiting "
                        "there, queuepath is wrong or this process sees another /tmp than "
                        "the application (systemd's PrivateTmp=)", self.path,
                        "did not exist: created it" if st_before is None else
                        "was an empty directory: made it a queue", _user_name(os.geteuid()),
                        " (a web application running as another user cannot use it)"
                        if os.geteuid() == 0 else "")
        if not os.access(os.path.join(self.path, "new"), os.W_OK | os.X_OK):
            raise QueueError("queue %s: new/ is not writable by this user" % self.path)

    def _open_readonly(self) -> None:
        """For list, show and status: any user who can read the queue."""
        try:
            st = os.lstat(self.path)
        except OSError as e:
            raise self._error("cannot look at the queue directory", e) from None
        self._check_dir(st)
        if not os.access(self.path, os.R_OK | os.X_OK):     # else new/ looks missing
            raise QueueError("queue %s cannot be read by this user: run the command as the "
                             "queue's owner: %s" % (self.path, _as_user(st.st_uid)))
        for sub in ("new", "cur"):
            full = os.path.join(self.path, sub)
            if not os.path.isdir(full) or os.path.islink(full):
                raise QueueError("queue %s: %s is not a directory" % (self.path, full))
            if not os.access(full, os.R_OK | os.X_OK):
                raise QueueError("queue %s: %s/ cannot be read by this user: run the "
                                 "command as the queue's owner: %s"
                                 % (self.path, sub, _as_user(st.st_uid)))
        self._identity = _identity(st)

    def _check_dir(self, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode):
            raise QueueError("queue %s is a symbolic link: refusing it (another "
                             "user could point it anywhere); give the real "
                             "directory as queuepath" % self.path)
        if not stat.S_ISDIR(st.st_mode):
            raise QueueError("queue %s exists and is not a directory" % self.path)
        if st.st_uid != os.geteuid() and not self.readonly:
            # Root too: a queue root wrote would lock its owner out (and root
            # has no business sending another user's mail with its rights).
            advice = "run the command as the queue's owner: %s" % _as_user(st.st_uid)
            if st.st_uid == 0:
                advice = ("root made it, probably by running gsemail as root first: if "
                          "it holds no mail (gsemail list), remove it, and it is made "
                          "again by this user")
            raise QueueError("queue %s is owned by uid %d (%s), not by this user (uid %d): "
                             "refusing to write a queue another user can read or fill; %s"
                             % (self.path, st.st_uid, _user_name(st.st_uid), os.geteuid(),
                                advice))

    def _check_parents(self) -> None:
        """Refuse a queue that another user could rename away and replace
        with their own: a parent directory that such a user can write."""
        seen = set()
        parent = os.path.dirname(self.path)
        for top in (parent, os.path.realpath(parent)):    # the path as given, and its links'
            for d in _ancestors(top):
                if d in seen:
                    continue
                seen.add(d)
                try:
                    st = os.stat(d)
                except OSError:
                    continue    # to be made by us (or the open says what is wrong)
                why = _unsafe_dir(st)
                if why is None:
                    continue
                if st.st_uid not in (0, os.geteuid()):
                    advice = ("make and use the queue as that user: %s" % _as_user(st.st_uid)
                              if os.geteuid() == 0 else "choose a queuepath in a directory "
                              "that only root or this user can write")
                else:
                    advice = ("remove that write permission (chmod go-w %s) or choose "
                              "another queuepath" % shlex.quote(d))
                raise QueueError("queue %s: refusing it, as its parent directory %s is not "
                                 "safe: %s, so another user could rename the queue away and "
                                 "put their own in its place; %s"
                                 % (self.path, d, why, advice))

    def check(self) -> None:
        """Raise QueueError unless the queue directory is still the one this
        object opened (device, inode, owner and mode) and no other user can
        replace it.  Called before each processor pass (add() checks the
        identity only)."""
        self._check_identity()
        if not self.readonly:
            self._check_parents()

    def _check_identity(self) -> None:
        try:
            st = os.lstat(self.path)
        except OSError as e:
            raise QueueError("queue %s has gone (%s): nothing is read from or written to "
                             "that path until the queue that was opened is back"
                             % (self.path, e.strerror)) from None
        if _identity(st) != self._identity:
            raise QueueError("queue %s has been replaced or changed since it was opened (%s; "
                             "now %s): refusing it, nothing is read from or written to it; "
                             "put the real queue back, or restart if it was replaced on "
                             "purpose" % (self.path, _describe(self._identity),
                                          _describe(_identity(st))))

    def _report_odd(self, path: str, what: str) -> None:
        """Log, once per path, a non-regular file where a message would be."""
        if path in self._odd:
            return
        self._odd.add(path)
        log.error("4.3.0 queue %s: %s is %s, not a regular file: it is not a message and is "
                  "left alone (remove it)", self.path, path, what)

    def _error(self, what: str, e: OSError) -> QueueError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return QueueError("queue %s: %s: %s" % (self.path, what, e.strerror),
                              status="4.3.1", exit_code=os.EX_TEMPFAIL)
        # Every errno that means "nothing can be made here" (a file where a
        # directory should be, a dangling or looping link, no permission, a
        # read-only file system) is EX_CANTCREAT, as README says.
        code = os.EX_CANTCREAT if e.errno in (
            errno.EEXIST, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS,
            errno.ELOOP) else os.EX_IOERR
        return QueueError("queue %s: %s: %s" % (self.path, what, e.strerror),
                          exit_code=code)

    # -- adding -------------------------------------------------------------

    def add(self, sender: str, recipients: List[str], data: bytes,
            xverp: bool = False, state: Optional[_Record] = None) -> str:
        """Queue a message durably and return its name.

        ``data`` must already have CRLF line ends.  When this returns, the
        file is fsynced and renamed into new/ and new/ is fsynced.  A
        ``state`` is written first, so a processor never sees the message
        without it.  Raises QueueError, queuing nothing, when the queue
        has been replaced since it was opened (see check).
        """
        for address in [sender] * bool(sender) + list(recipients):
            problem = _address_problem(address)
            if problem:     # the envelope could not be read back as it was given
                raise MessageError("address %r %s" % (address, problem), status="5.1.3")
        return self._add(sender, recipients, data, xverp, state)

    def _add(self, sender: str, recipients: List[str], data: bytes,
             xverp: bool = False, state: Optional[_Record] = None) -> str:
        """add, for addresses already checked (by _prepared: send_email and
        the send command), so that each is checked once."""
        name = self._stage(sender, recipients, data, xverp, state)
        self._publish(name)
        return name

    def _stage(self, sender: str, recipients: List[str], data: bytes,
               xverp: bool = False, state: Optional[_Record] = None) -> str:
        """The first half of _add: write the message (its state first, when
        given) to tmp/, fsynced, and return its name.  Raises QueueError,
        leaving nothing in tmp/, when it cannot.  A transaction's vote
        (_MailDataManager) stops here and publishes at its finish."""
        # The identity only (one lstat), not the parents' modes as well:
        # those cost a stat per level per message (60% of add's time), and
        # any replacement of the queue or of a parent changes the identity.
        # The parents are checked when the queue is opened and before each
        # processor pass.
        self._check_identity()
        now = time.time()
        name = "%d.M%06dP%dQ%d.%s%s" % (now, (now % 1) * 1e6, os.getpid(),
                                        next(_counter), _HOST,
                                        _XVERP_FLAG if xverp else "")
        try:
            if state:
                self._write_state(name, state, sync=True)
            _write_synced(self._tmp_dir + os.sep + name,
                          [_envelope(sender, recipients), data], exclusive=True)
        except OSError as e:
            self._discard(name)
            raise self._error("cannot write the message", e) from None
        return name

    def _publish(self, name: str, committed: bool = False) -> None:
        """The second half of _add: rename tmp/NAME into new/, where a
        processor finds it, and fsync new/.  Raises QueueError when the
        message is not queued, and then removes it from tmp/, unless
        ``committed`` (a transaction's finish, which can no longer take
        the message back): then it is kept there, whole, for the operator
        to move into new/ (README's "GroupServer and Zope").  When new/
        cannot be synced, the message is withdrawn (see _withdraw) and
        QueueError raised, or, committed, left queued and the error logged."""
        # joined by hand, as in _stage: os.path.join costs about half a microsecond each
        tmp, final = self._tmp_dir + os.sep + name, self._new_dir + os.sep + name
        try:
            os.rename(tmp, final)
        except OSError as e:
            if not committed:
                self._discard(name)
            raise self._error("cannot write the message", e) from None
        try:
            _fsync_dir(self._new_dir)
        except OSError as e:
            if committed:
                log.error("4.3.0 queue %s: %s was queued, but new/ could not be synced "
                          "(a crash now may lose it): %s", self.path, name, e.strerror)
            elif self._withdraw(final, e):
                raise self._error("cannot sync new/ after writing the message", e) from None

    def _discard(self, name: str) -> None:
        """Remove tmp/NAME, a message _stage wrote that is not to be queued,
        and the state file it may have written first."""
        for path in (os.path.join(self._tmp_dir, name), self._state_path(name)):
            try:
                os.unlink(path)
            except OSError:
                pass

    def _withdraw(self, path: str, e: OSError) -> bool:
        """After new/ could not be synced (e): take back the message just
        queued at path, and say whether that was done (then add raises; if
        not, add returns its name, the message still queued).

        The message is already visible in new/ and a processor may be
        sending it, so it cannot simply be unlinked: withdraw it only if we
        can claim it.  Otherwise it is on its way (or sent), and raising
        would make the caller send it a second time.
        """
        name = os.path.basename(path)
        msg = self.claim(path)
        if msg is None:
            log.error("4.3.0 queue %s: %s was queued and is being sent, but new/ "
                      "could not be synced: %s", self.path, name, e.strerror)
            return False
        try:
            os.unlink(path)
        except OSError:
            log.error("4.3.0 queue %s: %s was queued, but new/ could not be synced "
                      "and the message could not be withdrawn: %s", self.path, name,
                      e.strerror)
            return False    # it stays queued: raising would make it sent twice
        finally:
            msg.release()
        return True

    # -- finding and claiming -------------------------------------------------

    def due(self, now: Optional[float] = None) -> List[str]:
        """Paths of messages that may be sent now, oldest first.

        ``now`` (a Unix time) asks what is due at another time: cur/'s
        mtimes are compared with it, and the rescan schedule moves as far.
        """
        return self._due(now)[0]

    def _due(self, now: Optional[float] = None, most: int = 0) -> Tuple[List[str], int]:
        """due(); with most, only the oldest most of new/ (and every due one
        of cur/), and how many more of new/ there are, for the next call.

        A path costs some 120 bytes, so new/'s 100,000 would take 12 MB for
        as long as the pass lasts; taken most at a time (QueueProcessor's
        _PASS_MOST), a pass over them reads new/ again after each lot.
        """
        # Wall-clock time only against the stored times (the mtimes); the
        # schedule itself runs on the monotonic clock (``clock``).
        clock = time.monotonic()
        if now is None:
            now = time.time()
        else:
            clock += now - time.time()
        found: List[str] = []
        seen = 0
        for entry in self._scan("new"):
            found.append(entry.path)
            seen += 1
            if most and len(found) >= 2 * most:
                found.sort()        # keep the oldest most, in at most 2 * most
                del found[most:]
        found.sort()
        del found[most or len(found):]
        left = seen - len(found)
        due_cur: List[str] = []
        # Reading all of cur/ costs a stat per deferred message (0.3 CPU s
        # for 100,000), so it is read only when the soonest deferred message
        # is due, when another process or an operator may have changed it
        # (its mtime moved), and every _CUR_RESCAN as a safety net.
        rescan = clock >= self._cur_scan_at or (
            clock - self._cur_scanned >= _CUR_CHANGED and self._cur_stamp() != self._cur_seen)
        if rescan:
            self._cur_seen, self._cur_scanned = self._cur_stamp(), clock
            soonest = now + _CUR_RESCAN
            for entry in self._scan("cur"):
                try:
                    mtime = entry.stat().st_mtime
                except FileNotFoundError:
                    continue
                if mtime <= now:
                    due_cur.append(entry.path)
                else:
                    soonest = min(soonest, mtime)
            self._cur_scan_at = clock + (soonest - now)
        if not due_cur:
            return found, left
        # Each list sorts by name (one directory each); merging them by name
        # needs no list of 100,000 keys, as sort(key=...) would.
        due_cur.sort()
        return list(heapq.merge(found, due_cur, key=os.path.basename)), left

    def _cur_stamp(self) -> object:
        try:
            return os.stat(os.path.join(self.path, "cur")).st_mtime_ns
        except OSError:
            return None         # _scan says what is wrong

    def _scan(self, sub: str) -> Iterator[os.DirEntry[str]]:
        """The messages in sub/, one at a time: a list of 100,000 DirEntry
        objects would cost tens of megabytes that Python keeps."""
        try:
            it = os.scandir(os.path.join(self.path, sub))
        except FileNotFoundError:
            raise QueueError("queue %s: %s/ has gone" % (self.path, sub)) from None
        with it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                # d_type, no system call: a FIFO, link or directory is no
                # message, and must not hold up the messages after it.
                if not entry.is_file(follow_symlinks=False):
                    try:
                        mode = os.lstat(entry.path).st_mode
                    except FileNotFoundError:
                        continue
                    if not stat.S_ISREG(mode):
                        self._report_odd(entry.path, _kind(mode))
                        continue
                yield entry

    def count(self) -> int:
        """How many messages wait (new and deferred, not dead letters)."""
        return sum(1 for _ in self._scan("new")) + sum(1 for _ in self._scan("cur"))

    # Claiming, in three verbs: claim() takes a due message and reads it
    # (for delivery); _claim_unread() only takes the claim; _hold() takes it
    # for an operator's command, due or not.  _Claims makes the claim itself.

    def claim(self, path: str) -> Optional[QueuedMessage]:
        """Claim the message at path, or return None if another process has
        it, it has gone, or it is not due yet."""
        head, name = os.path.split(path)
        msg = self._claim_unread(path, head, name)
        if msg is None:
            return None
        try:
            raw, st = _read_regular(path)   # its fstat is the one that checked it
        except FileNotFoundError:
            msg.release()       # delivered by someone else meanwhile
            return None
        except _NotRegular as e:
            msg.release()       # a FIFO would block, a link lead anywhere
            self._report_odd(path, e.what)
            return None
        except BaseException:
            msg.release()
            raise
        msg._mtime = st.st_mtime
        # head in cur/ (os.path.basename(head) == "cur", without the call)
        if (head.endswith("/cur") or head == "cur") and st.st_mtime > time.time() + 1:
            msg.release()       # deferred again by someone else meanwhile
            return None
        try:
            read = _read_file(raw, name)
            state = self._read_state(name)
        except BaseException:
            msg.release()       # never a claim left behind by a file we misread
            raise
        msg.sender, msg.recipients, msg.data = read.sender, read.recipients, read.data
        msg.problem = read.problem
        msg._stateful, msg.state = state is not None, state or {}
        msg.xverp = self._wants_xverp(_asks_xverp(name, read), msg.sender)
        return msg

    def _wants_xverp(self, asked: bool, sender: str) -> bool:
        """The one decision on XVERP: when the message asks for it (a name
        ending in :2,X: _asks_xverp) or the config says xverp, and never for
        <>.  Nothing else counts (a state file's "xverp" is not read)."""
        return bool(sender) and (asked or self.xverp)

    def _claim_unread(self, path: str, head: str = "", name: str = ""
                      ) -> Optional[QueuedMessage]:
        """The claim on path (its os.path.split is head and name, if given),
        its file unread, or None if someone else holds it."""
        self._check_identity()  # one lstat: no claim, so no sending, in a replaced queue
        if not name:
            head, name = os.path.split(path)
        claim_path = os.path.join(head, _CLAIM + name)
        fd = self._claims.link(claim_path)
        return None if fd is None else QueuedMessage(path, claim_path, fd)

    def _forget_claimer(self) -> None:
        """In a forked child: let go of the parent's claimer file (see
        _Claims.forget_after_fork)."""
        self._claims.forget_after_fork()

    def close(self) -> None:
        """Remove this process's claimer file (claims it made are released)."""
        self._claims.close()

    # -- per-message state ------------------------------------------------------

    def _state_path(self, name: str) -> str:
        # os.path.join(self.path, "state", name), for a name (no "/"), as a
        # concatenation: claim() asks for one on every message
        return self._state_dir + name

    def _read_state(self, name: str) -> Optional[_Record]:
        """The message's state; None when it has no state file (and {} when
        it has one that cannot be read: it is advice)."""
        path = self._state_path(name)
        # Opened, not looked for first: os.access would read a state/ this
        # process may not search as "no record", and restart the backoff.
        try:
            state = json.loads(_read_regular(path)[0])
            return _sane_state(state)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError, MemoryError) as e:
            log.warning("4.3.0 %s: ignoring unreadable state file: %s",
                        self._state_path(name), e)
            return {}

    def _write_state(self, name: str, state: _Record, sync: bool) -> None:
        """Replace the message's state file with state (read back by
        _read_state).  Fsynced only when sync: attempts and times are cheap
        to lose, refused recipients are not (see defer)."""
        path = self._state_path(name)
        tmp = os.path.join(self.path, "tmp", _STATE_TMP + name)
        # A new file (O_EXCL|O_NOFOLLOW), never through what is at the name
        try:
            _write_synced(tmp, [json.dumps(state, sort_keys=True).encode("utf-8")],
                          sync=sync)
            os.rename(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)      # a full disk must not keep a half-written file
            except OSError:
                pass
            raise

    # -- settling -----------------------------------------------------------

    def remove(self, msg: QueuedMessage) -> None:
        """The message is done with: delete it and its state."""
        self._check_identity()  # a record never lands in a queue put in its place
        try:
            os.unlink(msg.path)
        except FileNotFoundError:
            pass
        if msg._stateful:    # most messages never had one: spare the system call
            try:
                os.unlink(self._state_path(msg.name))
            except FileNotFoundError:
                pass
        msg.release()

    def defer(self, msg: QueuedMessage, recipients: List[str],
              state: _Record, next_attempt: float) -> None:
        """Keep the message for the recipients still to do, due again at
        next_attempt, and record state."""
        self._check_identity()
        cur = os.path.join(self.path, "cur", msg.name)
        if msg.path != cur and not os.path.lexists(msg.path) and os.path.lexists(cur):
            # An earlier try of this same change moved it and then failed
            # (see QueueProcessor._record); we hold its claim, so it is ours.
            # Writing msg.path again would make a second copy.
            msg.path = cur
        try:
            # The refused recipients must survive a crash (they go in the dead
            # letter); attempts and times are cheap to lose.
            sync = (state.get("failed") or {}) != (msg.state.get("failed") or {})
            self._write_state(msg.name, state, sync)
            if recipients != msg.recipients:
                # Only those left go in X-Zope-To, so no reader of this queue
                # (zope.sendmail included) sends twice to those done.
                tmp = os.path.join(self.path, "tmp", msg.name)
                _write_synced(tmp, [_envelope(msg.sender, recipients), msg.data])
                os.utime(tmp, (next_attempt, next_attempt), follow_symlinks=False)
                # Replace in place, then move: a crash between the two
                # leaves the shorter list due early, never the longer one.
                os.rename(tmp, msg.path)
                if msg.path != cur:
                    os.rename(msg.path, cur)
                    _fsync_dir(os.path.dirname(msg.path))
                _fsync_dir(os.path.join(self.path, "cur"))
            else:
                os.utime(msg.path, (next_attempt, next_attempt), follow_symlinks=False)
                if msg.path != cur:
                    os.rename(msg.path, cur)
        except OSError as e:
            try:
                os.unlink(os.path.join(self.path, "tmp", msg.name))
            except OSError:
                pass
            raise self._error("cannot defer %s" % msg.name, e) from None
        msg.recipients, msg.state = list(recipients), state
        msg.path = cur
        self._cur_scan_at = min(self._cur_scan_at,
                                time.monotonic() + (next_attempt - time.time()))
        msg.release()

    def dead_letter(self, msg: QueuedMessage, failures: Dict[str, str],
                    summary: str, keep: bool = False,
                    attempts: Optional[int] = None) -> str:
        """Write the dead letter ``.rejected-NAME`` for the recipients in
        failures (recipient -> reason), with every byte of the message, and
        return its path.  Without keep the message is then removed.

        A message has one dead letter of ours.  Recipients refused while
        others are still to do go in it at once (keep=True), and later
        refusals are merged in, so they are named whoever finishes the
        message: zope.sendmail sends the rest and removes the file without
        a word of them.  A file we did not write is never replaced:
        zope.sendmail links its own ``.rejected-NAME`` beside a message it
        gives up, so ours then goes in the other directory (or as
        ``.rejected-NAME.N``), where link() too never replaces a file.
        """
        self._check_identity()
        own, held, old = self._own_dead_letter(msg.name)
        try:
            merged = dict(old)
            merged.update(failures)
            lines = _dead_letter_lines(msg.sender, merged, msg.name, time.time(),
                                       msg.attempts if attempts is None else attempts,
                                       msg.first_queued, summary)
            tmp = os.path.join(self.path, "tmp", _DEAD + msg.name)
            path = own
            try:
                _write_synced(tmp, [lines, msg.data])
                if own:
                    os.rename(tmp, own)     # ours, and claimed: nobody else writes it
                else:
                    path = self._link_dead_letter(tmp, msg, keep)
                _fsync_dir(os.path.dirname(path))
            except OSError as e:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise self._error("cannot write the dead letter of %s" % msg.name,
                                  e) from None
        finally:
            if held is not None:
                held.release()
        if not keep:
            self.remove(msg)
        return path

    def _dead_letter_paths(self, name: str, first: str) -> Iterator[List[str]]:
        """Where a dead letter of message name may be, a pair at a time:
        .rejected-NAME in first (new or cur) and the other, then
        .rejected-NAME.2 in each, and on."""
        subs = (first, "cur" if first == "new" else "new")
        for n in range(1, 1000):
            yield [os.path.join(self.path, sub, "%s%s%s" % (
                _DEAD, name, "" if n == 1 else ".%d" % n)) for sub in subs]

    def _own_dead_letter(self, name: str) -> Tuple[str, Optional[QueuedMessage],
                                                   Dict[str, str]]:
        """Our dead letter of message name, claimed so no operator's retry
        or purge takes it while we add to it: (path, claim, its failures),
        or ("", None, {}) when there is none."""
        for pair in self._dead_letter_paths(name, "new"):
            if not any(os.path.lexists(path) for path in pair):
                break       # a name in neither directory: none further
            for path in pair:
                held = self._hold(path)
                if held is None:
                    continue    # not there, or held by an operator's command
                try:
                    with _open_file(path) as f:     # never a FIFO's open, nor a link
                        head = _read_head(f.readline, os.path.basename(path))
                except OSError:     # gone, or not a regular file: not ours
                    head = _Head()
                except BaseException:
                    held.release()
                    raise
                if head.id == name:
                    return path, held, head.failed
                held.release()  # zope's, or another message's
        return "", None, {}

    def _link_dead_letter(self, tmp: str, msg: QueuedMessage, keep: bool) -> str:
        """Give the dead letter written at tmp a name nobody has taken.  One
        written while the message stays goes in new/ (the message itself
        will wait in cur/, where zope.sendmail would put its own)."""
        first = "new" if keep else os.path.basename(os.path.dirname(msg.path))
        for pair in self._dead_letter_paths(msg.name, first):
            for path in pair:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    continue
                os.unlink(tmp)
                return path
        raise OSError(errno.EEXIST, "every dead-letter name of %s is taken" % msg.name)

    def _strike(self, msg: QueuedMessage, done: Iterable[str]) -> bool:
        """Take the recipients in done out of the message file's X-Zope-To
        line in place, padding it with spaces to its old length (gsemail
        and zope.sendmail both ignore them).  True when the file now lists
        none of them.

        The fallback when an outcome cannot be recorded (defer and
        dead_letter write new files): an overwrite of bytes the file
        already has needs no new disk block, so it works on a full disk, and
        it keeps the recipients already delivered from being sent again by
        any later run or by zope.sendmail.  Crash safety: it is one pwrite
        within the file's first page, which a killed process leaves whole
        or undone; a power cut in the middle of a line that crosses a disk
        sector could tear it (at worst a mangled address is refused, or a
        delivered recipient is sent again, as after any crash before a
        record).  File systems that copy on write (btrfs, ZFS) may refuse
        even this when full: then False.
        """
        done = set(done)
        try:
            self._check_identity()
            fd = os.open(msg.path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            head = os.pread(fd, 4096, 0)
            first = head.find(b"\n") + 1
            end = head.find(b"\n", first)
            if first <= 0 or end < 0:
                return False    # beyond the first page: not one safe write
            line = head[first:end].rstrip(b"\r")
            if not line.startswith(_TO + b" "):
                return False
            listed = _read_head(io.BytesIO(head[:end + 1]).readline, msg.name).recipients
            left = [r for r in listed if r not in done]
            if len(left) == len(listed):
                return bool(left)   # already struck
            if not left:
                return False        # "nobody" cannot be said in X-Zope-To
            new = b"%s %s" % (_TO, ", ".join(left).encode("utf-8"))
            if len(new) > len(line):
                return False
            new += b" " * (len(line) - len(new))
            if os.pwrite(fd, new, first) != len(new):
                return False
            os.fsync(fd)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def _set_aside(self, msg: QueuedMessage) -> Optional[str]:
        """The last resort for a message whose outcome could not be recorded
        at all, not even by _strike: rename it to a dead letter (a rename
        needs no data block), so no processor sends it again, and release
        it.  The path, or None when even that failed.  A link, then the
        unlink of the message: a rename would replace a dead letter already
        there (ours, written when recipients were refused, or zope's)."""
        try:
            self._check_identity()
        except QueueError:
            return None
        here = os.path.basename(os.path.dirname(msg.path))
        for pair in self._dead_letter_paths(msg.name, here):
            for rejected in pair:
                try:
                    os.link(msg.path, rejected, follow_symlinks=False)
                except FileExistsError:
                    continue
                except OSError:
                    return None
                try:
                    os.unlink(msg.path)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.unlink(rejected)     # not both: it would be sent again
                    return None
                msg.release()
                return rejected
        return None

    # -- the operator's commands: list, show, status, flush, retry, purge -----

    def entries(self) -> List[QueueEntry]:
        """Every message in the queue, dead letters too, oldest first.

        A snapshot for ``list``, ``show`` and ``status``: a message that
        comes or goes meanwhile is missed or left out, never an error.
        """
        found = list(self._stream())
        # By when each was first queued, which a state file may say
        # otherwise than the name (a retried message keeps its first time).
        found.sort(key=lambda e: (e.queued, e.id))
        return found

    def _stated(self) -> Optional[Set[str]]:
        """The names that have a state file, from one listing of state/
        (None when it cannot be listed: then each is looked for).  A state
        file written after the listing is missed, as it would be had we
        looked a moment sooner: what status and list show is advice."""
        try:
            return set(os.listdir(os.path.join(self.path, "state")))
        except FileNotFoundError:
            return set()
        except OSError:
            return None

    def _listing(self, keep: Optional[Tuple[str, ...]] = None) -> _Listing:
        """new/ and cur/ as one scan names them, no file opened: what find
        and list start from, so that neither reads 100,000 files to show one
        message (or before its first line).  With keep, only the names that
        begin with one of its beginnings (find's: so as not to hold 100,000
        names to find one)."""
        names: Dict[str, List[str]] = {}
        claimed: Dict[str, set[str]] = {}
        for sub in ("new", "cur"):
            names[sub], claimed[sub] = [], set()
            try:
                it = os.scandir(os.path.join(self.path, sub))
            except FileNotFoundError:
                raise QueueError("queue %s: %s/ has gone" % (self.path, sub)) from None
            with it:
                for entry in it:
                    name = entry.name
                    if keep is not None and not name.startswith(keep):
                        continue
                    if name.startswith(_CLAIM):
                        claimed[sub].add(name[len(_CLAIM):])
                    elif name.startswith(_DEAD) or not name.startswith("."):
                        names[sub].append(name)     # a FIFO too: _entry says what it is
        # Which have a state file: list would otherwise try to open one for
        # each message, and most new mail has none.
        return _Listing(names, claimed, self._stated() if keep is None else None)

    def _entry_of(self, listing: _Listing, sub: str, name: str) -> Optional[QueueEntry]:
        """The entry of sub/name as listing found it; None if it has gone."""
        if name.startswith(_DEAD):
            state = "dead"
        elif name in listing.claimed[sub]:
            state = "sending"
        else:
            state = "new" if sub == "new" else "deferred"
        return self._entry(os.path.join(self.path, sub, name), state,
                           listing.stated is None or name in listing.stated)

    def _stream(self) -> Iterator[QueueEntry]:
        """Every message, as entries() has them, one at a time and oldest
        first by the time its name begins with (when it was queued; the
        file's mtime for a name without one): only the names are held and
        sorted, and each file is read as its entry is taken, so ``list``
        prints its first line at once and holds one entry at a time.

        The order is entries()'s but for a message whose state file says it
        was first queued another time than its name (``retry`` queues a dead
        letter again under a new name, keeping the first time): that order
        needs every state file read first."""
        listing = self._listing()
        runs: List[Iterable[Tuple[float, str, str, str]]] = []
        others: List[Tuple[float, str, str, str]] = []
        for sub, names in listing.names.items():
            # Names that begin with ten digits and a dot (every gsemail,
            # zope.sendmail and Maildir name until 2286) sort by their
            # time and then by id as plain strings do: sorting the names
            # themselves needs no key per name, which for 100,000 would
            # cost tens of megabytes.
            plain = [n for n in names if _TEN_DIGITS.match(n)]
            plain.sort()
            runs.append(_plain_run(plain, sub))
            for name in names:
                if _TEN_DIGITS.match(name):
                    continue
                when = _named_time(name)
                if when is None:
                    try:
                        when = os.lstat(os.path.join(self.path, sub, name)).st_mtime
                    except FileNotFoundError:
                        continue
                others.append((when, _queue_id(name), sub, name))
        others.sort()
        runs.append(others)
        for _, _, sub, name in heapq.merge(*runs, key=lambda r: r[:2]):
            entry = self._entry_of(listing, sub, name)
            if entry is not None:
                yield entry

    def _entry(self, path: str, state: str, stated: bool = True) -> Optional[QueueEntry]:
        """The file at path as an operator sees it; None if it has gone.
        stated False: it has no state file (the listing knows), none is read."""
        name = os.path.basename(path)
        try:
            f = _open_file(path)
        except FileNotFoundError:
            return None
        except _NotRegular as e:
            # Shown, so that list and status say what is there (and never
            # wait on a FIFO): not a message, to be removed by hand.
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return None
            return QueueEntry(
                id=_queue_id(name), state=state, path=path, size=0, sender="",
                recipients=[], queued=st.st_mtime, attempts=0, next_attempt=st.st_mtime,
                xverp=False, last_error="4.3.0 %s: not a message; remove it" % e)
        try:
            with f:
                st = os.fstat(f.fileno())
                head = _read_head(f.readline, name)     # as delivery reads it
        except FileNotFoundError:
            return None
        entry = QueueEntry(
            id=_queue_id(name), state=state, path=path,
            size=st.st_size - head.start, sender=head.sender, recipients=head.recipients,
            queued=_first_queued(name, {}, st.st_mtime), attempts=0,
            next_attempt=st.st_mtime,
            xverp=self._wants_xverp(_asks_xverp(name, head), head.sender),
            last_error=head.problem.text if head.problem else "")
        if state == "dead":
            _fill_from_dead_letter(entry, head, st.st_mtime)
            return entry
        _fill_from_state(entry, (self._read_state(name) if stated else None) or {},
                         st.st_mtime)
        if state == "sending":
            entry.claim, entry.claim_alive = self._claims.holder(
                os.path.join(os.path.dirname(path), _CLAIM + name))
        return entry

    def find(self, ids: Iterable[str]) -> List[QueueEntry]:
        """The messages named by ids, in that order.  An id is a queue id as
        ``list`` prints it, or a beginning of one that names one message.
        Raises QueueError (5.5.4, EX_USAGE) for an id that names none, or
        several.

        The ids are matched against the names in new/ and cur/ (a scan, no
        file read), and only the files that match are read: ``show`` of one
        message in 100,000 reads that message."""
        wanted_keys = [(wanted, os.path.basename(wanted.strip())) for wanted in ids]
        keys = tuple(_queue_id(key) for _, key in wanted_keys if _queue_id(key))
        scanned: Optional[_Listing] = None
        chosen: Dict[str, QueueEntry] = {}
        for wanted, key in wanted_keys:
            dead_only = key.startswith(_DEAD)
            key = _queue_id(key)
            listing = self._exact(key, dead_only)
            if listing is None:     # not a whole id: a beginning of one, or none
                if scanned is None:
                    # the names, dead letters and claims of every id asked for
                    scanned = self._listing(keys + tuple(_DEAD + k for k in keys)
                                            + tuple(_CLAIM + k for k in keys))
                listing = scanned
            pool = [(sub, name) for sub, names in listing.names.items() for name in names
                    if (name.startswith(_DEAD) or not dead_only)
                    and key and _queue_id(name).startswith(key)]
            matches = [(sub, name) for sub, name in pool if _queue_id(name) == key] or pool
            if len({_queue_id(name) for _, name in matches}) > 1:
                raise QueueError("%s names %d messages in queue %s: give more of the id"
                                 % (wanted, len(matches), self.path), status="5.5.4",
                                 exit_code=os.EX_USAGE)
            found = [e for e in (self._entry_of(listing, sub, name) for sub, name in matches)
                     if e is not None]     # None: it left after the scan
            if not found:
                raise QueueError("no message %s in queue %s (gsemail list shows the ids)"
                                 % (wanted, self.path), status="5.5.4", exit_code=os.EX_USAGE)
            found.sort(key=lambda e: (e.queued, e.id))     # a message, then its dead letter
            chosen.update((e.path, e) for e in found)
        return list(chosen.values())

    def _exact(self, key: str, dead_only: bool) -> Optional[_Listing]:
        """The files whose queue id is key (the message, its dead letter), as
        _listing would name them, from a few lstats instead of a scan: None
        when there is none (key may be a beginning of an id)."""
        names: Dict[str, List[str]] = {}
        claimed: Dict[str, set[str]] = {}
        for sub in ("new", "cur"):
            names[sub] = [name for name in (key, _DEAD + key)
                          if key and (name.startswith(_DEAD) or not name.startswith("."))
                          and (name.startswith(_DEAD) or not dead_only)
                          and os.path.lexists(os.path.join(self.path, sub, name))]
            claimed[sub] = {key} if os.path.lexists(
                os.path.join(self.path, sub, _CLAIM + key)) else set()
        return _Listing(names, claimed, None) if any(names.values()) else None

    def read_message(self, entry: QueueEntry) -> bytes:
        """The message itself, headers and body with CRLF line ends, as
        delivery sends it: without the envelope lines and a dead letter's
        own lines (a file without an envelope: all of its bytes).  Raises
        QueueError if it has left meanwhile."""
        try:
            with _open_file(entry.path) as f:
                raw = f.read()
        except _NotRegular as e:
            raise QueueError("%s: %s" % (entry.id, e), exit_code=os.EX_DATAERR) from None
        except FileNotFoundError:
            raise QueueError("%s has left %s meanwhile (sent, deferred or purged): look "
                             "again" % (entry.id, os.path.dirname(entry.path)),
                             exit_code=os.EX_TEMPFAIL) from None
        return _crlf(_read_file(raw, os.path.basename(entry.path)).data)

    def _heartbeat(self) -> None:
        """Show ``status`` that a processor sends from this queue: make this
        process's claimer file (its flock is held while the process lives)
        and touch it, at most once a second, for a ``status`` on another
        host, which cannot test the lock (QueueProcessor.run_once calls
        this every pass).  Never raises: it is advice, and a full disk must
        not stop the sending that empties it."""
        now = time.monotonic()
        if now - self._beat < 1.0:
            return
        self._beat = now
        try:
            os.utime(self._claims._claimer().fd)
        except OSError as e:
            log.debug("4.3.0 queue %s: cannot show that this processor lives: %s",
                      self.path, e.strerror)

    def _processors(self, now: float) -> Optional[int]:
        """How many processes send from this queue now (None when tmp/
        cannot be read).  Each keeps a claimer file in tmp/ (_heartbeat).
        One of this host counts while its flock is held, which ends when the
        process does, however it dies; one of another host (a shared NFS
        queue), or one we may not open, counts while it was touched within
        claim_timeout: the rule by which its claims are held too."""
        live = 0
        try:
            listing = os.scandir(os.path.join(self.path, "tmp"))
        except OSError:
            return None
        with listing:
            for entry in listing:
                if not entry.name.startswith(_CLAIMER):
                    continue
                host = entry.name[len(_CLAIMER):].rsplit("-", 2)[0]
                if host == _HOST:
                    held = _lock_held(entry.path)
                    if held is not None:
                        live += held
                        continue
                try:
                    touched = entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                if now - touched < self.claim_timeout:
                    live += 1
        return live

    def _claim_broken(self, claim_path: str, now: float) -> bool:
        """Whether the claim at claim_path is one the next processor would
        break (see _Claims.break_stale), looked at without breaking it: a
        claim of this host whose flock nobody holds, or any other untouched
        for claim_timeout.  Its message is due, as far as status is
        concerned: nobody is sending it."""
        held = _lock_held(claim_path)
        if held:
            return False
        try:
            fd = _open_regular(claim_path)
        except OSError:
            return False    # gone, or not ours to look at: nobody to blame
        try:
            st = os.fstat(fd)
            owner = self._claims.owner(fd, st)
        finally:
            os.close(fd)
        if owner is not None and owner.here and held is False:
            return True
        return now - max(st.st_mtime, st.st_ctime) >= self.claim_timeout

    @staticmethod
    def _quick_state(state_dir: str, name: str) -> Tuple[Optional[float], int]:
        """From a message's state file, state_dir + name: its first_queued
        (None: not there) and how many recipients it has refused so far.
        status reads one a message, so the usual file (as _write_state
        writes it) is read by its bytes, and only an unusual one is parsed
        as JSON."""
        try:
            fd = os.open(state_dir + name, _STATE_READ)
        except OSError:
            return None, 0      # none (most new mail), or unusable: advice
        try:
            # A small read first: a 1 MB buffer a call would be mmapped and
            # unmapped by malloc each time, which costs more than the read.
            raw = os.read(fd, 8192)
            while len(raw) < 1 << 20 and len(raw) % 8192 == 0 and raw:
                more = os.read(fd, 65536)
                if not more:
                    break
                raw += more
        except OSError:
            return None, 0
        finally:
            os.close(fd)
        first = _QUICK_FIRST.findall(raw)
        failed = raw.count(b'"failed"')
        if raw.count(b'"first_queued"') == len(first) <= 1 and \
                (failed == 0 or (failed == 1 and _QUICK_NONE in raw)):
            when = float(first[0]) if first else -1.0
            return (when if 0.0 <= when <= _TIME_MAX else None), 0    # as _when
        try:
            state = _sane_state(json.loads(raw))
        except (ValueError, RecursionError, MemoryError):
            return None, 0
        return _when(state.get("first_queued")), len(state.get("failed") or {})

    def status(self) -> _StatusFacts:
        """Facts for monitoring, as ``gsemail status`` shows them.

        ``counts`` (messages per state), ``waiting`` (not dead), ``due``
        (waiting and due now, so a processor should be at them),
        ``oldest_id`` and ``oldest_queued`` (of those waiting),
        ``oldest_due_id`` and ``oldest_due`` (of those due: since when it
        has been due), ``refused`` (recipients refused so far in messages
        still waiting for others), ``processors`` (how many live: see
        _processors), and what the processors recorded last:
        ``delivered_at``/``_id``/``_via`` and ``error_at``/``error``/
        ``error_id``.  Times are Unix times.

        It looks as entries() does, and as cheaply as it can (monitoring
        runs it every minute on a queue that may hold 100,000 messages when
        the relay has been down): one listing of new/ and cur/, one lstat a
        message, and a read of its state file, never the message itself.
        """
        now = time.time()
        counts = dict.fromkeys(_STATES, 0)
        due = refused = 0
        oldest: Tuple[float, str] = (math.inf, "")
        oldest_due: Tuple[float, str] = (math.inf, "")
        state_dir = os.path.join(self.path, "state", "")
        # A failed open a message would cost status a third of its time on
        # a queue of fresh mail, which has no state files.
        stated = self._stated()
        for sub in ("new", "cur"):
            head = os.path.join(self.path, sub)
            try:
                listing = os.listdir(head)
            except FileNotFoundError:
                raise QueueError("queue %s: %s/ has gone" % (self.path, sub)) from None
            claims = {n[len(_CLAIM):] for n in listing if n.startswith(_CLAIM)}
            head += os.sep
            for name in listing:
                if name.startswith("."):
                    counts["dead"] += name.startswith(_DEAD)
                    continue    # claims and other dot files
                try:
                    st = os.lstat(head + name)
                except FileNotFoundError:
                    continue    # sent or moved meanwhile
                if stat.S_ISREG(st.st_mode):
                    first, failed = self._quick_state(state_dir, name) \
                        if stated is None or name in stated else (None, 0)
                    if first is None:
                        first = _named_time(name)
                    queued = st.st_mtime if first is None else first
                    refused += failed
                else:
                    queued = st.st_mtime    # as entries() shows it: not a message
                if queued <= oldest[0]:     # a tuple for each would cost more
                    oldest = min(oldest, (queued, name))
                state = "new" if sub == "new" else "deferred"
                if name in claims:
                    state = "sending"
                    if not self._claim_broken(head + _CLAIM + name, now):
                        counts[state] += 1
                        continue
                counts[state] += 1
                if st.st_mtime <= now:
                    due += 1
                    if st.st_mtime <= oldest_due[0]:
                        oldest_due = min(oldest_due, (st.st_mtime, name))
        recorded = self._read_status()
        return {
            "queue": self.path, "counts": counts,
            "waiting": counts["new"] + counts["deferred"] + counts["sending"],
            "due": due,
            "oldest_id": _queue_id(oldest[1]) if oldest[1] else None,
            "oldest_queued": oldest[0] if oldest[1] else None,
            "oldest_due_id": _queue_id(oldest_due[1]) if oldest_due[1] else None,
            "oldest_due": oldest_due[0] if oldest_due[1] else None,
            "refused": refused,
            "processors": self._processors(now),
            "delivered_at": recorded.get("delivered_at"),
            "delivered_id": recorded.get("delivered_id"),
            "delivered_via": recorded.get("delivered_via"),
            "error_at": recorded.get("error_at"), "error": recorded.get("error"),
            "error_id": recorded.get("error_id"),
        }

    _STATUS_FACTS = {"delivered": ("delivered_id", "delivered_via"),
                     "error": ("error", "error_id")}

    def _read_status(self) -> _Recorded:
        """What processors noted in status.json, each fact checked: the file
        is advice that an operator or another tool may have written (ISO
        times, wrong types, NaN, anything), so only the facts we know are
        taken, and only with values we can use."""
        try:
            with _open_file(os.path.join(self.path, "status.json")) as f:
                raw = f.read(1 << 20)
            recorded = json.loads(raw)
        except (OSError, ValueError, RecursionError, MemoryError):
            return {}
        facts: _Recorded = {}
        if not isinstance(recorded, dict):
            return facts

        def text(key: str) -> Optional[str]:
            value = recorded.get(key)
            return _one_line(value)[:1000] if isinstance(value, str) else None

        # The groups of _STATUS_FACTS, each whole or not at all.
        at = _when(recorded.get("delivered_at"))
        if at is not None:
            facts["delivered_at"] = at
            facts["delivered_id"] = text("delivered_id")
            facts["delivered_via"] = text("delivered_via")
        at = _when(recorded.get("error_at"))
        if at is not None:
            facts["error_at"] = at
            facts["error"] = text("error")
            facts["error_id"] = text("error_id")
        return facts

    def _note(self, facts: Mapping[str, object]) -> None:
        """Record the last delivery (``delivered_at``, ``_id``, ``_via``) or
        error (``error_at``, ``error``, ``error_id``) for ``status``.  The
        newer record wins, whichever processor made it.  Never raises: this
        is advice, and nothing in it may stop a processor."""
        try:
            self._check_identity()      # nothing of ours goes into a replaced queue
        except QueueError as e:
            log.warning("4.3.0 cannot record the status: %s", e)
            return
        tmp = os.path.join(self.path, "tmp", ".status-%d-%d" % (os.getpid(), next(_counter)))
        try:
            recorded: Dict[str, object] = dict(self._read_status())
            for group in self._STATUS_FACTS:
                at = _when(facts.get(group + "_at"))
                if at is not None and at > (_when(recorded.get(group + "_at")) or 0):
                    recorded.update((k, v) for k, v in facts.items() if k.startswith(group))
            # Not fsynced: a crash may lose the last record, never a message.
            _write_synced(tmp, [json.dumps(recorded, sort_keys=True).encode()],
                          exclusive=True, sync=False)
            os.rename(tmp, os.path.join(self.path, "status.json"))
        except Exception as e:
            log.warning("4.3.0 queue %s: cannot record the status: %s", self.path,
                        getattr(e, "strerror", None) or e)
            try:
                os.unlink(tmp)      # on a full disk, leave no empty files behind
            except OSError:
                pass

    def _hold(self, path: str) -> Optional[QueuedMessage]:
        """Claim path for an operator's command, due or not, so no processor
        sends it meanwhile.  None when someone holds it or it has moved."""
        held = self._claim_unread(path)
        if held is None:
            return None
        if not os.path.exists(path):
            held.release()
            return None
        return held

    def flush(self, entry: QueueEntry) -> bool:
        """Make a deferred message due now (``postqueue -f``).

        It moves back to new/, where a running processor looks at every
        poll.  Returns False, changing nothing, when a processor is sending
        it or it has moved meanwhile.  A message in new/ is already due.
        """
        if entry.state != "deferred":
            return entry.state == "new"
        held = self._hold(entry.path)
        if held is None:
            return False
        try:
            now = time.time()
            info = self._read_state(entry.id) or {}
            info["next_attempt"] = now
            info["history"] = _history_with(
                info, {"at": now, "event": "made due now by an operator (flush)"})
            self._write_state(entry.id, info, sync=False)
            os.utime(entry.path, (now, now), follow_symlinks=False)
            os.rename(entry.path, os.path.join(self.path, "new", entry.id))
        except OSError as e:
            raise self._error("cannot flush %s" % entry.id, e) from None
        finally:
            held.release()
        return True

    def retry(self, entry: QueueEntry) -> Optional[str]:
        """Queue a dead letter again for the recipients that failed, as a new
        message with fresh attempts, and delete the dead letter.

        Returns the new queue id, or None when another command holds the
        dead letter or it has gone.  Raises MessageError when its envelope
        cannot be sent (a corrupt file), leaving it as it is.
        """
        if entry.state != "dead":
            raise MessageError("%s is %s, not a dead letter" % (entry.id, entry.state),
                               status="5.5.4")
        held = self._hold(entry.path)
        if held is None:
            return None
        try:
            try:
                with _open_file(entry.path) as f:
                    raw = f.read()
            except FileNotFoundError:
                return None
            except _NotRegular as e:
                raise MessageError("dead letter %s cannot be queued again: %s"
                                   % (entry.id, e), status="5.3.0") from None
            file_name = os.path.basename(entry.path)
            head = _read_file(raw, file_name)
            problem = head.problem
            if not head.recipients:
                problem = Reply(554, "5.1.3 it names no recipients to send to (its "
                                "X-Gsemail-Failed lines say why%s)" % (
                                    "; what follows them is the queue file gsemail could "
                                    "not read, byte for byte: mend it and move it into new/"
                                    if _NO_RECIPIENT in head.failed else ""))
            for address in head.recipients + ([head.sender] if head.sender else []):
                if not problem and _address_problem(address):
                    problem = Reply(554, "5.1.3 address <%s> %s" % (
                        _shown(address), _address_problem(address)))
            if problem:
                raise MessageError("dead letter %s cannot be queued again: %s"
                                   % (entry.id, _detail(problem)), status=problem.status)
            now = time.time()
            xverp = _asks_xverp(file_name, head)
            name = self.add(head.sender, head.recipients, head.data, xverp, state={
                "retried_from": entry.id, "history": _history_with(
                    {"history": entry.history},
                    {"at": now, "event": "queued again from dead letter %s by an "
                                         "operator (retry)" % entry.id})})
            try:
                # Only now: a crash before this leaves the dead letter too,
                # which is better than losing the message.
                os.unlink(entry.path)
                _fsync_dir(os.path.dirname(entry.path))
            except OSError as e:
                raise self._error("%s is queued again as %s, but its dead letter cannot "
                                  "be removed" % (entry.id, name), e) from None
            return name
        finally:
            held.release()

    def purge(self, entry: QueueEntry) -> bool:
        """Delete a message or dead letter for good.  Returns False, deleting
        nothing, when a processor is sending it or it has moved meanwhile."""
        held = self._hold(entry.path)
        if held is None:
            return False
        try:
            os.unlink(entry.path)
            if entry.state != "dead":
                try:
                    os.unlink(self._state_path(entry.id))
                except FileNotFoundError:
                    pass
            _fsync_dir(os.path.dirname(entry.path))
        except FileNotFoundError:
            return False
        except OSError as e:
            raise self._error("cannot purge %s" % entry.id, e) from None
        finally:
            held.release()
        return True

    # -- housekeeping -------------------------------------------------------------

    def maintain(self) -> None:
        """Remove what crashed processes left: old tmp/ files, claims whose
        message has gone and state files whose message has gone (another
        reader, zope.sendmail, finished it: its refused recipients are in
        its dead letter, written when they were refused)."""
        now = time.time()
        made = self._claims.ours()
        if made is not None:
            os.utime(made.fd)   # ours is alive, however old: keep it off the list
        for entry in os.scandir(os.path.join(self.path, "tmp")):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime > _STALE_TMP:
                    os.unlink(entry.path)
                    if not entry.name.startswith("."):
                        # a whole message a committed transaction left
                        # (_MailDataManager logged it), or a crash's
                        # half-written one: it was mail, so say so
                        log.error("4.3.0 %s: removed from %s after %s unqueued, as "
                                  "Maildir removes stale tmp/ files", entry.name,
                                  os.path.dirname(entry.path), _span(_STALE_TMP))
            except FileNotFoundError:
                pass
            except OSError as e:    # one odd entry does not stop the rest
                log.warning("4.3.0 %s: cannot be looked at or removed: %s",
                            entry.path, e.strerror)
        # Only the claims are kept of the listings, and a state file's
        # message is looked for by name: a set of every name would hold 15
        # MB for 100,000 messages (at the first pass of a drain of them).
        for sub in ("new", "cur"):
            head = os.path.join(self.path, sub)
            for n in [n for n in os.listdir(head) if n.startswith(_CLAIM)]:
                if not os.path.lexists(os.path.join(head, n[len(_CLAIM):])):
                    self._claims.break_stale(os.path.join(head, n))
        for entry in os.scandir(os.path.join(self.path, "state")):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime <= 3600:
                    continue
                # cur/, new/, then cur/ again: a message that moves between
                # two looks (flush from cur/ to new/, a deferral from new/ to
                # cur/) is found by the next one.
                if any(os.path.lexists(os.path.join(self.path, sub, entry.name))
                       for sub in ("cur", "new", "cur")):
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("4.3.0 %s: cannot be looked at or removed: %s",
                            entry.path, e.strerror)


# ---------------------------------------------------------------------------
# The SMTP connection: one socket, what its server offered, and the
# pipelined wire I/O on it (RFC 2920), in the order of the protocol.
#
# The pipelined dot.  A message sent with ``more`` leaves its final reply
# owed, so that the next message's commands go out with its dot:
#
#   client (Mailer)             server           processor (_deliver)
#   MAIL1 RCPT1 DATA1          ->
#                              <-  250 250 354
#   data1 . MAIL2 RCPT2 DATA2  ->                msg1 waiting
#                              <-  250 (dot 1)   collect(): msg1 settled
#                              <-  250 250 354   (MAIL2 RCPT2 DATA2)
#   heartbeat before data2                       msg1 recorded (_apply)
#   data2 .                    ->                msg2 waiting
#                              <-  250 (dot 2)   read with the next message
#                                                or by wait(): then recorded
#
# The reply to dot 1 is the first one read after it (_Connection.reply
# collects it before msg2's replies); it only settles msg1's Outcome
# (waiting becomes False; a lost connection settles it as deferred, for
# its dot may have gone).  The processor records msg1 at msg2's next
# heartbeat, which comes before any of msg2's data, or as soon as
# deliver, open or wait returns: so msg1 is on disk before dot 2 goes out,
# and a crash leaves at most one message sent and not recorded.
# ---------------------------------------------------------------------------

_CHUNK = 1 << 20            # bytes of DATA sent between heartbeats
_WINDOW = 100               # pipelined commands sent before reading replies
# When a relay hangs up in the middle of a message after settling some of
# its recipients (Postfix's smtpd_hard_error_limit: 20 errors, 1 under
# stress), the same attempt goes on at once on a new connection.  Each new
# connection must follow one that settled a recipient, so it always ends;
# this bounds how many one attempt opens (25 refusals and a good recipient
# at a limit of 1 take 26 connections).
_RECONNECTS = 30
_TOO_MANY_TEXT = re.compile(r"\btoo many\b", re.I)


def _too_many(reply: Reply) -> bool:
    """The reply says a limit of the server's was reached: RFC 3463's X.5.3
    (too many recipients), whatever the basic code (OpenSMTPD answers 451 or,
    at MAIL, 452); without an enhanced code, RFC 5321's 452 or 552 "too many
    recipients" (4.5.3.1.10)."""
    if reply.status in ("4.5.3", "5.5.3"):
        return True
    return (not _ENHANCED.match(reply.text) and reply.code in (452, 552)
            and bool(_TOO_MANY_TEXT.search(reply.text)))


# Throttling: the relay meters what this client sends and asks it to slow
# down.  Decided on the codes: a transient reply (421, 450, 451, 454) with
# X.7.0 or X.7.1 (Postfix's anvil: "450 4.7.1 Error: too much mail from",
# "... too many recipients from", "421 4.7.0 ... too many connections from";
# Gmail's "421 4.7.0 Try again later"), X.7.28 (Gmail's "unusual rate") or
# X.7.500-699 (Microsoft 365's "451 4.7.500 Server busy"); other X.7 codes
# are TLS or AUTH trouble.  (Greylisting's 450 4.7.1 to a RCPT reads the
# same: it costs a short pause.)  The text decides only when the reply has no
# enhanced code: Amazon SES's "454 Throttling failure: Maximum sending rate
# exceeded" (and "... Daily message quota exceeded") has none.
_THROTTLE_CODES = (421, 450, 451, 454)
_THROTTLE_TEXT = re.compile(r"throttl|\brate\b|\bquota\b|too (?:many|much) "
                            r"(?:mail|messages|connections)", re.I)


def _throttling(reply: Reply) -> bool:
    """The reply asks this client to send more slowly (see above)."""
    if reply.code not in _THROTTLE_CODES:
        return False
    if not _ENHANCED.match(reply.text):
        return bool(_THROTTLE_TEXT.search(reply.text))
    kind, detail = reply.status.split(".")[1:]
    return kind == "7" and (detail in ("0", "1", "28") or 500 <= int(detail) <= 699)


def _wire(data: bytes) -> Tuple[bytes, int]:
    """The DATA payload (CRLF line ends, dot-stuffed, ending in CRLF.CRLF)
    and the message's size as RFC 1870 counts it for SIZE: CRLF line ends,
    without the dot-stuffing and the final ".CRLF"."""
    data = _crlf(data)      # send_email queued CRLF; a zope queue file may not be
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    size = len(data)
    if data.startswith(b".") or b"\r\n." in data:   # every LF follows a CR now
        data = re.sub(rb"(?m)^\.", b"..", data)
    return data + b".\r\n", size


class _ConnectionLost(Exception):
    """The connection can carry nothing more (421, drop, timeout, garbage).

    Raised in a transaction, it says how far that got: ``todo`` is the
    batch's recipients still to do, those never answered first (None: those
    not settled), ``at_mail`` that not even MAIL was answered, and
    ``after_data`` that the message may have been sent, so it is not sent
    again in this attempt."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.todo: Optional[List[str]] = None
        self.at_mail = False
        self.after_data = False


class _UsedUp(Exception):
    """MAIL was refused because this connection has carried all the server
    takes on one (OpenSMTPD's 452 4.5.3 "Too many messages sent")."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class _Held(_ConnectionLost):
    """Raised by the processor's heartbeat to stop a message before its data
    goes: the queue could not record an earlier outcome (QueueProcessor._record)."""


_HELD = Reply(451, "4.3.0 not sent: the queue could not record an earlier delivery yet")


@dataclasses.dataclass
class Outcome:
    """What one delivery attempt did with each recipient."""

    delivered: List[str] = dataclasses.field(default_factory=list)
    failed: Dict[str, Reply] = dataclasses.field(default_factory=dict)
    deferred: Dict[str, Reply] = dataclasses.field(default_factory=dict)
    final: Optional[Reply] = None
    #: the dot is sent and its reply not yet read (see Mailer.deliver's
    #: more): the reply that settles it comes with the next message's
    waiting: bool = False
    #: the connection failed before the server answered any command of
    #: this message, so nothing of it can have been delivered
    unanswered: bool = False
    #: XVERP went out with the message (asked for, offered and not refused)
    xverp: bool = False
    #: the relay did not do VERP (no XVERP, or refused): gsemail did, a
    #: transaction per recipient, each from that recipient's VERP address
    client_verp: bool = False
    #: recipients sent from the plain sender though VERP was asked for:
    #: their VERP address would be longer than RFC 5321 lets a path be
    verp_too_long: List[str] = dataclasses.field(default_factory=list)
    #: the relay its data last went to ("" if none): the record names it,
    #: though the mailer may be on another relay when the record is written
    relay: str = ""
    #: for each recipient in delivered, the relay's reply to the dot that
    #: delivered it, whose text has the relay's own queue id (Postfix's
    #: "250 2.0.0 Ok: queued as 4XyZ"), so the log can lead to its log
    receipts: Dict[str, Reply] = dataclasses.field(default_factory=dict)
    #: time.monotonic() when the attempt started (Mailer.deliver), and the
    #: seconds from then to its final reply (a pipelined message's: the
    #: reply to its dot); None when nothing was timed (nothing was sent)
    started: float = 0.0
    took: Optional[float] = None
    #: the relay asked us to slow down (a throttling reply to MAIL, a RCPT
    #: or the dot, such as Postfix's "450 4.7.1 Error: too much mail"): the
    #: processor pauses before its next message
    throttled: Optional[Reply] = None

    def _settle(self, recipients: List[str], reply: Reply) -> None:
        """reply is final for recipients: failed if permanent, else deferred."""
        self.final = reply
        for rcpt in recipients:
            (self.failed if reply.permanent else self.deferred)[rcpt] = reply


# OpenSSL 3's X509_V_ERR_CA_CERT_MISSING_KEY_USAGE: the verify error of a
# CA without keyUsage, which Python 3.13's ssl.VERIFY_X509_STRICT (on in
# create_default_context) refuses and 3.12 accepted; a CA made with a bare
# ``openssl req -x509`` is one.  The number is decided on, not the wording.
_MISSING_KEY_USAGE = 92


def _reply_for(exc: BaseException, where: str) -> Reply:
    """The Reply that stands for an exception raised while talking SMTP."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = ""
        if exc.verify_code == _MISSING_KEY_USAGE:
            hint = (" (Python %d.%d refuses a CA certificate without the keyUsage "
                    "extension, as a bare openssl req -x509 makes: make the CA again "
                    "with keyUsage, see README's troubleshooting)" % sys.version_info[:2])
        return Reply(454, "4.7.5 certificate of %s did not verify: %s%s"
                     % (where, exc.verify_message or exc, hint))
    if isinstance(exc, ssl.SSLError):
        return Reply(454, "4.7.5 TLS with %s failed: %s" % (where, exc.reason or exc))
    if isinstance(exc, smtplib.SMTPResponseException):
        text = exc.smtp_error
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return Reply(exc.smtp_code, _one_line(text))
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return Reply(421, "4.4.2 connection to %s lost: %s" % (where, exc or "closed"))
    if isinstance(exc, socket.timeout):
        return Reply(451, "4.4.2 %s did not answer in time" % where)
    if isinstance(exc, ConnectionRefusedError):
        return Reply(451, "4.4.1 connection refused by %s" % where)
    if isinstance(exc, socket.gaierror):
        # getaddrinfo found no address for the relay's name: a typo in
        # hostname or this host's resolver, not a relay that is down.
        # 4.4.3, as Postfix's "Host or domain name not found"; decided on
        # the type, whatever the resolver's words.
        return Reply(451, "4.4.3 name %s does not resolve (%s): check hostname in the "
                     "SMTP section of gsconfig.ini, and DNS"
                     % (where.rsplit(":", 1)[0].strip("[]"), exc.strerror or exc))
    if isinstance(exc, OSError):
        return Reply(451, "4.4.1 cannot talk to %s: %s" % (where, exc.strerror or exc))
    return Reply(451, "4.3.0 %s: %s" % (type(exc).__name__, exc))


def _loopback(address: str) -> bool:
    """address (an IP address as getpeername gives it, "fe80::1%eth0" too)
    is this host's loopback: 127.0.0.0/8 or ::1, where no one on the way
    can read or change what is sent.  ::ffff:127.0.0.1 is too, as Python
    3.13 says and 3.12 did not."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


def _fingerprint(der: bytes) -> str:
    """The SHA-256 fingerprint of a certificate's DER bytes, as
    tls_fingerprint takes it and ``openssl x509 -fingerprint -sha256``
    prints it: "sha256:AB:CD:..."."""
    return "sha256:" + ":".join("%02X" % b for b in hashlib.sha256(der).digest())


class _Certificate(NamedTuple):
    """What check shows of a relay's certificate."""

    subject: str                # "CN=mail.example.org, O=Example"
    issuer: str
    names: List[str]            # its subjectAltNames: "DNS:mail.example.org", "IP:192.0.2.1"
    expires: Optional[float]    # notAfter, seconds since the epoch; None if unreadable
    fingerprint: str            # "sha256:AB:CD:..."


# getpeercert()'s long attribute names, as openssl and Postfix print them
_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
                "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
                "domainComponent": "DC"}


def _decoded(der: bytes) -> Dict[str, Any]:
    """The fields of a certificate that was not verified (pinned, or
    opportunistic TLS), in getpeercert()'s form, which gives them only for a
    verified one.  The ssl module's only parser of a certificate is
    _test_decode_cert, which reads a PEM file: used for check only, and
    without it check shows the fingerprint alone."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as f:    # mode 0600, O_EXCL
        f.write(ssl.DER_cert_to_PEM_cert(der))
        f.flush()
        try:
            return dict(decode(f.name))
        except (ssl.SSLError, OSError, ValueError):
            return {}


def _certificate(sock: ssl.SSLSocket) -> Optional[_Certificate]:
    """The relay's certificate on sock, or None if it sent none."""
    der = sock.getpeercert(binary_form=True)
    if not der:
        return None
    fields: Dict[str, Any] = dict(sock.getpeercert() or {}) or _decoded(der)

    def name(rdns: Iterable[Iterable[Tuple[str, str]]]) -> str:
        return ", ".join("%s=%s" % (_SHORT_NAMES.get(k, k), v) for rdn in rdns for k, v in rdn)
    try:
        expires: Optional[float] = ssl.cert_time_to_seconds(fields["notAfter"])
    except (KeyError, ValueError):
        expires = None
    return _Certificate(name(fields.get("subject", ())), name(fields.get("issuer", ())),
                        ["%s:%s" % ("IP" if kind == "IP Address" else kind, value)
                         for kind, value in fields.get("subjectAltName", ())],
                        expires, _fingerprint(der))


def _relay_trouble(where: str, e: DeliveryError) -> Reply:
    """Log that relay where cannot be used; the Reply to defer mail with."""
    down = e.reply.as_transient()
    if down.status.split(".")[1] == "7":
        log.error("%s relay %s: %s: fix this (TLS or AUTH); mail is kept and "
                  "retried", down.status, where, e.reply)
    else:
        log.warning("%s relay %s: %s: mail is kept and retried", down.status,
                    where, e.reply)
    return down


def _internal(e: BaseException) -> Reply:
    """The Reply for an error of our own.  A UnicodeError's text quotes the
    character it could not encode, which may be one of a password's."""
    text = "" if isinstance(e, UnicodeError) else ": %s" % _one_line(str(e))
    return Reply(451, "4.3.0 internal error: %s%s" % (type(e).__name__, text))


# The SMTP transcript (debug = true, or -vvv): every command and reply of a
# session, for an operator to see what a relay said, on its own logger so
# that it can be routed or silenced apart from the delivery lines.  It is
# made to be shared (pasted into a ticket, sent to the relay's operator):
# AUTH's arguments and the client's SASL responses are never shown, nor is
# the message, which is one line with its size and Message-ID.  Whether a
# connection is transcribed is decided once, when it is made; without the
# transcript the connection is plain smtplib and costs nothing more.
_smtp_log = logging.getLogger("gsemail.smtp")
_connection_numbers = itertools.count(1)      # per process, for the transcript
# RFC 4422 3.1: a SASL mechanism's name is up to 20 of these.
_SASL_NAME = re.compile(r"[A-Z0-9_-]{1,20}\Z", re.I)


class _Transcript:
    """The redacted transcript of one connection, on the gsemail.smtp
    logger at DEBUG.  Each line has the connection's number (per process),
    the relay, the seconds since it was made, a direction (C: the client,
    S: the server, *: what happened) and the text, e.g.
    ``#3 smtp.example.com:587 +0.012s C: AUTH PLAIN <redacted>``."""

    def __init__(self, relay: str) -> None:
        self.number = next(_connection_numbers)
        self.relay = relay
        self.started = time.monotonic()
        # An AUTH exchange is under way: every line the client sends is a
        # SASL response (a password, a token, a digest) until the server
        # answers other than 334.  What was redacted is kept till then, in
        # case a server quotes it back in a reply.
        self.in_auth = False
        self.redacted: List[str] = []

    def _line(self, direction: str, text: str) -> None:
        _smtp_log.debug("#%d %s +%.3fs %s %s", self.number, self.relay,
                        time.monotonic() - self.started, direction, text)

    def event(self, text: str) -> None:
        """Something that is neither a command nor a reply (connected, TLS, closed)."""
        self._line("*", text)

    def sent(self, data: bytes) -> None:
        """One or several commands (pipelined), each ending in CRLF."""
        lines = data.decode("utf-8", "replace").split("\r\n")
        if lines[-1] == "":
            lines.pop()
        for line in lines:
            self._line("C:", self._shown(line))

    def _shown(self, line: str) -> str:
        if self.in_auth:
            if line.strip() == "*":
                return "*"
            self._keep(line)
            return "<AUTH response redacted>"
        verb, _, rest = line.partition(" ")
        if verb.upper() != "AUTH":
            return line
        # Whatever the mechanism (PLAIN, LOGIN, CRAM-MD5, XOAUTH2 or one
        # not known here), its initial response is the secret or holds it.
        self.in_auth = True
        mechanism, _, response = rest.strip().partition(" ")
        if not _SASL_NAME.match(mechanism):
            self._keep(rest)
            return "AUTH <redacted>"
        self._keep(response)
        return "AUTH %s%s" % (mechanism.upper(), " <redacted>" if response.strip() else "")

    def _keep(self, secret: str) -> None:
        """Keep a redacted secret till the exchange ends (a shorter one,
        such as PLAIN's "=" for an empty response, would hide text)."""
        if len(secret.strip()) >= 4:
            self.redacted.append(secret.strip())

    def message(self, wire: bytes) -> None:
        """The DATA payload wire (dot-stuffed, ending in CRLF.CRLF) was
        sent: its size as SIZE counts it and its Message-ID, never a header
        or a line of the body."""
        size = len(wire) - 3 - wire.count(b"\r\n..") - wire.startswith(b"..")
        msgid = _message_id(wire)      # the head only, as the delivery lines read it
        self._line("C:", "<message: {:,} bytes, {}>".format(
            size, "Message-ID " + msgid if msgid else "no Message-ID"))
        self._line("C:", ".")

    def reply(self, code: int, text: bytes) -> None:
        """A reply as smtplib reads it: each of its lines, as the server sent it."""
        lines = text.decode("utf-8", "replace").split("\n")
        for i, line in enumerate(lines):
            for secret in self.redacted:
                line = line.replace(secret, "<redacted>")
            self._line("S:", "%d%s%s" % (code, "-" if i + 1 < len(lines) else " ", line))
        if code != 334:
            self.in_auth = False
            self.redacted = []


class _TranscribedSMTP(smtplib.SMTP):
    """smtplib.SMTP writing a _Transcript of what goes through it: the
    greeting, EHLO, STARTTLS, AUTH, QUIT and every reply (the pipelined
    commands, which _Connection writes to the socket itself, it writes)."""

    def __init__(self, transcript: _Transcript, **kw: Any) -> None:
        self.transcript = transcript
        self.connecting = False     # connect's greeting is the next reply
        super().__init__(**kw)

    def connect(self, host: str = "localhost", port: int = 0, *args: Any,
                **kw: Any) -> Tuple[int, bytes]:
        self.transcript.event("connecting to %s at %s" % (_where(host, port),
                                                          _iso(time.time())))
        self.connecting = True
        return super().connect(host, port, *args, **kw)

    def _connected(self) -> None:
        """The socket is open and the greeting not yet read: the address
        it went to (a name may have several) and implicit TLS."""
        self.connecting = False
        sock = self.sock
        if sock is None:
            return
        with contextlib.suppress(OSError):
            self.transcript.event("connected to %s" % _where(*sock.getpeername()[:2]))
        if isinstance(sock, ssl.SSLSocket):     # SMTP_SSL
            self.transcript.event("TLS from the first byte: %s, %s" % (
                sock.version(), (sock.cipher() or ("?",))[0]))

    # Any: smtplib takes a str or any bytes-like object (typeshed's
    # ReadableBuffer, which the standard library does not name at run time).
    def send(self, s: Any) -> None:
        t = self.transcript
        t.sent(s.encode("utf-8", "replace") if isinstance(s, str) else bytes(s))
        try:
            super().send(s)
        except (smtplib.SMTPException, OSError) as e:
            t.event("cannot send: %s" % (_one_line(str(e)) or type(e).__name__))
            raise

    def getreply(self) -> Tuple[int, bytes]:
        t = self.transcript
        if self.connecting:
            self._connected()
        try:
            code, text = super().getreply()
        except (smtplib.SMTPException, OSError) as e:
            t.event("no reply: %s" % (_one_line(str(e)) or type(e).__name__))
            raise
        t.reply(code, text)
        return code, text

    def starttls(self, *args: Any, **kw: Any) -> Tuple[int, bytes]:
        reply = super().starttls(*args, **kw)
        sock = self.sock
        if isinstance(sock, ssl.SSLSocket):
            self.transcript.event("TLS: %s, %s" % (sock.version(), (sock.cipher() or ("?",))[0]))
        return reply

    def close(self) -> None:
        if self.sock is not None:
            self.transcript.event("closed")
        super().close()


class _TranscribedSMTP_SSL(_TranscribedSMTP, smtplib.SMTP_SSL):
    """smtplib.SMTP_SSL (implicit TLS) writing a _Transcript."""


class _Connection:
    """One open SMTP connection to ``relay`` ("host:port"): its
    smtplib.SMTP, what its server offered, and the pipelined I/O on it.

    Commands written with ``send`` go out together when a reply is needed
    (``read``), as RFC 2920 allows.  The final reply of a message sent with
    ``more`` is left owed (``owed``) and read before the next reply
    (``reply``, ``collect``) or by ``wait``.  A connection that can carry
    nothing more raises _ConnectionLost.
    """

    def __init__(self, smtp: smtplib.SMTP, relay: str, greeting: Reply,
                 offered_before_tls: Dict[str, str], encrypted: bool) -> None:
        self.smtp = smtp
        self.relay = relay
        self.greeting = greeting
        #: the transcript of what is sent and read (debug), or None
        self.transcript = smtp.transcript if isinstance(smtp, _TranscribedSMTP) else None
        self.offered_before_tls = offered_before_tls
        self.encrypted = encrypted
        self.features = dict(smtp.esmtp_features)
        self.pipelining = "pipelining" in self.features
        try:
            self.size = int(self.features.get("size", "0").split()[0])
        except (ValueError, IndexError):
            self.size = 0
        self.messages = 0
        self.mails = 0          # transactions (MAILs accepted), as servers count messages
        self.answers = 0        # replies read, to tell when one was had
        self.errors = 0         # 4xx and 5xx replies read (error limits count them)
        self.broken = False
        self.warned_xverp = False
        self.refused_xverp = False  # MAIL with XVERP got 501/504/555: not asked again
        #: how its certificate was checked, for log lines and check
        #: (Mailer._reach_once says): "verified", "pinned (...)", ...
        self.certificate = "none (no TLS)"
        # Written but not yet sent: commands go out together when a reply
        # is needed (RFC 2920), and a small message in the same packet.
        self.unsent: List[bytes] = []
        self.unsent_size = 0
        # The outcome and accepted recipients of the message whose final
        # reply the server still owes us (see Mailer.deliver's more).
        self.owed: Optional[Tuple[Outcome, List[str]]] = None

    @property
    def tls_version(self) -> Optional[str]:
        """The TLS version in use ("TLSv1.3"), or None."""
        sock = self.smtp.sock
        return sock.version() if isinstance(sock, ssl.SSLSocket) else None

    def mark(self) -> int:
        """A mark to tell later (``answered_since``) whether the server has
        answered anything sent from now on: the replies read so far, and
        the one still owed for an earlier message, which answers nothing
        of what comes next."""
        return self.answers + (self.owed is not None)

    def answered_since(self, mark: int) -> bool:
        return self.answers > mark

    def send(self, data: bytes, payload: bool = False) -> None:
        """Send data, commands or (``payload``) a piece of the DATA payload,
        with whatever is written after it, before the next reply is read; a
        megabyte of DATA goes at once.  The transcript has each command
        here, in the order they go; the payload is the caller's to note."""
        if self.transcript is not None and not payload:
            self.transcript.sent(data)
        self.unsent.append(data)
        self.unsent_size += len(data)
        if self.unsent_size >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self.unsent:
            return
        data = b"".join(self.unsent)
        self.unsent, self.unsent_size = [], 0
        try:
            sock = self.smtp.sock
            if sock is None:
                raise smtplib.SMTPServerDisconnected("not connected")
            sock.sendall(data)
        except (OSError, AttributeError) as e:
            if self.transcript is not None:
                self.transcript.event("cannot send: %s" % (_one_line(str(e)) or
                                                          type(e).__name__))
            raise _ConnectionLost(_reply_for(
                smtplib.SMTPServerDisconnected(str(e)), self.relay)) from None

    def read(self) -> Reply:
        """The next reply, whatever it answers (see ``reply``)."""
        self.flush()
        try:
            code, text = self.smtp.getreply()
        except (smtplib.SMTPException, OSError) as e:
            raise _ConnectionLost(_reply_for(e, self.relay)) from None
        self.answers += 1
        reply = Reply(code, _one_line(text.decode("utf-8", "replace")))
        if code == -1 or not 200 <= code < 600:
            raise _ConnectionLost(Reply(451, "4.4.2 garbled reply from %s: %s"
                                        % (self.relay, reply.text[:200])))
        if code == 421:
            raise _ConnectionLost(reply)
        if code >= 400:
            self.errors += 1
        return reply

    def reply(self) -> Reply:
        """The server's next reply, after the one owed for an earlier message."""
        if self.owed is not None:
            self.collect()
        return self.read()

    def collect(self) -> None:
        """Read the final reply owed for an earlier message and settle its
        recipients; if the connection fails, they are deferred.  Settling
        is all: the processor records that message (see the banner)."""
        owed, self.owed = self.owed, None
        if owed is None:
            return
        out, accepted = owed
        final: Optional[Reply] = None
        try:
            if self.broken:     # a write failed: no reply will come
                final = Reply(421, "4.4.2 connection to %s lost before the reply"
                              % self.relay)
            else:
                final = self.read()
        except _ConnectionLost as e:
            final = e.reply
            raise
        finally:    # whatever happened, the outcome is settled: never "done"
            if final is None:   # made only then: this runs for every message
                final = Reply(451, "4.3.0 no reply read from %s" % self.relay)
            out.waiting = False
            out.took = time.monotonic() - out.started
            if final.ok:
                out.final = final
                out.delivered += accepted
                out.receipts.update(dict.fromkeys(accepted, final))
            else:
                out._settle(accepted, final)
                if _throttling(final):
                    out.throttled = final

    def wait(self) -> None:
        """Read the final reply the server still owes for the last message
        delivered with ``more``, which settles that message's outcome."""
        if self.owed is None:
            return
        try:
            self.collect()
        except _ConnectionLost:
            self.broken = True

    def stale(self, timeout: float) -> Optional[Reply]:
        """On a connection idle since its last reply: what the server said
        or did before anything more was sent, or None if nothing.  Anything
        there answers no command of ours: Postfix says "421 4.4.2 ... Error:
        timeout exceeded" and closes an idle connection; others just close."""
        sock = self.smtp.sock
        try:
            if sock is None:
                raise ValueError("closed")
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()) and \
                    not select.select([sock], [], [], 0)[0]:
                return None
            # Whatever it is, this connection ends here: do not wait long.
            sock.settimeout(min(1.0, timeout))
        except (OSError, ValueError, AttributeError):
            return Reply(421, "4.4.2 connection to %s lost while idle" % self.relay)
        try:
            reply = self.read()
        except _ConnectionLost as e:
            reply = e.reply
        return reply

    def exchange(self, mail: bytes, rcpts: List[bytes], replies: List[Reply]) -> None:
        """Send MAIL, the RCPTs and DATA; add their replies to replies, as
        they are read, so that those read before a failure are kept.
        Pipelined (in windows of _WINDOW commands) when offered, else one by
        one, stopping where the server has already said no."""
        commands = [mail] + rcpts + [b"DATA\r\n"]
        if self.pipelining:
            for i in range(0, len(commands), _WINDOW):
                window = commands[i:i + _WINDOW]
                self.send(b"".join(window))
                for _ in window:
                    replies.append(self.reply())
            return
        self.send(mail)
        replies.append(self.reply())
        if not replies[0].ok:
            return
        for command in rcpts:
            self.send(command)
            replies.append(self.reply())
        if any(r.ok for r in replies[1:]):
            self.send(b"DATA\r\n")
            replies.append(self.reply())

    def rset(self) -> None:
        """RSET; a connection that fails here raises _ConnectionLost, once
        the transaction's outcome is recorded (the caller's duty)."""
        self.send(b"RSET\r\n")
        self.reply()

    def close(self) -> None:
        """QUIT unless the connection is broken, then close it; errors are
        ignored, so they can never hide the one that made us close.  A
        reply still owed is the caller's to read first (``wait``)."""
        try:
            if not self.broken:
                self.smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass
        finally:
            self.smtp.close()


# ---------------------------------------------------------------------------
# The mailer: connecting (TLS, AUTH, failover), checking relays, and
# what to do with one message on a connection (deliver's policy).
# ---------------------------------------------------------------------------

# RFC 5321 4.5.3.1.3: "The maximum total length of a reverse-path or
# forward-path is 256 octets (including the punctuation and element
# separators)": the path is "<" mailbox ">", so a mailbox of 254 octets.
_MAX_PATH = 256
# A local part that needs no quotes (RFC 5321's Dot-string; RFC 6531 adds
# UTF-8, which a non-ASCII address may carry only with SMTPUTF8).
_ATOM = r'[^\x00-\x20\x7f()<>\[\]:;@\\,."]+'
_DOT_STRING = re.compile(r"%s(?:\.%s)*" % (_ATOM, _ATOM))


def _local_and_domain(address: str) -> Tuple[str, str]:
    """address's local part, unquoted (as Postfix keeps addresses inside),
    and its domain ("" if none), split at the last '@' as Postfix does."""
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return local, domain


def _verp_address(sender: str, recipient: str, delimiters: str) -> str:
    """The envelope sender Postfix's XVERP makes for recipient (its
    verp_sender()): sender's local part, the first delimiter, recipient's
    local part, the second delimiter and recipient's domain, then '@' and
    sender's domain.  bounces@lists.example.org to alice@example.com with
    "+=" is bounces+alice=example.com@lists.example.org.  A recipient
    without a domain adds no second delimiter; a sender without one gives
    an address without '@'.  A local part that needs quotes gets them, as
    Postfix's SMTP client quotes it on the wire."""
    s_local, s_domain = _local_and_domain(sender)
    r_local, r_domain = _local_and_domain(recipient)
    local = s_local + delimiters[0] + r_local
    if r_domain:
        local += delimiters[1] + r_domain
    if not _DOT_STRING.fullmatch(local):
        local = '"%s"' % re.sub(r'(["\\])', r"\\\1", local)
    return local + "@" + s_domain if s_domain else local


def _too_long(address: str) -> bool:
    """address, as MAIL FROM's reverse-path, is longer than RFC 5321 allows."""
    return len(address.encode("utf-8")) + 2 > _MAX_PATH


def _has_xverp(params: List[str]) -> bool:
    """MAIL's parameters ask the server for VERP (XVERP or XVERP=..)."""
    return any(p == "XVERP" or p.startswith("XVERP=") for p in params)


class _Next(NamedTuple):
    """The next transaction of a message (Mailer._next): its sender, MAIL
    parameters, recipients and recipients per transaction, and the
    recipients that are left for the transactions after it."""

    sender: str
    params: List[str]
    rcpts: List[str]
    limit: int
    others: List[str]
    client_verp: bool


class _Rest(NamedTuple):
    """What one transaction (Mailer._transaction) leaves for the next of
    the same message."""

    pending: List[str]          # recipients still to try
    limit: int                  # recipients per transaction from now on
    without_xverp: bool = False     # XVERP was refused: try them again without it


@dataclasses.dataclass
class RelayCheck:
    """What ``Mailer.check`` found out about one relay.

    ``offered`` maps each EHLO keyword (upper case) to its parameters, as
    offered after TLS; ``offered_before_tls`` as offered before it.
    ``error`` is the Reply that made the relay unusable, or None.
    ``verdict`` is one line, starting with an RFC 3463 code, saying what
    it all means for mail sent with this configuration.  The
    ``certificate_`` fields describe the relay's TLS certificate (empty
    without TLS): its subject and issuer ("CN=..., O=..."), its
    subjectAltNames ("DNS:mail.example.org"), when it expires (seconds
    since the epoch, or None) and its SHA-256 fingerprint in the
    "sha256:AB:CD:..." form that tls_fingerprint takes.
    """

    relay: str
    greeting: str = ""
    offered: Dict[str, str] = dataclasses.field(default_factory=dict)
    offered_before_tls: Dict[str, str] = dataclasses.field(default_factory=dict)
    tls: str = "none"
    auth: str = "not configured (no username)"
    error: Optional[Reply] = None
    verdict: str = ""
    certificate_subject: str = ""
    certificate_issuer: str = ""
    certificate_names: List[str] = dataclasses.field(default_factory=list)
    certificate_expires: Optional[float] = None
    certificate_fingerprint: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def certificate_days_left(self) -> Optional[float]:
        """Days until the certificate expires (below 0: it has), or None."""
        if self.certificate_expires is None:
            return None
        return (self.certificate_expires - time.time()) / 86400


class _CertificateRefused(TLSError):
    """The relay's certificate did not verify, or is not the one pinned:
    never a reason to try again in plain text, as other TLS trouble is when
    TLS is only opportunistic."""


def _oauth_error(challenge: bytes) -> str:
    """What an XOAUTH2 error challenge says (the base64 of a JSON object
    such as {"status":"401","schemes":"bearer","scope":"https://..."}),
    as one short line; "" when it says nothing readable.  It never holds
    the token."""
    try:
        said = json.loads(base64.b64decode(challenge.strip(), validate=True))
    except ValueError:      # not base64, not UTF-8, not JSON
        return ""
    if not isinstance(said, dict):
        return ""
    return _one_line(", ".join("%s %s" % (k, v) for k, v in said.items()))[:200]


class _AuthRefused(DeliveryError):
    """The relay answered AUTH with a refusal (its reply, with an X.7.Y
    status): the credentials, not the way to the relay, are at fault."""


def _command_secret(command: str, timeout: float) -> str:
    """The password or token that password_command prints: the first line
    of its standard output, without its line end.

    The command runs without a shell, with no input, in a session of its
    own so that a timeout kills it with its children, and for at most
    ``timeout`` seconds (the config's).  What it prints is never logged and
    never stored: it is returned, and forgotten once AUTH is done.  Its
    standard error is logged, with the secret hidden.  A failure (it cannot
    be run, a non-zero exit, no output, a timeout) is a DeliveryError 4.7.0
    naming argv[0] only, since the other words may be secrets (a client
    secret, a passphrase): mail is deferred until it works.
    """
    argv = _command_words(command, "")
    name = argv[0]

    def failed(why: str) -> DeliveryError:
        return DeliveryError(Reply(454, "4.7.0 password_command %s %s" % (name, why)))
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, close_fds=True,
                                start_new_session=True)
    except OSError as e:
        raise failed("cannot be run: %s" % (e.strerror or e)) from None
    with proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)     # its children too
            proc.kill()
            proc.wait()
            raise failed("did not finish within %s (timeout)" % _age(timeout)) from None
    first = out.split(b"\n", 1)[0]
    first = first[:-1] if first.endswith(b"\r") else first
    try:
        secret = first.decode("utf-8")
    except UnicodeDecodeError:
        secret = ""
        problem: Optional[str] = "printed a first line that is not UTF-8"
    else:
        problem = None if secret else "printed no password or token (its first line of " \
                                      "output is empty)"
    if proc.returncode:
        problem = ("was killed by signal %d" % -proc.returncode if proc.returncode < 0
                   else "exited with status %d" % proc.returncode)
    said = err.decode("utf-8", "replace")
    for hidden in {secret, first.decode("utf-8", "replace")} - {""}:
        said = said.replace(hidden, "(hidden)")     # a helper that echoes its token
    said = _one_line(said).strip()
    if said:
        if len(said) > 500:
            said = said[:500] + "..."
        (log.warning if problem else log.info)(
            "%s password_command %s said on stderr: %s", "4.7.0" if problem else "2.0.0",
            name, said)
    if problem:
        raise failed(problem + (" (its stderr is logged)" if said else ""))
    return secret


class Mailer:
    """Delivers messages over SMTP to the relay in an SMTPConfig.

    ``send`` is for direct use; the queue processor uses ``open`` and
    ``deliver``.  One connection carries up to messages_per_connection
    messages; ``close`` ends it with QUIT.  When hostname lists several
    relays, the next is tried only if one cannot be reached.
    """

    def __init__(self, config: SMTPConfig) -> None:
        self.config = config
        self._connection: Optional[_Connection] = None
        self._tried = _where(*config.relays[0])     # the last relay _reach tried
        self._contexts: Dict[bool, ssl.SSLContext] = {}    # verify -> context
        #: relay -> the transactions a connection to it takes, as learnt
        #: from a MAIL refused because the connection was used up
        self._limits: Dict[str, int] = {}
        if config.debug and _smtp_log.level == logging.NOTSET:
            # debug = true asks for the transcript: let it reach the
            # handlers even where the application logs only INFO or above,
            # unless the application has set this logger's level itself.
            _smtp_log.setLevel(logging.DEBUG)

    @property
    def where(self) -> str:
        """The relay in use ("host:port"), or the last one tried (for the
        processor's log lines and status).  New code should prefer the
        connection's own ``relay``."""
        conn = self._connection
        return conn.relay if conn is not None else self._tried

    # -- connecting ---------------------------------------------------------

    def _tls_context(self, verify: bool) -> ssl.SSLContext:
        """The context for a handshake that verifies the certificate against
        the CAs (and cafile) and the name, or one that takes any certificate
        (opportunistic TLS, or a pinned one: _reach_once checks the pin)."""
        context = self._contexts.get(verify)
        if context is None:
            context = ssl.create_default_context(cafile=self.config.cafile)
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._contexts[verify] = context
        return context

    def _verifies(self, peer: Optional[str]) -> bool:
        """Whether the handshake with the relay at address peer (None: not
        known yet, as for implicit TLS) verifies the certificate."""
        c = self.config
        if c.verify_certificates:
            return True
        # The password never goes to a peer no CA vouched for, even when TLS
        # is only opportunistic: an active attacker would offer STARTTLS with
        # a certificate of their own and read it.  Not on loopback, where no
        # one is on the way, nor against tls_verify = false said outright or
        # a pin, which is a check of its own.
        return c.tls_verify is None and not c.fingerprints and bool(c.username) and \
            peer is not None and not _loopback(peer)

    def open(self) -> None:
        """Make sure a usable connection is open: raises DeliveryError (a
        TLSError for TLS trouble) when no relay can be used."""
        conn = self._connection
        if conn is not None and not conn.broken and \
                conn.messages < self.config.messages_per_connection and \
                not self._used_up(conn):
            return
        self.close()
        self._connection = self._connect()

    def _used_up(self, conn: _Connection) -> bool:
        """conn has carried as many transactions as its relay takes on one connection."""
        return conn.mails >= self._limits.get(conn.relay, conn.mails + 1)

    def _learn(self, conn: _Connection, reply: Reply) -> None:
        """MAIL was refused with reply because conn was used up: from now on,
        no connection to its relay carries more than conn did (logged once)."""
        if conn.mails and conn.mails < self._limits.get(conn.relay, conn.mails + 1):
            self._limits[conn.relay] = conn.mails
            log.warning("%s relay %s takes %d messages per connection (it answered "
                        "MAIL with %s): sending at most %d on each from now on (set "
                        "messages_per_connection = %d to say so)", reply.status,
                        conn.relay, conn.mails, reply, conn.mails, conn.mails)

    def _connect(self) -> _Connection:
        """A logged-in connection to the first relay that can be reached.

        The next relay is tried only for trouble reaching one (refused, a
        timeout, a 4xx greeting such as 421, TLS failing): a relay that
        answers and refuses us (a 5xx greeting, AUTH) would refuse the same
        mail wherever it went, and the operator must hear of it.
        """
        relays = self.config.relays
        for i, (host, port) in enumerate(relays):
            try:
                conn = self._reach(host, port)
            except DeliveryError as e:
                if e.transient and i + 1 < len(relays):
                    log.warning("%s relay %s: %s: trying the next relay, %s", e.status,
                                _where(host, port), e.reply, _where(*relays[i + 1]))
                    continue
                raise
            if self.config.username:
                conn = self._logged_in(conn, host, port)
            if i:
                log.info("2.0.0 relay %s: connected (%d relay(s) before it failed)",
                         conn.relay, i)
            return conn
        raise AssertionError("no relays")     # SMTPConfig makes at least one

    def _reach(self, host: str, port: int) -> _Connection:
        """Connect to one relay: greeting, EHLO and TLS as configured."""
        self._tried = _where(host, port)
        try:
            return self._reach_once(host, port)
        except TLSError as e:
            # Opportunistic TLS, as Postfix's "may": a failed handshake is
            # no worse than a server without STARTTLS, so try again in plain
            # text.  Never when TLS is required or certificates are checked.
            c = self.config
            if c.tls_required or c.verify_certificates or e.status != "4.7.5" or \
                    isinstance(e, _CertificateRefused):
                raise
            log.warning("%s: sending in plain text, as TLS is not required (set "
                        "force_tls = true to require it)", e.reply)
            return self._reach_once(host, port, starttls=False)

    def _smtp(self, relay: str, verify: bool) -> smtplib.SMTP:
        """An smtplib.SMTP (SMTP_SSL for implicit TLS, verifying the
        certificate or not: see _tls_context), not yet connected; one that
        writes a transcript of the connection when debug is set and the
        gsemail.smtp logger takes DEBUG (asked once a connection, so that
        the transcript costs nothing when it is off)."""
        c = self.config
        kw: Dict[str, Any] = {"local_hostname": c.local_hostname, "timeout": c.timeout}
        if c.use_implicit_tls:
            kw["context"] = self._tls_context(verify)
        if c.debug and _smtp_log.isEnabledFor(logging.DEBUG):
            kind = _TranscribedSMTP_SSL if c.use_implicit_tls else _TranscribedSMTP
            return kind(_Transcript(relay), **kw)
        return smtplib.SMTP_SSL(**kw) if c.use_implicit_tls else smtplib.SMTP(**kw)

    def _reach_once(self, host: str, port: int, starttls: bool = True) -> _Connection:
        c = self.config
        relay = _where(host, port)
        smtp: Optional[smtplib.SMTP] = None
        verify = self._verifies(None)
        try:
            smtp = self._smtp(relay, verify)
            # Connected here, not by the constructor, to keep the greeting for
            # check; SMTP_SSL and starttls() take the name they verify and
            # send as SNI from _host, which only the constructor sets: the
            # relay's, or tls_servername.  (The ignore: _host is smtplib's
            # private attribute, which typeshed does not declare.)
            smtp._host = c.tls_servername or host  # type: ignore[attr-defined]
            code, text = smtp.connect(host, port)
            greeting = Reply(code, _one_line(text.decode("utf-8", "replace")))
            if code != 220:
                raise smtplib.SMTPConnectError(code, text)
            checked = self._certificate_checked(smtp, relay, verify) if c.use_implicit_tls else ""
            self._hello(smtp)
            before = dict(smtp.esmtp_features)
            encrypted = c.use_implicit_tls
            if not encrypted and not c.no_tls and starttls:
                if smtp.has_extn("starttls"):
                    sock = smtp.sock
                    verify = self._verifies(sock.getpeername()[0] if sock else None)
                    try:
                        # verifies the name in _host, set above
                        smtp.starttls(context=self._tls_context(verify))
                    except smtplib.SMTPResponseException as e:     # not 220
                        if c.tls_required:
                            said = _reply_for(e, relay)
                            raise TLSError(Reply(454, "4.7.4 %s refused STARTTLS (%d %s) "
                                                 "and %s" % (
                                                     relay, said.code, said.text,
                                                     self._requiring()))) from None
                        log.warning("4.7.4 %s refused STARTTLS (%d): sending in plain "
                                    "text", relay, e.smtp_code)
                    else:
                        # before anything is sent over it, EHLO included
                        checked = self._certificate_checked(smtp, relay, verify)
                        self._hello(smtp)
                        encrypted = True
                elif c.tls_required:
                    raise TLSError(Reply(454, "4.7.4 %s does not offer STARTTLS and %s: "
                                         "nothing is sent in plain text" % (
                                             relay, self._requiring())))
            conn = _Connection(smtp, relay, greeting, before, encrypted)
            if encrypted:
                conn.certificate = checked
                log.info("2.7.0 TLS with %s (%s), certificate %s", relay,
                         conn.tls_version, checked)
            return conn
        except BaseException as e:
            if smtp is not None:
                smtp.close()
            if isinstance(e, DeliveryError):
                raise
            if not isinstance(e, Exception):
                raise
            reply = _reply_for(e, relay)
            if isinstance(e, smtplib.SMTPConnectError):
                reply = Reply(reply.code, "%s (greeting from %s)" % (reply.text, relay))
            if isinstance(e, ssl.SSLCertVerificationError):
                if not c.verify_certificates:   # verified only because of the password
                    reply = Reply(reply.code, "%s; it is verified as username is set and "
                                  "%s is not loopback: give its CA as cafile, pin it with "
                                  "tls_fingerprint, or set tls_verify = false" % (
                                      reply.text, relay))
                raise _CertificateRefused(reply) from None
            if reply.status.startswith(("4.7.5", "4.7.4")):
                raise TLSError(reply) from None
            raise DeliveryError(reply) from None

    def _requiring(self) -> str:
        """Which option makes TLS required, for an error that says so."""
        c = self.config
        return "force_tls is set" if c.force_tls else \
            "tls_fingerprint pins its certificate" if c.fingerprints else "TLS is required"

    def _certificate_checked(self, smtp: smtplib.SMTP, relay: str, verify: bool) -> str:
        """How the certificate of the TLS session on smtp was checked, for
        the log; raises _CertificateRefused when tls_fingerprint pins others.
        Called as soon as TLS is up, before anything is sent over it."""
        pins = self.config.fingerprints
        sock = smtp.sock
        if not pins:
            if verify and not self.config.verify_certificates:
                return "verified (before AUTH: username is set and the relay is not loopback)"
            return "verified" if verify else \
                "not verified (set tls_verify = true to require it)"
        der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        seen = _fingerprint(der) if der else "none (no certificate)"
        if seen[7:] not in pins:
            raise _CertificateRefused(Reply(454, "4.7.5 certificate of %s is %s, not the "
                                            "one tls_fingerprint pins (%s): nothing is "
                                            "sent to it" % (relay, seen, ", ".join(
                                                "sha256:" + p for p in pins))))
        return "pinned (%s)%s" % (seen, " and verified" if verify else "")

    @staticmethod
    def _hello(smtp: smtplib.SMTP) -> None:
        code, text = smtp.ehlo()
        if code == -1:
            raise smtplib.SMTPServerDisconnected("no reply to EHLO")
        if not 200 <= code < 300:
            code, text = smtp.helo()
            if not 200 <= code < 300:
                raise smtplib.SMTPResponseException(code, text)

    def _password(self) -> str:
        """The password or token: password_command's output, got anew each
        time (it is never kept), or the configured password."""
        c = self.config
        if c.password_command is not None:
            return _command_secret(c.password_command, c.timeout)
        return c.password or ""

    def _logged_in(self, conn: _Connection, host: str, port: int) -> _Connection:
        """conn after a successful AUTH (closed when it fails).

        A token expires: when the password came from password_command and
        the relay refuses it (535, or 454 4.7.x), the command runs once more
        and AUTH is tried once more, on a new connection (a relay may close
        the first, or count the failure against it).
        """
        c = self.config
        try:
            try:
                self._login(conn)
            except _AuthRefused as e:
                if c.password_command is None or e.reply.code not in (454, 535):
                    raise
                conn.smtp.close()
                log.info("%s relay %s refused the password from password_command (%s): "
                         "running %s again and trying AUTH once more on a new connection",
                         e.reply.status, conn.relay, e.reply,
                         _command_words(c.password_command, "")[0])
                conn = self._reach(host, port)
                self._login(conn)
        except BaseException:
            conn.smtp.close()
            raise
        return conn

    def _login(self, conn: _Connection, password: Optional[str] = None) -> None:
        """AUTH on conn with password (by default _password's); raises
        _AuthRefused when the relay refuses it, DeliveryError otherwise."""
        c = self.config
        smtp, encrypted, relay = conn.smtp, conn.encrypted, conn.relay
        if not smtp.has_extn("auth"):
            if encrypted or not smtp.has_extn("starttls"):
                why = "username is set: enable AUTH on the relay, or remove username " \
                      "and password"
            elif c.no_tls:
                why = "it offers STARTTLS, which no_tls = true keeps off, and many " \
                      "relays offer AUTH only after it: unset no_tls"
            else:
                why = "the STARTTLS handshake failed, and many relays offer AUTH " \
                      "only after it: fix TLS (cafile, tls_verify)"
            raise DeliveryError(Reply(454, "4.7.0 %s does not offer AUTH in %s; %s" % (
                relay, "this session" if encrypted else "plain text", why)))
        sock = smtp.sock
        if sock is None:
            raise smtplib.SMTPServerDisconnected("not connected")
        if not encrypted and not _loopback(sock.getpeername()[0]):
            raise DeliveryError(Reply(454, "4.7.0 refusing to send the password for %s "
                                      "in plain text to %s: enable TLS on the relay "
                                      "or unset no_tls" % (c.username, relay)))
        # Only now, when it can be sent: a token helper may be slow, or ask
        # a server for a new token.
        secret = self._password() if password is None else password
        try:
            code, text = self._authenticate(smtp, secret, encrypted)
        except (smtplib.SMTPServerDisconnected, OSError) as e:
            raise DeliveryError(_reply_for(e, relay)) from None
        except (smtplib.SMTPException, ValueError) as e:
            raise DeliveryError(Reply(454, "4.7.0 AUTH as %s at %s failed: %s"
                                      % (c.username, relay, e))) from None
        if code == 235:
            return
        if code == 421:     # the relay is closing: its trouble, not the credentials'
            raise DeliveryError(Reply(code, _one_line(text.decode("utf-8", "replace"))))
        # A failed AUTH is an AUTH failure, whatever the server's text: its
        # status is the server's X.7.Y, or RFC 4954's for the code (535:
        # X.7.8 credentials invalid; Exim and many others give none).
        reply = Reply(code, _one_line(text.decode("utf-8", "replace")))
        status = reply.status
        if status.split(".")[1] != "7" or status.endswith(".0.0"):
            if not 400 <= code < 600:
                code = 454
            status = "%d.7.%d" % (code // 100, {535: 8, 534: 9, 538: 11}.get(code, 0))
        said = _ENHANCED.sub("", reply.text, count=1).strip() if _ENHANCED.match(
            reply.text) else reply.text
        if code == 535 and c.password_command is not None and \
                c.auth_mechanism != "xoauth2" and "XOAUTH2" in self._offered(smtp):
            said += "; if password_command prints an OAuth2 token, set auth_mechanism = " \
                    "xoauth2"
        raise _AuthRefused(Reply(code, "%s %s (AUTH as %s at %s)" % (
            status, said, c.username, relay)))

    @staticmethod
    def _offered(smtp: smtplib.SMTP) -> List[str]:
        """The AUTH mechanisms the relay offers, in capitals."""
        return (smtp.esmtp_features.get("auth") or "").upper().split()

    def _mechanism(self, offered: List[str], encrypted: bool) -> Optional[str]:
        """The mechanism to use: auth_mechanism's, or for auto the first the
        relay offers of PLAIN, LOGIN and CRAM-MD5 over TLS (PLAIN takes one
        round trip and lets the relay keep only a hash of the password) and
        of CRAM-MD5, PLAIN and LOGIN in plain text (possible only to
        loopback: CRAM-MD5 keeps the password itself off the wire).  Auto
        never picks XOAUTH2: what it sends is a token, not a password."""
        wanted = self.config.auth_mechanism
        if wanted != "auto":
            return wanted.upper() if wanted.upper() in offered else None
        order = ("PLAIN", "LOGIN", "CRAM-MD5") if encrypted else ("CRAM-MD5", "PLAIN", "LOGIN")
        return next((m for m in order if m in offered), None)

    def _authenticate(self, smtp: smtplib.SMTP, secret: str, encrypted: bool
                      ) -> Tuple[int, bytes]:
        """The AUTH exchange with the mechanism _mechanism picks; the
        server's last reply.  The username and password go as UTF-8 (RFC
        4616), which smtplib's login cannot do: it encodes them as ASCII and
        fails on "pässword" with an error that quotes it."""
        c = self.config
        user = (c.username or "").encode("utf-8")
        password = secret.encode("utf-8")
        offered = self._offered(smtp)
        mechanism = self._mechanism(offered, encrypted)

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode("ascii")
        if mechanism == "PLAIN":
            code, text = smtp.docmd("AUTH", "PLAIN " + b64(b"\0" + user + b"\0" + password))
        elif mechanism == "LOGIN":
            code, text = smtp.docmd("AUTH", "LOGIN")
            for answer in (user, password):
                if code != 334:
                    break
                code, text = smtp.docmd(b64(answer))
        elif mechanism == "CRAM-MD5":
            code, text = smtp.docmd("AUTH", "CRAM-MD5")
            if code == 334:
                digest = hmac.new(password, base64.b64decode(text), "md5").hexdigest()
                code, text = smtp.docmd(b64(user + b" " + digest.encode("ascii")))
        elif mechanism == "XOAUTH2":
            # Google's and Microsoft's SASL XOAUTH2, with the initial
            # response (RFC 4954), as both document it.
            code, text = smtp.docmd("AUTH", "XOAUTH2 " + b64(
                b"user=" + user + b"\x01auth=Bearer " + password + b"\x01\x01"))
            if code == 334:
                # A refused token: the challenge is a base64 JSON error
                # ({"status":"401","schemes":"bearer","scope":...}); the
                # client answers with an empty line and the server gives its
                # final reply (535 5.7.8 at Google, 535 5.7.3 at Microsoft).
                error = _oauth_error(text)
                code, text = smtp.docmd("")
                if error and code != 235:
                    text += (" (the token was refused: %s)" % error).encode("utf-8")
        elif c.auth_mechanism == "auto":
            return 504, ("5.7.4 none of the AUTH mechanisms offered (%s) is PLAIN, LOGIN "
                         "or CRAM-MD5 (XOAUTH2 is used only with auth_mechanism = xoauth2)"
                         % " ".join(offered)).encode()
        else:
            return 504, ("5.7.4 AUTH %s is not offered (auth_mechanism = %s; offered: %s)"
                         % (c.auth_mechanism.upper(), c.auth_mechanism, " ".join(offered))
                         ).encode()
        if code == 334:             # the server wants more than the mechanism has
            smtp.docmd("*")         # RFC 4954: cancel the exchange
            return 535, b"5.7.8 AUTH did not end when the credentials had been sent"
        return code, text

    def check(self) -> List[RelayCheck]:
        """Connect to each relay in turn as delivery would (TLS, AUTH), and
        report what it offers and whether mail can go through it.  Sends
        no mail.  This is ``python -m gsemail check``."""
        c = self.config
        results = []
        for host, port in c.relays:
            relay = _where(host, port)
            result = RelayCheck(relay)
            if c.username:
                result.auth = "not tried: the relay could not be used before AUTH"
            conn = None
            try:
                conn = self._reach(host, port)
                result.greeting = "%d %s" % conn.greeting
                result.offered_before_tls = {k.upper(): v for k, v in
                                             conn.offered_before_tls.items()}
                result.offered = {k.upper(): v for k, v in conn.features.items()}
                if conn.encrypted:
                    checked = conn.certificate
                    if checked.startswith("not verified"):
                        checked = "not verified (tls_verify = false)" if c.tls_verify \
                            is False else "not verified (TLS is only opportunistic: " \
                            "force_tls or tls_verify = true would verify it)"
                    result.tls = "%s%s, certificate %s" % (
                        conn.tls_version,
                        "" if c.use_implicit_tls else " after STARTTLS", checked)
                    sock = conn.smtp.sock
                    cert = _certificate(sock) if isinstance(sock, ssl.SSLSocket) else None
                    if cert is not None:
                        result.certificate_subject = cert.subject
                        result.certificate_issuer = cert.issuer
                        result.certificate_names = cert.names
                        result.certificate_expires = cert.expires
                        result.certificate_fingerprint = cert.fingerprint
                elif "starttls" in conn.offered_before_tls and not c.no_tls:
                    result.tls = ("none: the STARTTLS handshake failed, so mail goes in "
                                  "plain text (TLS is only opportunistic)")
                if c.username:
                    offered = result.offered.get("AUTH", "").strip()
                    try:
                        # as delivery does it, password_command run again included
                        conn = self._logged_in(conn, host, port)
                    except DeliveryError as e:
                        result.auth = "%s: %s" % ("not offered" if not offered else
                                                  "failed for %s" % c.username, e.reply)
                        raise
                    result.auth = "accepted for %s (offered: %s; used %s)" % (
                        c.username, offered,
                        self._mechanism(self._offered(conn.smtp), conn.encrypted))
            except DeliveryError as e:
                result.error = e.reply
            except Exception as e:      # never a traceback (it could quote a password)
                log.exception("4.3.0 relay %s: unexpected error in check", relay)
                result.error = _internal(e)
            finally:
                if conn is not None:
                    conn.close()        # QUIT: it is not broken
            result.verdict = self._verdict(result)
            results.append(result)
        return results

    def _verdict(self, r: RelayCheck) -> str:
        if r.error is not None:
            hint = {"4.4": "is it running, and listening on that address and port?",
                    "4.7": "fix TLS (cafile, tls_fingerprint, tls_verify, force_tls) or AUTH "
                           "(username, password or password_command: run it by hand)",
                    "5.7": "fix AUTH (username, password) or the relay's access rules"}
            status = r.error.status
            if status[1:] in (".7.8", ".7.9", ".7.11"):     # RFC 4954: AUTH refused
                fix = ("fix AUTH: username and the password (password, password_env, "
                       "password_file or password_command) or auth_mechanism")
            elif status[1:] == ".4.3":      # its name does not resolve (_reply_for)
                fix = "the name is at fault, not the relay"
            else:
                fix = hint.get(status[:3], "see the relay's log")
            return "%s %s cannot be used: %s; %s" % (status, r.relay, r.error, fix)
        if "XVERP" in r.offered:
            bounces = "XVERP is offered, so each bounce names the recipient it is for"
        elif self.config.verp_fallback == "client":
            bounces = ("XVERP is not offered to this client: gsemail does the VERP of mail "
                       "sent with xverp itself, one transaction per recipient (on a "
                       "Postfix relay, add this host to smtpd_authorized_verp_clients "
                       "to have one transaction carry them all)")
        else:
            bounces = ("XVERP is not offered to this client: mail sent with xverp goes "
                       "without it, so a bounce will not say which recipient bounced "
                       "(on a Postfix relay, add this host to "
                       "smtpd_authorized_verp_clients)")
        # EHLO, TLS and AUTH are all check tries: whether the relay lets this
        # client send to a recipient shows only when mail is sent.
        return "2.0.0 %s answered EHLO%s%s; %s" % (
            r.relay, "" if r.tls.startswith("none") else " over TLS",
            " and accepted AUTH" if self.config.username else "", bounces)

    def wait(self) -> None:
        """Read the final reply the server still owes for the last message
        delivered with ``more``, which settles that message's outcome (the
        caller records it: see the banner of the SMTP connection)."""
        if self._connection is not None:
            self._connection.wait()

    def close(self) -> None:
        """End the connection: QUIT unless it is broken; errors are ignored,
        so they can never hide the one that made us close.  A reply still
        owed for a message is read first (see ``wait``)."""
        self.wait()
        conn, self._connection = self._connection, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> "Mailer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one message ------------------------------------------------------------

    def _connected(self) -> _Connection:
        """The open connection (see ``open``)."""
        conn = self._connection
        if conn is None:
            raise RuntimeError("Mailer.deliver() before Mailer.open()")
        return conn

    def _replaced_if_closed(self, conn: _Connection) -> _Connection:
        """conn, or a new connection when the server closed conn while it
        was idle since its last message (it spoke, or hung up)."""
        if conn.messages and conn.owed is None:
            stale = conn.stale(self.config.timeout)
            if stale is not None:
                log.info("%s relay %s spoke on an idle connection (%s): it had closed "
                         "it, so the message goes on a new connection", stale.status,
                         conn.relay, stale)
                conn.broken = True
                self.close()
                self._connection = conn = self._connect()
        return conn

    def _preflight(self, conn: _Connection, sender: str, recipients: List[str],
                   data: bytes, xverp: bool, out: Outcome
                   ) -> Optional[Tuple[List[str], bytes, List[str]]]:
        """What deliver checks before it sends anything, against what conn's
        server offers: the recipients to send to, the DATA payload and
        MAIL's parameters; None when the message cannot go on conn at all.
        Each refusal (an address, non-ASCII without SMTPUTF8, 8-bit data
        without 8BITMIME, SIZE) goes in out."""
        offers_utf8 = "smtputf8" in conn.features
        problem = _sender_problem(sender) if sender else None
        if problem or not (sender.isascii() or offers_utf8):
            refusal = (Reply(553, "5.1.7 sender <%s> %s" % (_shown(sender), problem))
                       if problem else
                       Reply(553, "5.6.7 sender <%s> is not ASCII and %s does not "
                             "offer SMTPUTF8" % (sender, conn.relay)))
            out._settle(recipients, refusal)
            return None
        pending = []
        for rcpt in recipients:
            problem = _address_problem(rcpt)
            if problem:
                out.failed[rcpt] = Reply(553, "5.1.3 recipient <%s> %s" % (_shown(rcpt),
                                                                          problem))
            elif not rcpt.isascii() and not offers_utf8:
                out.failed[rcpt] = Reply(553, "5.6.7 recipient <%s> is not ASCII and %s "
                                         "does not offer SMTPUTF8" % (rcpt, conn.relay))
            else:
                pending.append(rcpt)
        if not data.isascii() and "8bitmime" not in conn.features:
            # RFC 6152: 8-bit data must not go to a server that does not take
            # it; we do not rewrite messages, so it is returned undelivered.
            refusal = Reply(554, "5.6.3 message has 8-bit data and %s does not offer "
                            "8BITMIME" % conn.relay)
            out._settle(pending, refusal)
            return None
        wire, size = _wire(data)
        if conn.size and size > conn.size:
            refusal = Reply(552, "5.3.4 message of %d bytes is larger than the %d that "
                            "%s accepts" % (size, conn.size, conn.relay))
            out._settle(pending, refusal)
            return None
        params = []
        if "size" in conn.features:
            params.append("SIZE=%d" % size)
        if "8bitmime" in conn.features and not data.isascii():
            params.append("BODY=8BITMIME")
        if not (sender.isascii() and all(r.isascii() for r in pending)):
            params.append("SMTPUTF8")   # non-ASCII got this far only if offered
        if xverp and sender:
            if "xverp" in conn.features and not conn.refused_xverp:
                params.append(self._xverp_parameter())
            elif not conn.warned_xverp:    # once per connection, not per message
                conn.warned_xverp = True
                if self.config.verp_fallback == "client":
                    log.info("%s does not offer XVERP to this client: gsemail does the "
                             "VERP itself, one transaction per recipient", conn.relay)
                else:
                    log.warning("4.3.3 %s does not offer XVERP to this client: sending "
                                "without it (bounces will not name the recipient)",
                                conn.relay)
        return pending, wire, params

    def _xverp_parameter(self) -> str:
        """MAIL's XVERP parameter: bare for Postfix's default delimiters
        (+=), else XVERP=.. with ours, as Postfix's smtpd reads it."""
        delims = self.config.verp_delimiters
        return "XVERP" if delims == "+=" else "XVERP=" + delims

    def _next(self, verp: str, sender: str, params: List[str], plain: List[str],
              pending: List[str], too_long: set[str], limit: int) -> _Next:
        """The next transaction for pending.  verp is "" (none), "xverp"
        (the relay does it: params carry XVERP) or "client" (one recipient,
        from its own VERP address, plain params).  Recipients whose VERP
        address would be too long go last, from sender, in plain
        transactions of their own."""
        if verp:
            if verp == "client":
                for i, rcpt in enumerate(pending):
                    if rcpt not in too_long:
                        return _Next(_verp_address(sender, rcpt, self.config.verp_delimiters),
                                     plain, [rcpt], 1, pending[:i] + pending[i + 1:], True)
            else:
                fits = [r for r in pending if r not in too_long]
                if fits:
                    return _Next(sender, params, fits, limit,
                                 [r for r in pending if r in too_long], False)
        return _Next(sender, plain, pending, limit, [], False)

    def deliver(self, sender: str, recipients: List[str], data: bytes,
                xverp: bool = False,
                heartbeat: Optional[Callable[[], None]] = None,
                more: bool = False) -> Outcome:
        """Deliver one message on the open connection (see ``open``) and
        report each recipient as delivered, failed or deferred.

        ``more`` says another message follows at once.  Then, when the
        server offers PIPELINING, the final reply may be left unread
        (``waiting`` is true) so that the next message's MAIL, RCPT and
        DATA go out with this one's dot (RFC 2920 3.1): one round trip a
        message, not two.  The next ``deliver``, ``wait`` or ``close``
        reads it and settles this outcome; recording it is the caller's.

        ``heartbeat`` is called at the start of each transaction and before
        each chunk of data, so before any data goes: there the caller
        records an earlier outcome settled meanwhile (see the banner of the
        SMTP connection), or raises _Held to stop the message.

        A connection the server has closed while it was idle, or used up
        (MAIL refused with X.5.3 or 421 on a connection that has carried
        mail), is replaced at once; so is one lost in the middle of the
        message after the server settled some recipients (an error limit),
        with those still to do first.  Raises DeliveryError only when the
        connection had to be replaced before anything was sent and could
        not be.
        """
        started = time.monotonic()
        conn = self._replaced_if_closed(self._connected())
        conn.messages += 1
        # Only a connection that goes on can carry the next message's
        # commands; and the connection's last reply is read before QUIT.
        more = more and conn.messages < self.config.messages_per_connection and \
            conn.mails + 1 < self._limits.get(conn.relay, conn.mails + 2)
        mark = conn.mark()      # any reply after it answers this message
        out = Outcome(started=started)
        ready = self._preflight(conn, sender, recipients, data, xverp, out)
        if ready is None:
            out.took = time.monotonic() - out.started
            return out          # refused before anything was sent
        pending, wire, params = ready
        limit = self.config.recipients_per_transaction
        first, reconnects = conn, 0
        # VERP: by the relay (XVERP), by us (client), or none.  params keep
        # XVERP only while the relay is to do it; plain never has it.
        plain = [p for p in params if not _has_xverp([p])]
        verp = ""
        if xverp and sender:
            verp = "xverp" if len(plain) < len(params) else \
                "client" if self.config.verp_fallback == "client" else ""
        too_long: set[str] = set()
        if verp:
            too_long = {r for r in pending
                        if _too_long(_verp_address(sender, r, self.config.verp_delimiters))}
            out.verp_too_long = [r for r in pending if r in too_long]
        if verp == "client":    # one copy each, as Postfix's cleanup makes of a duplicate
            pending = list(dict.fromkeys(pending))

        def settled() -> int:
            return len(out.delivered) + len(out.failed) + len(out.deferred)
        before = settled()          # recipients settled before this connection
        while pending:
            conn = self._connected()
            why: Optional[Reply] = None     # set: the rest waits, for this reason
            try:
                if self._used_up(conn):     # as the server taught us, before it refuses MAIL
                    why = self._reconnect(quit=True)
                else:
                    step = self._next(verp, sender, params, plain, pending, too_long, limit)
                    # A transaction with others after it may leave its final
                    # reply owed, to go with the next one's commands (the
                    # pipelined dot of the picture, within one message).
                    rest = self._transaction(conn, step.sender, step.params, step.rcpts,
                                             wire, out, heartbeat, more and not step.others,
                                             step.limit, chain=bool(step.others),
                                             client_verp=step.client_verp)
                    pending = rest.pending + step.others
                    if step.limit == limit:
                        limit = rest.limit
                    if rest.without_xverp:  # the server refused it: again without
                        conn.refused_xverp = conn.warned_xverp = True
                        params = plain
                        verp = "client" if self.config.verp_fallback == "client" else ""
                        if verp:
                            pending = list(dict.fromkeys(pending))
            except _UsedUp as e:
                self._learn(conn, e.reply)
                why = self._reconnect(quit=True) if reconnects < _RECONNECTS else \
                    e.reply.as_transient()
                reconnects += 1
            except _ConnectionLost as e:
                conn.broken = True
                self.close()
                done = set(out.delivered).union(out.failed, out.deferred)
                pending = [r for r in dict.fromkeys((e.todo or []) + pending)
                           if r not in done]
                if not pending:
                    break
                why = e.reply
                if conn is first and not conn.answered_since(mark):
                    # Nothing of this message was answered: the caller may
                    # send it again at once (QueueProcessor._attempt does).
                    out.unanswered = True
                elif e.after_data or reconnects >= _RECONNECTS:
                    pass
                elif e.at_mail and conn.mails and e.reply.code == 421:
                    # The first command on a reused connection: the server
                    # had timed it out (Postfix's 421 4.4.2 crossed our MAIL)
                    # or has a per-connection limit (Exim's 421 "too many
                    # messages"), which is learnt unless the code says
                    # timeout (X.4.x) or policy (X.7.x: an error limit).
                    if e.reply.status.split(".")[1] not in ("4", "7"):
                        self._learn(conn, e.reply)
                    log.info("%s relay %s answered MAIL on a connection that had carried "
                             "mail with %s: going on at once on a new connection",
                             e.reply.status, conn.relay, e.reply)
                    why = self._reconnect()
                elif settled() > before:
                    # It hung up after settling some recipients (an error
                    # limit): those are facts; go on at once with the rest,
                    # in transactions no bigger than the errors it allowed.
                    if conn.errors:
                        limit = max(1, min(limit, conn.errors))
                    log.info("%s relay %s closed the connection (%s) after settling %d "
                             "recipient(s) of the message: going on at once on a new "
                             "connection with the %d still to do, %d per transaction",
                             e.reply.status, conn.relay, e.reply, settled() - before,
                             len(pending), 1 if verp == "client" else limit)
                    why = self._reconnect()
                reconnects += 1
            except Exception as e:
                # An error of our own in the middle of the message: what is
                # settled stays settled, so a recipient delivered in an
                # earlier transaction is never sent again; the rest waits,
                # and the connection, in a state we do not know, is dropped.
                log.exception("4.3.0 unexpected error while sending to %s", conn.relay)
                conn.broken = True
                self.close()
                done = set(out.delivered).union(out.failed, out.deferred)
                pending = [r for r in pending if r not in done]
                why = _internal(e)
            if why is None:
                now = self._connected()
                if now is conn:
                    continue
                before = settled()
                if now.features == first.features:
                    continue
                # Another relay (failover), or the same offering other
                # extensions: MAIL's parameters were made for the first one.
                why = Reply(451, "4.4.0 the new connection to %s offers other extensions "
                            "than the one the message started on: the rest waits for "
                            "the next attempt" % now.relay)
            # What is left waits for a later attempt, those never answered
            # first (4xx answers went in out.deferred as they came).
            out.final = why
            out.deferred = {**dict.fromkeys(
                [r for r in pending if r not in out.deferred], why), **out.deferred}
            break
        if not out.waiting:     # else timed when its dot's reply is read (collect)
            out.took = time.monotonic() - out.started
        return out

    def _reconnect(self, quit: bool = False) -> Optional[Reply]:
        """Replace the connection in the middle of a delivery: None, or the
        Reply (transient) to defer the rest with when no relay can be used."""
        if self._connection is not None and not quit:
            self._connection.broken = True
        self.close()
        try:
            self._connection = self._connect()
        except DeliveryError as e:
            return _relay_trouble(self.where, e)
        return None

    def _transaction(self, conn: _Connection, sender: str, params: List[str],
                     pending: List[str], wire: bytes, out: Outcome,
                     heartbeat: Optional[Callable[[], None]],
                     more: bool, limit: int, chain: bool = False,
                     client_verp: bool = False) -> _Rest:
        """One MAIL..DATA transaction on conn for up to limit of pending;
        settles them in out and returns what is left for the next one:
        those still to try, the limit for the next transaction (the
        server's, once it said "too many"), and whether the server refused
        XVERP (the caller drops it from params and tries again).

        chain says another transaction of the same message follows at
        once: with PIPELINING its final reply is left owed, read with the
        next transaction's replies (it settles these recipients then).
        client_verp says sender is a recipient's VERP address."""
        if heartbeat:
            heartbeat()
        batch, rest = pending[:limit], pending[limit:]
        encoding = "utf-8" if "SMTPUTF8" in params else "ascii"
        mail = ("MAIL FROM:<%s>%s\r\n" % (sender, "".join(" " + p for p in params))
                ).encode(encoding)
        rcpts = [("RCPT TO:<%s>\r\n" % r).encode(encoding) for r in batch]
        replies: List[Reply] = []
        # The reply owed for this message's previous transaction (chain)
        # is read first: a failure there is not an answer to this MAIL.
        chained = conn.owed is not None and conn.owed[0] is out
        try:
            conn.exchange(mail, rcpts, replies)
        except _ConnectionLost as e:
            e.todo = self._answered(batch, replies, out)
            e.at_mail = not replies and not chained
            raise
        mail_reply = replies[0]
        if not mail_reply.ok:
            if conn.mails and _too_many(mail_reply):
                raise _UsedUp(mail_reply)       # the connection is used up
            if _has_xverp(params) and mail_reply.code in (501, 504, 555):
                if self.config.verp_fallback == "client":
                    log.warning("4.3.3 %s refused XVERP (%s): gsemail does the VERP "
                                "itself, one transaction per recipient", conn.relay,
                                mail_reply)
                else:
                    log.warning("4.3.3 %s refused XVERP (%s): sending without it",
                                conn.relay, mail_reply)
                conn.rset()
                return _Rest(pending, limit, without_xverp=True)
            out._settle(pending, mail_reply)
            if _throttling(mail_reply):
                out.throttled = mail_reply
            conn.rset()
            return _Rest([], limit)
        conn.mails += 1
        accepted: List[str] = []
        carried: Dict[str, Reply] = {}
        for rcpt, reply in zip(batch, replies[1:]):
            if reply.ok:
                accepted.append(rcpt)
            elif _too_many(reply):
                carried[rcpt] = reply
            elif reply.permanent:
                out.failed[rcpt] = reply
            else:
                out.deferred[rcpt] = reply
                if _throttling(reply):
                    out.throttled = reply
        data_reply = replies[len(batch) + 1] if len(replies) > len(batch) + 1 else None
        if not accepted:
            out.deferred.update(carried)    # "too many" with none taken: try later
            if data_reply is not None and data_reply.code == 354:
                conn.send(b".\r\n")    # RFC 2920: end the empty DATA
                conn.reply()
            conn.rset()
            return _Rest(rest, limit)
        if carried:     # the server's limit: the next transactions take no more
            limit = len(accepted)
        if data_reply is None or data_reply.code != 354:
            out._settle(accepted + list(carried) + rest, data_reply or mail_reply)
            conn.rset()
            return _Rest([], limit)
        out.xverp = out.xverp or _has_xverp(params)
        out.client_verp = out.client_verp or client_verp
        out.relay = conn.relay
        if conn.transcript is not None:
            conn.transcript.message(wire)
        try:
            for i in range(0, len(wire), _CHUNK):
                if heartbeat:
                    heartbeat()
                conn.send(wire[i:i + _CHUNK], payload=True)
            if (more or chain) and not carried and not rest and conn.pipelining:
                conn.owed = (out, accepted)
                out.waiting = not chain     # a later transaction of ours reads it
                return _Rest([], limit)
            final = conn.reply()
        except _ConnectionLost as e:
            e.after_data = True     # it may have been delivered: not again now
            raise
        out.final = final
        if not final.ok:
            out._settle(accepted + list(carried) + rest, final)
            if _throttling(final):
                out.throttled = final
            return _Rest([], limit)
        out.delivered += accepted
        out.receipts.update(dict.fromkeys(accepted, final))
        return _Rest(list(carried) + rest, limit)

    @staticmethod
    def _answered(batch: List[str], replies: List[Reply], out: Outcome) -> List[str]:
        """The connection was lost in a transaction after replies (MAIL's
        first) were read.  They are facts: record the refusals (5xx failed,
        4xx deferred); return the batch's recipients still to do, those
        never answered first, then those accepted or told "too many" (their
        transaction never reached the dot)."""
        if not replies or not replies[0].ok:
            return list(batch)
        unanswered, taken = [], []
        for i, rcpt in enumerate(batch):
            reply = replies[i + 1] if i + 1 < len(replies) else None
            if reply is None:
                unanswered.append(rcpt)
            elif reply.ok or _too_many(reply):
                taken.append(rcpt)
            elif reply.permanent:
                out.failed[rcpt] = reply
            else:
                out.deferred[rcpt] = reply
        return unanswered + taken

    # -- direct use -----------------------------------------------------------------

    def send(self, sender: str, recipients: Union[str, Iterable[str]],
             message: Union[bytes, str, email.message.Message],
             xverp: bool = False) -> Dict[str, Reply]:
        """Send one message now, without the queue.

        The message is checked and prepared as send_email's is (its
        Message-ID, when it has none, takes the sender's domain), and goes
        with XVERP as a queued one would (xverp, or the config's).  Returns
        the recipients that were not delivered, each with its Reply.
        Raises DeliveryError when no recipient was delivered and TLSError
        (a RuntimeError) when TLS was required and not had.
        """
        rcpts, data = _prepared(sender, recipients, message, xverp)
        self.open()
        out = self.deliver(sender, rcpts, data, xverp=_with_xverp(xverp, sender, self.config))
        if out.verp_too_long:   # the processor's _plan says it with the queue id
            log.warning("4.3.3 without VERP to %s: the VERP address would be longer than "
                        "RFC 5321's %d-octet path", ", ".join(
                            "<%s>" % _shown(r) for r in out.verp_too_long), _MAX_PATH)
        refused = dict(out.failed)
        refused.update(out.deferred)
        if not out.delivered:
            reply = out.final or next(iter(refused.values()))
            raise DeliveryError(reply, refused=refused)
        return refused


# ---------------------------------------------------------------------------
# The queue processor: takes due messages from the queue, hands them to the
# mailer and records each recipient's fate.
# ---------------------------------------------------------------------------

_MAINTAIN_EVERY = 3600.0    # s of running between two Queue.maintain() passes
_PASS_MOST = 25000          # paths of new/ a pass holds at once (see _deliver_due)
_NOTE_EVERY = 5.0           # s between two writes of the facts for ``status``
# An idle connection is closed after 5 s (or the config's timeout, if
# shorter), safely below the relays' own idle timeouts (Postfix's
# smtpd_timeout is 10 s under stress, 300 s otherwise; Exim's and
# OpenSMTPD's 5 minutes), so that the relay seldom closes one first
# (Mailer.deliver copes if it does).
_IDLE_CLOSE = 5.0
_IDLE_WAKE_MIN = 0.05       # s: the shortest wait before closing an idle connection
_IDLE_WAKE_LATE = 0.01      # s: woken this much past the idle time, it is up
_QUEUE_ERROR_EVERY = 300.0  # s: the same QueueError is logged once in 5 minutes
_JITTER = (0.8, 1.2)        # a retry's delay is spread by this factor
# 2 ** 64 times any min_backoff_time is past any max_backoff_time; more
# would overflow a float after a thousand attempts (and attempts come
# from a state file).
_DOUBLINGS_MAX = 64
# A relay's throttling reply pauses the processor's mail to it: 2 s at
# first (what a per-second meter such as SES's needs), doubled at each
# throttling reply in a row, up to 5 minutes (Postfix's anvil counts per
# anvil_rate_time_unit, 60 s by default); the first message delivered
# unthrottled starts the doubling again.
_THROTTLE_FIRST = 2.0
_THROTTLE_MOST = 300.0
_RATE_LOOK = 1.0            # s: the longest sleep between two looks at a limit
_RATES = "rates"            # queuepath/rates: the queue's shared token buckets
_RATES_MAGIC = b"gsemail-rates 1"


class _Group(NamedTuple):
    """Recipients that had the same reply (see _by_reply)."""

    reply: Reply
    recipients: List[str]


def _by_reply(replies: Dict[str, Reply]) -> List[_Group]:
    """The recipients grouped by their reply (as written), in order: one
    log line per distinct reply, however many recipients had it."""
    groups: Dict[str, _Group] = {}
    for rcpt, reply in replies.items():
        groups.setdefault(str(reply), _Group(reply, [])).recipients.append(rcpt)
    return list(groups.values())


def _pause(seconds: object) -> float:
    """poll_interval as a wait that cannot fail, whatever got past
    SMTPConfig's check: above zero, at most its bound; else 1 s."""
    try:
        # seconds may be any object (hence the ignore): float() raising is the check
        value = float(seconds)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return 1.0
    return min(value, _LIMITS["poll_interval"]) if value > 0 else 1.0   # NaN: 1 s


def _disk_full(e: BaseException) -> bool:
    """Whether e says the disk (or a quota) is full, which frees up again."""
    if isinstance(e, QueueError):
        return e.status == "4.3.1"      # Queue._error's code for ENOSPC, EDQUOT
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


class _Policy(NamedTuple):
    """The config's numbers that decide what becomes of a message that is
    not done: how long it waits (doubling from min_backoff_time up to
    max_backoff_time) and how long it may stay in the queue."""

    min_backoff_time: float
    max_backoff_time: float
    max_queue_lifetime: float

    @classmethod
    def of(cls, config: SMTPConfig) -> "_Policy":
        return cls(config.min_backoff_time, config.max_backoff_time,
                   config.max_queue_lifetime)


class _LogLine(NamedTuple):
    """One line for ``log.log(level, text, *args)``."""

    level: int
    text: str
    args: Tuple[object, ...]


# An outcome line (README's "Delivery lines"), in the spirit of Postfix's
# "to=<a>, relay=..., delay=..., status=sent (250 ...)": the code, the queue
# id, what happened, then key=value fields in a fixed order, the relay's
# reply last and quoted, as it is free text:
#
#   2.0.0 ID: delivered to=<a@example.com> msgid=<1@example.org>
#       relay=127.0.0.1:25 attempt=1 took=0.012s reply="250 2.0.0 Ok: queued as 4XyZ"
_TO_ALL = 10        # recipients a line names, all of them; over that:
_TO_FIRST = 5       # the first few, then "..." and nrcpt=


def _quoted(text: str) -> str:
    """text in double quotes, its quotes and backslashes escaped with a
    backslash and its control characters as Python writes them (_shown),
    so that a reply can neither end the field nor forge a line."""
    return '"%s"' % _shown(text.replace("\\", "\\\\").replace('"', '\\"'))


def _to(recipients: List[str]) -> str:
    """The to= field: every recipient, or over _TO_ALL the first few and the
    count, so that a line stays short for a post to thousands."""
    if len(recipients) <= _TO_ALL:
        return "to=" + ",".join("<%s>" % _shown(r) for r in recipients)
    return "to=%s,... nrcpt=%d" % (",".join("<%s>" % _shown(r)
                                            for r in recipients[:_TO_FIRST]),
                                   len(recipients))


class _Fields(NamedTuple):
    """The key=value part of an outcome line.  It becomes text (str) only
    when the line is logged: _plan runs for every message, and a line below
    the logger's level costs no formatting."""

    recipients: List[str]
    msgid: str                      # "" when the message has none
    relay: str                      # "" when none was used
    attempt: int
    took: Optional[float]           # None: nothing was timed
    reply: Reply
    extra: Tuple[Tuple[str, str], ...] = ()     # before the reply, in order

    def __str__(self) -> str:
        parts = [_to(self.recipients), "msgid=%s" % (self.msgid or "none"),
                 "relay=%s" % (self.relay or "none"), "attempt=%d" % self.attempt]
        if self.took is not None:
            parts.append("took=%.3fs" % self.took)
        parts += ["%s=%s" % kv for kv in self.extra]
        parts.append("reply=" + _quoted(str(self.reply)))
        return " ".join(parts)


_XVERP_FIELD = (("verp", "xverp"),)    # on a delivered line: XVERP went with it
_CLIENT_VERP_FIELD = (("verp", "client"),)  # or gsemail made the VERP addresses
# The reply of a delivery whose Outcome kept none (one an embedder made).
_NO_RECEIPT = Reply(250, "2.0.0 delivered (no reply kept)")


def _delivered_groups(out: Outcome) -> List[_Group]:
    """out's delivered recipients, grouped by the reply to their dot: one
    line for each transaction (each has its own id at the relay)."""
    receipts = out.receipts
    if receipts and len(receipts) == len(out.delivered):    # most often: one reply
        first = next(iter(receipts.values()))
        if all(reply is first for reply in receipts.values()):
            return [_Group(first, out.delivered)]
    other = out.final if out.final is not None and out.final.ok else _NO_RECEIPT
    return _by_reply({r: receipts.get(r, other) for r in out.delivered})


class _Plan(NamedTuple):
    """What an attempt means for a message (made by _plan, done by
    QueueProcessor._apply).  ``what`` is one of:

    * ``"delivered"``: nothing left to do or to write: remove the message;
    * ``"deferred"``: write the dead letter for ``refused`` (if any) and
      keep the message for ``recipients``, due at ``next_attempt``, with
      ``state`` (see QueueProcessor._refuse_and_defer);
    * ``"dead"``: write the dead letter for ``refused`` and remove the
      message (``state`` is then not written; its ``attempts`` go in the
      dead letter's header).

    It is also the key of QueueProcessor.stats the message counts in."""

    what: str
    attempts: int                   # this attempt's number
    state: _Record                  # the message's state after this attempt
    recipients: List[str]           # still to do ("deferred")
    next_attempt: float             # when they are due ("deferred")
    refused: Dict[str, str]         # recipient -> reason not yet in its dead letter
    summary: str                    # for the dead letter's header
    lines: List[_LogLine]           # to log once it is recorded
    notes: Dict[str, object]        # facts for ``status`` (QueueProcessor._note)


def _first_reason(refused: Dict[str, str], replies: Dict[str, Reply]) -> Reply:
    """The first of the reasons in refused: its Reply when it is one of
    this attempt's replies, else read back from its text (a refusal kept
    in the state, or one with "gave up after" added)."""
    rcpt, text = next(iter(refused.items()))
    reply = replies.get(rcpt)
    return reply if reply is not None and str(reply) == text else Reply.parse(text)


def _plan(name: str, state: _Record, first_queued: float, attempts: int,
          out: Outcome, where: str, policy: _Policy, now: float,
          rng: random.Random, *, msgid: str = "", info: bool = True) -> _Plan:
    """What to do with message name after an attempt whose outcome is out,
    over relay where, at time now.  state, first_queued and attempts (the
    attempts before this one) are the message's as claimed, msgid its
    Message-ID (for the log lines); rng.uniform spreads the retry's delay.
    info=False leaves out the lines of level INFO (delivered, deferred),
    for a logger that would drop them.  A pure function: it changes
    nothing, not even state, and raises (for the caller to decide without
    the state) when the state's content cannot be used."""
    attempts += 1
    lines: List[_LogLine] = []
    notes: Dict[str, object] = {}
    took = out.took
    earlier = state.get("failed") or {}
    if not isinstance(earlier, dict):
        raise TypeError("the state's failed is not a mapping: %r" % (earlier,))
    # The usual outcome: nothing refused or deferred, now or before.  Its
    # plan is made below without the dead letter's and the record's work
    # (this runs for every message).
    usual = not (out.failed or out.deferred or earlier)
    sent = _delivered_groups(out) if out.delivered and (info or not usual) else []
    for group in sent if info else ():
        lines.append(_LogLine(logging.INFO, "%s %s: delivered %s", (
            group.reply.status, name,
            _Fields(group.recipients, msgid, where, attempts, took, group.reply,
                    _XVERP_FIELD if out.xverp else
                    _CLIENT_VERP_FIELD if out.client_verp else ()))))
    if out.verp_too_long:
        lines.append(_LogLine(logging.WARNING, "4.3.3 %s: without VERP %s msgid=%s: the "
                              "VERP address would be longer than RFC 5321's %d-octet path",
                              (name, _to(out.verp_too_long), msgid or "none", _MAX_PATH)))
    if usual:   # what the general path below returns for it
        if out.final is not None and not out.final.ok:
            notes.update(error_at=now, error=str(out.final), error_id=name)
        if out.delivered:
            notes.update(delivered_at=now, delivered_id=name, delivered_via=where)
        return _Plan("delivered", attempts, {}, [], now, {},
                     "%d delivered" % len(out.delivered), lines, notes)
    for group in _by_reply(out.failed):
        lines.append(_LogLine(logging.WARNING, "%s %s: refused %s", (
            group.reply.status, name,
            _Fields(group.recipients, msgid, where, attempts, took, group.reply))))
    failed: Dict[str, str] = dict(earlier)
    failed.update((r, str(reply)) for r, reply in out.failed.items())
    # What is not yet in the message's dead letter: refusals go in it at
    # once, not when the message is done, for whoever finishes it may
    # not be us (zope.sendmail keeps no record of them).
    fresh = {r: str(reply) for r, reply in out.failed.items()}
    if not state.get("dead_letter"):
        fresh = dict(failed)    # refused before dead letters were written early
    summary = "%d delivered" % len(out.delivered)
    trouble = out.final if out.final and not out.final.ok else \
        next(iter({**out.deferred, **out.failed}.values()), None)
    if trouble is not None:
        notes.update(error_at=now, error=str(trouble), error_id=name)
    if out.delivered:
        notes.update(delivered_at=now, delivered_id=name, delivered_via=where)
    if not out.deferred and not fresh:  # done, every refusal already written
        return _Plan("delivered", attempts, {}, [], now, {}, summary, lines, notes)
    if sent:    # the dead letter's header says where they went
        summary += " via %s (%s)" % (where, "; ".join(str(g.reply) for g in sent[:3]))
    event: Dict[str, object] = {"at": round(now, 3), "via": where, "attempt": attempts,
                                "delivered": len(out.delivered),
                                "deferred": len(out.deferred), "refused": len(out.failed)}
    if sent:        # the relay's reply to each dot: its own queue id for them
        event["sent"] = [str(g.reply) for g in sent]
    if out.took is not None:
        event["took"] = round(out.took, 3)
    if trouble is not None:
        event["reply"] = str(trouble)
    new: _Record = {**state, "attempts": attempts, "first_queued": first_queued,
                    "last_attempt": now, "failed": failed,
                    "history": _history_with(state, event)}
    new.pop("xverp", None)      # the name (:2,X) and the config say, nothing else
    if out.deferred:
        last = out.final if out.final and not out.final.ok else \
            next(iter(out.deferred.values()))
        age = now - first_queued
        if age < policy.max_queue_lifetime:
            delay = min(policy.max_backoff_time,
                        policy.min_backoff_time * 2.0 ** min(attempts - 1, _DOUBLINGS_MAX))
            delay *= rng.uniform(*_JITTER)
            new.update({"last_error": str(last), "next_attempt": now + delay})
            for group in _by_reply(out.deferred) if info else ():
                lines.append(_LogLine(logging.INFO, "%s %s: deferred %s", (
                    group.reply.status, name,
                    _Fields(group.recipients, msgid, where, attempts, took, group.reply,
                            (("for", "%ds" % delay), ("until", _iso(now + delay)))))))
            if fresh:
                new["dead_letter"] = True
                reply = _first_reason(fresh, out.failed)
                lines.append(_LogLine(logging.ERROR, "%s %s: dead letter .rejected-%s %s", (
                    reply.status, name, name,
                    _Fields(list(fresh), msgid, where, attempts, took, reply,
                            (("still_to_do", str(len(out.deferred))),)))))
            return _Plan("deferred", attempts, new, list(out.deferred), now + delay, fresh,
                         summary, lines, notes)
        for rcpt, reply in out.deferred.items():
            fresh[rcpt] = "%s (gave up after %d attempts in %s)" % (
                reply, attempts, _span(age))
    reply = _first_reason(fresh, out.failed)
    lines.append(_LogLine(logging.ERROR, "%s %s: dead letter .rejected-%s %s",
                          (reply.status, name, name,
                           _Fields(list(fresh), msgid, where, attempts, took, reply))))
    return _Plan("dead", attempts, new, [], now, fresh, summary, lines, notes)


class _RateLimiter:
    """message_rate and recipient_rate for one queue: two token buckets in
    the file queuepath/rates, shared by every session, thread and process
    that sends from the queue on this host (an flock, and a lock for the
    sessions of one processor, which share its descriptor).

    Each bucket holds a single token (the smallest burst): a message (or
    recipient) may go once the bucket's "next" time has passed, and moves
    it on by one interval (1/N of the unit) from then, or from now if that
    is later (no credit for a quiet spell).  So in any span of the unit, at
    most N messages go, evenly spaced, however many processes send:
    50000/d is one message every 1.7 s, never the day's quota at once, and
    14/s is one every 71 ms, which SES's per-second meter accepts.  A
    message of k recipients takes k recipient tokens at once: it waits for
    the bucket's one token, goes whole, and the bucket owes k - 1 intervals,
    which the next message waits for (so a message larger than any limit
    still goes, and the average holds).

    The times are time.monotonic(), the same for every process of a host
    (Linux's CLOCK_MONOTONIC), and the file keeps when it was written: a
    time after now is another boot's, and the buckets start again.  The
    file is advice that is never needed to send mail; if it cannot be
    opened safely (a link, not a regular file), QueueError: nothing is
    sent, rather than sent above the limit, until it is fixed.
    """

    def __init__(self, queue: "Queue", messages: Optional[_Rate],
                 recipients: Optional[_Rate]) -> None:
        self.path = os.path.join(queue.path, _RATES)
        self._queue = queue
        self._limits = (messages, recipients)
        self._lock = threading.Lock()
        self._fd = -1
        self._pid = 0       # the process _fd was opened in: a fork's child opens its own

    def _open(self) -> int:
        if self._fd >= 0 and self._pid == os.getpid():
            return self._fd
        if self._fd >= 0:   # the parent's, after a fork: its flock is the parent's too
            os.close(self._fd)
            self._fd = -1
        self._queue._check_identity()
        try:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK
                             | os.O_CLOEXEC)
        except OSError as e:
            try:
                st: Optional[os.stat_result] = os.lstat(self.path)
            except OSError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise QueueError("queue %s: %s is %s, not a regular file: no mail is sent "
                                 "with message_rate or recipient_rate until it is removed"
                                 % (self._queue.path, self.path, _kind(st.st_mode))) from None
            raise self._queue._error("cannot open the rate-limit file %s" % self.path,
                                     e) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise QueueError("queue %s: %s is %s, not a regular file" % (
                self._queue.path, self.path, _kind(st.st_mode)))
        self._fd, self._pid = fd, os.getpid()
        return fd

    @staticmethod
    def _read(fd: int, now: float) -> List[float]:
        """The buckets' next times; now for each when the file is new, not
        ours, or written in another boot (a time after now)."""
        try:
            fields = os.pread(fd, 256, 0).split()
            if len(fields) == 5 and b" ".join(fields[:2]) == _RATES_MAGIC:
                times = [float(f) for f in fields[2:]]
                if all(math.isfinite(t) for t in times) and times[2] <= now:
                    return times[:2]
        except (OSError, ValueError):
            pass
        return [now, now]

    def take(self, recipients: int, look: bool = False) -> float:
        """Take a message's token and recipients' tokens when both buckets
        have them, and return 0; else take nothing and return how long
        until they may.  look: only look (a processor looks before it
        claims a message, whose recipients it cannot know before)."""
        wanted = (1, recipients)
        with self._lock:
            fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                now = time.monotonic()
                times = self._read(fd, now)
                wait = max([times[i] - now for i, limit in enumerate(self._limits)
                            if limit is not None and wanted[i]] + [0.0])
                if wait > 0 or look:
                    return wait
                for i, limit in enumerate(self._limits):
                    if limit is not None:
                        times[i] = max(times[i], now) + wanted[i] * limit.interval
                data = b"%s %r %r %r\n" % (_RATES_MAGIC, times[0], times[1], now)
                os.pwrite(fd, data, 0)      # one block, rewritten in place
                os.ftruncate(fd, len(data))
                return 0.0
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0 and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = -1


class _Unsettled(NamedTuple):
    """An outcome the queue could not record (see QueueProcessor._record)."""

    msg: QueuedMessage
    change: Callable[[], object]    # the queue change, tried again on every pass
    #: its file already keeps a later run from sending to the recipients
    #: delivered (Queue._strike)
    safe: bool
    #: it failed for a full disk: no new work until it is recorded
    full: bool


class QueueProcessor:
    """Delivers a queue: in a background thread (``start``/``stop``), in
    the foreground (``run``), or until nothing is due (``drain``).

    Any number of processors, in any number of processes, may work on one
    queue: each message is claimed before it is sent.

    As with ``sched.scheduler(timefunc, delayfunc)``, the clock and the
    randomness of its decisions can be given: ``timefunc()`` is the time
    (seconds since the epoch, default ``time.time``) an attempt is
    recorded at and its retry counted from; ``rng.uniform(a, b)`` spreads
    each retry's delay (default: a ``random.Random()`` of its own).  Its
    own intervals (housekeeping, closing an idle connection, notes for
    ``status``) use ``time.monotonic``, whatever the wall clock does.
    """

    def __init__(self, config: SMTPConfig, queue: Optional[Queue] = None,
                 mailer: Optional[Mailer] = None, *,
                 timefunc: Callable[[], float] = time.time,
                 rng: Optional[random.Random] = None) -> None:
        self.config = config
        self._timefunc = timefunc
        self._rng = random.Random() if rng is None else rng
        self.queue = queue or Queue(config.queuepath, config.claim_timeout, xverp=config.xverp)
        if config.xverp:    # the config's xverp is for every message, whoever queued it
            self.queue.xverp = True
        self.mailer = mailer or Mailer(config)
        # sessions > 1: that many connections at once, each with its share
        self._mailers = [self.mailer] + [Mailer(config) for _ in range(config.sessions - 1)]
        self._lock = threading.Lock()      # stats, status notes and progress
        self._done = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._refused = ("", 0.0)   # the queue's last QueueError in run(), and when logged
        self._pid = 0       # the process whose thread it is (see alive)
        # Outcomes the queue could not record.  While there are any, no new
        # message is sent; each keeps its claim.
        self._unsettled: List[_Unsettled] = []
        self._full = False      # one of them failed for a full disk: no new work
        self._record_lock = threading.Lock()
        self._maintained = -math.inf    # monotonic: maintain() at the first pass
        self._last_used = 0.0
        self._facts: Dict[str, object] = {}  # for Queue._note, saved every few seconds
        self._noted = 0.0
        self._progress: Optional[Callable[[Dict[str, int], int], None]] = None
        #: messages handled so far, by what became of them
        self.stats = {"delivered": 0, "deferred": 0, "dead": 0}
        # message_rate, recipient_rate: the queue's buckets (see _wait)
        self._rates = _RateLimiter(self.queue, config._message_limit, config._recipient_limit) \
            if config._message_limit or config._recipient_limit else None
        # A relay's throttling: no new message before _throttle_until
        # (monotonic), the last pause _throttle_pause s (see _throttled).
        self._throttle_until = 0.0
        self._throttle_pause = 0.0

    def start(self) -> None:
        """Run in a daemon thread; the backlog is delivered at once."""
        if not self.alive:
            self._stopping.clear()
            self._pid = os.getpid()
            self._thread = threading.Thread(
                target=self.run, name="gsemail %s" % self.queue.path, daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """Look at the queue now (send_email calls this)."""
        self._wake.set()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish the message in flight, close the connection and return.

        Waits at most ``timeout`` seconds (default: as long as one SMTP
        transaction can take), so interpreter exit never hangs here.
        """
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and \
                self._pid == os.getpid():   # in a forked child it does not run
            wait = self.config.claim_timeout if timeout is None else timeout
            if not wait == wait:            # NaN: the default
                wait = self.config.claim_timeout
            # join() takes no more than TIMEOUT_MAX: inf (or 1e100) means that
            thread.join(min(wait, threading.TIMEOUT_MAX))

    @property
    def alive(self) -> bool:
        """Its thread runs in this process.  A process forked without
        Python's fork hooks (uWSGI's workers) has the parent's processor
        object, whose thread looks alive there but does not exist."""
        return self._thread is not None and self._pid == os.getpid() and \
            self._thread.is_alive()

    def run(self) -> None:
        """Deliver until stop() is called.  Never dies of an exception."""
        log.info("2.0.0 queue processor for %s started (relay %s)", self.queue.path,
                 ", ".join(_where(*r) for r in self.config.relays))
        idle = min(_IDLE_CLOSE, self.config.timeout)    # see _IDLE_CLOSE
        while not self._stopping.is_set():
            # Everything, the waits too, inside the try: whatever a value
            # or a pass raises, the thread logs it and goes on.
            try:
                self._wake.clear()
                wait = _pause(self.config.poll_interval)
                if not self.run_once() and time.monotonic() - self._last_used > idle:
                    self._close_mailers()     # do not hold an idle connection open
                elif any(m._connection is not None for m in self._mailers):
                    # wake in time to close it, whatever poll_interval is
                    wait = min(wait, max(_IDLE_WAKE_MIN, self._last_used + idle
                                         - time.monotonic() + _IDLE_WAKE_LATE))
                self._wake.wait(wait)
            except QueueError as e:
                # The queue has gone, been replaced or become unsafe: nothing
                # is sent from whatever is at its path, and the thread lives
                # on to look again at the next poll (logged once in 5 minutes).
                self._close_mailers()
                text, logged = self._refused
                if str(e) != text or time.monotonic() - logged > _QUEUE_ERROR_EVERY:
                    log.error("%s queue processor: %s", e.status, e)
                    self._refused = (str(e), time.monotonic())
                self._wake.wait(_pause(self.config.poll_interval))
            except Exception:
                log.exception("4.3.0 queue processor for %s: unexpected error, going "
                              "on", self.queue.path)
                try:
                    self._close_mailers()
                except Exception:
                    log.exception("4.3.0 queue processor for %s: cannot close its "
                                  "connections, going on", self.queue.path)
                self._stopping.wait(_pause(self.config.poll_interval))
        self._close_mailers()
        self._finish()
        log.info("2.0.0 queue processor for %s stopped", self.queue.path)

    def drain(self, progress: Optional[Callable[[Dict[str, int], int], None]] = None
              ) -> None:
        """Deliver until nothing is due, then close the connection.

        ``progress(stats, remaining)`` is called after each message with
        ``stats`` (messages delivered, deferred and dead so far) and how
        many due messages this pass has still to do.
        """
        self._progress = progress
        try:
            while not self._stopping.is_set() and self.run_once():
                pass
        finally:
            self._progress = None
            self._close_mailers()
            self._finish()

    def _finish(self) -> None:
        """At the end of run() or drain(): a last try at the outcomes not
        recorded; then leave, for each one left, what a later run honours
        (see _record), and let its claim go."""
        if self._rates is not None:
            self._rates.close()     # opened again if the processor runs again
        if self._unsettled and not self._recorded():
            with self._record_lock:
                unsettled, self._unsettled = self._unsettled, []
            held = False
            for entry in unsettled:
                msg = entry.msg
                if entry.safe:
                    log.error("4.3.0 %s: its delivery outcome could not be recorded; its "
                              "file lists only the recipients not delivered, so a later "
                              "run sends to those alone (this attempt's refusals and "
                              "retry time are not kept)", msg.name)
                    msg.release()
                    continue
                rejected = self.queue._set_aside(msg)
                if rejected:
                    log.error("4.3.0 %s: its delivery outcome could not be recorded in "
                              "any way: set aside as dead letter %s, so that it is not "
                              "sent again to the recipients it reached (list them with "
                              "gsemail show before any retry)", msg.name, rejected)
                else:
                    log.critical("4.3.0 %s: its delivery outcome could not be recorded in "
                                 "any way, nor the message set aside: it will be sent "
                                 "again to the recipients it reached", msg.name)
                    held = True     # its claim stays with its claimer file
            if held:
                return
        self.queue.close()      # no claim is held: the claimer file can go

    def _close_mailers(self) -> None:
        for mailer in self._mailers:
            mailer.close()

    def run_once(self) -> int:
        """One pass over the due messages; returns how many were handled.
        Raises QueueError, touching nothing, when the queue has been
        replaced or has become unsafe (Queue.check)."""
        self.queue.check()
        self.queue._heartbeat()     # for status: a processor lives here
        now = time.monotonic()      # every hour of running, whatever the wall clock does
        if now - self._maintained > _MAINTAIN_EVERY:
            self._maintained = now
            try:
                self.queue.maintain()
            except OSError as e:
                log.warning("4.3.0 queue %s: housekeeping failed: %s", self.queue.path, e)
        if not self._recorded() and self._full:
            return 0        # no new work while the disk is full (see _record)
        try:
            return self._deliver_due()
        finally:
            self._note(force=True)

    def _deliver_due(self) -> int:
        """Deliver what is due, _PASS_MOST of new/ at a time (Queue._due):
        the paths of a backlog of 100,000 would take 12 MB."""
        self._done = 0
        handled = 0
        total = -1
        while True:
            paths, left = self.queue._due(most=_PASS_MOST)
            if total < 0:
                total = len(paths) + left   # for progress: what this pass has to do
            done = self._deliver_paths(paths, total)
            handled += done
            # none handled: the lot is held by others, or no new work may go
            if not left or not done or self._stopping.is_set():
                break
        if self._progress and handled:
            self._progress(self.stats, 0)
        return handled

    def _deliver_paths(self, paths: List[str], total: int) -> int:
        """Deliver paths, over self._mailers' sessions; how many were handled."""
        sessions = min(len(self._mailers), len(paths))
        if sessions <= 1:
            handled = self._deliver(paths, self.mailer, total)
        else:
            # Each session takes every n-th message: no two try to claim the
            # same one, and each keeps its own connection busy.
            counts: List[int] = [0] * sessions
            errors: List[Exception] = []

            def work(i: int) -> None:
                try:
                    counts[i] = self._deliver(paths[i::sessions], self._mailers[i], total)
                except Exception as e:      # raised again below, as one session would
                    errors.append(e)
            workers = [threading.Thread(target=work, args=(i,), daemon=True,
                                        name="gsemail session %d" % i)
                       for i in range(sessions)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            if errors:
                raise errors[0]
            handled = sum(counts)
        return handled

    def _deliver(self, paths: List[str], mailer: Mailer, total: int) -> int:
        """Claim and send each of paths over mailer's connection.

        A message sent with ``more`` waits here, in waiting, until the reply
        to its dot (read with the next message's first replies) settles it;
        it is recorded then, before any data of the next message goes out
        (see _record_settled and the banner of the SMTP connection).  Each
        call (one per session) has its own."""
        handled = 0
        down: Optional[Reply] = None
        waiting: List[Tuple[QueuedMessage, Outcome]] = []    # sent, reply unread
        try:
            for n, path in enumerate(paths):
                if self._progress and self._done:
                    with self._lock:
                        self._progress(self.stats, total - self._done)
                if self._stopping.is_set() or (self._full and not self._recorded()
                                               and self._full):   # retried, still full
                    break   # see _record: no new work while the disk is full
                # A throttling pause, and the rate limits, are waited for
                # before the claim (no claim is held for them), unless the
                # relay is down: then the message is only deferred.
                if down is None and not self._wait(mailer, waiting):
                    break   # stop() came first
                try:
                    msg = self.queue.claim(path)
                except OSError as e:
                    log.error("4.3.0 queue %s: cannot claim %s: %s", self.queue.path,
                              os.path.basename(path), e)
                    continue
                if msg is None:
                    continue
                handled += 1
                if msg.problem:
                    self._apply(mailer, msg, Outcome(
                        failed=dict.fromkeys(msg.recipients or [_NO_RECIPIENT], msg.problem)))
                    continue
                if down is None:
                    if self._rates is not None:
                        try:
                            go = self._wait(mailer, waiting, msg, len(msg.recipients))
                        except BaseException:   # the rates file became unsafe
                            msg.release()
                            raise
                        if not go:
                            msg.release()   # stopped: nothing of it went, no attempt
                            break
                    try:
                        mailer.open()
                    except DeliveryError as e:
                        if _throttling(e.reply) and e.reply.code == 421 and \
                                self._throttled(mailer.where, e.reply):
                            # "421 4.7.0 too many connections": not an attempt;
                            # it goes in the next pass, after the pause
                            msg.release()
                            self._record_settled(mailer, waiting)   # open() read it
                            continue
                        down = self._relay_down(mailer, e)
                    except Exception as e:  # a bug of ours: the message must not stay claimed
                        log.exception("4.3.0 relay %s: unexpected error while connecting",
                                      mailer.where)
                        down = _internal(e)
                    self._record_settled(mailer, waiting)   # if open() closed, it read
                if down is not None:
                    self._apply(mailer, msg, Outcome(
                        deferred=dict.fromkeys(msg.recipients, down), final=down))
                    continue
                outcome = self._attempt(mailer, msg, n + 1 < len(paths), waiting)
                self._last_used = time.monotonic()
                self._record_settled(mailer, waiting)   # the earlier message first
                if outcome.final is _HELD and not outcome.delivered:
                    msg.release()   # stopped before its dot: nothing of it went
                    break
                if outcome.waiting:
                    # Its final reply is read with the next message's replies
                    # (Mailer.deliver's more); it is recorded once that has
                    # settled it, at the latest at the next message's first
                    # heartbeat of data, before that message's dot goes out,
                    # so a crash leaves at most one message sent and not
                    # recorded.
                    waiting.append((msg, outcome))
                else:
                    self._conclude(mailer, msg, outcome)
        finally:
            try:
                mailer.wait()
            finally:
                self._record_settled(mailer, waiting)
        return handled

    def _wait(self, mailer: Mailer, waiting: List[Tuple[QueuedMessage, Outcome]],
              msg: Optional[QueuedMessage] = None, recipients: int = 1) -> bool:
        """Wait for the end of a relay's throttling pause and until the rate
        limits let a message go: without msg, only look (before a claim);
        with msg (claimed), take its tokens.  The mail waiting meanwhile is
        not deferred and no attempt is counted.  False when stop() came
        first.  Before any wait, the message sent before is read and
        recorded, and a connection that would be idle longer than a relay
        keeps one is closed (see _IDLE_CLOSE)."""
        settled = False
        while not self._stopping.is_set():
            wait = self._throttle_until - time.monotonic()
            if wait <= 0 and self._rates is not None:
                wait = self._rates.take(recipients, look=msg is None)
            if wait <= 0:
                return True
            if not settled:
                settled = True
                mailer.wait()
                self._record_settled(mailer, waiting)
            if wait > min(_IDLE_CLOSE, self.config.timeout) and mailer._connection is not None:
                mailer.close()
            if msg is not None:
                msg.heartbeat()
            self._stopping.wait(min(wait, _RATE_LOOK))
        return False

    def _conclude(self, mailer: Mailer, msg: QueuedMessage, out: Outcome) -> None:
        """Record an attempt (_apply), unless the relay refused the whole
        message with a throttling reply, to MAIL or to the dot, taking none
        of it: then it was no attempt, and the message, untouched, goes
        again in the next pass, after the pause (see _throttled)."""
        throttled = self._refused_whole(out)
        if throttled is not None and self._throttled(out.relay or mailer.where, throttled):
            msg.release()
            return
        self._apply(mailer, msg, out)

    @staticmethod
    def _refused_whole(out: Outcome) -> Optional[Reply]:
        """The throttling reply with which the relay refused the whole
        message (to MAIL, or to the dot), taking none of it: nothing
        delivered, nothing refused for good; else None."""
        if out.throttled is not None and out.final is out.throttled and \
                not out.delivered and not out.failed and not out.waiting:
            return out.throttled
        return None

    def _throttled(self, relay: str, reply: Reply) -> bool:
        """The relay sent a throttling reply: pause mail to it (every
        session of this processor), twice as long as the last pause if
        there was one since the last unthrottled delivery; logged once a
        pause.  False when the last pause was already the longest (a relay
        that refuses us for that long is down, not busy)."""
        with self._lock:
            now = time.monotonic()
            if now < self._throttle_until:
                return True     # this pause covers it (a pipelined message, a session)
            longest = min(_THROTTLE_MOST, self.config.max_backoff_time)
            busy = self._throttle_pause < longest
            pause = min(longest, max(_THROTTLE_FIRST, 2 * self._throttle_pause))
            self._throttle_pause = pause
            self._throttle_until = now + pause
        log.warning("%s relay %s throttles this client (%s): no new mail goes to it for "
                    "%d s; mail waiting meanwhile is not deferred", reply.status, relay,
                    reply, pause)
        return busy

    def _record_settled(self, mailer: Mailer,
                        waiting: List[Tuple[QueuedMessage, Outcome]]) -> None:
        """Record each waiting message whose final reply has been read (its
        outcome no longer waiting), in the order they were sent.  Called
        after each call that may read a reply (Mailer.open, deliver, wait)
        and at each heartbeat, which comes before any data goes."""
        while waiting and not waiting[0][1].waiting:
            msg, outcome = waiting.pop(0)
            self._conclude(mailer, msg, outcome)

    def _attempt(self, mailer: Mailer, msg: QueuedMessage, more: bool,
                 waiting: List[Tuple[QueuedMessage, Outcome]]) -> Outcome:
        """mailer.deliver(msg), never raising.  A connection that failed before
        the server answered anything of the message (a drop after the
        previous message's dot, or a connection the server had closed) is
        no attempt: the message goes again at once on a new connection.

        waiting is _deliver's (messages sent before, their replies owed):
        each heartbeat first records those settled meanwhile, so that an
        earlier message is on disk before this one's data goes.

        The message is stopped before its data (final _HELD) when the
        outcome of an earlier one could not be recorded meanwhile: that
        is read with this message's first replies, when its MAIL, RCPT and
        DATA are already sent with the earlier dot."""
        def heartbeat() -> None:
            if waiting:
                self._record_settled(mailer, waiting)
            if self._full:
                # An earlier message's reply still owed is read (and that
                # message recorded) first: dropping the connection would
                # settle it as lost, though its dot may have gone.
                mailer.wait()
                self._record_settled(mailer, waiting)
                raise _Held(_HELD)      # the connection is dropped: no dot goes
            msg.heartbeat()

        for again in (True, False):
            try:
                outcome = mailer.deliver(msg.sender, msg.recipients, msg.data,
                                         msg.xverp, heartbeat, more=more)
            except DeliveryError as e:
                # the connection had to be replaced before anything of the
                # message was sent (the relay had closed it) and could not be
                reply = QueueProcessor._relay_down(mailer, e)
                return Outcome(deferred=dict.fromkeys(msg.recipients, reply), final=reply)
            except Exception as e:
                log.exception("4.3.0 %s: unexpected error while sending", msg.name)
                mailer.close()
                reply = _internal(e)
                return Outcome(deferred=dict.fromkeys(msg.recipients, reply), final=reply)
            final = outcome.final
            if final is _HELD or not (again and outcome.unanswered):
                break
            log.info("%s %s: connection lost before the server answered: sending it "
                     "again on a new connection", final.status if final else "4.4.2",
                     msg.name)
            # An earlier message settled meanwhile is recorded now, while
            # mailer.where still names the relay that carried it.
            self._record_settled(mailer, waiting)
            try:
                mailer.open()
            except DeliveryError:
                break       # deferred as it is; the next message finds the relay down
        return outcome

    @staticmethod
    def _relay_down(mailer: Mailer, e: DeliveryError) -> Reply:
        """Log that no relay can be used; the Reply to defer mail with."""
        return _relay_trouble(mailer.where, e)

    def _note(self, facts: Optional[Dict[str, object]] = None, force: bool = False
              ) -> None:
        """Keep facts for ``status``; write them at most every few seconds."""
        with self._lock:
            self._facts.update(facts or {})
            if not self._facts or not (force or
                                       time.monotonic() - self._noted > _NOTE_EVERY):
                return
            self._noted = time.monotonic()
            facts, self._facts = self._facts, {}
        self.queue._note(facts)

    def _apply(self, mailer: Mailer, msg: QueuedMessage, out: Outcome) -> None:
        """Decide what an attempt means for the message (remove, defer or
        dead-letter: _plan), record it in the queue, then log it and note
        it for ``status``.  The record comes first, and nothing advisory
        can stop it: a state whose content cannot be used is set aside and
        the decision made without it."""
        now = self._timefunc()
        policy = _Policy.of(self.config)
        relay = out.relay or mailer.where
        # A message delivered to all, with no record, needs no age (_plan
        # returns before it looks): most messages; the age costs a parse.
        plain = not (out.deferred or out.failed or msg.state)
        first_queued = now if plain else msg.first_queued
        # Lines of level INFO are made only for a logger that keeps them
        # (the CLI's default is WARNING); then a plain delivery logs no line,
        # and needs no Message-ID (msg.message_id reads the message's head).
        info = log.isEnabledFor(logging.INFO)
        msgid = "" if plain and not info and not out.verp_too_long else msg.message_id
        try:
            plan = _plan(msg.name, msg.state, first_queued, msg.attempts, out,
                         relay, policy, now, self._rng, msgid=msgid, info=info)
        except Exception:
            log.exception("4.3.0 %s: its state cannot be used: recording this attempt "
                          "without it", msg.name)
            msg.state = {}
            plan = _plan(msg.name, msg.state, msg.first_queued, msg.attempts, out,
                         relay, policy, now, self._rng, msgid=msg.message_id, info=info)
        self._record(msg, self._change(msg, plan), out.delivered)
        for line in plan.lines:
            log.log(line.level, line.text, *line.args)
        self._count(plan.what)
        self._note(plan.notes)
        if out.throttled is not None:
            self._throttled(relay, out.throttled)
        elif out.delivered and self._throttle_pause:
            with self._lock:
                self._throttle_pause = 0.0      # it takes mail again: start afresh

    def _change(self, msg: QueuedMessage, plan: _Plan) -> Callable[[], object]:
        """The queue change that records plan (done, or kept to try again,
        by _record)."""
        if plan.what == "delivered":
            return functools.partial(self.queue.remove, msg)
        if plan.what == "deferred":
            return functools.partial(self._refuse_and_defer, msg, plan)
        # the header counts the attempts as the message's state would read
        # them back (_attempts: at most _ATTEMPTS_MAX)
        return functools.partial(self.queue.dead_letter, msg, plan.refused, plan.summary,
                                 attempts=_attempts(plan.attempts))

    def _refuse_and_defer(self, msg: QueuedMessage, plan: _Plan) -> None:
        """The dead letter for those refused first (durably), then the
        deferral of the rest: a crash between them sends the refused ones
        a RCPT again, which is refused again and merged, never lost."""
        if plan.refused:
            self.queue.dead_letter(msg, plan.refused, plan.summary, keep=True,
                                   attempts=plan.attempts)
        self.queue.defer(msg, plan.recipients, plan.state, plan.next_attempt)

    def _count(self, what: str) -> None:
        with self._lock:
            self.stats[what] += 1
            self._done += 1

    def _record(self, msg: QueuedMessage, action: Callable[[], object],
                delivered: Iterable[str] = ()) -> None:
        """Do a queue change.  If it fails (a full disk), nothing of it is
        lost and nothing is sent twice:

        * the change is kept in memory with the message's claim, so no
          processor sends it meanwhile, and retried on every pass;
        * no new message is sent until it is recorded (_deliver, _attempt);
        * the recipients delivered are struck from the file's X-Zope-To in
          place (Queue._strike needs no new disk block), so that if this
          process stops first (_finish) or is killed, a later run, ours or
          zope.sendmail's, sends only to the others.
        """
        try:
            action()
            return
        except Exception as e:
            problem = e
        delivered = list(delivered)
        safe = not delivered or self.queue._strike(msg, delivered)
        named = "; delivered %s msgid=%s" % (_to(delivered), msg.message_id or "none") \
            if delivered else ""
        # Only a full disk stops new work (whose outcomes could not be
        # recorded either, until space returns).  Any other failure (a
        # directory at state/NAME, EACCES, EROFS) keeps this message and
        # retries it, but must not stop all other mail for good.
        full = _disk_full(problem)
        log.error("4.3.0 %s: cannot record the delivery outcome in the queue: %s; it "
                  "stays claimed and is recorded as soon as the queue allows; %s%s%s",
                  msg.name, problem, "no more mail is sent until then" if full else
                  "other mail goes on", "" if not delivered else
                  "; its file no longer lists the %d recipient(s) delivered" % len(delivered)
                  if safe else "; its file could not be changed either", named)
        with self._record_lock:
            self._unsettled.append(_Unsettled(msg, action, safe, full))
            self._full = any(entry.full for entry in self._unsettled)

    def _recorded(self) -> bool:
        """Try again the queue changes that could not be made; True when
        none is left."""
        with self._record_lock:
            left = []
            for entry in self._unsettled:
                try:
                    entry.change()
                except Exception:
                    left.append(entry)
                else:
                    log.warning("2.0.0 %s: its delivery outcome is recorded now",
                                entry.msg.name)
            self._unsettled = left
            self._full = any(entry.full for entry in left)
            return not left


# ---------------------------------------------------------------------------
# send_email: the API for request handlers.
# ---------------------------------------------------------------------------

_lock = threading.Lock()
_config: Optional[SMTPConfig] = None
_queues: Dict[str, Queue] = {}
_processors: Dict[str, QueueProcessor] = {}
_pid = os.getpid()      # the process that _processors and _lock belong to


def _after_fork() -> None:
    # A child has the parent's queues but none of its threads: start afresh.
    global _lock, _pid
    _pid = os.getpid()
    _lock = threading.Lock()
    _processors.clear()
    for queue in set(_claiming) | set(_queues.values()):
        queue._forget_claimer()     # its lock too: a parent's thread may hold it


def _check_fork() -> None:
    """Run _after_fork in a child that was forked without Python's fork
    hooks: uWSGI's master forks its workers with libc's fork() (unless
    --lazy-apps), so a web application that configured gsemail at import
    has, in each worker, its master's processors and locks but not their
    threads.  Every entry point checks the pid first."""
    if _pid != os.getpid():
        # Python's own hooks did not run either: logging's locks may be held
        # by a thread of the parent's (our processor's, logging as it was
        # forked), and our processor logs.  This is what those hooks do.
        reinit = getattr(logging, "_after_at_fork_child_reinit_locks", None)
        if reinit is not None:
            try:
                reinit()
            except Exception:
                pass
        _after_fork()


def _queue_from(config: SMTPConfig, create: bool = True, readonly: bool = False) -> Queue:
    """A Queue opened as config says (queuepath, claim_timeout, xverp)."""
    return Queue(config.queuepath, config.claim_timeout, create=create, xverp=config.xverp,
                 readonly=readonly)


def _uwsgi_master() -> Any:     # the uwsgi module, which has no types
    """uWSGI's ``uwsgi`` module when this is its master loading the
    application before it forks the workers (no --lazy-apps); else None.

    A thread must not run there: uWSGI forks with libc's fork() and never
    calls PyOS_AfterFork_Child, so a worker forked while our thread waited
    for the GIL inherits the GIL's lock and condition mid-use and hangs the
    first time two of its threads take turns (seen: 1 start in 5 under
    load, stuck in drop_gil).  Nothing Python can do in the child mends that."""
    uwsgi = sys.modules.get("uwsgi")
    try:
        return uwsgi if uwsgi is not None and uwsgi.worker_id() == 0 else None
    except Exception:
        return None


_after_uwsgi_fork: Dict[str, SMTPConfig] = {}   # processors that wait for the fork


def _queue_for(config: SMTPConfig) -> Queue:
    _check_fork()
    with _lock:
        queue = _queues.get(config.queuepath)
        if queue is None:
            queue = _queues[config.queuepath] = _queue_from(config)
        processor = _processors.get(config.queuepath)
        if config.processorthread and (processor is None or not processor.alive):
            uwsgi = _uwsgi_master()
            if uwsgi is not None:
                # Started in each worker instead (see _uwsgi_master), chained
                # after any post_fork_hook the application set: the hook,
                # _start_after_uwsgi_fork below, comes back here.
                if not _after_uwsgi_fork:
                    before = getattr(uwsgi, "post_fork_hook", None)

                    def hook() -> None:
                        if callable(before):
                            before()
                        _start_after_uwsgi_fork()
                    uwsgi.post_fork_hook = hook
                _after_uwsgi_fork[config.queuepath] = config
                return queue
            processor = QueueProcessor(config, queue)
            _processors[config.queuepath] = processor
            processor.start()
        return queue


def _start_after_uwsgi_fork() -> None:
    """uWSGI's post_fork_hook: each worker starts the processors that the
    master put off, at once, so a backlog is delivered without waiting for
    the first send_email."""
    _check_fork()
    for config in list(_after_uwsgi_fork.values()):
        try:
            _queue_for(config)
        except GsEmailError as e:
            log.error("%s queue processor for %s not started: %s", e.status,
                      config.queuepath, e)


_transaction: Any = None     # the transaction package, once transactional = true needed it


def _transaction_package(config: SMTPConfig) -> Any:   # transaction has no types
    """The ``transaction`` package that transactional = true joins,
    imported when first needed: gsemail itself needs the standard library
    only, and the processor (python -m gsemail) needs no transactions."""
    global _transaction
    if _transaction is None:
        try:
            _transaction = importlib.import_module("transaction")
        except ImportError as e:
            where = (" in %s" % config.source) if config.source else ""
            raise ConfigError("option transactional = true%s: the transaction package "
                              "cannot be imported (%s): install it for this Python (pip "
                              "install transaction), or set transactional = false"
                              % (where, e)) from None
    return _transaction


class _OutboxMessage(NamedTuple):
    """What send_email would have queued, as outbox() keeps it."""

    sender: str
    recipients: List[str]       # bare, checked, without duplicates
    message: email.message.EmailMessage     # data parsed with email.policy.default, LF ends
    data: bytes                 # the bytes that would go, CRLF, Message-ID and Date added
    xverp: bool                 # as the caller asked (the config is not read)


# The lists of the outbox() blocks now open, innermost last: while there is
# one, send_email keeps its messages there and never reads the config,
# opens a queue or starts a thread.
_outboxes: List[List[_OutboxMessage]] = []


def _to_outboxes(sender: str, rcpts: List[str], data: bytes, xverp: bool) -> None:
    # parsed with LF line ends, so that its text is as Python code writes it
    parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(
        data.replace(b"\r\n", b"\n"))
    sent = _OutboxMessage(sender, rcpts, parsed, data, bool(xverp))
    for kept in list(_outboxes):
        kept.append(sent)


def configure(config: Union[str, SMTPConfig], instance: str = "default") -> SMTPConfig:
    """Set the configuration send_email uses in this process.

    ``config`` is the path of a gsconfig.ini (read with load_config) or an
    SMTPConfig.  With processorthread = true the queue processor thread
    starts now and delivers any backlog at once.  With transactional = true
    the ``transaction`` package must be importable (else ConfigError).
    """
    global _config
    if not isinstance(config, SMTPConfig):
        config = load_config(config, instance)
    if config.transactional:
        _transaction_package(config)    # now, not at the first message
    if _outboxes:
        return config       # inside outbox(): read and checked, nothing set or started
    with _lock:
        _config = config
    _queue_for(config)
    return config


def _current_config() -> SMTPConfig:
    with _lock:
        config = _config
    if config is not None:
        return config
    path, instance = os.environ.get("GSEMAIL_CONFIG"), os.environ.get("GSEMAIL_INSTANCE")
    if not path and os.environ.get("INSTANCE_HOME"):
        path = os.path.join(os.environ["INSTANCE_HOME"], "etc", "gsconfig.ini")
    if not path:
        raise ConfigError("gsemail is not configured: call gsemail.configure(path, "
                          "instance), or set $GSEMAIL_CONFIG (and $GSEMAIL_INSTANCE) "
                          "or $INSTANCE_HOME")
    return configure(path, instance or "default")


def _log_queued(name: str, sender: str, rcpts: List[str], data: bytes, path: str) -> None:
    """The first line of a message's story in the log (INFO), which a grep
    for a recipient finds with the outcome lines (README's "Delivery
    lines"); made only when INFO is logged."""
    if log.isEnabledFor(logging.INFO):
        log.info("2.0.0 %s: queued %s from=<%s> msgid=%s size=%d queue=%s", name, _to(rcpts),
                 _shown(sender), _message_id(data) or "none", len(data), path)


def _queue_now(config: SMTPConfig, queue: Queue, sender: str, rcpts: List[str],
               data: bytes, xverp: bool) -> str:
    """Queue a checked, prepared message at once (send_email without a
    transaction, EmailBackend, send and sendmail mode), log it and wake this
    process's processor for that queue, if it runs one; its name."""
    name = queue._add(sender, rcpts, data, xverp=_with_xverp(xverp, sender, config))
    _log_queued(name, sender, rcpts, data, queue.path)
    processor = _processors.get(config.queuepath)
    if processor is not None:
        processor.wake()
    return name


class _Mail(NamedTuple):
    """A message send_email took in a transaction, checked and prepared."""

    queue: Queue
    sender: str
    recipients: List[str]
    data: bytes
    xverp: bool


class _MailSavepoint(NamedTuple):
    """_MailDataManager's savepoint (transaction's IDataManagerSavepoint):
    its rollback keeps the messages taken before it."""

    manager: "_MailDataManager"
    kept: int       # how many messages the manager had when it was taken

    def rollback(self) -> None:
        del self.manager._mails[self.kept:]     # before the vote: nothing on disk yet


class _MailDataManager:
    """The messages send_email took in one transaction (transactional =
    true), queued if it commits: a data manager of the ``transaction``
    package (IDataManager, ISavepointDataManager), one per transaction, as
    zope.sendmail's QueuedMailDelivery joined one per message.

    send_email checks and prepares each message at once (its errors are
    the request's) and this keeps it in memory until the commit.  The vote
    writes and fsyncs each into tmp/ (Queue._stage); a vote that cannot (a
    full disk) raises the QueueError, so the transaction aborts, and
    leaves nothing.  The finish renames them into new/ (Queue._publish)
    and wakes the processor; it never raises, for the transaction has
    committed: a message it cannot queue stays whole in tmp/ and is logged.
    abort and tpc_abort forget every message (and remove what the vote
    wrote); a savepoint's rollback forgets those taken after it.
    """

    def __init__(self, package: Any) -> None:
        self.transaction_manager = package.manager     # IDataManager's attribute
        self._mails: List[_Mail] = []
        self._staged: List[Tuple[_Mail, str]] = []     # written by the vote, with names
        self._joined = True

    @classmethod
    def joined(cls, package: Any) -> "_MailDataManager":
        """The current transaction's data manager, joined to it if new (or
        if the one it had left by an abort: a savepoint's rollback)."""
        txn = package.get()
        try:
            manager: Optional[_MailDataManager] = txn.data(cls)
        except KeyError:
            manager = None
        if manager is None or not manager._joined:
            manager = cls(package)
            txn.join(manager)
            txn.set_data(cls, manager)
        return manager

    def __repr__(self) -> str:     # as the transaction package logs a failed manager
        return "<gsemail mail of a transaction: %d message(s)>" % len(self._mails)

    def sortKey(self) -> str:
        # Last ("~" after the letters, digits and "/" of ZODB's keys), so the
        # database votes first: a ConflictError there costs no fsyncs here,
        # and a committed database is not undone by a mail that failed.
        return "~gsemail"

    def savepoint(self) -> _MailSavepoint:
        return _MailSavepoint(self, len(self._mails))

    def abort(self, txn: Any) -> None:
        self._forget()

    def tpc_begin(self, txn: Any) -> None:
        pass

    def commit(self, txn: Any) -> None:
        pass

    def tpc_vote(self, txn: Any) -> None:
        try:
            for mail in self._mails:
                name = mail.queue._stage(mail.sender, mail.recipients, mail.data, mail.xverp)
                self._staged.append((mail, name))
        except BaseException:
            self._unstage()     # the transaction aborts: nothing may stay in tmp/
            raise

    def tpc_finish(self, txn: Any) -> None:
        staged = self._staged
        self._staged, self._mails, self._joined = [], [], False
        woken = set()
        for i, (mail, name) in enumerate(staged):
            queue = mail.queue
            try:
                queue._publish(name, committed=True)
            except Exception as e:      # never raise: the transaction has committed
                self._unqueued(e, staged[i:i + 1])
                continue
            except BaseException as e:  # Ctrl-C, SystemExit: say what is left, then go
                self._unqueued(e, staged[i:])
                raise
            _log_queued(name, mail.sender, mail.recipients, mail.data, queue.path)
            woken.add(queue.path)
        for path in woken:
            processor = _processors.get(path)
            if processor is not None:
                processor.wake()

    @staticmethod
    def _unqueued(e: BaseException, left: List[Tuple[_Mail, str]]) -> None:
        status = e.status if isinstance(e, GsEmailError) else "4.3.0"
        for mail, name in left:
            path = mail.queue.path
            log.error("%s %s: the transaction committed, but the message could not be "
                      "queued: %s; it is whole in %s: move it into %s within %s to send it "
                      "(stale tmp/ files are removed)", status, name, e,
                      os.path.join(path, "tmp", name), os.path.join(path, "new", ""),
                      _span(_STALE_TMP))

    def tpc_abort(self, txn: Any) -> None:
        self._forget()

    def _forget(self) -> None:
        """Leave the transaction, dropping every message (an abort, or the
        rollback of a savepoint taken before this joined)."""
        mails, self._mails, self._joined = self._mails, [], False
        self._unstage()
        if mails and log.isEnabledFor(logging.INFO):
            # What a ConflictError's retry sends again, or a doomed request
            # never sent: the log shows it was meant so.
            log.info("2.0.0 %d message(s) not queued: their transaction was aborted "
                     "(msgid=%s)", len(mails),
                     ",".join(_message_id(m.data) or "none" for m in mails))

    def _unstage(self) -> None:
        staged, self._staged = self._staged, []
        for mail, name in staged:
            mail.queue._discard(name)


def send_email(sender: str, recipients: Union[str, Iterable[str]],
               email: Union[bytes, str, email.message.Message],
               xverp: bool = False) -> None:
    """Queue a message for delivery and return once it is safely on disk.

    ``sender`` is the envelope sender ('' for a bounce), ``recipients`` a
    str or an iterable of str, ``email`` a whole message (bytes, str or
    email.message.Message).  The message goes with XVERP when xverp is true
    or the config says xverp = True.  Raises ValueError (MessageError) for a
    bad address or message, ConfigError or QueueError when it cannot be
    queued; nothing is queued when it raises.

    With transactional = true it is checked now but queued only when the
    current transaction commits (see _MailDataManager), and never if it
    aborts; errors of the transaction package itself (NoTransaction, a
    transaction that already failed) are raised as they are.
    """
    rcpts, data = _prepared(sender, recipients, email, xverp)
    if _outboxes:
        _to_outboxes(sender, rcpts, data, xverp)
        return
    config = _current_config()
    queue = _queue_for(config)
    if config.transactional:
        manager = _MailDataManager.joined(_transaction_package(config))
        manager._mails.append(_Mail(queue, sender, rcpts, data,
                                    _with_xverp(xverp, sender, config)))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("2.0.0 %s from=<%s> msgid=%s: queued when the current transaction "
                      "commits", _to(rcpts), _shown(sender), _message_id(data) or "none")
        return
    _queue_now(config, queue, sender, rcpts, data, xverp)


@contextlib.contextmanager
def outbox() -> Iterator[List[_OutboxMessage]]:
    """For an application's tests: ``with gsemail.outbox() as sent:``
    send_email keeps each message in the list ``sent`` instead of queuing
    it, as Django's mail.outbox does, until the block ends.

    Each item has ``sender``, ``recipients``, ``message`` (an
    email.message.EmailMessage, parsed with email.policy.default), ``data``
    (the bytes that would be queued) and ``xverp``.  send_email checks and
    prepares the message as ever (the same errors) but reads no
    configuration, opens no queue and starts no thread, in every thread of
    the process; configure() inside the block reads and checks its config
    and changes nothing.  Whatever was configured before is untouched, and
    in effect again after the block.  Blocks nest: each open one gets every
    message.
    """
    kept: List[_OutboxMessage] = []
    _outboxes.append(kept)
    try:
        yield kept
    finally:
        # not there when _reset_for_tests ran inside the block
        for i, other in enumerate(_outboxes):
            if other is kept:
                del _outboxes[i]
                break


def shutdown(timeout: Optional[float] = None) -> None:
    """Stop every processor thread this process started (run at exit)."""
    _check_fork()
    with _lock:
        processors = list(_processors.values())
        _processors.clear()
    for processor in processors:
        processor.stop(timeout)


def _reset_for_tests(timeout: Optional[float] = 10.0) -> None:
    """Put send_email back as a fresh import leaves it: for test suites only.

    Stops every processor thread as shutdown() does, then forgets the
    configuration and the queues, so that the next send_email() configures
    itself again (from $GSEMAIL_CONFIG or $INSTANCE_HOME) and opens its
    queue anew.  Tests call this instead of writing _config, _queues or
    _processors themselves, so those names can change with the code.
    """
    global _config
    shutdown(timeout)
    with _lock:
        _config = None
        _queues.clear()     # shutdown() forgot the processors
        _after_uwsgi_fork.clear()
    del _outboxes[:]


# At exit, wait a little for the message in flight.  If it is cut short, the
# claim's lock dies with the process and the message is sent again later.
atexit.register(shutdown, 10.0)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


# ---------------------------------------------------------------------------
# Django: EmailBackend, for EMAIL_BACKEND = "gsemail.EmailBackend" or a
# MAILERS entry (Django 6.1).  It queues each message as send_email does,
# from the envelope Django's SMTP backend would give.  Django is never
# imported here: a backend exists only inside a Django that has imported its
# settings already, so those are read from sys.modules, and importing or
# constructing the backend starts and creates nothing (manage.py migrate,
# shell and test touch no queue).
# ---------------------------------------------------------------------------

def _django_setting(name: str) -> Any:
    """settings.NAME of the Django project this process runs, or None (no
    Django loaded, its settings not configured, or no such setting)."""
    conf = sys.modules.get("django.conf")
    settings = getattr(conf, "settings", None)
    if settings is None or not getattr(settings, "configured", False):
        return None
    return getattr(settings, name, None)


def _django_address(address: object, what: str) -> str:
    """The bare address that Django's SMTP backend puts in MAIL FROM or RCPT
    TO for a from_email, to, cc or bcc: the display name dropped (``Site
    <noreply@example.org>``, a non-ASCII or RFC 2047 name included) and a
    non-ASCII domain IDNA-encoded, as sanitize_address (Django 4.2, 5.2) and
    prep_address (6.1) do.  MessageError when it is not one address."""
    if isinstance(address, tuple) and len(address) == 2:
        address = address[1]    # (name, address), which Django before 6.1 takes
    text = str(address)         # also a lazy translation (gettext_lazy)
    status = "5.1.7" if what == "sender" else "5.1.3"
    if _CONTROL.search(text):
        # The parser would skip a CR or LF and join what is around it.
        raise MessageError("%s %r contains a control character (CR, LF, NUL, ...)"
                           % (what, text), status=status)
    parsed = email.headerregistry.AddressHeader.value_parser(text)
    # Django allows a mailbox without a domain ("webmaster"): the check in
    # _prepared says why it cannot go on the envelope.
    defects = sorted({str(d) for d in parsed.all_defects} -
                     {"addr-spec local part with no domain"})
    mailboxes = parsed.all_mailboxes
    if defects or len(mailboxes) != 1:
        raise MessageError("%s %r is not one address%s" % (
            what, text, (": " + "; ".join(defects)) if defects else ""), status=status)
    mailbox = mailboxes[0]
    domain = mailbox.domain or ""
    if domain.isascii():
        return str(mailbox.addr_spec)
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise MessageError("%s %r has a domain that IDNA cannot encode: %s"
                           % (what, text, e), status=status) from None
    return str(email.headerregistry.Address(username=mailbox.local_part, domain=domain))


class EmailBackend:
    """Django's email backend that queues through gsemail.

    ``EMAIL_BACKEND = "gsemail.EmailBackend"`` with the settings
    ``GSEMAIL_CONFIG`` (a gsconfig.ini's path), ``GSEMAIL_INSTANCE``,
    ``GSEMAIL_ENVELOPE_SENDER`` and ``GSEMAIL_XVERP``; or, in Django 6.1's
    ``MAILERS``, ``"BACKEND": "gsemail.EmailBackend"`` with the OPTIONS
    ``config``, ``instance``, ``envelope_sender``, ``xverp`` and
    ``fail_silently`` (which also override the settings when given to
    get_connection).  Without a config, send_email's is used (configure(),
    ``$GSEMAIL_CONFIG`` or ``$INSTANCE_HOME``).

    Each message is queued as send_email queues it (inside outbox() it is
    kept there), but always at once: transactional = true, for Zope, is not
    for Django, where nothing would commit it.  The envelope sender is
    the message's ``envelope_sender`` attribute (as django-anymail names
    it), else the backend's, else from_email's bare address; the recipients
    are message.recipients() (to, cc and bcc); a Bcc header is removed.
    send_messages returns how many were queued; a message without
    recipients is skipped.  With fail_silently, a GsEmailError or an OSError
    is logged (WARNING) and the next message tried; else it is raised.
    Nothing is read, created or started before the first message is sent.
    """

    def __init__(self, fail_silently: bool = False, *, alias: Optional[str] = None,
                 config: Union[str, "os.PathLike[str]", SMTPConfig, None] = None,
                 instance: Optional[str] = None, envelope_sender: Optional[str] = None,
                 xverp: Optional[bool] = None,
                 _ignore_unknown_kwargs: Optional[Iterable[str]] = None,
                 **kwargs: Any) -> None:
        # What Django 6.1's deprecated get_connection(**kwargs) passes on and
        # says may be dropped when the backend does not know it.
        for name in _ignore_unknown_kwargs or ():
            kwargs.pop(name, None)
        # send_mail and send_mass_mail of Django 4.2 and 5.2 always pass
        # their auth_user and auth_password, None unless the caller gave them.
        for name in ("username", "password"):
            if name in kwargs and kwargs[name] is None:
                del kwargs[name]
        where = ("MAILERS[%r]" % alias) if alias is not None else "gsemail.EmailBackend"
        if kwargs:
            hint = (" (the relay's credentials are gsconfig.ini's username and password)"
                    if {"username", "password"} & set(kwargs) else "")
            raise TypeError("gsemail.EmailBackend does not take %s%s; its options are "
                            "config, instance, envelope_sender, xverp and fail_silently"
                            % (", ".join(repr(k) for k in sorted(kwargs)), hint))
        self.alias = alias
        self.fail_silently = bool(fail_silently)

        def option(value: Any, setting: str, types: Tuple[type, ...], name: str) -> Any:
            how = "option %r in %s" % (name, where)
            if value is None:
                value, how = _django_setting(setting), "setting " + setting
            if value is not None and not isinstance(value, types):
                raise ConfigError("%s = %r: must be %s" % (how, value, " or ".join(
                    t.__name__ for t in types)))
            return value

        config = option(config, "GSEMAIL_CONFIG", (str, os.PathLike, SMTPConfig), "config")
        self._config_given: Union[str, SMTPConfig, None] = (
            config if config is None or isinstance(config, SMTPConfig) else os.fspath(config))
        self._instance: Optional[str] = option(instance, "GSEMAIL_INSTANCE", (str,), "instance")
        if self._instance is not None and self._config_given is None:
            raise ConfigError("%s: an instance (%r) needs a config too, the path of its "
                              "gsconfig.ini" % (where, self._instance))
        self.xverp: bool = bool(option(xverp, "GSEMAIL_XVERP", (bool,), "xverp"))
        sender = option(envelope_sender, "GSEMAIL_ENVELOPE_SENDER", (str,), "envelope_sender")
        if sender:
            try:
                sender = _django_address(sender, "sender")
                _check_sender(sender, self.xverp)
            except MessageError as e:
                raise ConfigError("%s: envelope_sender: %s" % (where, e)) from None
        elif sender == "" and self.xverp:
            raise ConfigError("%s: an empty envelope_sender (<>) cannot be used with "
                              "xverp: XVERP rewrites the sender" % where)
        #: the envelope sender of every message (None: its from_email's)
        self.envelope_sender: Optional[str] = sender
        self._config: Optional[SMTPConfig] = None

    def _smtp_config(self) -> SMTPConfig:
        """The configuration, read at the first message (a backend lives
        for one send_mail, or one ``with`` block)."""
        if self._config is None:
            given = self._config_given
            if isinstance(given, SMTPConfig):
                self._config = given
            elif given is not None:
                self._config = load_config(given, self._instance or "default")
            else:
                self._config = _current_config()
        return self._config

    def open(self) -> None:
        """Nothing to open: the queue is opened, and its processor started,
        when the first message is queued."""

    def close(self) -> None:
        """Nothing to close: the processor serves the whole process, and
        stops at its exit (shutdown)."""

    def __enter__(self) -> "EmailBackend":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_messages(self, email_messages: Iterable[Any]) -> int:
        """Queue each of Django's EmailMessages; return how many were queued."""
        queued = 0
        for message in email_messages or ():
            if not message.recipients():
                continue        # as every Django backend: nothing to send
            try:
                self._queue(message)
            except (GsEmailError, OSError) as e:
                if not self.fail_silently:
                    raise
                log.warning("%s not queued (fail_silently) from=%s %s: %s",
                            getattr(e, "status", "4.3.0"), _quoted(str(message.from_email)),
                            _to([str(r) for r in message.recipients()]), _one_line(str(e)))
                continue
            queued += 1
        return queued

    def _queue(self, message: Any) -> str:
        sender = getattr(message, "envelope_sender", None)
        if sender is None:
            sender = self.envelope_sender
        if sender is None:
            sender = message.from_email
        sender = _django_address(sender, "sender") if sender else ""
        rcpts = [_django_address(r, "recipient") for r in message.recipients()]
        mime = message.message()
        # Django puts bcc on the envelope only; a Bcc header given in
        # headers= (Django 4.2 and 5.2 let one through) must not go out.
        del mime["Bcc"]
        rcpts, data = _prepared(sender, rcpts, mime, self.xverp)
        if _outboxes:       # an application's test: kept as send_email keeps it
            _to_outboxes(sender, rcpts, data, self.xverp)
            return ""
        # At once, whatever transactional says: nothing commits Django's mail.
        config = self._smtp_config()
        return _queue_now(config, _queue_for(config), sender, rcpts, data, self.xverp)


# ---------------------------------------------------------------------------
# The command line: python -m gsemail --config gsconfig.ini --instance main
# [COMMAND].  Without a command it runs the queue processor; the commands
# are the operator's tools, each a thin layer over a documented method.
# ---------------------------------------------------------------------------

class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(os.EX_USAGE, "5.5.4 %s: %s\n" % (self.prog, message))


_EPILOG = """\
exit status (sysexits.h): 0 done (with --once: the queue is empty);
64 usage error; 65 bad message; 66 no such queue; 69 relay unavailable;
73 cannot create the queue; 74 queue I/O error; 75 temporary failure (with
--once: messages wait for a retry); 78 configuration error.  Every error
line starts with an RFC 3463 status code.

environment: GSEMAIL_CONFIG and GSEMAIL_INSTANCE are the defaults for
--config and --instance."""


def _common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    # Given to the main parser and to every command, so they may come before
    # or after the command; a command's copies leave the main ones alone.
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("-c", "--config", default=default(os.environ.get("GSEMAIL_CONFIG")),
                        help="the gsconfig.ini file ($GSEMAIL_CONFIG)")
    parser.add_argument("-i", "--instance",
                        default=default(os.environ.get("GSEMAIL_INSTANCE", "default")),
                        help="the instance: reads [config-INSTANCE] and its smtp "
                             "option, or [smtp-INSTANCE] (default: $GSEMAIL_INSTANCE "
                             "or default)")
    parser.add_argument("-v", "--verbose", action="count", default=default(0),
                        help="log each message queued and each attempt, as the "
                             "processor does without it (-vv: debug messages too; -vvv: "
                             "the SMTP transcript too, redacted, as debug = true)")


# The command line's numbers, bounded as the config's are: a threshold of
# 1e20 or NaN, or purge --dead-older-than -1 (every dead letter), is a typo.
_MOST_SECONDS = 3650 * 86400.0      # ten years
_MOST_DAYS = 36500.0                # a hundred years
_MOST_COUNT = 10 ** 9


def _duration_option(text: str) -> float:
    try:
        value = _duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a duration such as 90, 30m, 4h "
                                         "or 2d" % text) from None
    if value > _MOST_SECONDS:
        raise argparse.ArgumentTypeError("%r is more than the %dd allowed"
                                         % (text, _MOST_SECONDS // 86400))
    return value


def _count_option(text: str) -> int:
    try:
        value = _integer(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a whole number of 0 or more"
                                         % text) from None
    if value > _MOST_COUNT:
        raise argparse.ArgumentTypeError("%r is more than the %d allowed"
                                         % (text, _MOST_COUNT))
    return value


def _days_option(text: str) -> float:
    """An age in days: a duration like every other option's (30d, 12h, 2w),
    or a bare number, which is days (as the option first took it)."""
    try:
        if re.fullmatch(r"\s*[0-9]+(?:\.[0-9]*)?\s*", text):
            value = float(text)
        else:
            value = _duration(text) / 86400
    except ValueError:
        value = -1.0
    if not 0 <= value <= _MOST_DAYS:
        raise argparse.ArgumentTypeError("%r is not an age such as 30d, 12h or 2w (a bare "
                                         "number is days), from 0 to %dd" % (text, _MOST_DAYS))
    return value


def _summary(stats: Dict[str, int], waiting: int, elapsed: float) -> str:
    """The one line that --once always ends with, so that a cron job's mail
    (or its log) says what the run did."""
    done = sum(stats.values())
    if not done:
        return "2.0.0 --once: nothing was due; %d wait for a retry" % waiting
    return ("2.0.0 --once: %d messages in %.1f s (%.1f/s): %d delivered, %d deferred, "
            "%d dead; %d wait for a retry" % (done, elapsed, done / max(elapsed, 1e-3),
                                              stats["delivered"], stats["deferred"],
                                              stats["dead"], waiting))


class _Progress:
    """How a --once drain goes, on one self-rewriting terminal line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self.shown_at: Optional[float] = None
        self.showing = False

    def __call__(self, stats: Dict[str, int], remaining: int) -> None:
        now = time.monotonic()
        if self.shown_at is not None and now - self.shown_at < 0.25:
            return
        self.shown_at = now
        done = sum(stats.values())
        self.stream.write("\r\x1b[K%d messages: %d delivered, %d deferred, %d dead; "
                          "%.1f/s; %d remaining" % (
                              done, stats["delivered"], stats["deferred"], stats["dead"],
                              done / max(now - self.started, 1e-3), remaining))
        self.stream.flush()
        self.showing = True

    def clear(self) -> None:
        if self.showing:
            self.stream.write("\r\x1b[K")
            self.showing = False

    def finish(self, stats: Dict[str, int], waiting: int) -> None:
        """Clear the progress line and write the run's summary (_summary)."""
        self.clear()
        self.stream.write(_summary(stats, waiting, time.monotonic() - self.started) + "\n")
        self.stream.flush()


if TYPE_CHECKING:   # generic in typeshed; subscriptable at run time only from 3.11
    _StreamHandler = logging.StreamHandler[TextIO]
else:
    _StreamHandler = logging.StreamHandler


class _LogHandler(_StreamHandler):
    """Log lines to stderr, clearing the progress line first."""

    progress: Optional[_Progress] = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.progress is not None:
            self.progress.clear()
        super().emit(record)


def _cmd_run(config: SMTPConfig, args: argparse.Namespace) -> int:
    """No command: the queue processor, in the foreground."""
    processor = QueueProcessor(config)
    stops = []

    def on_signal(signum: int, frame: object) -> None:
        stops.append(signum)
        if len(stops) > 1:
            raise KeyboardInterrupt
        log.warning("4.3.2 %s: finishing the message in flight, then stopping",
                    signal.Signals(signum).name)
        processor.stop(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if not args.verbose and not args.quiet:
        # Without -v the processor still says what it does, as a newcomer (or
        # a journal) needs: that it started, on which queue and relay, and a
        # line per delivery and deferral (INFO).  -q: warnings and errors only.
        log.setLevel(logging.INFO)
    if not args.once:
        processor.run()     # which logs its start
        return os.EX_OK
    log.info("2.0.0 queue processor for %s started (relay %s): --once, until nothing is due",
             processor.queue.path, ", ".join(_where(*r) for r in config.relays))
    progress = None
    if sys.stderr.isatty():
        progress = _Progress(sys.stderr)
        for h in log.handlers:
            if isinstance(h, _LogHandler):
                h.progress = progress
    started = time.monotonic()
    processor.drain(progress)
    # Not those another live process is sending now (two --once runs on
    # one queue): they wait for nobody, and a 75 would say they did.
    counts = processor.queue.status()["counts"]
    waiting = counts["new"] + counts["deferred"]
    if progress is not None:
        progress.finish(processor.stats, waiting)
    else:
        print(_summary(processor.stats, waiting, time.monotonic() - started), file=sys.stderr)
    if waiting:
        print("4.4.1 %d message(s) in %s wait for a retry"
              % (waiting, config.queuepath), file=sys.stderr)
        return os.EX_TEMPFAIL
    return os.EX_OK


def _open_queue(config: SMTPConfig, readonly: bool = False) -> Queue:
    """The queue an operator's command works on: it must exist already."""
    return _queue_from(config, create=False, readonly=readonly)


def _size(n: int) -> str:
    if n < 1024:
        return str(n)
    if n < 1024 * 1024:
        return "%.1fK" % (n / 1024)
    return "%.1fM" % (n / 1024 / 1024)


def _next(e: QueueEntry, now: float) -> str:
    if e.state == "sending" and e.claim_alive is False:
        return "now"        # its claim is broken at a processor's next pass
    if e.state in ("dead", "sending"):
        return "never" if e.state == "dead" else "sending"
    if e.next_attempt is None or e.next_attempt <= now:
        return "now"
    return "in " + _age(e.next_attempt - now)


def _entry_json(e: QueueEntry, now: float) -> Dict[str, object]:
    return {
        "id": e.id, "state": e.state, "path": e.path, "size": e.size,
        "sender": e.sender, "recipients": e.recipients,
        "recipient_count": len(e.recipients), "queued": _iso(e.queued),
        "age": _whole_seconds(now - e.queued), "attempts": e.attempts,
        "next_attempt": (_iso(e.next_attempt) if e.next_attempt is not None
                         and e.state in ("new", "deferred") else None),
        "last_error": e.last_error or None, "xverp": e.xverp, "claim": e.claim or None,
        "claim_alive": e.claim_alive,
        "failed": e.failed,
        "dead_since": _iso(e.dead_since) if e.dead_since is not None else None,
    }


# list's columns are as wide as their widest cell among the first rows: a
# queue of up to this many is printed as one table; in a longer one a cell
# wider than its column pushes the rest of its row to the right, as ps does,
# and the first line is out before the rest of the queue is read.
_LIST_WINDOW = 1000


def _print_list_json(entries: Iterable[QueueEntry], now: float) -> None:
    """entries as one JSON array written as each is read, one message's
    object a line (as postqueue -j writes them, and grep finds them): json
    with an indent is encoded in Python, five times slower than this."""
    out = sys.stdout
    out.write("[")
    sep = "\n"
    dumps = json.JSONEncoder(separators=(", ", ": ")).encode
    for e in entries:
        out.write(sep + dumps(_entry_json(e, now)))
        sep = ",\n"
    out.write("]\n" if sep == "\n" else "\n]\n")


def _cmd_list(config: SMTPConfig, args: argparse.Namespace) -> int:
    queue = _open_queue(config, readonly=True)
    entries = queue._stream()
    now = time.time()
    if args.json:
        _print_list_json(entries, now)
        return os.EX_OK
    counts = dict.fromkeys(_STATES, 0)
    total = size = 0
    rows = [("QUEUE ID", "STATE", "AGE", "SIZE", "SENDER", "RCPTS", "TRIES", "NEXT",
             "LAST ERROR")]
    widths: List[int] = []

    write = sys.stdout.write        # print() a row would cost a fifth of list's time

    def put(row: Tuple[str, ...]) -> None:
        write("  ".join([c.ljust(w) for c, w in zip(row, widths)]) + "  " + row[-1] + "\n")

    for e in entries:
        counts[e.state] += 1
        total += 1
        size += e.size
        last = _one_line(e.last_error) or "-"
        if e.claim_alive is False:      # a dead holder: say so where the trouble is said
            last = "claimed by %s%s" % (e.claim, "" if last == "-" else "; " + last)
        row = (e.id, e.state, _age(now - e.queued), _size(e.size), e.sender or "<>",
               str(len(e.recipients)), str(e.attempts), _next(e, now), last)
        if widths:
            put(row)
            continue
        rows.append(row)
        if len(rows) > _LIST_WINDOW:
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
            for r in rows:
                put(r)
            rows = []
    if not total:
        print("queue %s is empty" % queue.path)
        return os.EX_OK
    if not widths:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            put(r)
    print("-- %d message(s), %s bytes: %s" % (
        total, format(size, ","), ", ".join("%d %s" % (n, s) for s, n in counts.items())))
    return os.EX_OK


def _cmd_show(config: SMTPConfig, args: argparse.Namespace) -> int:
    queue = _open_queue(config, readonly=True)
    now = time.time()
    for i, e in enumerate(queue.find([args.id])):
        data = queue.read_message(e)
        if i:
            print()
        state = e.state
        if e.state == "deferred" and e.next_attempt:
            state += ": next attempt %s (%s)" % (_next(e, now), _iso(e.next_attempt))
        elif e.state == "dead" and e.dead_since:
            state += " since %s (%s ago): never sent again unless retried" % (
                _iso(e.dead_since), _age(now - e.dead_since))
        lines = [("id", e.id), ("state", state), ("file", e.path),
                 ("queued", "%s (%s ago)" % (_iso(e.queued), _age(now - e.queued))),
                 ("size", "%d bytes" % e.size), ("sender", "<%s>" % e.sender),
                 ("xverp", "yes" if e.xverp else "no"),
                 ("recipients", "%d %s" % (len(e.recipients), "that failed" if e.state == "dead"
                                           else "still to do"))]
        lines += [("", "<%s>" % r) for r in e.recipients]
        lines += [("attempts", str(e.attempts))]
        if e.last_error:
            lines.append(("last error", _one_line(e.last_error)))
        lines += [("refused", "<%s> %s" % (r, why)) for r, why in e.failed.items()]
        if e.claim:
            lines.append(("claimed by", e.claim))
        for event in e.history:
            when = _when(event.get("at"))
            at = _iso(when) if when is not None else "(no time)"
            if "event" in event:
                text = str(event["event"])
            else:
                # attempt, took and sent are newer: a record may lack them
                attempt, took, sent = (event.get(k) for k in ("attempt", "took", "sent"))
                text = "attempt%s via %s%s: %s delivered%s, %s deferred, %s refused%s" % (
                    "" if attempt is None else " %s" % attempt, event.get("via"),
                    " (took %ss)" % took if isinstance(took, (int, float)) and
                    not isinstance(took, bool) else "",
                    event.get("delivered"),
                    " (%s)" % "; ".join(map(str, sent)) if isinstance(sent, list) and sent
                    else "", event.get("deferred"), event.get("refused"),
                    ": %s" % event["reply"] if "reply" in event else "")
            lines.append(("history", "%s %s" % (at, text)))
        for n, (label, value) in enumerate(lines):
            if label == "history" and lines[n - 1][0] == "history":
                label = ""
            print("%-12s%s" % (label, value))
        print()
        end = data.find(b"\r\n\r\n")
        shown = data if args.body or end < 0 else data[:end + 2]
        sys.stdout.flush()
        sys.stdout.buffer.write(shown.replace(b"\r\n", b"\n"))
        sys.stdout.buffer.flush()
    return os.EX_OK


_LEVELS = ("ok", "warning", "critical", "unknown")    # status's verdicts, by exit code
_UNKNOWN = 3        # status could not check: Nagios' UNKNOWN


class _StatusReport(NamedTuple):
    """``gsemail status``: the queue's facts, judged by the thresholds."""
    facts: _StatusFacts
    now: float
    oldest: Optional[float]             # when the oldest waiting message was queued
    oldest_age: Optional[float]         # and how long ago; None if none waits
    due_age: Optional[float]            # how long the longest due has been due; None: none
    problems: List[Tuple[int, str]]     # (level, what) for each threshold passed
    level: int                          # the worst: 0 ok, 1 warning, 2 critical; the exit code


def _status_report(facts: _StatusFacts, args: argparse.Namespace, now: float
                   ) -> _StatusReport:
    """The facts judged by the thresholds in args (a threshold of 0 is off)."""
    counts, waiting = facts["counts"], facts["waiting"]
    oldest = _when(facts["oldest_queued"])
    oldest_age = now - oldest if oldest is not None else None
    due_since = _when(facts["oldest_due"])
    due_age = max(0.0, now - due_since) if due_since is not None else None
    problems: List[Tuple[int, str]] = []

    def judge(value: Optional[float], warning: float, critical: float, what: str,
              shown: str) -> None:
        for level, limit, option in ((2, critical, "critical"), (1, warning, "warning")):
            if value is not None and limit and value >= limit:
                problems.append((level, "%s (--%s-%s)" % (shown, option, what)))
                return

    live = facts["processors"]
    judge(due_age, args.warning_due_age, args.critical_due_age, "due-age",
          "a message has been due for %s and %s" % (
              _age(due_age or 0), "no processor runs on this queue" if live == 0 else
              "no processor has taken it" if live is None else
              "%d live processor(s) have not taken it" % live))
    judge(oldest_age, args.warning_age, args.critical_age, "age",
          "a message has waited %s" % _age(oldest_age or 0))
    judge(waiting, args.warning_queue, args.critical_queue, "queue",
          "%d messages wait" % waiting)
    judge(counts["dead"], args.warning_dead, args.critical_dead, "dead",
          "%d dead letter(s)" % counts["dead"])
    level = max((p[0] for p in problems), default=0)
    return _StatusReport(facts, now, oldest, oldest_age, due_age, problems, level)


def _recorded_at(value: Optional[float], now: float) -> Tuple[Optional[str], Optional[int]]:
    """A time status.json recorded, as ISO and as seconds ago; (None, None)
    for what is no time (status.json is anyone's to edit)."""
    when = _when(value)
    if when is None:
        return None, None
    return _iso(when), _whole_seconds(now - when)


_THRESHOLDS = ("warning_due_age", "critical_due_age", "warning_age", "critical_age",
               "warning_queue", "critical_queue", "warning_dead", "critical_dead")


def _print_status_json(report: _StatusReport, args: argparse.Namespace) -> None:
    """The report and the thresholds as one JSON object, for scripts."""
    facts, counts, now, oldest = report.facts, report.facts["counts"], report.now, report.oldest
    delivered, delivered_age = _recorded_at(facts["delivered_at"], now)
    error_at, error_age = _recorded_at(facts["error_at"], now)
    print(json.dumps({
        "status": _LEVELS[report.level], "exit_code": report.level,
        "problems": [p[1] for p in report.problems],
        "queue": facts["queue"], "counts": counts, "waiting": facts["waiting"],
        "due": facts["due"], "dead": counts["dead"],
        "refused": facts["refused"], "processors": facts["processors"],
        "oldest_id": facts["oldest_id"],
        "oldest_queued": _iso(oldest) if oldest is not None else None,
        "oldest_age": (_whole_seconds(report.oldest_age) if report.oldest_age is not None
                       else None),
        "oldest_due_id": facts["oldest_due_id"],
        "oldest_due_age": (_whole_seconds(report.due_age) if report.due_age is not None
                           else None),
        "last_delivery": delivered, "last_delivery_age": delivered_age,
        "last_delivery_id": facts["delivered_id"],
        "last_delivery_via": facts["delivered_via"],
        "last_error": facts["error"], "last_error_at": error_at,
        "last_error_age": error_age, "last_error_id": facts["error_id"],
        "thresholds": {k: getattr(args, k) for k in _THRESHOLDS},
    }, indent=1))


def _print_status_text(report: _StatusReport, args: argparse.Namespace) -> None:
    """A Nagios plugin's line (verdict | performance data), then the facts."""
    facts, counts, now, oldest = report.facts, report.facts["counts"], report.now, report.oldest
    waiting, oldest_age, live = facts["waiting"], report.oldest_age, facts["processors"]
    print("GSEMAIL %s: %d waiting (%d new, %d deferred, %d sending), %d dead%s%s | "
          "waiting=%d;%s;%s dead=%d;%s;%s oldest=%ds;%d;%d due_age=%ds;%d;%d due=%d "
          "refused=%d%s" % (
              _LEVELS[report.level].upper(), waiting, counts["new"], counts["deferred"],
              counts["sending"], counts["dead"],
              "; oldest %s" % _age(oldest_age) if oldest_age is not None else "",
              "; no processor running" if live == 0 else "",
              waiting, args.warning_queue or "", args.critical_queue or "",
              counts["dead"], args.warning_dead or "", args.critical_dead or "",
              oldest_age or 0, args.warning_age, args.critical_age,
              report.due_age or 0, args.warning_due_age, args.critical_due_age,
              facts["due"], facts["refused"],
              " processors=%d" % live if live is not None else ""))
    for level, text in report.problems:
        print("%s: %s" % (_LEVELS[level], text))
    print("queue          %s" % facts["queue"])
    print("processors     %s" % (
        "cannot tell (tmp/ cannot be read by this user)" if live is None else
        "%d live" % live))
    print("due now        %d%s" % (facts["due"], ", %s due for %s" % (
        facts["oldest_due_id"], _age(report.due_age)) if report.due_age is not None else ""))
    if facts["refused"]:
        print("refused        %d recipient(s) in messages still waiting for others"
              % facts["refused"])
    if oldest_age is not None and oldest is not None:
        print("oldest         %s, queued %s (%s ago)" % (facts["oldest_id"], _iso(oldest),
                                                          _age(oldest_age)))
    delivered, delivered_age = _recorded_at(facts["delivered_at"], now)
    print("last delivery  %s" % ("%s (%s ago): %s via %s" % (
        delivered, _age(delivered_age or 0), facts["delivered_id"], facts["delivered_via"])
        if delivered else "none recorded"))
    error_at, error_age = _recorded_at(facts["error_at"], now)
    print("last error     %s" % ("%s (%s ago): %s: %s" % (
        error_at, _age(error_age or 0), facts["error_id"], facts["error"])
        if error_at else "none recorded"))


def _prometheus_label(value: str) -> str:
    """A label value in Prometheus' text format: backslash, quote and
    newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _print_prometheus(queue: str, samples: List[Tuple[str, str, str, Optional[float]]]
                      ) -> None:
    """Gauges in Prometheus' text exposition format, each with HELP and
    TYPE and a queue label (several queues' files sit in one textfile
    directory).  samples: (name, extra labels, help, value); a value of
    None leaves that sample out (a fact not known is no zero)."""
    label = 'queue="%s"' % _prometheus_label(queue)
    lines: List[str] = []
    described: set[str] = set()
    for name, extra, text, value in samples:
        if name not in described:
            described.add(name)
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s gauge" % name]
        if value is not None:
            lines.append("%s{%s%s} %s" % (name, label, "," + extra if extra else "",
                                          repr(float(value)) if value != int(value)
                                          else int(value)))
    print("\n".join(lines))


def _print_status_prometheus(report: _StatusReport, args: argparse.Namespace) -> None:
    """The same facts for node_exporter's textfile collector."""
    facts, counts = report.facts, report.facts["counts"]
    samples: List[Tuple[str, str, str, Optional[float]]] = [
        ("gsemail_up", "", "1 if status could read the queue, 0 if not", 1),
        ("gsemail_status", "", "the verdict by status's thresholds: 0 ok, 1 warning, "
         "2 critical", report.level)]
    samples += [("gsemail_queue_messages", 'state="%s"' % state, "messages waiting, by "
                 "state (new, deferred, sending)", counts[state])
                for state in ("new", "deferred", "sending")]
    samples += [
        ("gsemail_due_messages", "", "messages due now, not being sent", facts["due"]),
        ("gsemail_dead_letters", "", "dead letters in the queue", counts["dead"]),
        ("gsemail_refused_recipients", "", "recipients refused in messages still waiting "
         "for others", facts["refused"]),
        ("gsemail_oldest_due_age_seconds", "", "how long the message due longest has "
         "been due (0: none is due)", _whole_seconds(report.due_age or 0)),
        ("gsemail_oldest_waiting_age_seconds", "", "how long ago the oldest waiting "
         "message was queued (0: none waits)", _whole_seconds(report.oldest_age or 0)),
        ("gsemail_live_processors", "", "processes sending from the queue now",
         facts["processors"]),
        ("gsemail_last_delivery_timestamp_seconds", "", "when a processor last delivered "
         "a message, Unix time", _when(facts["delivered_at"])),
        ("gsemail_last_error_timestamp_seconds", "", "when a processor last recorded an "
         "error, Unix time", _when(facts["error_at"]))]
    _print_prometheus(facts["queue"], samples)


def _status_unknown(e: GsEmailError, args: argparse.Namespace, queue: str = "") -> int:
    """``status`` could not check: exit 3 (UNKNOWN) with the reason on
    stderr, and on stdout in the form asked for, so a monitor that reads
    only stdout, or only JSON, learns why."""
    reason = "%s %s" % (e.status, _one_line(str(e)))
    print(reason, file=sys.stderr)
    if getattr(args, "prometheus", False):
        _print_prometheus(queue, [("gsemail_up", "", "1 if status could read the queue, "
                                   "0 if not", 0)])
    elif getattr(args, "json", False):
        print(json.dumps({"status": "unknown", "exit_code": _UNKNOWN, "reason": reason,
                          "problems": [reason], "queue": queue or None}, indent=1))
    else:
        print("GSEMAIL UNKNOWN: %s" % reason)
    return _UNKNOWN


def _cmd_status(config: SMTPConfig, args: argparse.Namespace) -> int:
    try:
        queue = _open_queue(config, readonly=True)
        facts = queue.status()
    except GsEmailError as e:
        return _status_unknown(e, args, os.path.abspath(config.queuepath))
    except OSError as e:
        return _status_unknown(QueueError("queue %s: cannot read it: %s" % (
            config.queuepath, e.strerror or e)), args, os.path.abspath(config.queuepath))
    report = _status_report(facts, args, time.time())
    if args.prometheus:
        # Checked: exit 0 whatever the verdict (gsemail_status has it), so
        # a cron job that writes the file is quiet; alerting is Prometheus'.
        _print_status_prometheus(report, args)
        return os.EX_OK
    (_print_status_json if args.json else _print_status_text)(report, args)
    return report.level


def _cmd_flush(config: SMTPConfig, args: argparse.Namespace) -> int:
    queue = _open_queue(config)
    entries = queue.find(args.ids) if args.ids else \
        [e for e in queue.entries() if e.state in ("deferred", "sending")]
    flushed = 0
    for e in entries:
        if e.state == "deferred":
            if queue.flush(e):
                flushed += 1
                print("%s: due now" % e.id)
            else:
                print("%s: being sent (or it moved meanwhile): left alone" % e.id)
        else:
            print("%s: %s" % (e.id, {"new": "already due", "sending": "being sent now",
                                     "dead": "a dead letter: use gsemail retry"}[e.state]))
    print("%d message(s) made due now; a running processor sends them within %g s"
          % (flushed, config.poll_interval))
    return os.EX_OK


def _cmd_retry(config: SMTPConfig, args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.all_dead):
        raise GsEmailError("retry takes dead letters' queue ids, or --all-dead",
                           status="5.5.4", exit_code=os.EX_USAGE)
    queue = _open_queue(config)
    entries = [e for e in queue.entries() if e.state == "dead"] if args.all_dead \
        else queue.find(args.ids)
    # A message still queued for some shares its id with its dead letter (of
    # those refused so far): the id then means the dead letter.
    dead_ids = {e.id for e in entries if e.state == "dead"}
    entries = [e for e in entries if e.state == "dead" or e.id not in dead_ids]
    for e in entries:
        if e.state != "dead":
            raise GsEmailError("%s is %s, not a dead letter: retry takes dead letters "
                               "(flush makes deferred mail due now); nothing was done"
                               % (e.id, e.state), status="5.5.4", exit_code=os.EX_USAGE)
    status = os.EX_OK
    done = 0
    for e in entries:
        try:
            name = queue.retry(e)
        except MessageError as err:
            print("%s %s" % (err.status, err), file=sys.stderr)
            status = status or err.exit_code
            continue
        if name is None:
            print("4.2.0 %s: held by another command, or gone: left alone" % e.id,
                  file=sys.stderr)
            status = status or os.EX_TEMPFAIL
            continue
        done += 1
        print("%s: queued again as %s for %d recipient(s)" % (e.id, name, len(e.recipients)))
    print("%d dead letter(s) queued again" % done)
    return status


def _cmd_purge(config: SMTPConfig, args: argparse.Namespace) -> int:
    if bool(args.ids) == (args.dead_older_than is not None):
        raise GsEmailError("purge takes queue ids, or --dead-older-than AGE",
                           status="5.5.4", exit_code=os.EX_USAGE)
    queue = _open_queue(config)
    now = time.time()
    if args.ids:
        entries = queue.find(args.ids)
    else:
        cutoff = now - args.dead_older_than * 86400
        entries = [e for e in queue.entries() if e.state == "dead" and
                   (e.dead_since or now) < cutoff]
    status = os.EX_OK
    purged = 0
    for e in entries:
        print("%s %s: %s, queued %s ago, from <%s> to %d recipient(s)%s" % (
            "would purge" if args.dry_run else "purging", e.id, e.state,
            _age(now - e.queued), e.sender, len(e.recipients),
            ": " + _one_line(e.last_error) if e.last_error else ""))
        sys.stdout.flush()
        if args.dry_run:
            continue
        if queue.purge(e):
            purged += 1
        else:
            print("4.2.0 %s: being sent (or it moved meanwhile): not purged" % e.id,
                  file=sys.stderr)
            status = os.EX_TEMPFAIL
    print("%d message(s) %s" % (len(entries) if args.dry_run else purged,
                                "would be purged" if args.dry_run else "purged"))
    return status


# The capabilities that check reports, in its order, and what it means
# for our mail when a relay does not offer one.
_MEANING = {
    "SIZE": "no size limit announced",
    "XVERP": "not offered to this client: gsemail does the VERP of mail sent with xverp "
             "itself, a transaction per recipient (with verp_fallback = plain, bounces "
             "will not name the recipient)",
    "PIPELINING": "one command per round trip (slower with many recipients)",
    "SMTPUTF8": "non-ASCII addresses are refused (5.6.7)",
    "8BITMIME": "messages with 8-bit data are refused (5.6.3)",
    "STARTTLS": "plain text only",
}


# check warns of a certificate that expires sooner than this, in days (as
# certbot renews 30 days ahead, a certificate this close has missed renewals)
_EXPIRY_WARNING = 14


def _print_certificate(r: RelayCheck) -> None:
    """check's lines on the relay's certificate: one to paste into
    tls_fingerprint, and a warning when it expires soon."""
    for label, value in (("subject", r.certificate_subject), ("issuer", r.certificate_issuer),
                         ("names", ", ".join(r.certificate_names))):
        if value:
            print("  %-11s %s" % (label, value))
    left = r.certificate_days_left
    if r.certificate_expires is not None and left is not None:
        print("  %-11s %s (%s)" % ("expires", _iso(r.certificate_expires),
                                   "in %d days" % round(left) if left >= 0 else "EXPIRED"))
    elif not r.certificate_subject:
        print("  %-11s %s" % ("details", "not readable without verifying it (this "
                              "Python's ssl shows only a verified certificate)"))
    print("  %-11s %s" % ("fingerprint", r.certificate_fingerprint))
    if left is not None and left < _EXPIRY_WARNING:
        print("  %-11s 4.7.0 the relay's certificate %s: renew it (gsemail check warns "
              "%d days ahead)" % ("WARNING", "expires in %.1f days" % left if left >= 0
                                  else "has expired", _EXPIRY_WARNING))


def _cmd_check(config: SMTPConfig, args: argparse.Namespace) -> int:
    results = Mailer(config).check()
    for r in results:
        print("relay %s" % r.relay)
        if r.greeting:
            print("  %-11s %s" % ("greeting", r.greeting))
        if r.offered:
            print("  %-11s %s" % ("TLS", r.tls))
            if r.certificate_fingerprint:
                _print_certificate(r)
            print("  %-11s %s" % ("AUTH", r.auth))
            for name, meaning in _MEANING.items():
                offered = r.offered_before_tls if name == "STARTTLS" else r.offered
                if name == "STARTTLS" and config.use_implicit_tls:
                    value = "not needed: TLS from the first byte"
                elif name in offered:
                    value = "yes" + (", %s bytes" % offered[name] if name == "SIZE" and
                                     offered[name] else "")
                else:
                    value = "no: " + meaning
                print("  %-11s %s" % (name, value))
            others = sorted(set(r.offered) - set(_MEANING))
            if others:
                print("  %-11s %s" % ("also", ", ".join(others)))
        print("verdict: %s" % r.verdict)
    usable = [r for r in results if r.ok]
    if usable and len(results) > 1:
        down = [r.relay for r in results if not r.ok]
        print("overall: %s mail goes to %s%s" % (
            "4.4.1" if down else "2.0.0", usable[0].relay,
            "; cannot use %s" % ", ".join(down) if down else
            ", the first relay; the others stand by"))
    first = results[0].error    # None when the first relay can be used
    if usable or first is None:
        return os.EX_OK
    error = DeliveryError(first)
    print("%s no relay can be used: %s" % (error.status, first), file=sys.stderr)
    return error.exit_code


# The sink: a development tool, no part of delivery.  Python 3.12 removed
# smtpd, whose DebuggingServer developers ran to see what an application
# sends; this is that, named after Postfix's smtp-sink.

_SINK_LINE = 4096           # the longest command line (RFC 5321's least is 512)
_SINK_RCPTS = 1000          # recipients a transaction (RFC 5321's least is 100)
_SINK_MAIL = re.compile(r"FROM:\s*<([^<>]*)>((?:\s+\S+)*)\s*", re.IGNORECASE)
_SINK_RCPT = re.compile(r"TO:\s*<([^<>]+)>\s*", re.IGNORECASE)


def _port_option(text: str) -> int:
    value = _count_option(text)
    if value > 65535:
        raise argparse.ArgumentTypeError("%r is not a port, from 0 to 65535" % text)
    return value


class _SinkSession(socketserver.StreamRequestHandler):
    """One SMTP session of the sink: EHLO/HELO, MAIL (SIZE, BODY, SMTPUTF8),
    RCPT, DATA (dot-unstuffed), RSET, NOOP, VRFY, HELP, QUIT.  Pipelined
    commands are read from the buffer in turn, as RFC 2920 wants."""

    timeout = 300.0         # RFC 5321's idle timeout
    server: "_Sink"     # defined next: it names this class as its handler

    def reply(self, *lines: str) -> None:
        self.wfile.write("".join("%s%s%s\r\n" % (line[:3], " " if n == len(lines) - 1
                                                 else "-", line[4:])
                                 for n, line in enumerate(lines)).encode("utf-8"))

    def handle(self) -> None:
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reply("220 %s ESMTP gsemail sink: keeps every message, delivers none" % _HOST)
        hello = ""
        sender: Optional[str] = None
        rcpts: List[str] = []
        try:
            while True:
                line = self.rfile.readline(_SINK_LINE + 1)
                if not line:
                    return
                if not line.endswith(b"\n"):
                    while line and not line.endswith(b"\n"):    # the rest of it
                        line = self.rfile.readline(_SINK_LINE + 1)
                    self.reply("500 5.5.2 line too long")
                    continue
                verb, _, arg = line.rstrip(b"\r\n").decode("utf-8", "replace").partition(" ")
                verb = verb.upper()
                if verb in ("EHLO", "HELO"):
                    if not arg.strip():
                        self.reply("501 5.5.4 %s needs your name" % verb)
                        continue
                    hello, sender, rcpts = verb, None, []
                    if verb == "HELO":
                        self.reply("250 %s" % _HOST)
                    else:
                        self.reply("250 %s" % _HOST, "250 PIPELINING", "250 8BITMIME",
                                   "250 SMTPUTF8", "250 ENHANCEDSTATUSCODES",
                                   "250 SIZE %d" % self.server.size)
                elif verb == "MAIL":
                    mail = _SINK_MAIL.fullmatch(arg)
                    if not hello:
                        self.reply("503 5.5.1 EHLO or HELO first")
                    elif sender is not None:
                        self.reply("503 5.5.1 one MAIL at a time: RSET first")
                    elif mail is None:
                        self.reply("501 5.5.4 the syntax is MAIL FROM:<address>")
                    else:
                        refused = self._parameters(hello, mail.group(2).split())
                        if refused:
                            self.reply(refused)
                        else:
                            sender, rcpts = mail.group(1), []
                            self.reply("250 2.1.0 ok")
                elif verb == "RCPT":
                    rcpt = _SINK_RCPT.fullmatch(arg)
                    if sender is None:
                        self.reply("503 5.5.1 MAIL first")
                    elif rcpt is None:
                        self.reply("501 5.5.4 the syntax is RCPT TO:<address>")
                    elif len(rcpts) >= _SINK_RCPTS:
                        self.reply("452 4.5.3 too many recipients")
                    else:
                        rcpts.append(rcpt.group(1))
                        self.reply("250 2.1.5 ok")
                elif verb == "DATA":
                    if sender is None or not rcpts:
                        self.reply("503 5.5.1 %s first" % ("MAIL" if sender is None
                                                           else "RCPT"))
                        continue
                    self.reply("354 end data with <CR><LF>.<CR><LF>")
                    data = self._data()
                    if data is None:
                        self.reply("552 5.3.4 message larger than SIZE %d"
                                   % self.server.size)
                    else:
                        try:
                            number = self.server.keep(self.client_address[0], sender,
                                                      rcpts, data)
                        except OSError as e:    # a full disk, a closed stdout: try later
                            self.reply("451 4.3.0 the sink cannot keep it: %s"
                                       % _one_line(str(e.strerror or e)))
                        else:
                            self.reply("250 2.0.0 kept as message %d (not delivered)"
                                       % number)
                    sender, rcpts = None, []
                elif verb == "RSET":
                    sender, rcpts = None, []
                    self.reply("250 2.0.0 ok")
                elif verb == "NOOP":
                    self.reply("250 2.0.0 ok")
                elif verb == "VRFY":
                    self.reply("252 2.5.0 not verified: send it, and it is kept")
                elif verb == "HELP":
                    self.reply("214 2.0.0 EHLO HELO MAIL RCPT DATA RSET NOOP VRFY QUIT")
                elif verb == "QUIT":
                    self.reply("221 2.0.0 bye")
                    return
                else:
                    self.reply("500 5.5.2 command not recognised")
        except (OSError, EOFError):     # the client went, or stayed idle too long
            return

    def _parameters(self, hello: str, params: List[str]) -> str:
        """The reply refusing MAIL's parameters, or "" for none to refuse."""
        for param in params:
            key, _, value = param.partition("=")
            key = key.upper()
            if hello != "EHLO":
                return "555 5.5.4 parameters need EHLO"
            if key == "SIZE" and value.isdigit():
                if int(value) > self.server.size:
                    return "552 5.3.4 message larger than SIZE %d" % self.server.size
            elif not ((key == "BODY" and value.upper() in ("7BIT", "8BITMIME"))
                      or (key == "SMTPUTF8" and not value)):
                return "555 5.5.4 parameter %s not recognised" % param
        return ""

    def _data(self) -> Optional[bytes]:
        """DATA's message up to the lone dot, unstuffed; None when it is
        larger than SIZE (read to its end all the same).  Raises EOFError
        if the connection ends first."""
        chunks: List[bytes] = []
        size, whole = 0, True
        at_start = True         # a line begins here: only there are dots special
        while True:
            chunk = self.rfile.readline(65536)
            if not chunk:
                raise EOFError
            if at_start:
                if chunk in (b".\r\n", b".\n"):
                    break
                if chunk.startswith(b"."):
                    chunk = chunk[1:]
            at_start = chunk.endswith(b"\n")
            size += len(chunk)
            if size > self.server.size:
                whole = False
                chunks = []
            elif whole:
                chunks.append(chunk)
        return b"".join(chunks) if whole else None


class _Sink(socketserver.ThreadingTCPServer):
    """``gsemail sink``: an SMTP server that keeps every message it is given
    and delivers none.  It is not a relay: nothing it accepts goes anywhere
    but to its standard output and its --maildir."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: Tuple[str, int], maildir: Optional[str],
                 size: int) -> None:
        self.address_family = socket.getaddrinfo(address[0], address[1], 0,
                                                 socket.SOCK_STREAM)[0][0]
        self.maildir = maildir
        self.size = size
        self.kept = 0
        self._keeping = threading.Lock()
        super().__init__(address, _SinkSession)

    def keep(self, client: str, sender: str, rcpts: List[str], data: bytes) -> int:
        """Print the message (and write it to the Maildir); its number."""
        with self._keeping:
            self.kept += 1
            where = ""
            if self.maildir is not None:
                where = " file=" + self._write(sender, rcpts, data)
            out = sys.stdout.buffer
            out.write(("2.0.0 sink: message %d from=<%s> %s size=%d client=%s%s\n" % (
                self.kept, sender, _to(rcpts), len(data), client, where)).encode("utf-8"))
            if self.maildir is None:
                out.write(data.replace(b"\r\n", b"\n") + b"\n")
            out.flush()
            return self.kept

    def _write(self, sender: str, rcpts: List[str], data: bytes) -> str:
        """The message as a Maildir's new/ file, envelope in its first two
        headers (as Postfix's local delivery writes it); its path."""
        assert self.maildir is not None
        name = "%d.P%dQ%d.%s" % (time.time(), os.getpid(), self.kept, _HOST)
        tmp = os.path.join(self.maildir, "tmp", name)
        fd = os.open(tmp, _CREATE, 0o600)
        with open(fd, "wb") as f:
            f.write(("Return-Path: <%s>\r\nX-Original-To: %s\r\n"
                     % (sender, ", ".join(rcpts))).encode("utf-8") + data)
        path = os.path.join(self.maildir, "new", name)
        os.rename(tmp, path)
        return path


def _cmd_sink(config: Optional[SMTPConfig], args: argparse.Namespace) -> int:
    """``sink``: the development tool; reads no config and no queue."""
    try:
        if args.maildir is not None:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(args.maildir, sub), 0o700, exist_ok=True)
        sink = _Sink((args.listen, args.port), args.maildir, args.size)
    except OSError as e:
        raise GsEmailError("sink cannot listen on %s%s: %s" % (
            _where(args.listen, args.port), " or write %s" % args.maildir if args.maildir
            else "", e.strerror or e), status="4.3.0", exit_code=os.EX_OSERR) from None

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    host, port = sink.server_address[:2]
    print("2.0.0 gsemail sink listening on %s: not a relay, it keeps each message %s "
          "and delivers none (Ctrl-C stops it)" % (
              _where(str(host), int(port)), "in the Maildir " + args.maildir
              if args.maildir else "by printing it"), file=sys.stderr, flush=True)
    try:
        sink.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        sink.server_close()
    print("2.0.0 gsemail sink stopped: %d message(s) kept" % sink.kept, file=sys.stderr)
    return os.EX_OK


def _split_head(data: bytes) -> Tuple[bytes, bytes]:
    """(header block, rest) of a message as _prepare_message sends it: CRLF
    line ends whatever they were (CR, LF, mixed), leading blank lines gone.
    The block ends before the first line that is neither 'Name:' nor a
    continuation, so _header_addresses and _without_bcc see the same headers."""
    data = _crlf(data.lstrip(b"\r\n"))
    at = 0
    while at < len(data):
        end = data.find(b"\r\n", at)
        end = len(data) if end < 0 else end + 2
        line = data[at:end]
        if not (_HEADER_LINE.match(line) or (at and line[:1] in (b" ", b"\t"))):
            break
        at = end
    return data[:at], data[at:]


def _header_addresses(data: bytes, names: Iterable[str]) -> List[str]:
    """The addresses in the named headers of the message."""
    # Parsed as text, so an 8-bit (SMTPUTF8) address comes out whole.
    head = _split_head(data)[0]
    headers = email.parser.HeaderParser().parsestr(head.decode("utf-8", "replace"))
    values = [str(v) for name in names for v in headers.get_all(name, [])]
    return [address for _, address in email.utils.getaddresses(values) if address]


def _without_bcc(data: bytes) -> bytes:
    """The message without its Bcc headers, folded or not (sendmail -t
    removes them), and with CRLF line ends."""
    head, rest = _split_head(data)
    kept, bcc = [], False
    for line in head.splitlines(keepends=True):
        if line[:1] not in (b" ", b"\t"):      # a new header, not a continuation
            bcc = line[:4].lower() == b"bcc:"
        if not bcc:
            kept.append(line)
    return b"".join(kept) + rest


def _no_processor_hint(queue: Queue, run: str) -> None:
    """Say on stderr when no processor is running on the queue (Queue.status
    counts them the same way): what was just queued would wait there,
    silently, until one starts.  run is the command that starts one."""
    if queue._processors(time.time()) == 0:
        print("4.3.0 no queue processor is running on %s: the message waits there until "
              "one starts (%s)" % (queue.path, run), file=sys.stderr)


def _deliver_now(config: SMTPConfig, queue: Queue, name: str) -> Tuple[str, str]:
    """send --now, sendmail -odi: try the message just queued as name at
    once, through the processor's own path (claim, send, record), so the
    rules for retries, refusals and dead letters are those of any other
    attempt, and what is not delivered stays queued.  Returns what became
    of it ("delivered", "deferred", "dead", or "" when a running processor
    claimed it first) and, unless it was delivered, a line that says so.

    It never raises: the message is queued whatever happens here (a rates
    file that cannot be used, Ctrl-C), and a caller told of a failure would
    send it again."""
    try:
        processor = QueueProcessor(config, queue=queue)
        try:
            processor._deliver([os.path.join(queue.path, "new", name)], processor.mailer, 1)
        finally:
            processor._close_mailers()
            processor._note(force=True)     # for status: the last delivery or error
            processor._finish()     # lets go of this process's claimer file
    except (Exception, KeyboardInterrupt) as e:
        status = e.status if isinstance(e, GsEmailError) else "4.3.0"
        return "error", "%s %s: not tried now (%s); it stays queued" % (
            status, name, _one_line(str(e)) or type(e).__name__)
    what = next((w for w, n in processor.stats.items() if n), "")
    line = ""
    if what == "deferred":
        state = queue._read_state(name) or {}
        reason = Reply.parse(str(state.get("last_error") or "451 4.3.0 deferred"))
        due = _when(state.get("next_attempt"))
        line = "%s %s: not delivered yet (%s); it stays queued%s" % (
            reason.status, name, reason,
            ", to be tried again at %s" % _iso(due) if due is not None else "")
    elif what == "dead":
        line = ("5.0.0 %s: refused (for some or all of its recipients): the reasons are "
                "in its dead letter (gsemail show %s)" % (name, name))
    elif not what:
        line = "2.0.0 %s: a running processor took it first" % name
    return what, line


def _cmd_send(config: SMTPConfig, args: argparse.Namespace) -> int:
    if args.file:
        try:
            with open(args.file, "rb") as f:
                data = f.read()
        except OSError as e:
            raise MessageError("%s: cannot read the message: %s" % (args.file, e.strerror),
                               status="5.3.0", exit_code=os.EX_NOINPUT) from None
    else:
        data = sys.stdin.buffer.read()
    recipients = list(args.recipients)
    if args.from_headers:
        recipients += _header_addresses(data, ("To", "Cc", "Bcc"))
        data = _without_bcc(data)
    if not recipients:
        raise MessageError("no recipients: give them after send, or use -t to take "
                           "them from the headers", status="5.5.4", exit_code=os.EX_USAGE)
    sender = args.sender
    if sender is None:
        found = _header_addresses(data, ("From",))
        if not found:
            raise MessageError("no sender: give -f SENDER (the message has no From "
                               "header)", status="5.1.7", exit_code=os.EX_USAGE)
        sender = found[0]
    sender = sender.strip().strip("<>")
    rcpts, data = _prepared(sender, recipients, data, args.xverp)
    queue = _queue_from(config)
    name = _queue_now(config, queue, sender, rcpts, data, args.xverp)
    print("2.0.0 queued as %s for %d recipient(s) in %s" % (name, len(rcpts), queue.path),
          flush=True)
    what = ""
    if args.now:
        what, line = _deliver_now(config, queue, name)
        if what == "delivered":
            print("2.0.0 %s: delivered" % name)
        else:
            print(line, file=sys.stderr)
    if what != "delivered":
        _no_processor_hint(queue, "gsemail --config %s --instance %s" % (
            shlex.quote(args.config), shlex.quote(args.instance)))
    return os.EX_OK


def _parser() -> argparse.ArgumentParser:
    common = _ArgumentParser(add_help=False)
    _common_options(common, suppress=True)
    parser = _ArgumentParser(
        prog="gsemail", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Deliver and look after the gsemail queue of a GroupServer instance.\n"
                    "Without a COMMAND, run the queue processor: in the foreground until\n"
                    "SIGTERM or SIGINT, or with --once until nothing is due.  Each\n"
                    "command has --help.")
    _common_options(parser, suppress=False)
    parser.add_argument("--once", action="store_true",
                        help="deliver what is due and exit: 0 when the queue is "
                             "empty, 75 when messages wait for a retry; on a "
                             "terminal, shows progress")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="without -v: log only warnings and errors, not the start "
                             "line and each delivery")
    parser.add_argument("--version", action="version",
                        version="gsemail %s" % __version__)
    parser.set_defaults(run=_cmd_run, command=None)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, run: Callable[[SMTPConfig, argparse.Namespace], int],
                summary: str, description: str, aliases: Iterable[str] = ()
                ) -> argparse.ArgumentParser:
        p = commands.add_parser(name, aliases=list(aliases), parents=[common], help=summary,
                                description=description)
        p.set_defaults(run=run)
        return p

    p = command("list", _cmd_list, "one line per message (--json for scripts)",
                "One line per message in the queue: queue id, state "
                "(new, deferred, sending, dead), age, size, sender, recipients, "
                "attempts, next attempt, last error.  Python: Queue.entries().",
                aliases=["mailq"])
    p.add_argument("--json", action="store_true", help="a JSON list, for scripts")

    p = command("show", _cmd_show, "one message: envelope, state, history, headers",
                "One message: its envelope, state, history and "
                "headers.  Python: Queue.find() and Queue.read_message().")
    p.add_argument("id", metavar="ID", help="a queue id (or a unique beginning of one)")
    p.add_argument("--body", action="store_true", help="the whole message, not only "
                   "its headers")

    p = command("status", _cmd_status, "queue health, with exit codes for monitoring",
                "Queue depth by state, the oldest message, the message due longest, "
                "live processors, the last delivery and the last error, for people and "
                "for monitoring: exits 0 (ok), 1 (warning) or 2 (critical) by the "
                "thresholds below, as a Nagios plugin does, and 3 (unknown) with the "
                "reason when it cannot check.  A threshold of 0 is off.  Python: "
                "Queue.status().")
    p.set_defaults(cannot_check=_status_unknown)
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="a JSON object, for scripts")
    shown.add_argument("--prometheus", action="store_true", help="Prometheus' text "
                       "format, for node_exporter's textfile collector (exits 0 when "
                       "checked, 3 when not)")
    p.add_argument("--warning-due-age", type=_duration_option, default=300.0,
                   metavar="AGE", help="warn when a message has been due this long and "
                   "no processor has taken it (default: 5m)")
    p.add_argument("--critical-due-age", type=_duration_option, default=900.0,
                   metavar="AGE", help="critical when a message has been due this long: "
                   "no processor for 15 minutes is critical (default: 15m)")
    p.add_argument("--warning-age", type=_duration_option, default=3600.0, metavar="AGE",
                   help="warn when a message has waited this long (default: 1h)")
    p.add_argument("--critical-age", type=_duration_option, default=4 * 3600.0,
                   metavar="AGE", help="critical when a message has waited this long "
                   "(default: 4h)")
    p.add_argument("--warning-queue", type=_count_option, default=500, metavar="N",
                   help="warn when N messages wait (default: %(default)s)")
    p.add_argument("--critical-queue", type=_count_option, default=5000, metavar="N",
                   help="critical when N messages wait (default: %(default)s)")
    p.add_argument("--warning-dead", type=_count_option, default=1, metavar="N",
                   help="warn when there are N dead letters (default: %(default)s)")
    p.add_argument("--critical-dead", type=_count_option, default=0, metavar="N",
                   help="critical when there are N dead letters (default: off)")

    p = command("flush", _cmd_flush, "make deferred messages due now (postqueue -f)",
                "Make every deferred message (or those named) due "
                "now, as postqueue -f does; a running processor sends them at its next "
                "look.  Messages being sent are left alone.  Python: Queue.flush().")
    p.add_argument("ids", nargs="*", metavar="ID", help="only these messages")

    p = command("retry", _cmd_retry, "queue dead letters again",
                "Queue dead letters again, for the recipients that failed, as new "
                "messages with fresh attempts.  Python: Queue.retry().")
    p.add_argument("ids", nargs="*", metavar="ID", help="the dead letters to retry")
    p.add_argument("--all-dead", action="store_true", help="every dead letter")

    p = command("purge", _cmd_purge, "delete messages or old dead letters",
                "Delete messages or dead letters for good, printing "
                "each before it goes.  Messages being sent are left alone (exit 75).  "
                "Python: Queue.purge().")
    p.add_argument("ids", nargs="*", metavar="ID", help="the messages to delete")
    p.add_argument("--dead-older-than", type=_days_option, metavar="AGE",
                   help="every dead letter that died more than AGE ago (30d, 12h, 2w; "
                        "a bare number is days)")
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="print what would go, and delete nothing")

    command("check", _cmd_check, "test the relay(s): TLS, AUTH, EHLO capabilities",
            "Connect to each relay with the configured settings "
            "(TLS, AUTH) as delivery would, print its EHLO capabilities and a verdict, "
            "send no mail.  Exits 0 when mail can go, else with the sysexits code of "
            "the first relay's failure.  Python: Mailer(config).check().")

    p = command("send", _cmd_send, "queue a message from standard input (sendmail)",
                "Queue a message read from standard input (or "
                "--file) for the recipients given, as sendmail does; a running "
                "processor sends it.  Python: send_email().")
    p.add_argument("recipients", nargs="*", metavar="RCPT", help="envelope recipients")
    p.add_argument("-f", dest="sender", metavar="SENDER",
                   help="the envelope sender ('' for none, as a bounce); default: the "
                        "address in the message's From header")
    p.add_argument("-t", dest="from_headers", action="store_true",
                   help="also send to the addresses in the To, Cc and Bcc headers, and "
                        "remove Bcc")
    p.add_argument("--now", action="store_true",
                   help="after queueing, try delivery at once (as sendmail -odi); "
                        "what is not delivered stays queued, and the exit status is 0")
    p.add_argument("--xverp", action="store_true", help="send with XVERP")
    p.add_argument("--file", metavar="FILE", help="read the message from FILE")

    p = command("sink", _cmd_sink, "an SMTP server that prints mail and delivers none "
                "(development)",
                "A development tool, needing no --config: an SMTP server that keeps "
                "every message it is given and delivers none (not a relay), as smtpd's "
                "DebuggingServer did and Postfix's smtp-sink does.  Each message is "
                "printed to standard output, an envelope line then its bytes; with "
                "--maildir, written to that Maildir and only its envelope line printed.  "
                "Point hostname and port at it.  Stops on SIGINT or SIGTERM.")
    p.set_defaults(no_config=True)
    p.add_argument("--listen", default="127.0.0.1", metavar="ADDRESS",
                   help="the address to listen on (default: %(default)s, this host only)")
    p.add_argument("--port", type=_port_option, default=1025,
                   help="the port to listen on (default: %(default)s; 0: any free one)")
    p.add_argument("--maildir", metavar="DIR", help="write each message to the Maildir "
                   "DIR (made if missing) instead of printing it")
    p.add_argument("--size", type=_count_option, default=10240000, metavar="BYTES",
                   help="the SIZE it offers and the largest message it takes "
                        "(default: %(default)s, as Postfix's message_size_limit)")
    return parser


# -- sendmail mode: /usr/sbin/sendmail and mailq for cron, PHP, git, mutt -----
#
# Run as sendmail (a symlink to the gsemail script, or python -m gsemail
# sendmail ...), gsemail takes the command line that programs give
# /usr/sbin/sendmail, as Postfix's sendmail(1) reads it: getopt's rules
# (flags anywhere before "--", bundled, a value attached or next), and
# exits as sendmail's callers expect (sysexits, RFC 3463 lines, silence on
# success).  The queue's owner queues, and so does root, as the owner; any
# other user (who may not write the queue) has the message delivered at
# once, as msmtp does, and learns from the exit status whether it went.

# Where sendmail mode looks for its config after $GSEMAIL_CONFIG, and
# before $INSTANCE_HOME/etc/gsconfig.ini (gs.config's own rule).
_SENDMAIL_CONFIGS = ("/etc/gsemail/gsconfig.ini",)
_SENDMAIL_FLAGS = "itv"          # flags without a value: -t, -i, -v
_SENDMAIL_VALUED = "BFNRVbfor"   # options with one, attached (-fADDR) or next (-f ADDR)
_SENDMAIL_QUIET_O = ("i", "em", "ee", "ep", "eq", "di", "db", "dq")  # -oX taken


@dataclasses.dataclass
class _SendmailArgs:
    """The sendmail command line, as _sendmail_args reads it."""

    mode: str = "m"                 # -bm: read a message and send it; -bp: the queue
    from_headers: bool = False      # -t
    sender: Optional[str] = None    # -f / -r, as given
    full_name: Optional[str] = None     # -F
    ignore_dots: bool = False       # -i, -oi: a line of "." does not end the message
    deliver_now: bool = False       # -odi
    verbose: int = 0                # -v
    recipients: List[str] = dataclasses.field(default_factory=list)
    warnings: List[str] = dataclasses.field(default_factory=list)


def _sendmail_usage(text: str) -> MessageError:
    return MessageError("sendmail: %s" % text, status="5.5.4", exit_code=os.EX_USAGE)


def _sendmail_option(args: _SendmailArgs, flag: str, value: str) -> None:
    """One option with its value (-fADDR, -f ADDR, -oi, -B8BITMIME ...)."""
    if flag in "fr":
        args.sender = value
    elif flag == "F":
        args.full_name = value
    elif flag == "b":
        if value not in ("m", "p"):
            raise _sendmail_usage("-b%s is not supported: only -bm (send a message, the "
                                  "default) and -bp (list the queue)" % _shown(value))
        args.mode = value
    elif flag == "B":
        if value.upper() not in ("8BITMIME", "7BIT"):
            raise _sendmail_usage("-B %s: the body type must be 8BITMIME or 7BIT"
                                  % _shown(value))
        # Nothing to do: a message with 8-bit data goes with BODY=8BITMIME
        # wherever the relay offers it (Mailer).
    elif flag == "o":
        if value == "i":
            args.ignore_dots = True
        elif value in ("di", "db", "dq"):
            args.deliver_now = value == "di"    # the last one counts
        elif value not in _SENDMAIL_QUIET_O:
            args.warnings.append("4.3.5 sendmail: option -o%s is not known: ignored"
                                 % _shown(value))
    # -N (DSN NOTIFY), -R (DSN RET) and -V (DSN ENVID) are taken and
    # ignored, as for a relay that offers no DSN.


def _sendmail_args(words: List[str]) -> _SendmailArgs:
    """The sendmail command line (without the program name), read with
    getopt's rules, as Postfix's sendmail reads it: a flag may come before
    or after the recipients (until "--"), flags may be bundled (-ti), and
    an option's value is the rest of its word or the next word."""
    args = _SendmailArgs()
    at = 0
    while at < len(words):
        word = words[at]
        at += 1
        if word == "--":
            args.recipients += words[at:]
            break
        if not word.startswith("-") or word == "-":
            args.recipients.append(word)
            continue
        i = 1
        while i < len(word):
            flag = word[i]
            i += 1
            if flag in _SENDMAIL_FLAGS:
                if flag == "t":
                    args.from_headers = True
                elif flag == "i":
                    args.ignore_dots = True
                else:
                    args.verbose += 1
                continue
            if flag not in _SENDMAIL_VALUED:
                raise _sendmail_usage("option -%s is not supported (flags taken: -t -i "
                                      "-f -r -F -o -B -b -N -R -V -v)" % _shown(flag))
            value = word[i:]
            if not value:
                if at == len(words):
                    raise _sendmail_usage("option -%s needs a value" % flag)
                value = words[at]
                at += 1
            _sendmail_option(args, flag, value)
            break
    return args


def _sendmail_config() -> Tuple[str, str]:
    """(config file, instance) for sendmail mode: $GSEMAIL_CONFIG, else
    /etc/gsemail/gsconfig.ini, else $INSTANCE_HOME/etc/gsconfig.ini; the
    instance $GSEMAIL_INSTANCE or default.  Raises ConfigError (exit 78)
    naming each path tried."""
    instance = os.environ.get("GSEMAIL_INSTANCE") or "default"
    given = os.environ.get("GSEMAIL_CONFIG")
    if given:
        return given, instance     # load_config says what is wrong with it
    tried = list(_SENDMAIL_CONFIGS)
    home = os.environ.get("INSTANCE_HOME")
    if home:
        tried.append(os.path.join(home, "etc", "gsconfig.ini"))
    for path in tried:
        if os.path.exists(path):
            return path, instance
    raise ConfigError("sendmail: no configuration: tried %s%s; set $GSEMAIL_CONFIG to the "
                      "gsconfig.ini to use" % (", ".join(tried), "" if home else
                                              " ($INSTANCE_HOME is not set)"))


def _login_name() -> str:
    """The invoking user's login name (the real uid's, as Postfix's sendmail)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        raise MessageError("sendmail: uid %d has no login name to send as: give -f SENDER"
                           % os.getuid(), status="5.1.7", exit_code=os.EX_USAGE) from None


def _completed(address: str, domain: str) -> str:
    """A bare name (root) as an address at domain (root@DOMAIN)."""
    address = address.strip()
    return "%s@%s" % (address, domain) if address and "@" not in address else address


def _sendmail_recipients(words: Iterable[str], domain: str) -> List[str]:
    """Each word may hold several addresses, with commas and display names
    (cron gives MAILTO as it is): the addresses, bare names completed."""
    found = []
    for word in words:
        for _, address in email.utils.getaddresses([word]):
            if address.strip():
                found.append(_completed(address, domain))
    return found


def _until_dot(data: bytes) -> bytes:
    """data up to a line of a single ".", which ends the message when
    sendmail is run without -i (or -oi), as Postfix's does."""
    end = re.search(rb"(?m)^\.\r?$", data)
    return data if end is None else data[:end.start()]


# The headers whose bare names sendmail mode completes, as Postfix does for
# mail submitted on its host (append_at_myorigin): cron writes "From: root
# (Cron Daemon)" and "To: root", which a relay elsewhere may refuse and to
# which nobody can reply.
_ADDRESS_HEADERS = ("from", "sender", "reply-to", "to", "cc", "resent-from",
                    "resent-sender", "resent-reply-to", "resent-to", "resent-cc")


def _completed_headers(head: bytes, domain: str) -> bytes:
    """head (CRLF lines, as _split_head gives it) with the bare names in its
    address headers completed: "root (Cron Daemon)" -> "Cron Daemon
    <root@DOMAIN>".  A header with none is left byte for byte."""
    fields: List[bytes] = []
    for line in head.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line      # a continuation
        else:
            fields.append(line)
    kept = []
    for field in fields:
        name, _, value = field.partition(b":")
        if name.strip().lower().decode("ascii", "replace") in _ADDRESS_HEADERS:
            text = re.sub(r"\r?\n(?=[ \t])", "", value.decode("utf-8", "replace"))
            pairs = [(n, a) for n, a in email.utils.getaddresses([text]) if a]
            if any("@" not in a for _, a in pairs):
                shown = [email.utils.formataddr((n, _completed(a, domain)), charset="utf-8")
                         for n, a in pairs]
                joined = ", ".join(shown)
                if len(joined) > 70:    # one address a line, never over 998 octets
                    joined = ",\r\n ".join(shown)
                field = b"%s: %s\r\n" % (name.strip(), joined.encode("utf-8"))
        kept.append(field)
    return b"".join(kept)


def _sendmail_message(data: bytes, sender: str, full_name: Optional[str],
                      domain: str) -> bytes:
    """The message as sendmail would send it: without Bcc, the bare names
    in its address headers completed, a message of body only given a head,
    and a From header when it has none (the full name from -F, else $NAME,
    as Postfix's sendmail)."""
    head, rest = _split_head(_without_bcc(data))
    head = _completed_headers(head, domain)
    data = head + rest
    if not head:
        data = b"\r\n" + rest   # all of it is body: the headers below start it
    if not re.search(rb"(?im)^from:", head):
        name = full_name if full_name is not None else os.environ.get("NAME", "")
        address = sender or "%s@%s" % (_login_name(), domain)
        data = b"From: %s\r\n%s" % (email.utils.formataddr(
            (_CONTROL.sub("", name).strip(), address), charset="utf-8").encode("utf-8"), data)
    return data


def _deliver_directly(config: SMTPConfig, sender: str, rcpts: List[str], data: bytes,
                      why: str) -> int:
    """For a user who may not write the queue: send now, as msmtp does, and
    exit 0 only when every recipient has it; else a line for the others
    (nothing is kept for them), and 75 when none has it and it may be tried
    again (a 4xx, a relay down), 69 when all were refused, or when some
    have it: a caller told 75 would send it again to those too."""
    log.info("2.0.0 sendmail: delivering directly, not queueing: %s", why)
    try:
        with Mailer(config) as mailer:
            undelivered = mailer.send(sender, rcpts, data)
    except DeliveryError as e:
        undelivered = e.refused or dict.fromkeys(rcpts, e.reply)
    if not undelivered:
        return os.EX_OK
    delivered = [r for r in rcpts if r not in undelivered]
    for group in _by_reply(undelivered):
        print("%s sendmail: not sent to %s: %s (%s)" % (
            group.reply.status, ", ".join("<%s>" % _shown(r) for r in group.recipients),
            group.reply, "refused" if group.reply.permanent else
            "nothing is kept, as this user may not write the queue: send it again later"),
            file=sys.stderr)
    if delivered:
        print("2.0.0 sendmail: delivered to %s" % ", ".join(
            "<%s>" % _shown(r) for r in delivered), file=sys.stderr)
    if not delivered and any(not reply.permanent for reply in undelivered.values()):
        return os.EX_TEMPFAIL
    return os.EX_UNAVAILABLE


def _become(uid: int, gid: int) -> None:
    """Root, in sendmail mode, becomes the queue's owner for the rest of the
    process (its groups, its gid, then its uid), so that root's mail (cron's,
    most of all) is queued and retried like any other, in files the owner's
    processor may remove: root writes no other user's queue with its own
    rights (Queue._check_dir)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        os.setgroups([])
    else:
        gid = entry.pw_gid
        os.initgroups(entry.pw_name, gid)
    os.setgid(gid)
    os.setuid(uid)


def _queue_of_owner(config: SMTPConfig) -> Tuple[Optional[Queue], str]:
    """The queue, when this user owns it and so may write it (root becomes
    its owner: _become); else None and why not.  A queue that does not
    exist is not made here: made by whoever calls sendmail first (root's
    cron), it would lock its processor out."""
    try:
        st = os.lstat(config.queuepath)
    except OSError as e:
        return None, "queue %s: %s" % (config.queuepath, e.strerror)
    if st.st_uid != os.geteuid() and os.geteuid() == 0 and stat.S_ISDIR(st.st_mode):
        log.info("2.0.0 sendmail: queueing as %s, the owner of queue %s",
                 _user_name(st.st_uid), config.queuepath)
        try:
            _become(st.st_uid, st.st_gid)
        except OSError as e:    # a root without CAP_SETUID (a container)
            return None, "cannot become %s, the owner of queue %s: %s" % (
                _user_name(st.st_uid), config.queuepath, e.strerror)
    if st.st_uid != os.geteuid():
        return None, "queue %s is owned by %s, not by %s" % (
            config.queuepath, _user_name(st.st_uid), _user_name(os.geteuid()))
    return _queue_from(config, create=False), ""


def _sendmail_send(config: SMTPConfig, args: _SendmailArgs, run: str) -> int:
    """sendmail -bm: read the message, queue it (or, for a user who may not
    write the queue, deliver it now); quiet on success."""
    domain = config.default_domain or _fqdn()
    data = sys.stdin.buffer.read()
    if not args.ignore_dots:
        data = _until_dot(data)
    recipients = _sendmail_recipients(args.recipients, domain)
    if args.from_headers:   # added to those given, as Postfix does
        recipients += [_completed(r, domain) for r in
                       _header_addresses(data, ("To", "Cc", "Bcc"))]
    if not recipients:
        raise _sendmail_usage("no recipients: give them after the options, or -t to "
                              "take them from the To, Cc and Bcc headers")
    if args.sender is None:
        sender = "%s@%s" % (_login_name(), domain)
    else:
        sender = args.sender.strip()
        if sender not in ("", "<>"):
            sender = _completed(email.utils.parseaddr(sender)[1] or sender.strip("<>"),
                                domain)
        else:
            sender = ""     # the empty sender, as a bounce's
    data = _sendmail_message(data, sender, args.full_name, domain)
    rcpts, data = _prepared(sender, recipients, data, False)
    queue, why = _queue_of_owner(config)
    if queue is None:
        return _deliver_directly(config, sender, rcpts, data, why)
    name = _queue_now(config, queue, sender, rcpts, data, False)
    what = ""
    if args.deliver_now:
        what, line = _deliver_now(config, queue, name)
        if what != "delivered":
            print("%s" % line, file=sys.stderr)
    if what != "delivered":
        _no_processor_hint(queue, run)
    return os.EX_OK


def _sendmail(program: str, words: List[str]) -> int:
    """sendmail mode (program "sendmail") and mailq: the exit status."""
    handler = _LogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    log.propagate = False
    sending = False
    try:
        args = _sendmail_args(words)
        if program == "mailq":
            args.mode = "p"
        log.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)])
        for line in args.warnings:
            print(line, file=sys.stderr)
        path, instance = _sendmail_config()
        config = load_config(path, instance)
        if args.mode == "p":
            return _cmd_list(config, argparse.Namespace(json=False))
        sending = True
        return _sendmail_send(config, args, "gsemail --config %s --instance %s" % (
            shlex.quote(path), shlex.quote(instance)))
    except GsEmailError as e:
        print("%s %s" % (e.status, e), file=sys.stderr)
        # A queue that cannot take a message now (a full disk, its owner's
        # rights) is sendmail's temporary failure: 75, which callers try
        # again; some read 73 as final and drop the mail.
        if sending and isinstance(e, QueueError) and e.status.startswith("4"):
            return os.EX_TEMPFAIL
        return e.exit_code
    except KeyboardInterrupt:
        print("4.3.2 sendmail: interrupted", file=sys.stderr)
        return os.EX_TEMPFAIL
    except BrokenPipeError:     # mailq | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return os.EX_OK
    finally:
        log.removeHandler(handler)


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; returns the exit status.  Run as sendmail or mailq
    (by a link of that name, or as python -m gsemail sendmail ... or
    python -m gsemail mailq), it takes sendmail's command line instead."""
    words = list(sys.argv[1:] if argv is None else argv)
    # the program's name counts only for the program's own command line
    program = os.path.basename(sys.argv[0]) if argv is None and sys.argv else ""
    if program in ("sendmail", "mailq"):
        return _sendmail(program, words)
    if words[:1] == ["sendmail"] or words == ["mailq"]:
        return _sendmail(words[0], words[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    no_config = getattr(args, "no_config", False)      # sink
    if not args.config and not no_config:
        parser.error("--config is required (or set $GSEMAIL_CONFIG)")
    if args.once and args.command:
        parser.error("--once is for running the processor, not for %s" % args.command)

    global _cli
    _cli = [sys.executable, "-m", "gsemail"] + list(sys.argv[1:] if argv is None else argv)
    handler = _LogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)])
    log.propagate = False
    try:
        if no_config:
            sink: Callable[[Optional[SMTPConfig], argparse.Namespace], int] = args.run
            return sink(None, args)
        config = load_config(args.config, args.instance)
        if args.verbose >= 3 and not config.debug:
            config = dataclasses.replace(config, debug=True)
        run: Callable[[SMTPConfig, argparse.Namespace], int] = args.run
        return run(config, args)
    except GsEmailError as e:
        cannot_check = getattr(args, "cannot_check", None)    # status: UNKNOWN
        if cannot_check is not None:
            return int(cannot_check(e, args))
        print("%s %s" % (e.status, e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("4.3.2 interrupted%s" % (": the message in flight will be sent again"
                                       if args.command is None else ""), file=sys.stderr)
        return os.EX_TEMPFAIL
    except BrokenPipeError:
        # The reader has gone (gsemail list | head): not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return os.EX_OK
    finally:
        log.removeHandler(handler)
        _cli = None


if __name__ == "__main__":
    sys.exit(main())
