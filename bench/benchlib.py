"""Shared pieces of the gsemail benchmark (bench/run.py and bench/peers.py).

Standard library only, and importable by any Python 3.9+: the system's,
which runs gsemail, and the benchmark's virtual environment, which runs
zope.sendmail.  Nothing here imports gsemail.

* The workload: ``make_message(i)`` is message i, 5,060 bytes with CRLF
  line ends, from SENDER to ``rcpt(i)``.  It is the same message the
  anchors in the team's shared bench README were measured with, so figures
  can be put side by side.
* The queue writer: ``write_queue`` fills a Maildir in zope.sendmail's
  format ("X-Zope-From: ...\\nX-Zope-To: ...\\n" + message), which both
  gsemail and zope.sendmail drain.
* Processes: ``Procs`` starts every child (optionally pinned to a CPU with
  taskset), remembers its PID and ends exactly those PIDs at the end.
* Servers: ``SmtpSink`` (Postfix's smtp-sink), ``ArrivalSink`` (our own
  timestamping sink, arrival_sink.py) and ``Postfix`` (a private Postfix
  instance with STARTTLS on 127.0.0.1).
"""

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
HOST = "127.0.0.1"
SENDER = "bounces@bench.test"
DOMAIN = "bench.test"
SIZE = 5120

_BODY_LINE = ("The quick brown fox jumps over the lazy dog 0123456789 "
              "ABCDEFGHIJKLMNOPQ\r\n")  # 72 characters + CRLF = 74 bytes


# ---------------------------------------------------------------------------
# The workload
# ---------------------------------------------------------------------------

def rcpt(i: int, domain: str = DOMAIN) -> str:
    return "user%06d@%s" % (i, domain)


def make_message(i: int, size: int = SIZE, sender: str = SENDER,
                 to: Optional[str] = None, domain: str = DOMAIN) -> bytes:
    """Message number i as bytes with CRLF line ends (5,060 bytes by default).

    The same text as the shared bench's benchlib.make_message, so that our
    figures stand beside the anchors measured with it.
    """
    to = to or rcpt(i, domain)
    head = ("From: Bench Sender <%s>\r\n"
            "To: <%s>\r\n"
            "Subject: bench message %d\r\n"
            "Date: Sat, 01 Jan 2000 00:00:00 +0000\r\n"
            "Message-Id: <bench.%d@%s>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "X-Bench-Seq: %d\r\n"
            "\r\n" % (sender, to, i, i, domain, i))
    nlines = max(1, (size - len(head)) // len(_BODY_LINE))
    return (head + _BODY_LINE * nlines).encode("ascii")


def make_messages(n: int) -> List[tuple]:
    """[(recipient, message bytes)] for i in range(n), built before timing."""
    return [(rcpt(i), make_message(i)) for i in range(n)]


def zope_envelope(sender: str, recipients: Sequence[str]) -> bytes:
    """The two envelope lines zope.sendmail (and gsemail) put first."""
    return ("X-Zope-From: %s\nX-Zope-To: %s\n" % (sender, ", ".join(recipients))
            ).encode("utf-8")


_queue_counter = 0


def write_queue(queue: str, n: int, sub: str = "new", mtime: Optional[float] = None,
                start: int = 0, recipients: Optional[List[str]] = None,
                via_tmp: bool = False) -> List[str]:
    """Write n messages into queue/sub in zope.sendmail's format; return
    their paths.

    The queue gets the Maildir layout gsemail and zope.sendmail expect
    (new, cur, tmp; mode 0700).  ``mtime`` sets each file's mtime (gsemail
    reads a future mtime in cur/ as "deferred until then").  ``recipients``
    replaces the one recipient of each message (the group post).
    ``via_tmp`` writes to tmp/ and renames, as a live queue needs; without
    it the files are written in place, which is faster for a queue nobody
    reads yet.  No fsync: this is set-up, not the thing measured.
    """
    global _queue_counter
    for d in (queue, os.path.join(queue, "new"), os.path.join(queue, "cur"),
              os.path.join(queue, "tmp")):
        os.makedirs(d, mode=0o700, exist_ok=True)
    now = time.time()
    paths = []
    for i in range(start, start + n):
        _queue_counter += 1
        # A Maildir name gsemail and zope both accept: time first (gsemail
        # takes the first-queued time from it), then something unique.
        name = "%d.M%06dP%dQ%d.bench" % (now, i, os.getpid(), _queue_counter)
        final = os.path.join(queue, sub, name)
        path = os.path.join(queue, "tmp", name) if via_tmp else final
        data = zope_envelope(SENDER, recipients or [rcpt(i)]) + make_message(i)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        if via_tmp:
            os.rename(path, final)
        paths.append(final)
    return paths


def queue_count(queue: str) -> Dict[str, int]:
    """Messages waiting in new/ and cur/, and dead letters (.rejected-)."""
    out = {"waiting": 0, "rejected": 0}
    for sub in ("new", "cur"):
        try:
            names = os.listdir(os.path.join(queue, sub))
        except FileNotFoundError:
            continue
        out["waiting"] += sum(1 for n in names if not n.startswith("."))
        out["rejected"] += sum(1 for n in names if n.startswith(".rejected-"))
    return out


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def find_bin(name: str) -> Optional[str]:
    """A Postfix tool: PATH first, then where Debian and others put it."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/lib/postfix", "/usr/libexec/postfix",
              "/usr/local/sbin"):
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    return None


def fs_type(path: str) -> str:
    """The file system type of path, from /proc/mounts (longest mount point)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) \
                        and len(mount) > len(best):
                    best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port?  Read from /proc/net/tcp
    rather than by connecting, so no SMTP session is opened to find out."""
    want = {"0100007F:%04X" % port, "00000000:%04X" % port}
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1] in want and parts[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             step: float = 0.02) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(step)


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc/PID/stat."""
    with open("/proc/%d/stat" % pid) as f:
        stat = f.read()
    # the command name (field 2) may hold spaces: split after its ")"
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])     # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_rss_kb(pid: int) -> int:
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

