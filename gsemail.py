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

* one connection carries many messages; every RCPT reply is read, so a 5xx
  for one recipient never loses the others and a 4xx keeps only that
  recipient queued;
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
main``.  README.rst is the full manual.

Public names: send_email, configure, shutdown, load_config, SMTPConfig,
Queue, Mailer, QueueProcessor, Reply, main and the exceptions GsEmailError,
ConfigError, QueueError, MessageError, DeliveryError and TLSError.
"""

import argparse
import atexit
import configparser
import dataclasses
import datetime
import difflib
import email.message
import email.utils
import errno
import fcntl
import functools
import ipaddress
import json
import logging
import os
import random
import re
import signal
import smtplib
import socket
import ssl
import stat
import sys
import threading
import time
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Union

__version__ = "1.0.0"
__all__ = [
    "send_email", "configure", "shutdown", "load_config", "SMTPConfig",
    "Queue", "QueuedMessage", "Mailer", "QueueProcessor", "Reply", "main",
    "GsEmailError", "ConfigError", "QueueError", "MessageError",
    "DeliveryError", "TLSError",
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

    @classmethod
    def parse(cls, line: str) -> "Reply":
        """Read back a reply written by ``str(reply)``."""
        match = re.match(r"(\d{3}) (.*)", line.strip(), re.S)
        if not match:
            return cls(451, "4.3.0 " + line.strip())
        return cls(int(match.group(1)), match.group(2))


_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s|$)")


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
# Configuration: GroupServer's gsconfig.ini.
# ---------------------------------------------------------------------------

def _duration(text: str) -> float:
    """'90', '90s', '5m', '1h', '5d' or '1w' as seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not match:
        raise ValueError(text)
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    return float(match.group(1)) * scale[match.group(2)]