class Result:
    """How a child process ended: exit code, wall seconds, CPU seconds,
    peak RSS (KB, or None when it cannot be told) and its output.

    With ``stream``, the output was read as it came and not kept (only its
    last 64 KB): ``first_line`` is the seconds from the start to its first
    complete line (None if there was none), ``out_bytes`` and ``out_lines``
    how much there was, ``out_matches`` how often the bytes ``count`` of
    ``Procs.run`` were in it.
    """

    def __init__(self, returncode: int, wall: float, maxrss_kb: Optional[int],
                 stdout: str, stderr: str, cpu: float = 0.0,
                 first_line: Optional[float] = None, out_bytes: int = 0,
                 out_lines: int = 0, out_matches: int = 0) -> None:
        self.returncode, self.wall, self.maxrss_kb = returncode, wall, maxrss_kb
        self.stdout, self.stderr = stdout, stderr
        self.cpu = cpu      # user + system CPU seconds of the child
        self.first_line, self.out_bytes, self.out_lines = first_line, out_bytes, out_lines
        self.out_matches = out_matches

    @property
    def maxrss_mb(self) -> Optional[float]:
        return None if self.maxrss_kb is None else self.maxrss_kb / 1024

    def json(self) -> dict:
        """The one JSON line a peers.py command ends its output with."""
        import json
        for line in reversed(self.stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError("no JSON result in the output (exit %d): %s"
                           % (self.returncode, self.stderr[-1500:]))


def gnu_time() -> Optional[str]:
    """GNU time (Debian package "time"), which reports the peak RSS of the
    command it forks; None if there is none (the shell's "time" keyword
    is not it)."""
    for path in (shutil.which("time"), "/usr/bin/time"):
        if path and os.access(path, os.X_OK):
            try:
                run = subprocess.run([path, "--version"], capture_output=True, text=True,
                                     timeout=10)
            except (OSError, subprocess.SubprocessError):
                continue
            if "GNU" in run.stdout + run.stderr:
                return path
    return None


def own_peak_rss_kb() -> int:
    """This process's own peak RSS (VmHWM), in KB."""
    return proc_rss_kb(os.getpid())


class _Stream:
    """Reads a child's output pipe in a thread as it comes: the time of the
    first complete line, bytes and lines counted, the last 64 KB kept.  The
    child is never held up by a full pipe, and nothing big is stored."""

    KEEP = 65536

    def __init__(self, fd: int, t0: float, count: bytes = b"") -> None:
        self.fd, self.t0, self.count = fd, t0, count
        self.first_line: Optional[float] = None
        self.bytes = self.lines = self.matches = 0
        self.tail = b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                break
            if self.first_line is None and b"\n" in chunk:
                self.first_line = time.perf_counter() - self.t0
            if self.count:      # with the end of the last chunk: none missed at the seam
                self.matches += (self.tail[1 - len(self.count):] + chunk).count(self.count)
            self.bytes += len(chunk)
            self.lines += chunk.count(b"\n")
            self.tail = (self.tail + chunk)[-self.KEEP:]
        os.close(self.fd)

    def text(self) -> str:
        self.thread.join()
        return self.tail.decode("utf-8", "replace")


class Procs:
    """Starts children and remembers them, so that everything started can
    be ended by its PID, whatever happens (errors, Ctrl-C, SIGTERM).

    ``cpu`` pins a child to one CPU with taskset (when pinning is on).

    Peak RSS.  A child's ``ru_maxrss``, even from ``wait4`` on its own PID,
    is at least its parent's peak RSS at the fork: Linux records the peak of
    the memory it leaves at ``exec`` (the parent's, copied or, with vfork,
    shared) in the process's own maximum.  Measured: a child ``/bin/true``
    of a 320 MB Python reports 321,112 KB.  So ``run`` has GNU time, a 1 MB
    process, fork the command and report its peak RSS (``%M``), which is
    then the command's own (floor: about 1 MB).  Without GNU time the
    ``wait4`` figure is used only when it is above this process's own peak,
    when it can only be the child's; otherwise it is None ("-" in tables).
    CPU seconds are always ``wait4``'s, the command's own plus, with GNU
    time, time's (about 1 ms).
    """

    def __init__(self, pin: bool) -> None:
        self.pin = pin and shutil.which("taskset") is not None
        self.live: Dict[int, subprocess.Popen] = {}
        self.groups: set = set()                # children that lead their own group
        self.extra_pids: Dict[int, str] = {}   # daemons we did not fork (Postfix)
        self.time_bin = gnu_time()
        self.rss_method = ("GNU time's %%M (%s): the command's own peak RSS" % self.time_bin
                           if self.time_bin else
                           "wait4's ru_maxrss, shown only when above the benchmark's own "
                           "peak (install GNU time for the rest)")

    def command(self, cmd: List[str], cpu: Optional[int]) -> List[str]:
        if self.pin and cpu is not None:
            return ["taskset", "-c", str(cpu)] + cmd
        return cmd

    def start(self, cmd: List[str], cpu: Optional[int] = None,
              **popen: object) -> subprocess.Popen:
        popen.setdefault("stdin", subprocess.DEVNULL)
        # taskset execs the command, so the PID we get is the command's own.
        p = subprocess.Popen(self.command(cmd, cpu), **popen)  # type: ignore[call-overload]
        self.live[p.pid] = p
        if popen.get("start_new_session"):
            self.groups.add(p.pid)
        return p

    def run(self, cmd: List[str], cpu: Optional[int] = None, timeout: float = 1800,
            env: Optional[dict] = None, cwd: Optional[str] = None,
            stream: bool = False, count: bytes = b"") -> Result:
        """Run a child to the end; measure its wall time, CPU and peak RSS.

        Waits with a blocking wait4 (exact end time, and the child's own
        rusage: CPU of it and of the children it waited for), with a timer
        that kills the child if it overruns.  Peak RSS: see the class.
        Output goes to temporary files, never to a pipe that could fill;
        with ``stream``, stdout goes to a pipe read as it comes (see
        ``Result``).  The child leads its own process group, so that a
        kill reaches the command behind GNU time too.
        """
        import tempfile
        fd, rssfile = tempfile.mkstemp(prefix="gsemail-bench-rss-")
        os.close(fd)
        full = ([self.time_bin, "-f", "%M", "-o", rssfile] + cmd) if self.time_bin else cmd
        reader: Optional[_Stream] = None
        try:
            with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
                if stream:
                    rfd, wfd = os.pipe()
                t0 = time.perf_counter()
                try:
                    p = self.start(full, cpu, stdout=wfd if stream else out, stderr=err,
                                   env=env, cwd=cwd, start_new_session=True)
                finally:
                    if stream:
                        os.close(wfd)
                if stream:
                    reader = _Stream(rfd, t0, count)
                timer = threading.Timer(timeout, self._kill, (p.pid,))
                timer.daemon = True
                timer.start()
                try:
                    _, status, usage = os.wait4(p.pid, 0)
                    wall = time.perf_counter() - t0
                finally:
                    timer.cancel()
                p.returncode = os.waitstatus_to_exitcode(status)
                self.live.pop(p.pid, None)
                self.groups.discard(p.pid)
                out.seek(0)
                err.seek(0)
                stdout = reader.text() if reader else out.read().decode("utf-8", "replace")
                stderr = err.read().decode("utf-8", "replace")
            maxrss: Optional[int]
            if self.time_bin:
                # the last line: GNU time puts "Command exited with non-zero
                # status N" before it
                with open(rssfile) as f:
                    lines = f.read().split()
                maxrss = int(lines[-1]) if lines and lines[-1].isdigit() else None
            else:
                maxrss = usage.ru_maxrss if usage.ru_maxrss > own_peak_rss_kb() else None
        finally:
            os.unlink(rssfile)
        if p.returncode < 0 and -p.returncode == signal.SIGKILL:
            stderr += "\n(killed after the %d s time limit)" % timeout
        return Result(p.returncode, wall, maxrss, stdout, stderr,
                      usage.ru_utime + usage.ru_stime,
                      reader.first_line if reader else None,
                      reader.bytes if reader else 0, reader.lines if reader else 0,
                      reader.matches if reader else 0)

    def _kill(self, pid: int) -> None:
        self._signal(pid, signal.SIGKILL)

    def _signal(self, pid: int, sig: int) -> None:
        """sig to a child of ours, by its PID: to its whole process group
        if it leads one of its own (GNU time and the command it forked)."""
        try:
            if pid in self.groups:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, p: subprocess.Popen, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after grace seconds; reap it."""
        if p.poll() is None:
            try:
                self._signal(p.pid, signal.SIGTERM)
                p.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(p.pid, signal.SIGKILL)
                p.wait()
        self.live.pop(p.pid, None)
        self.groups.discard(p.pid)

    def stop_all(self) -> None:
        for p in list(self.live.values()):
            self.stop(p)


# ---------------------------------------------------------------------------
# Servers on 127.0.0.1
# ---------------------------------------------------------------------------

class SmtpSink:
    """Postfix's smtp-sink on a fresh port, run with -c so that it keeps a
    count of the messages it got (in a file we read) and nothing else: no
    dump, which would cost it far more than the clients it measures."""

    def __init__(self, procs: Procs, workdir: str, cpu: Optional[int]) -> None:
        binary = find_bin("smtp-sink")
        if not binary:
            raise RuntimeError("smtp-sink not found (Debian: apt-get install postfix)")
        self.procs = procs
        self.port = free_port()
        self.counter = os.path.join(workdir, "sink-%d.out" % self.port)
        cmd = [binary, "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]     # smtp-sink refuses to run as root
        cmd += ["%s:%d" % (HOST, self.port), "256"]
        with open(self.counter, "wb") as out:
            self.proc = procs.start(cmd, cpu, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: listening(self.port) or self.proc.poll() is not None,
                     10, "smtp-sink to listen")
            if self.proc.poll() is not None:
                raise RuntimeError("smtp-sink exited at start: %s" % self._tail())
        except BaseException:
            self.stop()
            raise

    def _tail(self) -> str:
        try:
            with open(self.counter, "rb") as f:
                f.seek(max(0, os.path.getsize(self.counter) - 300))
                return f.read().decode("ascii", "replace")
        except OSError:
            return ""

    def messages(self) -> int:
        """How many messages the sink has received (it prints
        "sess=S quit=Q mesg=M" and a CR after each one)."""
        found = re.findall(r"mesg=(\d+)", self._tail())
        return int(found[-1]) if found else 0

    def wait_messages(self, n: int, timeout: float = 5.0) -> int:
        try:
            wait_for(lambda: self.messages() >= n, timeout, "%d messages" % n, 0.05)
        except TimeoutError:
            pass
        return self.messages()

    def stop(self) -> None:
        self.procs.stop(self.proc)
        try:
            os.unlink(self.counter)
        except OSError:
            pass

    def __enter__(self) -> "SmtpSink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ArrivalSink:
    """Our own small SMTP sink (arrival_sink.py) in its own process: it
    writes "sent-timestamp arrival-timestamp" for every message, taking the
    arrival time with time.time() as soon as the final dot is read."""

    def __init__(self, procs: Procs, workdir: str, cpu: Optional[int]) -> None:
        self.procs = procs
        self.port = free_port()
        self.path = os.path.join(workdir, "arrivals-%d.txt" % self.port)
        open(self.path, "w").close()
        cmd = [sys.executable, os.path.join(HERE, "arrival_sink.py"),
               "--port", str(self.port), "--out", self.path]
        self.proc = procs.start(cmd, cpu)
        try:
            wait_for(lambda: listening(self.port) or self.proc.poll() is not None,
                     10, "arrival sink to listen")
            if self.proc.poll() is not None:
                raise RuntimeError("arrival_sink.py exited at start")
        except BaseException:
            self.stop()
            raise

    def arrivals(self) -> List[tuple]:
        """[(sent, arrived)] as floats, one per message received so far."""
        out = []
        with open(self.path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2:
                    out.append((float(parts[0]), float(parts[1])))
        return out

    def count(self) -> int:
        with open(self.path, "rb") as f:
            return f.read().count(b"\n")

    def stop(self) -> None:
        self.procs.stop(self.proc)

    def __enter__(self) -> "ArrivalSink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Postfix:
    """A private Postfix instance whose config, queue and log live in one
    directory: smtpd on 127.0.0.1:port, STARTTLS offered with a self-signed
    certificate, XVERP allowed, smtpd_recipient_limit = 1000, and every
    recipient, of any domain, accepted and then discarded (so nothing is
    written per recipient but the log).  Started with taskset on the
    server CPU; every Postfix process inherits that.

    The recipe is the team's postfix-loopback.sh: no chroot, data_directory
    owned by postfix, maillog_file under maillog_file_prefixes (postlogd,
    no syslog needed).
    """

    def __init__(self, procs: Procs, base: str, cpu: Optional[int],
                 recipient_limit: int = 1000, dead_relay: Optional[int] = None) -> None:
        self.procs, self.cpu = procs, cpu
        self.postfix = find_bin("postfix")
        if not self.postfix:
            raise RuntimeError("postfix not found (Debian: apt-get install postfix)")
        if os.geteuid() != 0:
            raise RuntimeError("a private Postfix instance must be started as root")
        if not shutil.which("openssl"):
            raise RuntimeError("openssl not found (needed for the STARTTLS certificate)")
        self.dir = os.path.join(base, "postfix")
        os.makedirs(self.dir)
        os.chmod(base, 0o755)           # postfix and nobody must reach it
        os.chmod(self.dir, 0o755)
        self.etc = os.path.join(self.dir, "etc")
        self.log = os.path.join(self.dir, "log", "maillog")
        self.port = free_port()
        self.recipient_limit = recipient_limit
        # With dead_relay, mail is not discarded but relayed through smtp(8)
        # to 127.0.0.1:dead_relay, where nothing listens: it is deferred,
        # as on a relay that is down, and stays so (retries hours apart).
        self.dead_relay = dead_relay
        self.pid: Optional[int] = None
        self._write_config()

    def _write_config(self) -> None:
        d, etc = self.dir, self.etc
        for sub in ("etc/tls", "queue", "data", "log"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        os.chown(os.path.join(d, "data"), pwd.getpwnam("postfix").pw_uid, -1)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-days", "30", "-subj", "/CN=mx.bench.test",
                        "-keyout", "key.pem", "-out", "cert.pem"],
                       cwd=os.path.join(etc, "tls"), check=True, capture_output=True)
        drop = "discard:gsemail bench drops everything"
        main_cf = """\
compatibility_level = 3.6
queue_directory = %(d)s/queue
data_directory = %(d)s/data
mail_owner = postfix
setgid_group = postdrop
syslog_name = gsemail-bench
maillog_file = %(d)s/log/maillog
maillog_file_prefixes = %(d)s/log
myhostname = mx.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks_style = host
mynetworks = 127.0.0.0/8
smtpd_authorized_verp_clients = 127.0.0.0/8
smtpd_recipient_limit = %(limit)d
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
default_transport = %(drop)s
relay_transport = %(drop)s
local_transport = %(drop)s
message_size_limit = 52428800
smtp_dns_support_level = disabled
biff = no
smtpd_tls_cert_file = %(etc)s/tls/cert.pem
smtpd_tls_key_file = %(etc)s/tls/key.pem
smtpd_tls_security_level = may
smtpd_tls_loglevel = 0
""" % {"d": d, "etc": etc, "limit": self.recipient_limit, "drop": drop}
        if self.dead_relay is not None:
            main_cf += """\
relayhost = [%s]:%d
default_transport = smtp
relay_transport = smtp
# no pause of smtpd for the queue manager: the queue fills at full speed
in_flow_delay = 0s
# tried once, then left alone while the benchmark reads the queue
minimal_backoff_time = 4h
maximal_backoff_time = 8h
queue_run_delay = 4h
maximal_queue_lifetime = 5d
bounce_queue_lifetime = 5d
""" % (HOST, self.dead_relay)
        with open(os.path.join(etc, "main.cf"), "w") as f:
            f.write(main_cf)
        services = ["%s:%d inet n - n - - smtpd" % (HOST, self.port)] + [
            "pickup unix n - n 60 1 pickup", "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr", "tlsmgr unix - - n 1000? 1 tlsmgr",
            "rewrite unix - - n - - trivial-rewrite", "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce", "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify", "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap", "proxywrite unix - - n - 1 proxymap",
            "smtp unix - - n - - smtp", "relay unix - - n - - smtp",
            "showq unix n - n - - showq", "error unix - - n - - error",
            "retry unix - - n - - error", "discard unix - - n - - discard",
            "local unix - n n - - local", "virtual unix - n n - - virtual",
            "lmtp unix - - n - - lmtp", "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache", "postlog unix-dgram n - n - 1 postlogd"]
        with open(os.path.join(etc, "master.cf"), "w") as f:
            f.write("\n".join(services) + "\n")

    def start(self) -> None:
        run = subprocess.run(self.procs.command([self.postfix, "-c", self.etc, "start"],
                                                self.cpu),
                             capture_output=True, text=True)
        pidfile = os.path.join(self.dir, "queue", "pid", "master.pid")
        if run.returncode:
            raise RuntimeError("postfix start failed: %s %s" % (run.stderr, self.log_tail()))

        def master_pid() -> Optional[int]:
            try:
                with open(pidfile) as f:
                    return int(f.read().strip() or 0) or None
            except (OSError, ValueError):
                return None
        self.pid = wait_for(master_pid, 20, "Postfix master.pid")  # type: ignore[assignment]
        self.procs.extra_pids[self.pid] = "postfix master"  # type: ignore[index]
        wait_for(lambda: listening(self.port), 20, "Postfix smtpd on port %d" % self.port)

    def log_tail(self, size: int = 2000) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log) - size))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def queue_counts(self) -> Dict[str, int]:
        """Files in each of Postfix's queues."""
        out = {}
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            out[sub] = sum(len(files) for _, _, files in
                           os.walk(os.path.join(self.dir, "queue", sub)))
        return out

    def daemons(self, name: str) -> Dict[int, tuple]:
        """{pid: (CPU seconds, peak RSS KB)} of this master's children that
        run the daemon name (showq, qmgr, ...), from /proc."""
        out: Dict[int, tuple] = {}
        if not self.pid:
            return out
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % entry) as f:
                    stat = f.read()
                comm = stat[stat.index("(") + 1:stat.rindex(")")]
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                if ppid == self.pid and comm == name:
                    pid = int(entry)
                    out[pid] = (proc_cpu_seconds(pid), proc_rss_kb(pid))
            except (OSError, ValueError):
                continue
        return out

    def queued(self) -> int:
        """Messages in Postfix's queues (not yet discarded)."""
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(os.path.join(self.dir, "queue", sub)):
                n += len(files)
        return n

    def wait_idle(self, timeout: float = 300) -> bool:
        """Wait until Postfix has discarded everything it accepted, so one
        run's backlog does not slow the next."""
        try:
            wait_for(lambda: self.queued() == 0, timeout, "Postfix to empty its queue", 0.1)
            return True
        except TimeoutError:
            return False

    def truncate_log(self) -> None:
        # postlogd appends (O_APPEND), so cutting the file is safe; it keeps
        # the log small (about 0.5 KB a message) and one run's lines apart.
        try:
            os.truncate(self.log, 0)
        except OSError:
            pass

    def accepted_recipients(self) -> int:
        """Recipients Postfix accepted since the log was cut: the sum of
        qmgr's nrcpt= over the messages it took in."""
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            return 0
        return sum(int(n) for n in re.findall(r"qmgr\[\d+\]: \w+: from=<[^>]*>, "
                                              r"size=\d+, nrcpt=(\d+)", text))

    def accepted_at_least(self, n: int) -> int:
        """Once Postfix is idle, wait (10 s at most) for its log to show n
        accepted recipients; return how many it shows."""
        self.wait_idle()
        try:
            wait_for(lambda: self.accepted_recipients() >= n, 10, "Postfix log")
        except TimeoutError:
            pass
        return self.accepted_recipients()

    def stop(self) -> None:
        """SIGTERM to the master we started (it ends its children), by PID.

        Interrupted while starting, we may not know the PID yet: it is then
        read from this instance's own pid file."""
        pid, self.pid = self.pid, None
        if pid is None:
            try:
                with open(os.path.join(self.dir, "queue", "pid", "master.pid")) as f:
                    pid = int(f.read().strip() or 0) or None
            except (OSError, ValueError):
                pid = None
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
                wait_for(lambda: not _alive(pid), 30, "Postfix master to exit", 0.1)
            except ProcessLookupError:
                pass
            except TimeoutError:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.procs.extra_pids.pop(pid, None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not reaped by its parent, init) counts as gone
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