@functools.cache
def _fqdn() -> str:
    # getfqdn() can take seconds on a badly configured resolver, and
    # smtplib calls it per connection when local_hostname is not given.
    return socket.getfqdn() or "localhost"


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
    source: str = dataclasses.field(default="", compare=False)

    def __post_init__(self) -> None:
        where = (" in %s" % self.source) if self.source else ""

        def bad(option: str, value: object, why: str) -> ConfigError:
            return ConfigError("option %s = %r%s: %s" % (option, value, where, why))

        if not isinstance(self.hostname, str) or not self.hostname.strip():
            raise bad("hostname", self.hostname, "a host name or address is required")
        if not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise bad("port", self.port, "must be a whole number from 1 to 65535")
        if bool(self.username) != bool(self.password):
            option = "password" if self.username else "username"
            raise ConfigError("option %s is missing%s: username and password go "
                              "together (leave both empty for no AUTH)" % (option, where))
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
        for name in ("timeout", "min_backoff_time", "max_backoff_time",
                     "max_queue_lifetime", "poll_interval"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise bad(name, value, "must be a duration above zero")
        for name in ("messages_per_connection", "recipients_per_transaction"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise bad(name, value, "must be a whole number of at least 1")
        if self.max_backoff_time < self.min_backoff_time:
            raise bad("max_backoff_time", self.max_backoff_time,
                      "must not be less than min_backoff_time")

    @property
    def use_implicit_tls(self) -> bool:
        """SMTPS: TLS from the first byte (port 465 unless set)."""
        if self.implicit_tls is None:
            return self.port == 465 and not self.no_tls
        return self.implicit_tls

    @property
    def tls_required(self) -> bool:
        return self.force_tls or self.use_implicit_tls

    @property
    def verify_certificates(self) -> bool:
        """Verify where TLS is required, unless tls_verify says otherwise."""
        if self.tls_verify is None:
            return self.tls_required
        return self.tls_verify

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


# Options, their parser and whether they are required.  The first nine are
# gs.email's; the rest are ours.
_BOOLEAN = "boolean"
_OPTIONS = {
    "hostname": str, "port": int, "username": str, "password": str,
    "no_tls": _BOOLEAN, "force_tls": _BOOLEAN, "queuepath": str,
    "processorthread": _BOOLEAN, "xverp": _BOOLEAN,
    "timeout": _duration, "implicit_tls": _BOOLEAN, "tls_verify": _BOOLEAN,
    "cafile": str, "ehlo_name": str, "messages_per_connection": int,
    "recipients_per_transaction": int, "min_backoff_time": _duration,
    "max_backoff_time": _duration, "max_queue_lifetime": _duration,
    "poll_interval": _duration,
}
_REQUIRED = ("hostname", "port")


def load_config(path: str, instance: str = "default") -> SMTPConfig:
    """Read the SMTP settings of ``instance`` from the gsconfig.ini at path.

    ``[config-<instance>]`` with ``smtp = NAME`` selects ``[smtp-NAME]``;
    without a ``[config-<instance>]`` section ``[smtp-<instance>]`` is used.
    Raises ConfigError naming the file, section and option at fault.
    """
    parser = configparser.ConfigParser(
        interpolation=configparser.BasicInterpolation(), strict=True)
    parser.optionxform = str    # option names as written, like gs.config
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except FileNotFoundError:
        raise ConfigError("%s: no such config file" % path) from None
    except PermissionError:
        raise ConfigError("%s: cannot read the config file (permission "
                          "denied)" % path) from None
    except IsADirectoryError:
        raise ConfigError("%s: is a directory, not a config file" % path) from None
    except UnicodeDecodeError as e:
        raise ConfigError("%s: not a UTF-8 text file (byte %d)"
                          % (path, e.start)) from None
    except configparser.DuplicateSectionError as e:
        raise ConfigError("%s, line %s: section [%s] appears twice"
                          % (path, e.lineno, e.section)) from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError("%s, line %s: option %s appears twice in [%s]"
                          % (path, e.lineno, e.option, e.section)) from None
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError("%s, line %s: text before the first [section] header"
                          % (path, e.lineno)) from None
    except configparser.ParsingError as e:
        # Lines are not quoted: they might hold a password.
        lines = ", ".join(str(n) for n, _ in e.errors)
        raise ConfigError("%s: cannot parse line %s (not 'option = value')"
                          % (path, lines)) from None
    except OSError as e:
        raise ConfigError("%s: cannot read the config file: %s"
                          % (path, e.strerror)) from None

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

    where = "%s [%s]" % (path, section)
    values: Dict[str, object] = {"source": where}
    for option in parser.options(section):
        kind = _OPTIONS.get(option)
        raw = _get(parser, path, section, option)
        if kind is None:
            close = difflib.get_close_matches(option, _OPTIONS, n=1, cutoff=0.8)
            if close:
                log.warning("4.3.5 %s: option %s is not known; did you mean %s?",
                            where, option, close[0])
            continue
        value = raw.strip()
        if option in ("username", "password", "cafile", "ehlo_name") and not value:
            continue    # empty means unset, as in gs.email
        if kind is _BOOLEAN:
            state = configparser.ConfigParser.BOOLEAN_STATES.get(value.lower())
            if state is None:
                raise ConfigError("%s: option %s = %r is not a boolean (use true/"
                                  "false, yes/no, on/off or 1/0)" % (where, option, value))
            values[option] = state
        elif kind is str:
            values[option] = raw if option == "password" else value
        else:
            try:
                values[option] = kind(value)
            except ValueError:
                shown = "(hidden)" if option == "password" else repr(value)
                what = "whole number" if kind is int else "duration such as 60, 5m, 1h or 5d"
                raise ConfigError("%s: option %s = %s is not a %s"
                                  % (where, option, shown, what)) from None
    for option in _REQUIRED:
        if option not in values:
            raise ConfigError("%s: required option %s is missing" % (where, option))
    return SMTPConfig(**values)  # type: ignore[arg-type]


def _get(parser: configparser.ConfigParser, path: str, section: str,
         option: str) -> str:
    try:
        return parser.get(section, option)
    except configparser.InterpolationError:
        raise ConfigError("%s [%s]: option %s has a lone %%: write %%%% for a "
                          "literal %%" % (path, section, option)) from None


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
# ---------------------------------------------------------------------------

_counter = iter(range(1, 1 << 62))
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
_STALE_TMP = 36 * 3600      # Maildir's rule for abandoned tmp/ files
_CUR_RESCAN = 60.0          # look at cur/ at least this often


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: str, chunks: List[bytes], exclusive: bool = False) -> None:
    """Write chunks to a new file of mode 0600 (whatever the umask) and fsync it."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _envelope(sender: str, recipients: List[str]) -> bytes:
    """zope.sendmail's two envelope lines."""
    return ("X-Zope-From: %s\nX-Zope-To: %s\n" % (sender, ", ".join(recipients))
            ).encode("utf-8")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class QueuedMessage:
    """A message claimed for delivery.  Nobody else will send it until it is
    settled with Queue.remove, Queue.defer or Queue.dead_letter, or released.
    """

    def __init__(self, path: str, claim_path: str, fd: int) -> None:
        self.path = path
        self.name = os.path.basename(path)
        self.claim_path = claim_path
        self._fd = fd
        self._beat = time.monotonic()
        self.sender = ""
        self.recipients: List[str] = []
        self.data = b""
        self.xverp = self.name.endswith(":2,X")
        self.state: Dict[str, object] = {}
        self.problem: Optional[str] = None
        self.mtime = 0.0

    @property
    def first_queued(self) -> float:
        if "first_queued" in self.state:
            return float(self.state["first_queued"])  # type: ignore[arg-type]
        match = re.match(r"(\d{9,})\.", self.name)
        return float(match.group(1)) if match else self.mtime

    @property
    def attempts(self) -> int:
        return int(self.state.get("attempts", 0))  # type: ignore[arg-type]

    def heartbeat(self) -> None:
        """Show that the claim's owner is alive (for claims seen over NFS)."""
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
        try:
            os.unlink(self.claim_path)
        except FileNotFoundError:
            pass
        finally:
            # Unlink before closing: the flock protects the claim until the
            # name is gone, so no one can mistake it for a dead owner's.
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return "<QueuedMessage %s>" % self.name


class Queue:
    """The durable Maildir queue at ``path``."""

    def __init__(self, path: str, claim_timeout: float = 240.0) -> None:
        self.path = os.path.abspath(path)
        self.claim_timeout = claim_timeout
        self._cur_scan_at = 0.0
        self._setup()

    def _setup(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as e:
            raise self._error("cannot create the parent of the queue", e) from None
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            try:
                os.mkdir(self.path, 0o700)
            except FileExistsError:
                pass    # made by a process beside us
            except OSError as e:
                raise self._error("cannot create the queue directory", e) from None
            st = os.lstat(self.path)
        if stat.S_ISLNK(st.st_mode):
            raise QueueError("queue %s is a symbolic link: refusing it (another "
                             "user could point it anywhere); give the real "
                             "directory as queuepath" % self.path)
        if not stat.S_ISDIR(st.st_mode):
            raise QueueError("queue %s exists and is not a directory" % self.path)
        if st.st_uid != os.geteuid():
            raise QueueError("queue %s is owned by uid %d, not by this user (uid "
                             "%d): refusing a queue another user can read or fill"
                             % (self.path, st.st_uid, os.geteuid()))
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(self.path, 0o700)
        for sub in ("new", "cur", "tmp", "state"):
            full = os.path.join(self.path, sub)
            try:
                os.mkdir(full, 0o700)
            except FileExistsError:
                if not os.path.isdir(full) or os.path.islink(full):
                    raise QueueError("queue %s: %s is not a directory" % (self.path, full))
            except OSError as e:
                raise self._error("cannot create %s" % full, e) from None
        if not os.access(os.path.join(self.path, "new"), os.W_OK | os.X_OK):
            raise QueueError("queue %s: new/ is not writable by this user" % self.path)

    def _error(self, what: str, e: OSError) -> QueueError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return QueueError("queue %s: %s: %s" % (self.path, what, e.strerror),
                              status="4.3.1", exit_code=os.EX_TEMPFAIL)
        code = os.EX_CANTCREAT if e.errno in (errno.EACCES, errno.EPERM,
                                              errno.EROFS) else os.EX_IOERR
        return QueueError("queue %s: %s: %s" % (self.path, what, e.strerror),
                          exit_code=code)

    # -- adding -------------------------------------------------------------

    def add(self, sender: str, recipients: List[str], data: bytes,
            xverp: bool = False) -> str:
        """Queue a message durably and return its name.

        ``data`` must already have CRLF line ends.  When this returns, the
        file is fsynced and renamed into new/ and new/ is fsynced.
        """
        now = time.time()
        name = "%d.M%06dP%dQ%d.%s%s" % (now, (now % 1) * 1e6, os.getpid(),
                                        next(_counter), _HOST,
                                        ":2,X" if xverp else "")
        tmp = os.path.join(self.path, "tmp", name)
        final = os.path.join(self.path, "new", name)
        try:
            _write_synced(tmp, [_envelope(sender, recipients), data], exclusive=True)
            os.rename(tmp, final)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise self._error("cannot write the message", e) from None
        try:
            _fsync_dir(os.path.join(self.path, "new"))
        except OSError as e:
            # The message is already visible in new/ and a processor may be
            # sending it, so it cannot simply be unlinked: withdraw it only
            # if we can claim it.  Otherwise it is on its way (or sent), and
            # raising would make the caller send it a second time.
            msg = self.claim(final)
            if msg is None:
                log.error("4.3.0 queue %s: %s was queued and is being sent, but new/ "
                          "could not be synced: %s", self.path, name, e.strerror)
                return name
            try:
                os.unlink(final)
            finally:
                msg.release()
            raise self._error("cannot sync new/ after writing the message", e) from None
        return name

    # -- finding and claiming -------------------------------------------------

    def due(self, now: Optional[float] = None) -> List[str]:
        """Paths of messages that may be sent now, oldest first."""
        now = time.time() if now is None else now
        found = []
        for entry in self._scan("new"):
            found.append(entry.path)
        if now >= self._cur_scan_at:
            soonest = now + _CUR_RESCAN
            for entry in self._scan("cur"):
                try:
                    mtime = entry.stat().st_mtime
                except FileNotFoundError:
                    continue
                if mtime <= now:
                    found.append(entry.path)
                else:
                    soonest = min(soonest, mtime)
            self._cur_scan_at = soonest
        found.sort(key=os.path.basename)
        return found

    def _scan(self, sub: str) -> List[os.DirEntry]:
        try:
            with os.scandir(os.path.join(self.path, sub)) as it:
                return [e for e in it if not e.name.startswith(".")]
        except FileNotFoundError:
            raise QueueError("queue %s: %s/ has gone" % (self.path, sub)) from None

    def count(self) -> int:
        """How many messages wait (new and deferred, not dead letters)."""
        return len(self._scan("new")) + len(self._scan("cur"))

    def claim(self, path: str) -> Optional[QueuedMessage]:
        """Claim the message at path, or return None if another process has
        it, it has gone, or it is not due yet."""
        head, name = os.path.split(path)
        claim_path = os.path.join(head, ".sending-" + name)
        fd = self._make_claim(claim_path)
        if fd is None:
            return None
        msg = QueuedMessage(path, claim_path, fd)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read()
        except FileNotFoundError:
            msg.release()       # delivered by someone else meanwhile
            return None
        except BaseException:
            msg.release()
            raise
        msg.mtime = st.st_mtime
        if os.path.basename(head) == "cur" and st.st_mtime > time.time() + 1:
            msg.release()       # deferred again by someone else meanwhile
            return None
        self._parse(msg, raw)
        msg.state = self._read_state(name)
        if msg.state.get("xverp"):
            msg.xverp = True
        return msg

    def _make_claim(self, claim_path: str) -> Optional[int]:
        # The claim is born whole: written and locked under a private name in
        # tmp/, then hard-linked into place (atomic, and it fails if the name
        # exists, as zope's own link() claim does).  A process killed at any
        # point leaves either no claim or one that names it and whose lock
        # is free, so the next processor can break it at once.
        private = os.path.join(self.path, "tmp", ".claim-%s-%d-%d" % (
            _HOST, os.getpid(), next(_counter)))
        fd = os.open(private, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                os.write(fd, ("gsemail %s %d\n" % (_HOST, os.getpid())).encode())
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # A full disk must not stop the sending that empties it: the
                # claim holds without its owner's name; others just wait
                # claim_timeout before they take it as stale.
            for _ in range(2):
                try:
                    os.link(private, claim_path)
                except FileExistsError:
                    if self._break_stale_claim(claim_path):
                        continue
                    break
                taken, fd = fd, -1
                return taken
            return None
        finally:
            os.unlink(private)
            if fd >= 0:
                os.close(fd)

    def _break_stale_claim(self, claim_path: str) -> bool:
        """Remove a claim whose owner is gone.  True if it was removed.

        Our claims hold an flock while their owner lives, so a claim we can
        lock that names this host belongs to a dead process.  Any other claim
        (another host, or zope.sendmail's hard link) is stale only when it
        has not been touched for claim_timeout seconds.
        """
        try:
            fd = os.open(claim_path, os.O_RDONLY)
        except FileNotFoundError:
            return True
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
            # ours holds "gsemail HOST PID"; zope's is a link to the message
            words = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            ours = len(words) == 3 and words[0] == "gsemail" and words[1] == _HOST
            # link() and utime() both set ctime: a zope claim's age is its ctime.
            age = time.time() - max(st.st_mtime, st.st_ctime)
            if not ours and age < self.claim_timeout:
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

    @staticmethod
    def _parse(msg: QueuedMessage, raw: bytes) -> None:
        first, _, rest = raw.partition(b"\n")
        second, _, rest = rest.partition(b"\n")
        first, second = first.rstrip(b"\r"), second.rstrip(b"\r")
        if not (first.startswith(b"X-Zope-From:") and second.startswith(b"X-Zope-To:")):
            msg.problem = ("5.6.0 queue file does not start with the X-Zope-From "
                           "and X-Zope-To envelope lines")
            return
        try:
            msg.sender = first[12:].decode("utf-8").strip()
            to = second[10:].decode("utf-8").strip()
        except UnicodeDecodeError:
            msg.problem = "5.6.0 queue file envelope is not UTF-8"
            return
        msg.recipients = [r.strip() for r in to.split(",") if r.strip()]
        # A dead letter moved back by hand keeps our X-Gsemail- lines: skip them.
        while rest.startswith(b"X-Gsemail-"):
            rest = rest.partition(b"\n")[2]
        msg.data = rest
        if not msg.recipients:
            msg.problem = "5.1.3 queue file has no recipients in X-Zope-To"
        elif not rest.strip():
            msg.problem = "5.6.0 queue file holds no message (empty or truncated)"

    # -- per-message state ------------------------------------------------------

    def _state_path(self, name: str) -> str:
        return os.path.join(self.path, "state", name)

    def _read_state(self, name: str) -> Dict[str, object]:
        try:
            with open(self._state_path(name), encoding="utf-8") as f:
                state = json.load(f)
            return state if isinstance(state, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("4.3.0 %s: ignoring unreadable state file: %s",
                        self._state_path(name), e)
            return {}

    def _write_state(self, name: str, state: Dict[str, object], sync: bool) -> None:
        path = self._state_path(name)
        tmp = os.path.join(self.path, "tmp", ".state-" + name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(state, sort_keys=True).encode("utf-8"))
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)

    # -- settling -----------------------------------------------------------

    def remove(self, msg: QueuedMessage) -> None:
        """The message is done with: delete it and its state."""
        try:
            os.unlink(msg.path)
        except FileNotFoundError:
            pass
        try:
            os.unlink(self._state_path(msg.name))
        except FileNotFoundError:
            pass
        msg.release()

    def defer(self, msg: QueuedMessage, recipients: List[str],
              state: Dict[str, object], next_attempt: float) -> None:
        """Keep the message for the recipients still to do, due again at
        next_attempt, and record state."""
        try:
            # The refused recipients must survive a crash (they go in the dead
            # letter); attempts and times are cheap to lose.
            sync = (state.get("failed") or {}) != (msg.state.get("failed") or {})
            self._write_state(msg.name, state, sync)
            cur = os.path.join(self.path, "cur", msg.name)
            if recipients != msg.recipients:
                # Only those left go in X-Zope-To, so no reader of this queue
                # (zope.sendmail included) sends twice to those done.
                tmp = os.path.join(self.path, "tmp", msg.name)
                _write_synced(tmp, [_envelope(msg.sender, recipients), msg.data])
                os.utime(tmp, (next_attempt, next_attempt))
                # Replace in place, then move: a crash between the two
                # leaves the shorter list due early, never the longer one.
                os.rename(tmp, msg.path)
                if msg.path != cur:
                    os.rename(msg.path, cur)
                    _fsync_dir(os.path.dirname(msg.path))
                _fsync_dir(os.path.join(self.path, "cur"))
            else:
                os.utime(msg.path, (next_attempt, next_attempt))
                if msg.path != cur:
                    os.rename(msg.path, cur)
        except OSError as e:
            raise self._error("cannot defer %s" % msg.name, e) from None
        msg.recipients, msg.state = list(recipients), state
        msg.path = cur
        self._cur_scan_at = min(self._cur_scan_at, next_attempt)
        msg.release()

    def dead_letter(self, msg: QueuedMessage, failures: Dict[str, str],
                    summary: str) -> str:
        """Move the message aside as ``.rejected-NAME`` for the recipients in
        failures (recipient -> reason) and return that path."""
        head = os.path.dirname(msg.path)
        rejected = os.path.join(head, ".rejected-" + msg.name)
        tmp = os.path.join(self.path, "tmp", ".rejected-" + msg.name)
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        lines = ["X-Zope-From: %s" % msg.sender,
                 "X-Zope-To: %s" % ", ".join(failures),
                 "X-Gsemail-Dead-Letter: %s; attempts=%d; first-queued=%s; "
                 "failed=%d; %s" % (when, msg.attempts, datetime.datetime.fromtimestamp(
                     msg.first_queued, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                     len(failures), _one_line(summary))]
        lines += ["X-Gsemail-Failed: <%s> %s" % (rcpt, _one_line(why))
                  for rcpt, why in failures.items()]
        try:
            _write_synced(tmp, [("\n".join(lines) + "\n").encode("utf-8", "replace"),
                                msg.data])
            os.rename(tmp, rejected)
            _fsync_dir(head)
        except OSError as e:
            raise self._error("cannot write dead letter %s" % rejected, e) from None
        self.remove(msg)
        return rejected

    # -- housekeeping -------------------------------------------------------------

    def maintain(self) -> None:
        """Remove what crashed processes left: old tmp/ files, claims whose
        message has gone and state files whose message has gone."""
        now = time.time()
        for entry in os.scandir(os.path.join(self.path, "tmp")):
            try:
                if now - entry.stat().st_mtime > _STALE_TMP:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass
        names = set()
        for sub in ("new", "cur"):
            head = os.path.join(self.path, sub)
            listing = os.listdir(head)
            names.update(n for n in listing if not n.startswith("."))
            for n in listing:
                if n.startswith(".sending-") and n[9:] not in listing:
                    self._break_stale_claim(os.path.join(head, n))
        for entry in os.scandir(os.path.join(self.path, "state")):
            try:
                if entry.name not in names and now - entry.stat().st_mtime > 3600:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------------------
# The mailer: one SMTP connection that carries many messages.
# ---------------------------------------------------------------------------

_CHUNK = 1 << 20            # bytes of DATA sent between heartbeats
_WINDOW = 100               # pipelined commands sent before reading replies
_TOO_MANY = re.compile(r"4\.5\.3|too many", re.I)


def _address_problem(address: str) -> Optional[str]:
    """Why address cannot go in MAIL FROM or RCPT TO, or None if it can."""
    if any(ord(c) < 32 or ord(c) == 127 for c in address):
        return "contains a control character (CR, LF, NUL, ...)"
    if len(address.encode("utf-8")) > 254:
        return "is longer than 254 octets"
    if "," in address:
        return "contains a comma (give each address as its own item of the list)"
    if "<" in address or ">" in address:
        return "contains < or > (give the bare address, not 'Name <address>')"
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "is not of the form local-part@domain"
    if " " in domain or (" " in local and not (local.startswith('"')
                                                and local.endswith('"'))):
        return "contains a space"
    return None


def _wire(data: bytes) -> bytes:
    """The DATA payload: CRLF line ends, dot-stuffed, ending in CRLF.CRLF."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    data = re.sub(rb"(?m)^\.", b"..", data)
    return data + b".\r\n"


class _ConnectionLost(Exception):
    """The connection can carry nothing more (421, drop, timeout, garbage)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclasses.dataclass
class _Outcome:
    """What one delivery attempt did with each recipient."""

    delivered: List[str] = dataclasses.field(default_factory=list)
    failed: Dict[str, Reply] = dataclasses.field(default_factory=dict)
    deferred: Dict[str, Reply] = dataclasses.field(default_factory=dict)
    final: Optional[Reply] = None


def _reply_for(exc: BaseException, where: str) -> Reply:
    """The Reply that stands for an exception raised while talking SMTP."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Reply(454, "4.7.5 certificate of %s did not verify: %s"
                     % (where, exc.verify_message or exc))
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
    if isinstance(exc, OSError):
        return Reply(451, "4.4.1 cannot talk to %s: %s" % (where, exc.strerror or exc))
    return Reply(451, "4.3.0 %s: %s" % (type(exc).__name__, exc))


class _Session:
    """One open SMTP connection and what its server offered."""

    def __init__(self, smtp: smtplib.SMTP) -> None:
        self.smtp = smtp
        self.features = dict(smtp.esmtp_features)
        self.pipelining = "pipelining" in self.features
        try:
            self.size = int(self.features.get("size", "0").split()[0])
        except (ValueError, IndexError):
            self.size = 0
        self.messages = 0
        self.broken = False
        self.warned_xverp = False


class Mailer:
    """Delivers messages over SMTP to the relay in an SMTPConfig.

    ``send`` is for direct use; the queue processor uses ``open`` and
    ``deliver``.  One connection carries up to messages_per_connection
    messages; ``close`` ends it with QUIT.
    """

    def __init__(self, config: SMTPConfig) -> None:
        self.config = config
        self.where = "%s:%d" % (config.hostname, config.port)
        self._session: Optional[_Session] = None
        self._context: Optional[ssl.SSLContext] = None

    # -- connecting ---------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        if self._context is None:
            context = ssl.create_default_context(cafile=self.config.cafile)
            if not self.config.verify_certificates:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._context = context
        return self._context

    def open(self) -> None:
        """Make sure a usable connection is open: raises DeliveryError (a
        TLSError for TLS trouble) when the relay cannot be used."""
        s = self._session
        if s is not None and not s.broken and \
                s.messages < self.config.messages_per_connection:
            return
        self.close()
        try:
            smtp = self._connect()
        except TLSError as e:
            # Opportunistic TLS, as Postfix's "may": a failed handshake is
            # no worse than a server without STARTTLS, so try again in plain
            # text.  Never when TLS is required or certificates are checked.
            c = self.config
            if c.tls_required or c.verify_certificates or e.status != "4.7.5":
                raise
            log.warning("%s: sending in plain text, as TLS is not required (set "
                        "force_tls = true to require it)", e.reply)
            smtp = self._connect(starttls=False)
        self._session = _Session(smtp)

    def _connect(self, starttls: bool = True) -> smtplib.SMTP:
        c = self.config
        smtp = None
        try:
            if c.use_implicit_tls:
                smtp = smtplib.SMTP_SSL(c.hostname, c.port, local_hostname=c.local_hostname,
                                        timeout=c.timeout, context=self._tls_context())
            else:
                smtp = smtplib.SMTP(c.hostname, c.port, local_hostname=c.local_hostname,
                                    timeout=c.timeout)
            self._hello(smtp)
            encrypted = c.use_implicit_tls
            if not encrypted and not c.no_tls and starttls:
                if smtp.has_extn("starttls"):
                    code, text = smtp.docmd("STARTTLS")
                    if code == 220:
                        smtp.sock = self._tls_context().wrap_socket(
                            smtp.sock, server_hostname=c.hostname)
                        smtp.file = None
                        smtp.helo_resp = smtp.ehlo_resp = None
                        smtp.esmtp_features, smtp.does_esmtp = {}, False
                        self._hello(smtp)
                        encrypted = True
                    elif c.force_tls:
                        raise TLSError(Reply(454, "4.7.4 %s refused STARTTLS (%d %s) "
                                             "and force_tls is set" % (
                                                 self.where, code, _one_line(
                                                     text.decode("utf-8", "replace")))))
                    else:
                        log.warning("4.7.4 %s refused STARTTLS (%d): sending in plain "
                                    "text", self.where, code)
                elif c.force_tls:
                    raise TLSError(Reply(454, "4.7.4 %s does not offer STARTTLS and "
                                         "force_tls is set: nothing is sent in plain "
                                         "text" % self.where))
            if encrypted:
                log.info("2.7.0 TLS with %s (%s), certificate %s", self.where,
                         smtp.sock.version(), "verified" if c.verify_certificates
                         else "not verified (set tls_verify = true to require it)")
            if c.username:
                self._login(smtp, encrypted)
            return smtp
        except BaseException as e:
            if smtp is not None:
                smtp.close()
            if isinstance(e, DeliveryError):
                raise
            if not isinstance(e, Exception):
                raise
            reply = _reply_for(e, self.where)
            if isinstance(e, smtplib.SMTPConnectError):
                reply = Reply(reply.code, "%s (greeting from %s)" % (reply.text, self.where))
            if reply.status.startswith(("4.7.5", "4.7.4")):
                raise TLSError(reply) from None
            raise DeliveryError(reply) from None

    @staticmethod
    def _hello(smtp: smtplib.SMTP) -> None:
        code, text = smtp.ehlo()
        if code == -1:
            raise smtplib.SMTPServerDisconnected("no reply to EHLO")
        if not 200 <= code < 300:
            code, text = smtp.helo()
            if not 200 <= code < 300:
                raise smtplib.SMTPResponseException(code, text)

    def _login(self, smtp: smtplib.SMTP, encrypted: bool) -> None:
        c = self.config
        peer = smtp.sock.getpeername()[0]
        if not encrypted and not ipaddress.ip_address(peer.split("%")[0]).is_loopback:
            raise DeliveryError(Reply(454, "4.7.0 refusing to send the password for %s "
                                      "in plain text to %s: enable TLS on the relay "
                                      "or unset no_tls" % (c.username, self.where)))
        if not smtp.has_extn("auth"):
            raise DeliveryError(Reply(454, "4.7.0 %s does not offer AUTH, but username "
                                      "is set" % self.where))
        try:
            smtp.login(c.username, c.password)
        except smtplib.SMTPAuthenticationError as e:
            raise DeliveryError(Reply(e.smtp_code, "%s (AUTH as %s at %s)" % (
                _reply_for(e, self.where).text, c.username, self.where))) from None
        except smtplib.SMTPException as e:
            raise DeliveryError(Reply(454, "4.7.0 AUTH as %s at %s failed: %s"
                                      % (c.username, self.where, e))) from None

    def close(self) -> None:
        """End the connection: QUIT unless it is broken; errors are ignored,
        so they can never hide the one that made us close."""
        s, self._session = self._session, None
        if s is None:
            return
        try:
            if not s.broken:
                s.smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass
        finally:
            s.smtp.close()

    def __enter__(self) -> "Mailer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- talking --------------------------------------------------------------

    def _reply(self) -> Reply:
        try:
            code, text = self._session.smtp.getreply()  # type: ignore[union-attr]
        except (smtplib.SMTPException, OSError) as e:
            raise _ConnectionLost(_reply_for(e, self.where)) from None
        reply = Reply(code, _one_line(text.decode("utf-8", "replace")))
        if code == -1 or not 200 <= code < 600:
            raise _ConnectionLost(Reply(451, "4.4.2 garbled reply from %s: %s"
                                        % (self.where, reply.text[:200])))
        if code == 421:
            raise _ConnectionLost(reply)
        return reply

    def _send(self, data: bytes) -> None:
        try:
            self._session.smtp.sock.sendall(data)  # type: ignore[union-attr]
        except (OSError, AttributeError) as e:
            raise _ConnectionLost(_reply_for(
                smtplib.SMTPServerDisconnected(str(e)), self.where)) from None

    def _rset(self) -> None:
        try:
            self._send(b"RSET\r\n")
            self._reply()
        except _ConnectionLost:
            self._session.broken = True  # type: ignore[union-attr]

    def _exchange(self, mail: bytes, rcpts: List[bytes]) -> List[Reply]:
        """Send MAIL, the RCPTs and DATA; return their replies.  Pipelined
        (in windows of _WINDOW commands) when offered, else one by one,
        stopping where the server has already said no."""
        commands = [mail] + rcpts + [b"DATA\r\n"]
        replies: List[Reply] = []
        if self._session.pipelining:  # type: ignore[union-attr]
            for i in range(0, len(commands), _WINDOW):
                window = commands[i:i + _WINDOW]
                self._send(b"".join(window))
                replies += [self._reply() for _ in window]
            return replies
        self._send(mail)
        replies.append(self._reply())
        if not replies[0].ok:
            return replies
        for command in rcpts:
            self._send(command)
            replies.append(self._reply())
        if any(r.ok for r in replies[1:]):
            self._send(b"DATA\r\n")
            replies.append(self._reply())
        return replies

    def deliver(self, sender: str, recipients: List[str], data: bytes,
                xverp: bool = False,
                heartbeat: Optional[Callable[[], None]] = None) -> _Outcome:
        """Deliver one message on the open connection (see ``open``) and
        report each recipient as delivered, failed or deferred."""
        s = self._session
        if s is None:
            raise RuntimeError("Mailer.deliver() before Mailer.open()")
        s.messages += 1
        out = _Outcome()
        offers_utf8 = "smtputf8" in s.features
        problem = _address_problem(sender) if sender else None
        if problem or not (sender.isascii() or offers_utf8):
            why = (Reply(553, "5.1.7 sender <%s> %s" % (sender, problem)) if problem
                   else Reply(553, "5.6.7 sender <%s> is not ASCII and %s does not "
                              "offer SMTPUTF8" % (sender, self.where)))
            out.failed = dict.fromkeys(recipients, why)
            out.final = why
            return out
        pending = []
        for rcpt in recipients:
            problem = _address_problem(rcpt)
            if problem:
                out.failed[rcpt] = Reply(553, "5.1.3 recipient <%s> %s" % (rcpt, problem))
            elif not rcpt.isascii() and not offers_utf8:
                out.failed[rcpt] = Reply(553, "5.6.7 recipient <%s> is not ASCII and %s "
                                         "does not offer SMTPUTF8" % (rcpt, self.where))
            else:
                pending.append(rcpt)
        if not data.isascii() and "8bitmime" not in s.features:
            # RFC 6152: 8-bit data must not go to a server that does not take
            # it; we do not rewrite messages, so it is returned undelivered.
            why = Reply(554, "5.6.3 message has 8-bit data and %s does not offer "
                        "8BITMIME" % self.where)
            out.failed.update((r, why) for r in pending)
            out.final = why
            return out
        wire = _wire(data)
        if s.size and len(wire) > s.size:
            why = Reply(552, "5.3.4 message of %d bytes is larger than the %d that "
                        "%s accepts" % (len(wire), s.size, self.where))
            out.failed.update((r, why) for r in pending)
            out.final = why
            return out
        params = []
        if "size" in s.features:
            params.append("SIZE=%d" % len(wire))
        if "8bitmime" in s.features and not data.isascii():
            params.append("BODY=8BITMIME")
        if not (sender.isascii() and all(r.isascii() for r in pending)):
            params.append("SMTPUTF8")   # non-ASCII got this far only if offered
        if xverp and sender:
            if "xverp" in s.features:
                params.append("XVERP")
            elif not s.warned_xverp:    # once per connection, not per message
                s.warned_xverp = True
                log.warning("4.3.3 %s does not offer XVERP to this client: sending "
                            "without it (bounces will not name the recipient)", self.where)
        try:
            while pending:
                pending = self._transaction(sender, params, pending, wire, out, heartbeat)
        except _ConnectionLost as e:
            s.broken = True
            self.close()
            out.final = e.reply
            done = set(out.delivered).union(out.failed)
            for rcpt in recipients:
                if rcpt not in done:
                    out.deferred.setdefault(rcpt, e.reply)
        return out

    def _transaction(self, sender: str, params: List[str], pending: List[str],
                     wire: bytes, out: _Outcome,
                     heartbeat: Optional[Callable[[], None]]) -> List[str]:
        """One MAIL..DATA transaction for up to recipients_per_transaction of
        pending; settles them in out and returns those still to try."""
        if heartbeat:
            heartbeat()
        limit = self.config.recipients_per_transaction
        batch, rest = pending[:limit], pending[limit:]
        encoding = "utf-8" if "SMTPUTF8" in params else "ascii"
        mail = ("MAIL FROM:<%s>%s\r\n" % (sender, "".join(" " + p for p in params))
                ).encode(encoding)
        rcpts = [("RCPT TO:<%s>\r\n" % r).encode(encoding) for r in batch]
        replies = self._exchange(mail, rcpts)
        mail_reply = replies[0]
        if not mail_reply.ok:
            self._rset()
            if "XVERP" in params and mail_reply.code in (501, 504, 555):
                log.warning("4.3.3 %s refused XVERP (%s): sending without it",
                            self.where, mail_reply)
                params.remove("XVERP")
                return pending
            self._settle(pending, mail_reply, out)
            return []
        accepted: List[str] = []
        carried: Dict[str, Reply] = {}
        for rcpt, reply in zip(batch, replies[1:]):
            if reply.ok:
                accepted.append(rcpt)
            elif reply.code in (452, 552) and _TOO_MANY.search(reply.text):
                carried[rcpt] = reply
            elif reply.permanent:
                out.failed[rcpt] = reply
            else:
                out.deferred[rcpt] = reply
        data_reply = replies[len(batch) + 1] if len(replies) > len(batch) + 1 else None
        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                self._send(b".\r\n")    # RFC 2920: end the empty DATA
                self._reply()
            self._rset()
            out.deferred.update(carried)    # "too many" with none taken: try later
            return rest
        if data_reply is None or data_reply.code != 354:
            self._rset()
            self._settle(accepted + list(carried) + rest, data_reply or mail_reply, out)
            return []
        for i in range(0, len(wire), _CHUNK):
            if heartbeat:
                heartbeat()
            self._send(wire[i:i + _CHUNK])
        final = self._reply()
        out.final = final
        if not final.ok:
            self._settle(accepted + list(carried) + rest, final, out)
            return []
        out.delivered += accepted
        return list(carried) + rest

    @staticmethod
    def _settle(recipients: List[str], reply: Reply, out: _Outcome) -> None:
        out.final = reply
        for rcpt in recipients:
            (out.failed if reply.permanent else out.deferred)[rcpt] = reply

    # -- direct use -----------------------------------------------------------------

    def send(self, sender: str, recipients: Union[str, Iterable[str]],
             message: Union[bytes, str, email.message.Message],
             xverp: bool = False) -> Dict[str, Reply]:
        """Send one message now, without the queue.

        Returns the recipients that were not delivered, each with its
        Reply.  Raises DeliveryError when no recipient was delivered and
        TLSError (a RuntimeError) when TLS was required and not had.
        """
        rcpts = _check_recipients(recipients)
        _check_sender(sender, xverp)
        data = _prepare_message(message)
        self.open()
        out = self.deliver(sender, rcpts, data, xverp=xverp)
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

def _transient(reply: Reply) -> Reply:
    """The same reason, as a reason to try again later."""
    if not reply.permanent:
        return reply
    status = "4" + reply.status[1:]
    text = _ENHANCED.sub("", reply.text, count=1).strip()
    return Reply(451, "%s %s (was %d)" % (status, text, reply.code))


def _group(replies: Dict[str, Reply], limit: int = 5) -> List[str]:
    """'reply: <a>, <b> and N more' lines, one per distinct reply."""
    by_reply: Dict[str, List[str]] = {}
    for rcpt, reply in replies.items():
        by_reply.setdefault(str(reply), []).append(rcpt)
    lines = []
    for reply, rcpts in by_reply.items():
        shown = ", ".join("<%s>" % r for r in rcpts[:limit])
        if len(rcpts) > limit:
            shown += " and %d more" % (len(rcpts) - limit)
        lines.append("%s: %s" % (reply, shown))
    return lines


class QueueProcessor:
    """Delivers a queue: in a background thread (``start``/``stop``), in
    the foreground (``run``), or until nothing is due (``drain``).

    Any number of processors, in any number of processes, may work on one
    queue: each message is claimed before it is sent.
    """

    def __init__(self, config: SMTPConfig, queue: Optional[Queue] = None,
                 mailer: Optional[Mailer] = None) -> None:
        self.config = config
        self.queue = queue or Queue(config.queuepath, config.claim_timeout)
        self.mailer = mailer or Mailer(config)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._unsettled: List[tuple] = []     # (message, queue change to retry)
        self._maintained = 0.0
        self._last_used = 0.0

    def start(self) -> None:
        """Run in a daemon thread; the backlog is delivered at once."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
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
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.config.claim_timeout if timeout is None else timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self) -> None:
        """Deliver until stop() is called.  Never dies of an exception."""
        log.info("2.0.0 queue processor for %s started (relay %s)",
                 self.queue.path, self.mailer.where)
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                if not self.run_once() and \
                        time.monotonic() - self._last_used > min(10.0, self.config.timeout):
                    self.mailer.close()     # do not hold an idle connection open
            except Exception:
                log.exception("4.3.0 queue processor for %s: unexpected error, "
                              "going on", self.queue.path)
                self.mailer.close()
                self._stopping.wait(self.config.poll_interval)
            self._wake.wait(self.config.poll_interval)
        self.mailer.close()
        self._warn_unsettled()
        log.info("2.0.0 queue processor for %s stopped", self.queue.path)

    def drain(self) -> None:
        """Deliver until nothing is due, then close the connection."""
        try:
            while not self._stopping.is_set() and self.run_once():
                pass
        finally:
            self.mailer.close()
            self._warn_unsettled()

    def _warn_unsettled(self) -> None:
        for msg, _ in self._unsettled:
            log.error("4.3.0 %s: its delivery could not be recorded; it will be "
                      "sent again to the recipients it reached", msg.name)

    def run_once(self) -> int:
        """One pass over the due messages; returns how many were handled."""
        now = time.time()
        if now - self._maintained > 3600:
            self._maintained = now
            try:
                self.queue.maintain()
            except OSError as e:
                log.warning("4.3.0 queue %s: housekeeping failed: %s", self.queue.path, e)
        unsettled, self._unsettled = self._unsettled, []
        for msg, action in unsettled:
            self._record(msg, action)
        handled = 0
        paths = self.queue.due()
        down: Optional[Reply] = None
        for path in paths:
            if self._stopping.is_set():
                break
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
                self._apply(msg, _Outcome(
                    failed={r: Reply.parse("554 " + msg.problem)
                            for r in (msg.recipients or ["(no recipient)"])}))
                continue
            if down is None:
                try:
                    self.mailer.open()
                except DeliveryError as e:
                    down = _transient(e.reply)
                    if down.status.split(".")[1] == "7":
                        log.error("%s relay %s: %s: fix this (TLS or AUTH); mail is "
                                  "kept and retried", down.status, self.mailer.where,
                                  e.reply)
                    else:
                        log.warning("%s relay %s: %s: mail is kept and retried",
                                    down.status, self.mailer.where, e.reply)
            if down is not None:
                self._apply(msg, _Outcome(deferred=dict.fromkeys(msg.recipients, down),
                                          final=down))
                continue
            try:
                outcome = self.mailer.deliver(msg.sender, msg.recipients, msg.data,
                                              msg.xverp, msg.heartbeat)
            except Exception as e:
                log.exception("4.3.0 %s: unexpected error while sending", msg.name)
                self.mailer.close()
                reply = Reply(451, "4.3.0 internal error: %s: %s" % (type(e).__name__, e))
                outcome = _Outcome(deferred=dict.fromkeys(msg.recipients, reply), final=reply)
            self._last_used = time.monotonic()
            self._apply(msg, outcome)
        return handled

    def _apply(self, msg: QueuedMessage, out: _Outcome) -> None:
        """Decide what an attempt means for the message (remove, defer or
        dead-letter), log it once, and record it in the queue."""
        now = time.time()
        attempts = msg.attempts + 1
        if out.delivered:
            log.info("2.0.0 %s: delivered to %d recipient(s) via %s%s", msg.name,
                     len(out.delivered), self.mailer.where,
                     " with XVERP" if msg.xverp else "")
        for line in _group(out.failed):
            log.warning("%s %s: refused: %s", Reply.parse(line).status, msg.name, line)
        failed = dict(msg.state.get("failed") or {})  # type: ignore[call-overload]
        failed.update((r, str(reply)) for r, reply in out.failed.items())
        state: Dict[str, object] = dict(msg.state, attempts=attempts,
                                        first_queued=msg.first_queued,
                                        xverp=msg.xverp, last_attempt=now,
                                        failed=failed)
        if out.deferred:
            last = out.final if out.final and not out.final.ok else \
                next(iter(out.deferred.values()))
            age = now - msg.first_queued
            if age < self.config.max_queue_lifetime:
                c = self.config
                delay = min(c.max_backoff_time, c.min_backoff_time * 2 ** (attempts - 1))
                delay *= random.uniform(0.8, 1.2)
                state.update(last_error=str(last), next_attempt=now + delay)
                for line in _group(out.deferred):
                    log.info("%s %s: deferred for %d s (attempt %d): %s",
                             Reply.parse(line).status, msg.name, delay, attempts, line)
                self._record(msg, functools.partial(
                    self.queue.defer, msg, list(out.deferred), state, now + delay))
                return
            for rcpt, reply in out.deferred.items():
                failed[rcpt] = "%s (gave up after %d attempts in %.1f days)" % (
                    reply, attempts, age / 86400)
        if not failed:
            self._record(msg, functools.partial(self.queue.remove, msg))
            return
        reply = Reply.parse(next(iter(failed.values())))
        log.error("%s %s: dead letter .rejected-%s for %d recipient(s): %s", reply.status,
                  msg.name, msg.name, len(failed), reply)
        msg.state = state
        self._record(msg, functools.partial(self.queue.dead_letter, msg, failed,
                                            "%d delivered" % len(out.delivered)))

    def _record(self, msg: QueuedMessage, action: Callable[[], object]) -> None:
        """Do a queue change; if it fails, keep it (and the claim) to retry
        on the next pass.  Holding the claim means nobody sends it again."""
        try:
            action()
        except Exception:
            log.exception("4.3.0 %s: cannot record the delivery outcome in the "
                          "queue; will try again", msg.name)
            self._unsettled.append((msg, action))


# ---------------------------------------------------------------------------
# send_email: the API for request handlers.
# ---------------------------------------------------------------------------

_lock = threading.Lock()
_config: Optional[SMTPConfig] = None
_queues: Dict[str, Queue] = {}
_processors: Dict[str, QueueProcessor] = {}


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
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data.lstrip(b"\r\n"))
    if not data.strip():
        raise MessageError("the message is empty", status="5.6.0")
    nul = data.find(b"\0")
    if nul >= 0:
        raise MessageError("the message has a NUL byte (line %d), which SMTP cannot "
                           "carry: encode that part (base64)"
                           % (data.count(b"\r\n", 0, nul) + 1), status="5.6.0")
    lengths = [len(line) for line in data.split(b"\r\n")]
    if max(lengths) > 998:
        raise MessageError("line %d of the message is longer than the 998 octets "
                           "RFC 5322 allows: encode that part (quoted-printable or "
                           "base64)" % (next(n for n, length in enumerate(lengths, 1)
                                              if length > 998)), status="5.6.0")
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


def configure(config: Union[str, SMTPConfig], instance: str = "default") -> SMTPConfig:
    """Set the configuration send_email uses in this process.

    ``config`` is the path of a gsconfig.ini (read with load_config) or an
    SMTPConfig.  With processorthread = true the queue processor thread
    starts now and delivers any backlog at once.
    """
    global _config
    if not isinstance(config, SMTPConfig):
        config = load_config(config, instance)
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


def _queue_for(config: SMTPConfig) -> Queue:
    with _lock:
        queue = _queues.get(config.queuepath)
        if queue is None:
            queue = _queues[config.queuepath] = Queue(config.queuepath,
                                                      config.claim_timeout)
        processor = _processors.get(config.queuepath)
        if config.processorthread and (processor is None or not processor.alive):
            processor = QueueProcessor(config, queue)
            _processors[config.queuepath] = processor
            processor.start()
        return queue


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
    """
    rcpts = _check_recipients(recipients)
    _check_sender(sender, xverp)
    data = _prepare_message(email, sender)
    config = _current_config()
    queue = _queue_for(config)
    name = queue.add(sender, rcpts, data, xverp=bool((xverp or config.xverp) and sender))
    log.debug("2.0.0 %s: queued for %d recipient(s) in %s", name, len(rcpts), queue.path)
    processor = _processors.get(config.queuepath)
    if processor is not None:
        processor.wake()


def shutdown(timeout: Optional[float] = None) -> None:
    """Stop every processor thread this process started (run at exit)."""
    with _lock:
        processors = list(_processors.values())
        _processors.clear()
    for processor in processors:
        processor.stop(timeout)


def _after_fork() -> None:
    # A child has the parent's queues but none of its threads: start afresh.
    global _lock
    _lock = threading.Lock()
    _processors.clear()


# At exit, wait a little for the message in flight.  If it is cut short, the
# claim's lock dies with the process and the message is sent again later.
atexit.register(shutdown, 10.0)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


# ---------------------------------------------------------------------------
# The command line: python -m gsemail --config gsconfig.ini --instance main
# ---------------------------------------------------------------------------

class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> "NoReturn":  # type: ignore[name-defined]  # noqa: F821
        self.print_usage(sys.stderr)
        self.exit(os.EX_USAGE, "5.5.4 %s: %s\n" % (self.prog, message))


_EPILOG = """\
exit status (sysexits.h): 0 done (with --once: the queue is empty);
64 usage error; 65 bad message; 69 relay unavailable; 73 cannot create the
queue; 74 queue I/O error; 75 temporary failure (with --once: messages wait
for a retry); 78 configuration error.  Every error line starts with an
RFC 3463 status code.

environment: GSEMAIL_CONFIG and GSEMAIL_INSTANCE are the defaults for
--config and --instance."""


def main(argv: Optional[List[str]] = None) -> int:
    """Run the queue processor from the command line; returns the exit status."""
    parser = _ArgumentParser(
        prog="gsemail", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Deliver the gsemail queue of a GroupServer instance. Runs in the "
                    "foreground until SIGTERM or SIGINT, or with --once until nothing "
                    "is due.")
    parser.add_argument("-c", "--config", default=os.environ.get("GSEMAIL_CONFIG"),
                        help="the gsconfig.ini file ($GSEMAIL_CONFIG)")
    parser.add_argument("-i", "--instance",
                        default=os.environ.get("GSEMAIL_INSTANCE", "default"),
                        help="the instance: reads [config-INSTANCE] and its smtp "
                             "option, or [smtp-INSTANCE] (default: %(default)s)")
    parser.add_argument("--once", action="store_true",
                        help="deliver what is due and exit: 0 when the queue is "
                             "empty, 75 when messages wait for a retry")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log each attempt (-vv: debug messages too)")
    parser.add_argument("--version", action="version",
                        version="gsemail %s" % __version__)
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("--config is required (or set $GSEMAIL_CONFIG)")

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)])
    log.propagate = False
    try:
        config = load_config(args.config, args.instance)
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
        if args.once:
            processor.drain()
            waiting = processor.queue.count()
            if waiting:
                print("4.4.1 %d message(s) in %s wait for a retry"
                      % (waiting, config.queuepath), file=sys.stderr)
                return os.EX_TEMPFAIL
            return os.EX_OK
        processor.run()
        return os.EX_OK
    except GsEmailError as e:
        print("%s %s" % (e.status, e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("4.3.2 interrupted: the message in flight will be sent again",
              file=sys.stderr)
        return os.EX_TEMPFAIL
    finally:
        log.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
