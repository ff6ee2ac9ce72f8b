#!/usr/bin/env python3
"""gsemail's benchmark: drain, enqueue, latency, one group post and scale,
measured side by side with zope.sendmail, raw smtplib and smtp-source.

    python bench/run.py                     # everything, N = 20,000, 3 runs
    python bench/run.py --quick             # a smoke run: small N, 1 run
    python bench/run.py --with-zope         # add zope.sendmail (makes a venv)
    python bench/run.py --only drain,latency --repeats 5 --json-out out.json

It needs Postfix's smtp-sink and smtp-source (Debian: apt-get install
postfix; they are in /usr/sbin), and root for the private Postfix instance
of the STARTTLS and group-post cases (without it those cases are skipped).
--with-zope creates a virtual environment with zope.sendmail==7.3 and
transaction==5.1 from PyPI (default /tmp/gsemail-bench-venv; reused when
present).

Every server it needs is its own and listens on 127.0.0.1 only: a fresh
smtp-sink per run, our arrival sink (arrival_sink.py) for latency, and one
private Postfix.  On a machine with 2 or more CPUs, servers are pinned to
one CPU and clients to another with taskset.  Each case runs --repeats
times, the peers interleaved (A B C A B C ...), so that drift of the machine
hits all alike; tables give the median and every run, ratios of medians
against the peers measured in the same run, and each target as PASS/MISS.
Whatever it started (sinks, Postfix, children) it ends by PID, and it
deletes its directories, also on Ctrl-C or SIGTERM.

Cases (--only takes these names, or a prefix such as "drain" or "scale"):

  enqueue        send_email() with processorthread = false, N messages, on
                 tmpfs and on disk, beside zope.sendmail's QueuedMailDelivery
                 + transaction.commit() per message, and the file system's
                 ceiling (create + write + fsync + rename + fsync dir)
  drain-sink     python -m gsemail --once over a queue of N to smtp-sink,
                 sessions = 1 and 4, beside zope.sendmail's
                 QueueProcessorThread (one pass over the same queue), smtplib
                 with one reused connection, and smtp-source -d with 1 and 4
                 sessions; msg/s and the client's CPU per message (user +
                 system from wait4, or getrusage around smtplib's loop,
                 over the messages delivered), and issue 16's targets:
                 sessions = 1 at most 0.75x smtp-source -s 1's CPU per
                 message, sessions = 4 at least 0.6x smtp-source -s 4's msg/s
  drain-postfix  the same to the private Postfix, with STARTTLS
  latency        the processor thread running (configure + send_email in one
                 process); send_email at a steady rate; time to arrival at
                 the sink, p50 and p99
  group          one message to 10,000 recipients through Postfix
                 (smtpd_recipient_limit = 1000); seconds until every
                 recipient is accepted
  scale-idle     100,000 messages deferred to the future plus a trickle of
                 new ones: CPU of the idle processor
  scale-rss      peak RSS of python -m gsemail --once draining 100,000
  scale-ops      the operator's commands on 100,000 deferred + 10 dead
                 letters: show ID (and a beginning of one), status, status
                 --json, list and list --json (wall, time to the first line
                 of output, CPU, peak RSS)
  scale-mailq    gsemail's list and list --json on 100,000 deferred beside
                 Postfix's mailq (postqueue -p) and postqueue -j on a private
                 Postfix (root) filled with as many deferred messages: its
                 relay is 127.0.0.1 on a port nobody listens on; the same
                 figures, and the CPU and peak RSS of showq, the Postfix
                 daemon that reads the queue for postqueue

Peak RSS is the command's own, from GNU time (%M), which forks it: a
child's ru_maxrss, even from wait4 on its own PID, is at least its
parent's peak RSS (Linux carries it across exec), here the benchmark's.
"""

import argparse
import collections
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import Procs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, "peers.py")
ZOPE_PINS = ["zope.sendmail==7.3", "transaction==5.1"]
CASES = ["enqueue", "drain-sink", "drain-postfix", "latency", "group",
         "scale-idle", "scale-rss", "scale-ops", "scale-mailq"]

# The anchors in the team's shared bench README (same machine type, same
# message, N = 2,000, smtp-sink / Postfix; msg/s), shown beside ours so a
# reader can tell whether this machine is running as it did then.
README_ANCHORS = {
    ("drain-sink", "zope"): 1650, ("drain-sink", "smtplib"): 3370,
    ("drain-sink", "source1"): 4550, ("drain-sink", "source4"): 17700,
    ("drain-postfix", "zope"): 317, ("drain-postfix", "smtplib"): 811,
    ("drain-postfix", "source1"): 996, ("drain-postfix", "source4"): 1600,
}


class Skip(Exception):
    """This peer cannot run here (the reason is printed in its row)."""


@dataclasses.dataclass
class Peer:
    key: str
    label: str
    run: Callable[[], dict]
    skip: Optional[str] = None          # why it does not run, if it does not


def fmt(x: Optional[float], digits: int = 0) -> str:
    if x is None:
        return "-"
    return "{:,.{}f}".format(x, digits)


def rx(x: Optional[float]) -> str:
    """A ratio as "1.23x", or "n/a" when one side is missing."""
    return "n/a" if x is None else "%.2fx" % x


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or not b:
        return None
    return a / b


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t_start = time.monotonic()
        pin = not args.no_pin
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if pin and len(cpus) >= 2 and shutil.which("taskset"):
            self.server_cpu, self.client_cpu = cpus[0], cpus[1]
            self.pinning = ("servers (smtp-sink, arrival sink, Postfix) on CPU %d, "
                            "clients (gsemail, zope.sendmail, smtplib, smtp-source) "
                            "on CPU %d, with taskset" % (self.server_cpu, self.client_cpu))
        else:
            self.server_cpu = self.client_cpu = None
            self.pinning = "none (%s)" % ("--no-pin" if not pin else
                                          "needs taskset and 2 CPUs")
        self.procs = Procs(self.server_cpu is not None)
        self.postfix: Optional[benchlib.Postfix] = None
        self.postfix_error: Optional[str] = None
        self.runs: Dict[str, Dict[str, List[dict]]] = collections.defaultdict(
            lambda: collections.defaultdict(list))
        self.labels: Dict[str, List[Tuple[str, str, Optional[str]]]] = {}
        self.notes: List[str] = []
        self.interrupted = False
        # Work directories: one on disk, one on tmpfs.
        self.disk_base = args.disk_dir or ("/var/tmp" if os.path.isdir("/var/tmp")
                                           else tempfile.gettempdir())
        self.work = tempfile.mkdtemp(prefix="gsemail-bench-", dir=self.disk_base)
        os.chmod(self.work, 0o755)      # Postfix's users must reach its directory in it
        self.shm = tempfile.mkdtemp(prefix="gsemail-bench-", dir=args.tmpfs_dir)
        self.pf_base = tempfile.mkdtemp(prefix="gsemail-bench-",
                                        dir=args.postfix_dir or args.tmpfs_dir)
        os.chmod(self.pf_base, 0o755)   # Postfix's users must reach its directory in it
        self.seq = 0
        gs = os.path.abspath(args.gsemail)
        self.gsemail_dir = os.path.dirname(gs) if gs.endswith(".py") else gs
        if not os.path.isfile(os.path.join(self.gsemail_dir, "gsemail.py")):
            raise SystemExit("no gsemail.py in %s (see --gsemail)" % self.gsemail_dir)
        self.env = dict(os.environ, PYTHONPATH=self.gsemail_dir,
                        # byte code goes to our temp dir, not the project
                        PYTHONPYCACHEPREFIX=os.path.join(self.work, "pycache"))
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)    # a deployment has byte code
        self.env.pop("GSEMAIL_CONFIG", None)
        self.env.pop("GSEMAIL_INSTANCE", None)
        self.zope_python: Optional[str] = None
        self.info: Dict[str, object] = {}
        # scale-mailq: seconds to write gsemail's queue and to fill Postfix's
        self.mailq_fill: Dict[str, float] = {}

    # -- plumbing ---------------------------------------------------------------

    def say(self, text: str) -> None:
        print("[%6.0fs] %s" % (time.monotonic() - self.t_start, text), file=sys.stderr,
              flush=True)

    def fresh(self, base: str, what: str) -> str:
        """A new directory for one run."""
        self.seq += 1
        path = os.path.join(base, "%s-%d" % (what, self.seq))
        os.makedirs(path, 0o700)
        return path

    def write_ini(self, queue: str, port: int, processorthread: bool = False,
                  sessions: Optional[int] = None) -> str:
        """A gsconfig.ini as GroupServer's, with one instance 'bench'.  Only
        what the case needs is set; everything else keeps gsemail's default
        (messages_per_connection = 100, recipients_per_transaction = 1000,
        poll_interval = 1 s, opportunistic STARTTLS without verification)."""
        ini = os.path.join(os.path.dirname(queue), "gsconfig-%d.ini" % port)
        lines = ["[config-bench]", "smtp = bench", "", "[smtp-bench]",
                 "hostname = %s" % benchlib.HOST, "port = %d" % port,
                 "queuepath = %s" % queue,
                 "processorthread = %s" % ("true" if processorthread else "false"),
                 # a fixed EHLO name keeps the resolver (getfqdn) out of it
                 "ehlo_name = gsemail.bench.test"]
        if sessions is not None:
            lines.append("sessions = %d" % sessions)
        with open(ini, "w") as f:
            f.write("\n".join(lines) + "\n")
        return ini

    def python_gsemail(self, ini: str, once: bool = True, quiet: bool = False) -> List[str]:
        cmd = [sys.executable, "-m", "gsemail", "-c", ini, "-i", "bench"]
        if quiet and self.gs.get("quiet"):
            cmd.append("-q")
        return cmd + ["--once"] if once else cmd

    def run_peer(self, cmd: List[str], timeout: float) -> benchlib.Result:
        return self.procs.run(cmd, self.client_cpu, timeout=timeout, env=self.env,
                              cwd=self.work)

    def timeout(self, n: int) -> float:
        # generous: 20 msg/s is far below anything measured here
        return max(300.0, n / 20.0)

    def interleave(self, section: str, peers: List[Peer]) -> None:
        """Run every peer --repeats times, interleaved: A B C A B C ..."""
        self.labels[section] = [(p.key, p.label, p.skip) for p in peers]
        todo = [p for p in peers if not p.skip]
        for r in range(self.args.repeats):
            for p in todo:
                t0 = time.monotonic()
                try:
                    result = p.run()
                    result["ok"] = True
                except KeyboardInterrupt:
                    raise
                except Skip as e:
                    result = {"ok": False, "error": str(e)}
                except Exception as e:  # a failed run is reported, the rest go on
                    result = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
                result["run_seconds"] = round(time.monotonic() - t0, 2)
                self.runs[section][p.key].append(result)
                if result["ok"]:
                    shown = result.get("show") or fmt(result.get("value"))
                else:
                    shown = "FAILED: %s" % result["error"][-400:]
                self.say("%-13s %-44s run %d/%d: %s" % (section, p.label, r + 1,
                                                         self.args.repeats, shown))

    def ensure_zope(self) -> None:
        """Make (or reuse) the venv with zope.sendmail for the zope rows."""
        if not self.args.with_zope:
            return
        venv = self.args.venv
        python = os.path.join(venv, "bin", "python")
        check = [python, "-c", "import zope.sendmail, transaction"]
        if not (os.path.exists(python) and
                subprocess.run(check, capture_output=True).returncode == 0):
            self.say("creating %s with %s (pip)" % (venv, " ".join(ZOPE_PINS)))
            if not os.path.exists(python):
                subprocess.run([sys.executable, "-m", "venv", venv], check=True)
            subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
                           + ZOPE_PINS, check=True)
        versions = subprocess.run(
            [python, "-c", "from importlib.metadata import version as v; "
             "print(v('zope.sendmail'), v('transaction'))"],
            capture_output=True, text=True, check=True).stdout.split()
        self.info["zope"] = "zope.sendmail %s, transaction %s (%s)" % (
            versions[0], versions[1], venv)
        if ["zope.sendmail==%s" % versions[0], "transaction==%s" % versions[1]] != ZOPE_PINS:
            self.notes.append("the venv %s has zope.sendmail %s / transaction %s, not the "
                              "pinned %s" % (venv, versions[0], versions[1],
                                             " ".join(ZOPE_PINS)))
        self.zope_python = python

    def zope_skip(self) -> Optional[str]:
        return None if self.zope_python else "skipped (add --with-zope)"

    def ensure_postfix(self) -> Optional[str]:
        """Start the private Postfix once; return why not, if it cannot."""
        if self.postfix is None and self.postfix_error is None:
            try:
                pf = benchlib.Postfix(self.procs, self.fresh(self.pf_base, "pf"),
                                      self.server_cpu)
                self.postfix = pf
                pf.start()
                version = subprocess.run(
                    [benchlib.find_bin("postconf") or "postconf", "-h", "mail_version"],
                    capture_output=True, text=True).stdout.strip()
                self.info["postfix"] = "Postfix %s, private instance on 127.0.0.1:%d " \
                    "(STARTTLS offered, smtpd_recipient_limit = %d, everything discarded; " \
                    "queue on %s)" % (version, pf.port, pf.recipient_limit,
                                      benchlib.fs_type(pf.dir))
                self.say("Postfix started on 127.0.0.1:%d (master PID %s)" % (pf.port, pf.pid))
            except Exception as e:
                self.postfix_error = "Postfix could not start: %s" % e
                self.say(self.postfix_error)
        return self.postfix_error

    # -- probes -------------------------------------------------------------------

    def probe(self) -> None:
        r = self.run_peer([sys.executable, PEERS, "probe"], 60)
        if r.returncode:
            raise SystemExit("cannot import gsemail from %s: %s" % (self.gsemail_dir,
                                                                     r.stderr[-1000:]))
        self.gs = r.json()
        git = subprocess.run(["git", "-C", self.gsemail_dir, "log", "-1", "--format=%h %s"],
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", self.gsemail_dir, "status", "--porcelain",
                                "gsemail.py"], capture_output=True, text=True).stdout.strip()
        self.info["gsemail"] = "%s %s%s" % (self.gs["file"], self.gs["version"],
                                            " (git %s%s)" % (git[:60], ", modified" if dirty
                                                             else "") if git else "")
        # What python -m gsemail costs before it sends anything: interpreter
        # start-up and import (its byte code cached after the first run).
        walls, rss = [], []
        for _ in range(4):
            r = self.run_peer([sys.executable, "-c", "import gsemail"], 60)
            walls.append(r.wall)
            rss.append(r.maxrss_mb)
        known = [x for x in rss[1:] if x is not None]
        self.startup = (statistics.median(walls[1:]),
                        statistics.median(known) if known else None)
        self.info["startup"] = "python -c 'import gsemail': %.0f ms, %s MB RSS" % (
            self.startup[0] * 1e3, fmt(self.startup[1], 1))
        self.info["rss"] = self.procs.rss_method

    # -- cases ----------------------------------------------------------------------

    def case_enqueue(self) -> None:
        n = self.args.n
        bases = {"tmpfs": self.shm, "disk": self.work}

        def enqueue(base: str, tag: str, command: Callable[[str], List[str]]) -> dict:
            """One enqueue run in a fresh directory under base, removed after."""
            d = self.fresh(base, tag)
            try:
                return self.enqueue_result(self.run_peer(command(d), self.timeout(n)), n)
            finally:
                shutil.rmtree(d, ignore_errors=True)

        def gsemail_cmd(d: str) -> List[str]:
            ini = self.write_ini(os.path.join(d, "queue"), 25)
            return [sys.executable, PEERS, "enqueue-gsemail", "--ini", ini, "--n", str(n)]

        def zope_cmd(d: str) -> List[str]:
            return [self.zope_python, PEERS, "enqueue-zope", "--queue",  # type: ignore[list-item]
                    os.path.join(d, "queue"), "--n", str(n)]

        def fs_cmd(d: str) -> List[str]:
            return [sys.executable, PEERS, "enqueue-fs", "--dir", os.path.join(d, "q"),
                    "--n", str(n)]

        peers = []
        for where, base in bases.items():
            peers += [
                Peer("gsemail-" + where, "gsemail send_email, %s" % where,
                     lambda b=base: enqueue(b, "enq-gs", gsemail_cmd)),
                Peer("zope-" + where, "zope.sendmail queued delivery, %s" % where,
                     lambda b=base: enqueue(b, "enq-zope", zope_cmd), self.zope_skip()),
                Peer("fs-" + where, "file system ceiling, %s" % where,
                     lambda b=base: enqueue(b, "enq-fs", fs_cmd)),
            ]
        self.interleave("enqueue", peers)

    @staticmethod
    def enqueue_result(r: benchlib.Result, n: int) -> dict:
        if r.returncode:
            raise RuntimeError("exit %d: %s" % (r.returncode, r.stderr[-800:]))
        res = r.json()
        if res.get("queued") != n:
            raise RuntimeError("%s of %d messages are in new/" % (res.get("queued"), n))
        res["value"] = n / res["seconds"]
        return res

    def drain_peers(self, section: str, n: int) -> List[Peer]:
        """The drain peers against smtp-sink (section drain-sink) or the
        private Postfix (drain-postfix)."""
        to_postfix = section == "drain-postfix"
        source = benchlib.find_bin("smtp-source")
        msgfile = os.path.join(self.work, "smtp-source-message.txt")
        if not os.path.exists(msgfile):
            with open(msgfile, "wb") as f:
                f.write(benchlib.make_message(0).replace(b"\r\n", b"\n"))

        def server():
            """(port, how to count what arrived, how to finish) for one run."""
            if to_postfix:
                pf = self.postfix
                assert pf is not None
                if not pf.wait_idle():
                    self.say("warning: Postfix still has mail queued from the last run")
                pf.truncate_log()
                return pf.port, pf.accepted_at_least, lambda: None
            sink = benchlib.SmtpSink(self.procs, self.work, self.server_cpu)
            return sink.port, lambda expected: sink.wait_messages(expected), sink.stop

        def check(arrived: int, what: str) -> None:
            if arrived != n:
                raise RuntimeError("%s: %d of %d messages arrived" % (what, arrived, n))

        def gsemail_peer(sessions: Optional[int], quiet: bool = True) -> dict:
            d = self.fresh(self.shm, "drain-gs")
            port, arrived, done = server()
            try:
                queue = os.path.join(d, "queue")
                benchlib.write_queue(queue, n)
                ini = self.write_ini(queue, port, sessions=sessions)
                r = self.run_peer(self.python_gsemail(ini, quiet=quiet), self.timeout(n))
                if r.returncode:
                    raise RuntimeError("exit %d: %s" % (r.returncode, r.stderr[-800:]))
                check(arrived(n), "gsemail")
                left = benchlib.queue_count(queue)
                if left["waiting"] or left["rejected"]:
                    raise RuntimeError("left in the queue: %s" % left)
                return {"value": n / r.wall, "seconds": r.wall, "cpu_share": r.cpu / r.wall,
                        "cpu_seconds": r.cpu, "cpu_us": r.cpu / n * 1e6,
                        "maxrss_mb": r.maxrss_mb,
                        "show": "%s msg/s (%.2f s; its CPU %.0f%% of that, %.1f µs a "
                                "message)" % (fmt(n / r.wall), r.wall, 100 * r.cpu / r.wall,
                                              r.cpu / n * 1e6)}
            finally:
                done()
                shutil.rmtree(d, ignore_errors=True)

        def zope_peer() -> dict:
            d = self.fresh(self.shm, "drain-zope")
            port, arrived, done = server()
            try:
                queue = os.path.join(d, "queue")
                benchlib.write_queue(queue, n)
                r = self.run_peer([self.zope_python, PEERS, "drain-zope", "--queue", queue,  # type: ignore[list-item]
                                   "--port", str(port)], self.timeout(n) * 3)
                if r.returncode:
                    raise RuntimeError("exit %d: %s" % (r.returncode, r.stderr[-800:]))
                res = r.json()
                check(arrived(n), "zope.sendmail")
                if res["waiting"]:
                    raise RuntimeError("%d left in the queue" % res["waiting"])
                # Timed as gsemail is: the whole process that drains the
                # queue (start-up and imports included); the pass alone is
                # in "inner_seconds".
                res.update(value=n / r.wall, seconds=r.wall, inner_seconds=res["seconds"],
                           cpu_share=r.cpu / r.wall, maxrss_mb=r.maxrss_mb,
                           cpu_seconds=r.cpu, cpu_us=r.cpu / n * 1e6,
                           show="%s msg/s (%.2f s; the pass alone %s msg/s; %.1f µs CPU a "
                                "message)" % (fmt(n / r.wall), r.wall, fmt(n / res["seconds"]),
                                              r.cpu / n * 1e6))
                return res
            finally:
                done()
                shutil.rmtree(d, ignore_errors=True)

        def smtplib_peer() -> dict:
            port, arrived, done = server()
            try:
                cmd = [sys.executable, PEERS, "raw-smtplib", "--port", str(port), "--n", str(n)]
                r = self.run_peer(cmd + (["--starttls"] if to_postfix else []), self.timeout(n))
                if r.returncode:
                    raise RuntimeError("exit %d: %s" % (r.returncode, r.stderr[-800:]))
                res = r.json()
                check(arrived(n), "smtplib")
                # its send loop only, CPU as well as seconds (getrusage in it)
                res["value"] = n / res["seconds"]
                res["cpu_us"] = res["cpu_seconds"] / n * 1e6
                res["cpu_share"] = res["cpu_seconds"] / res["seconds"]
                res["show"] = "%s msg/s (%.2f s; %.1f µs CPU a message)" % (
                    fmt(res["value"]), res["seconds"], res["cpu_us"])
                return res
            finally:
                done()

        def source_peer(sessions: int) -> dict:
            if not source:
                raise Skip("smtp-source not found")
            port, arrived, done = server()
            try:
                cmd = [source, "-d", "-s", str(sessions), "-m", str(n), "-F", msgfile,
                       "-f", benchlib.SENDER, "-t", "user@" + benchlib.DOMAIN,
                       "-M", benchlib.DOMAIN, "%s:%d" % (benchlib.HOST, port)]
                r = self.run_peer(cmd, self.timeout(n))
                if r.returncode:
                    raise RuntimeError("exit %d: %s" % (r.returncode, r.stderr[-800:]))
                check(arrived(n), "smtp-source")
                return {"value": n / r.wall, "seconds": r.wall, "cpu_seconds": r.cpu,
                        "cpu_us": r.cpu / n * 1e6, "cpu_share": r.cpu / r.wall,
                        "show": "%s msg/s (%.2f s; %.1f µs CPU a message)" % (
                            fmt(n / r.wall), r.wall, r.cpu / n * 1e6)}
            finally:
                done()

        tls = ", STARTTLS" if to_postfix else ""
        no_sessions = None if self.gs["sessions"] else "n/a (no sessions option)"
        # The delivery rows run with -q, as smtp-source logs nothing; the
        # "lines" row is the default output, one log line a delivery on
        # stderr (read by this script through a pipe), for what that costs.
        return [
            Peer("gsemail", "gsemail --once -q, sessions = 1 (default)%s" % tls,
                 lambda: gsemail_peer(None)),
            Peer("gsemail-lines", "gsemail --once, sessions = 1, a line a delivery%s" % tls,
                 lambda: gsemail_peer(None, quiet=False),
                 None if self.gs.get("quiet") else "n/a (no -q: every row prints its lines)"),
            Peer("gsemail4", "gsemail --once -q, sessions = 4%s" % tls,
                 lambda: gsemail_peer(4), no_sessions),
            Peer("zope", "zope.sendmail QueueProcessorThread, 1 pass%s" % (
                ", TLS per message" if to_postfix else ""), zope_peer, self.zope_skip()),
            Peer("smtplib", "raw smtplib, one reused connection%s" % tls, smtplib_peer),
            Peer("source1", "smtp-source, 1 session (-d)%s" % (
                ", plain: no TLS" if to_postfix else ""), lambda: source_peer(1)),
            Peer("source4", "smtp-source, 4 sessions (-d)%s" % (
                ", plain: no TLS" if to_postfix else ""), lambda: source_peer(4)),
        ]

    def case_drain_sink(self) -> None:
        self.interleave("drain-sink", self.drain_peers("drain-sink", self.args.n))

    def case_drain_postfix(self) -> None:
        why = self.ensure_postfix()
        peers = self.drain_peers("drain-postfix", self.args.n_postfix)
        if why:
            for p in peers:
                p.skip = p.skip or why
        self.interleave("drain-postfix", peers)

    def case_latency(self) -> None:
        n, rate = self.args.latency_n, self.args.rate

        def peer(kind: str) -> dict:
            d = self.fresh(self.shm, "lat")
            sink = benchlib.ArrivalSink(self.procs, self.work, self.server_cpu)
            try:
                queue = os.path.join(d, "queue")
                common = ["--n", str(n), "--rate", str(rate), "--arrivals", sink.path,
                          "--timeout", str(max(60.0, 4 * self.args.zope_interval))]
                if kind == "smtplib":
                    cmd = [sys.executable, PEERS, "latency-smtplib", "--port",
                           str(sink.port)] + common
                elif kind == "zope":
                    cmd = [self.zope_python, PEERS, "latency-zope", "--queue", queue,
                           "--port", str(sink.port), "--interval",
                           str(self.args.zope_interval)] + common
                else:
                    ini = self.write_ini(queue, sink.port, processorthread=True)
                    cmd = [sys.executable, PEERS, "latency-gsemail", "--ini", ini] + common
                r = self.run_peer(cmd, n / rate + 300)  # type: ignore[arg-type]
                if r.returncode:
                    raise RuntimeError("exit %d: %s" % (r.returncode, r.stderr[-800:]))
                res = r.json()
                lat = [(a - s) * 1e3 for s, a in sink.arrivals()]
                if len(lat) != n:
                    raise RuntimeError("%d of %d messages arrived" % (len(lat), n))
                res.update(p50=benchlib.percentile(lat, 50), p99=benchlib.percentile(lat, 99),
                           max=max(lat))
                res["value"] = res["p50"]
                res["show"] = "p50 %.2f ms, p99 %.2f ms, max %.1f ms (call p50 %.2f " \
                    "ms); %d behind schedule" % (res["p50"], res["p99"], res["max"],
                                                 res["call_p50_ms"], res["behind"])
                return res
            finally:
                sink.stop()
                shutil.rmtree(d, ignore_errors=True)

        self.interleave("latency", [
            Peer("gsemail", "gsemail processor thread", lambda: peer("gsemail")),
            Peer("zope", "zope.sendmail QueueProcessorThread (%g s poll)"
                 % self.args.zope_interval, lambda: peer("zope"), self.zope_skip()),
            Peer("smtplib", "floor: smtplib sends at once, no queue",
                 lambda: peer("smtplib")),
        ])

    def case_group(self) -> None:
        n = self.args.group_rcpts
        rcpts = ["member%05d@%s" % (i, benchlib.DOMAIN) for i in range(n)]

        def peer(zope: bool) -> dict:
            pf = self.postfix
            assert pf is not None
            d = self.fresh(self.shm, "group")
            try:
                queue = os.path.join(d, "queue")
                benchlib.write_queue(queue, 1, recipients=rcpts)
                pf.wait_idle()
                pf.truncate_log()
                if zope:
                    r = self.run_peer([self.zope_python, PEERS, "drain-zope", "--queue",  # type: ignore[list-item]
                                       queue, "--port", str(pf.port)], 600)
                    seconds = r.wall if not r.returncode else None
                else:
                    r = self.run_peer(self.python_gsemail(self.write_ini(queue, pf.port)), 600)
                    seconds = r.wall    # the whole process, start-up included
                left = benchlib.queue_count(queue)
                accepted = pf.accepted_at_least(n)
                if r.returncode and not zope:
                    raise RuntimeError("exit %d (%d of %d accepted): %s" % (
                        r.returncode, accepted, n, r.stderr[-800:]))
                if seconds is None:
                    raise RuntimeError("exit %d: %s" % (r.returncode, r.stderr[-800:]))
                return {"value": seconds, "accepted": accepted, "recipients": n,
                        "left": left["waiting"], "exit": r.returncode,
                        "cpu_share": r.cpu / r.wall,
                        "show": "%.2f s, %d of %d recipients accepted, %d message(s) left "
                                "in the queue" % (seconds, accepted, n, left["waiting"])}
            finally:
                shutil.rmtree(d, ignore_errors=True)

        def source_peer() -> dict:
            """The C client on the same work: n recipients as n/1000
            transactions of 1000 (smtp-source -r; no TLS, no pipelining)."""
            pf = self.postfix
            source = benchlib.find_bin("smtp-source")
            if pf is None or not source:
                raise Skip("smtp-source not found")
            msgfile = os.path.join(self.work, "smtp-source-message.txt")
            with open(msgfile, "wb") as f:
                f.write(benchlib.make_message(0).replace(b"\r\n", b"\n"))
            per = min(1000, n)
            pf.wait_idle()
            pf.truncate_log()
            r = self.run_peer([source, "-d", "-s", "1", "-r", str(per), "-m", str(-(-n // per)),
                               "-F", msgfile, "-f", benchlib.SENDER,
                               "-t", "member@" + benchlib.DOMAIN, "-M", benchlib.DOMAIN,
                               "%s:%d" % (benchlib.HOST, pf.port)], 600)
            if r.returncode:
                raise RuntimeError("exit %d: %s" % (r.returncode, r.stderr[-800:]))
            accepted = pf.accepted_at_least(n)
            return {"value": r.wall, "accepted": accepted, "recipients": n, "left": 0,
                    "cpu_share": r.cpu / r.wall,
                    "show": "%.2f s, %d of %d recipients accepted" % (r.wall, accepted, n)}

        why = self.ensure_postfix()
        self.interleave("group", [
            Peer("gsemail", "gsemail --once (recipients_per_transaction 1000)",
                 lambda: peer(False), why),
            Peer("zope", "zope.sendmail QueueProcessorThread, 1 pass", lambda: peer(True),
                 why or self.zope_skip()),
            Peer("source", "smtp-source -r 1000 (plain, no pipelining)", source_peer, why),
        ])

    def case_scale_idle(self) -> None:
        n, window = self.args.scale_n, self.args.idle_seconds
        queue = os.path.join(self.fresh(self.shm, "scale-idle"), "queue")
        built = []

        def peer() -> dict:
            if not built:     # the deferred backlog is written once, kept for every run
                self.say("writing %s deferred messages into %s/cur" % (fmt(n), queue))
                benchlib.write_queue(queue, n, sub="cur", mtime=time.time() + 7 * 86400)
                built.append(True)
            sink = benchlib.SmtpSink(self.procs, self.work, self.server_cpu)
            ini = self.write_ini(queue, sink.port)
            logfile = os.path.join(self.work, "processor-%d.log" % sink.port)
            trickled = 0
            with open(logfile, "wb") as log:
                proc = self.procs.start(self.python_gsemail(ini, once=False), self.client_cpu,
                                        env=self.env, cwd=self.work, stdout=log, stderr=log)
            try:
                # Warm-up: the first pass reads all of cur/; the window starts
                # once the first trickled message has gone through.
                benchlib.write_queue(queue, 1, start=n + 1, via_tmp=True)
                trickled += 1
                benchlib.wait_for(lambda: sink.messages() >= 1 or proc.poll() is not None,
                                  300, "the processor to send its first message", 0.05)
                if proc.poll() is not None:
                    raise RuntimeError("the processor exited (%s)" % proc.returncode)
                time.sleep(1.0)
                cpu0, t0 = benchlib.proc_cpu_seconds(proc.pid), time.monotonic()
                interval = 1.0 / self.args.trickle
                while time.monotonic() - t0 < window:
                    time.sleep(max(0.0, t0 + trickled * interval - time.monotonic()))
                    benchlib.write_queue(queue, 1, start=n + 1 + trickled, via_tmp=True)
                    trickled += 1
                cpu1, t1 = benchlib.proc_cpu_seconds(proc.pid), time.monotonic()
                got = sink.wait_messages(trickled, 10)
                rss = benchlib.proc_rss_kb(proc.pid) / 1024
            finally:
                self.procs.stop(proc, grace=15)
                sink.stop()
            left = benchlib.queue_count(queue)
            if got != trickled:
                raise RuntimeError("%d of %d trickled messages arrived" % (got, trickled))
            if left["waiting"] != n:
                raise RuntimeError("%d messages in the queue, not the %d deferred"
                                   % (left["waiting"], n))
            share = (cpu1 - cpu0) / (t1 - t0) * 100
            return {"value": share, "cpu_s_per_min": (cpu1 - cpu0) / (t1 - t0) * 60,
                    "window_s": t1 - t0, "trickled": trickled, "peak_rss_mb": rss,
                    "show": "%.2f%% of one core (%.2f CPU s a minute), %d trickled "
                            "messages delivered, peak RSS %.1f MB"
                            % (share, (cpu1 - cpu0) / (t1 - t0) * 60, trickled, rss)}

        self.interleave("scale-idle", [
            Peer("gsemail", "python -m gsemail (processor), %s deferred, %g new/s"
                 % (fmt(n), self.args.trickle), peer)])

    def case_scale_rss(self) -> None:
        n = self.args.scale_n

        def peer() -> dict:
            d = self.fresh(self.shm, "scale-rss")
            sink = benchlib.SmtpSink(self.procs, self.work, self.server_cpu)
            try:
                queue = os.path.join(d, "queue")
                benchlib.write_queue(queue, n)
                r = self.run_peer(self.python_gsemail(self.write_ini(queue, sink.port)),
                                  self.timeout(n))
                if r.returncode:
                    raise RuntimeError("exit %d: %s" % (r.returncode, r.stderr[-800:]))
                got = sink.wait_messages(n)
                if got != n:
                    raise RuntimeError("%d of %d messages arrived" % (got, n))
                mb = r.maxrss_mb
                if mb is None:
                    raise Skip("peak RSS not known: install GNU time")
                return {"value": mb, "seconds": r.wall, "msgs_per_s": n / r.wall,
                        "cpu_us": r.cpu / n * 1e6,
                        "show": "peak RSS %.1f MB; %s msg/s (%.1f s, %.1f µs CPU a message)"
                                % (mb, fmt(n / r.wall), r.wall, r.cpu / n * 1e6)}
            finally:
                sink.stop()
                shutil.rmtree(d, ignore_errors=True)

        self.interleave("scale-rss", [
            Peer("gsemail", "python -m gsemail --once, %s due" % fmt(n), peer)])

    # The ten dead letters of scale-ops, made by gsemail itself (in a child:
    # this process does not import gsemail).
    DEAD_LETTERS = """if True:
        import os, sys, gsemail
        queue = gsemail.Queue(sys.argv[1])
        for i in range(10):
            name = queue.add("bench@example.org", ["dead%d@example.org" % i],
                             b"Subject: dead %d\\r\\n\\r\\nbody\\r\\n" % i)
            msg = queue.claim(os.path.join(sys.argv[1], "new", name))
            queue.dead_letter(msg, {msg.recipients[0]: "550 5.1.1 no such user"},
                              "refused by the bench")
        """

    def measure_command(self, cmd: List[str], timeout: float,
                        exit_codes: Tuple[int, ...] = (0,), count: bytes = b"") -> dict:
        """One operator command as a whole process on the client CPU: wall
        time, time to its first line of output, CPU and peak RSS (the
        command's own: see benchlib.Procs).  Its output is read as it
        comes from a pipe, counted and dropped."""
        r = self.procs.run(cmd, self.client_cpu, timeout=timeout, env=self.env,
                           cwd=self.work, stream=True, count=count)
        if r.returncode not in exit_codes:
            raise RuntimeError("exit %d: %s" % (r.returncode, r.stderr[-800:]))
        return {"value": r.wall, "peak_rss_mb": r.maxrss_mb, "cpu_seconds": r.cpu,
                "exit": r.returncode, "tail": r.stdout[-300:],
                "first_line_s": r.first_line, "out_lines": r.out_lines,
                "out_matches": r.out_matches,
                "out_bytes": r.out_bytes,
                "show": "%.2f s, first line at %s s, CPU %.2f s, peak RSS %s MB, %s lines"
                        % (r.wall, fmt(r.first_line, 3), r.cpu, fmt(r.maxrss_mb, 1),
                           fmt(r.out_lines))}

    def case_scale_ops(self) -> None:
        n = self.args.scale_n
        queue = os.path.join(self.fresh(self.shm, "scale-ops"), "queue")
        built: List[str] = []

        def ops(args: List[str], exit_codes: Tuple[int, ...] = (0,)) -> Callable[[], dict]:
            def peer() -> dict:
                if not built:     # the queue is written once, for every command and run
                    self.say("writing %s deferred messages and 10 dead letters into %s"
                             % (fmt(n), queue))
                    paths = benchlib.write_queue(queue, n, sub="cur",
                                                 mtime=time.time() + 7 * 86400)
                    r = subprocess.run([sys.executable, "-c", self.DEAD_LETTERS, queue],
                                       env=self.env, capture_output=True, text=True)
                    if r.returncode:
                        raise RuntimeError("dead letters: %s" % r.stderr[-800:])
                    built.append(os.path.basename(paths[n // 2]))
                ini = self.write_ini(queue, 9)
                # the whole id, as list prints it; or its first 24 characters,
                # which only a scan of the names can match
                shown = [built[0] if a == "ID" else built[0][:24] if a == "PREFIX" else a
                         for a in args]
                return self.measure_command(self.python_gsemail(ini, once=False) + shown,
                                            self.timeout(n), exit_codes)
            return peer

        try:
            self.interleave("scale-ops", [
                Peer("show", "python -m gsemail show ID", ops(["show", "ID"])),
                Peer("show-prefix", "python -m gsemail show PREFIX (of ID)",
                     ops(["show", "PREFIX"])),
                # status exits 1 or 2 for a warning or critical verdict,
                # which 100,000 deferred messages may well be
                Peer("status", "python -m gsemail status", ops(["status"], (0, 1, 2))),
                Peer("status-json", "python -m gsemail status --json",
                     ops(["status", "--json"], (0, 1, 2))),
                Peer("list", "python -m gsemail list", ops(["list"])),
                Peer("list-json", "python -m gsemail list --json", ops(["list", "--json"]))])
        finally:
            shutil.rmtree(os.path.dirname(queue), ignore_errors=True)

    def case_scale_mailq(self) -> None:
        """gsemail's list and list --json on n deferred messages beside
        Postfix's mailq (postqueue -p) and postqueue -j on n deferred
        messages in a private Postfix whose relay is down."""
        n = self.args.scale_n
        base = self.fresh(self.shm, "scale-mailq")
        queue = os.path.join(base, "queue")
        ini = self.write_ini(queue, 9)
        t0 = time.monotonic()
        self.say("writing %s deferred messages into %s/cur" % (fmt(n), queue))
        benchlib.write_queue(queue, n, sub="cur", mtime=time.time() + 7 * 86400)
        fill = self.mailq_fill
        fill["gsemail_write_s"] = round(time.monotonic() - t0, 1)
        self.info["scale-mailq fill"] = fill
        pf: Optional[benchlib.Postfix] = None
        postqueue = benchlib.find_bin("postqueue")
        why: Optional[str] = None
        try:
            if os.geteuid() != 0:
                why = "skipped (a private Postfix needs root)"
            elif not postqueue or not benchlib.find_bin("smtp-source"):
                why = "skipped (postqueue or smtp-source not found)"
            else:
                try:
                    pf = self.deferred_postfix(n, fill)
                except Exception as e:
                    why = "Postfix could not be filled: %s: %s" % (type(e).__name__, e)
                    self.say(why)

            def gsemail_peer(args: List[str]) -> Callable[[], dict]:
                def peer() -> dict:
                    # list --json: an object a message, each at the start of
                    # its line ('\n{'; '\n {' when indented, before 1.1)
                    res = self.measure_command(self.python_gsemail(ini, once=False) + args,
                                               self.timeout(n),
                                               count=b"\n{" if "--json" in args else b"")
                    if "--json" in args and not res["out_matches"]:
                        res = self.measure_command(self.python_gsemail(ini, once=False) + args,
                                                   self.timeout(n), count=b"\n {")
                    listed = res["out_matches"] if "--json" in args else res["out_lines"] - 2
                    if listed != n:     # list: a heading and a summary line more
                        raise RuntimeError("listed %d of %d messages" % (listed, n))
                    return res
                return peer

            def postfix_peer(flag: str) -> Callable[[], dict]:
                def peer() -> dict:
                    assert pf is not None and postqueue is not None
                    # postqueue is a client: showq, a daemon of the instance
                    # (on the server CPU), reads the queue for it.  Its peak
                    # RSS is reset before and read after (it stays idle for
                    # the next request), its CPU counted as the difference.
                    before = pf.daemons("showq")
                    for pid in before:
                        try:
                            with open("/proc/%d/clear_refs" % pid, "w") as f:
                                f.write("5")
                        except OSError:
                            pass
                    res = self.measure_command([postqueue, "-c", pf.etc, flag], self.timeout(n))
                    after = pf.daemons("showq")
                    res["showq_cpu_s"] = sum(cpu - before.get(pid, (0.0, 0))[0]
                                             for pid, (cpu, _) in after.items())
                    res["showq_rss_mb"] = max((kb for _, kb in after.values()), default=0) / 1024
                    if flag == "-j":
                        listed = res["out_lines"]
                    else:
                        found = re.findall(r"in (\d+) Requests?\.", res["tail"])
                        listed = int(found[-1]) if found else -1
                    if listed != n:
                        raise RuntimeError("listed %d of %d messages" % (listed, n))
                    res["show"] += "; showq CPU %.2f s, peak RSS %.1f MB" % (
                        res["showq_cpu_s"], res["showq_rss_mb"])
                    return res
                return peer

            self.interleave("scale-mailq", [
                Peer("list", "python -m gsemail list", gsemail_peer(["list"])),
                Peer("list-json", "python -m gsemail list --json",
                     gsemail_peer(["list", "--json"])),
                Peer("mailq", "Postfix mailq (postqueue -p)", postfix_peer("-p"), why),
                Peer("postqueue-j", "Postfix postqueue -j", postfix_peer("-j"), why)])
        finally:
            if pf is not None:
                pf.stop()
                shutil.rmtree(os.path.dirname(pf.dir), ignore_errors=True)
            shutil.rmtree(base, ignore_errors=True)

    def deferred_postfix(self, n: int, fill: Dict[str, float]) -> benchlib.Postfix:
        """A private Postfix, its relay down, with n deferred messages of
        the bench's 5,060 bytes: smtp-source sends them to its smtpd over 4
        connections; the one smtp(8) attempt each gets "Connection refused"
        (then the queue manager defers the rest of a batch at once), and the
        retries are hours away.  Returns once all n are in deferred/."""
        source = benchlib.find_bin("smtp-source")
        assert source is not None
        pf = benchlib.Postfix(self.procs, self.fresh(self.pf_base, "pf-mailq"),
                              self.server_cpu, dead_relay=benchlib.free_port())
        try:
            pf.start()
            self.say("Postfix (relay 127.0.0.1:%s, nothing there) on 127.0.0.1:%d, master "
                     "PID %s: sending it %s messages" % (pf.dead_relay, pf.port, pf.pid, fmt(n)))
            msgfile = os.path.join(self.work, "smtp-source-message.txt")
            with open(msgfile, "wb") as f:
                f.write(benchlib.make_message(0).replace(b"\r\n", b"\n"))
            t0 = time.monotonic()
            r = self.run_peer([source, "-d", "-s", "4", "-m", str(n), "-F", msgfile,
                               "-f", benchlib.SENDER, "-t", "user@relay.example",
                               "-M", "bench.example", "%s:%d" % (benchlib.HOST, pf.port)],
                              self.timeout(n))
            if r.returncode:
                raise RuntimeError("smtp-source exit %d: %s" % (r.returncode, r.stderr[-500:]))
            sent = time.monotonic() - t0

            def settled() -> bool:
                c = pf.queue_counts()
                return c["deferred"] >= n and not (c["maildrop"] or c["incoming"]
                                                   or c["active"])
            benchlib.wait_for(settled, max(600.0, n / 50.0), "%d deferred messages" % n, 0.5)
            total = time.monotonic() - t0
            fill.update(postfix_sent_s=round(sent, 1), postfix_deferred_s=round(total, 1),
                        postfix_msgs_per_s=round(n / total))
            self.say("Postfix: %s messages deferred after %.1f s (%.1f s to send them)"
                     % (fmt(n), total, sent))
            pf.truncate_log()
            return pf
        except BaseException:
            pf.stop()
            shutil.rmtree(os.path.dirname(pf.dir), ignore_errors=True)
            raise

    # -- the whole run -------------------------------------------------------------

    def selected(self) -> List[str]:
        if not self.args.only:
            return CASES
        chosen = []
        for word in self.args.only.split(","):
            word = word.strip().lower()
            match = [c for c in CASES if c == word or c.startswith(word)]
            if not match:
                raise SystemExit("--only: no case %r (cases: %s)" % (word, ", ".join(CASES)))
            chosen += [c for c in match if c not in chosen]
        return [c for c in CASES if c in chosen]

    def run(self) -> None:
        cases = self.selected()
        self.info["cases"] = cases
        self.probe()
        if any(c in cases for c in ("enqueue", "drain-sink", "drain-postfix", "latency",
                                    "group")):
            self.ensure_zope()
        for case in cases:
            self.say("== %s" % case)
            getattr(self, "case_" + case.replace("-", "_"))()

    def cleanup(self) -> None:
        if self.postfix is not None:
            self.postfix.stop()
        self.procs.stop_all()
        for pid in list(self.procs.extra_pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.args.keep:
            self.say("kept %s, %s and %s" % (self.work, self.shm, self.pf_base))
            return
        for d in (self.work, self.shm, self.pf_base):
            shutil.rmtree(d, ignore_errors=True)

    # -- the report -------------------------------------------------------------------

    def median(self, section: str, key: str, field: str = "value") -> Optional[float]:
        values = [r[field] for r in self.runs.get(section, {}).get(key, [])
                  if r.get("ok") and r.get(field) is not None]
        return statistics.median(values) if values else None

    def report(self) -> Tuple[str, dict]:
        a = self.args
        out: List[str] = []
        w = out.append
        elapsed = time.monotonic() - self.t_start
        w("gsemail benchmark, %s, %s%s" % (
            datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), platform.node(),
            " (INTERRUPTED: partial)" if self.interrupted else ""))
        w("  command:   %s" % " ".join(["python bench/run.py"] + sys.argv[1:]))
        w("  machine:   %d CPUs, Linux %s, Python %s" % (
            os.cpu_count() or 0, platform.release(), platform.python_version()))
        w("  pinning:   %s" % self.pinning)
        for key in ("gsemail", "startup", "rss", "zope", "postfix"):
            if key in self.info:
                w("  %-10s %s" % (key + ":", self.info[key]))
        w("  message:   %s bytes, one recipient (benchlib.make_message), no XVERP"
          % fmt(len(benchlib.make_message(0))))
        w("  queues:    tmpfs %s (%s); disk %s (%s)" % (
            self.args.tmpfs_dir, benchlib.fs_type(self.shm), self.disk_base,
            benchlib.fs_type(self.work)))
        w("  runs:      %d per peer, interleaved; figures are medians, then every run; "
          "ratios are of medians from this run" % a.repeats)
        w("  duration:  %.0f s" % elapsed)
        targets: List[dict] = []

        def target(name: str, value: Optional[float], ok: Optional[bool], shown: str) -> str:
            verdict = "n/a" if ok is None else ("PASS" if ok else "MISS")
            targets.append({"target": name, "figure": shown, "value": value,
                            "result": verdict,
                            "verdict": {"PASS": "met", "MISS": "missed"}.get(verdict, "n/a")})
            return verdict if ok is None else "%s %s" % (verdict, shown)

        def table(section: str, title: str, unit: str, digits: int,
                  extra: Callable[[str], str],
                  cols: Tuple[Tuple[str, str, int], ...] = ()) -> None:
            """One case's table: its value (median, then each run), the
            medians of cols (field, heading, digits), then extra(key)."""
            if section not in self.labels:
                return
            w("")
            w(title)
            width = max(len(label) for _, label, _ in self.labels[section])
            more = "".join(" %11s" % heading for _, heading, _ in cols)
            w("  %-*s %10s%s  %-24s %s" % (width, "peer", unit, more, "each run",
                                            "ratios, target"))
            for key, label, skip in self.labels[section]:
                runs = self.runs[section].get(key, [])
                if skip:
                    w("  %-*s %s" % (width, label, skip))
                    continue
                if not runs:
                    w("  %-*s %s" % (width, label, "not run (interrupted)"))
                    continue
                each = " ".join(fmt(r["value"], digits) if r.get("ok") else "fail"
                                for r in runs)
                med = self.median(section, key)
                more = "".join(" %11s" % fmt(self.median(section, key, field), d)
                               for field, _, d in cols)
                w(("  %-*s %10s%s  %-24s %s" % (width, label, fmt(med, digits)
                                                if med is not None else "FAILED", more, each,
                                                extra(key))).rstrip())
                for r in runs:
                    if not r.get("ok"):
                        w("      failed run: %s" % r["error"][-300:])

        # -- enqueue
        def enqueue_extra(key: str) -> str:
            if not key.startswith("gsemail-"):
                return ""
            where = key.split("-")[1]
            med = self.median("enqueue", key)
            vz = ratio(med, self.median("enqueue", "zope-" + where))
            vf = ratio(med, self.median("enqueue", "fs-" + where))
            text = "%s zope, %s fs ceiling" % (rx(vz), rx(vf))
            if where == "tmpfs":
                text += "; >= 1.0x zope: " + target(
                    "enqueue on tmpfs >= 1.0x zope.sendmail queued delivery", vz,
                    None if vz is None else vz >= 1.0, rx(vz))
            else:
                text += "; >= 0.8x fs ceiling: " + target(
                    "enqueue on disk >= 0.8x the file-system ceiling", vf,
                    None if vf is None else vf >= 0.8, rx(vf))
            return text
        table("enqueue", "ENQUEUE: %s messages into a fresh queue (msg/s)" % fmt(a.n),
              "msg/s", 0, enqueue_extra)

        # -- drain
        def drain_extra(section: str) -> Callable[[str], str]:
            def extra(key: str) -> str:
                med = self.median(section, key)
                ref = README_ANCHORS.get((section, key))
                if not key.startswith("gsemail"):
                    return "(shared README: %s)" % fmt(ref) if ref else ""
                vs = {k: ratio(med, self.median(section, k))
                      for k in ("zope", "smtplib", "source1", "source4")}
                text = "%s zope, %s smtplib, %s src-1, %s src-4" % tuple(
                    rx(vs[k]) for k in ("zope", "smtplib", "source1", "source4"))
                share = self.median(section, key, "cpu_share")
                if share is not None:
                    text += " (busy: %.0f%% CPU)" % (100 * share)
                checks = []
                if section == "drain-sink" and key == "gsemail":
                    checks.append(">= 2.5x zope: " + target(
                        "drain to smtp-sink, 1 session >= 2.5x zope.sendmail", vs["zope"],
                        None if vs["zope"] is None else vs["zope"] >= 2.5,
                        rx(vs["zope"])))
                    checks.append(">= 1.3x smtplib: " + target(
                        "drain to smtp-sink, 1 session >= 1.3x raw smtplib reuse",
                        vs["smtplib"], None if vs["smtplib"] is None else vs["smtplib"] >= 1.3,
                        rx(vs["smtplib"])))
                if section == "drain-sink" and key == "gsemail4":
                    checks.append(">= 1.0x src-1: " + target(
                        "drain to smtp-sink, parallel sessions >= 1.0x smtp-source 1 session",
                        vs["source1"], None if vs["source1"] is None else vs["source1"] >= 1.0,
                        rx(vs["source1"])))
                if section == "drain-postfix" and key == "gsemail":
                    checks.append(">= 3x zope: " + target(
                        "drain to Postfix with STARTTLS >= 3x zope.sendmail", vs["zope"],
                        None if vs["zope"] is None else vs["zope"] >= 3.0,
                        rx(vs["zope"])))
                return text + ("; " + "; ".join(checks) if checks else "")
            return extra
        timing = ("gsemail and zope.sendmail: the whole process that drains the queue, "
                  "start-up included; smtplib: its send loop only")
        cpu_col = (("cpu_us", "CPU µs/msg", 1),)
        table("drain-sink", "DRAIN to smtp-sink: a queue of %s (msg/s; %s; CPU µs/msg: user + "
              "system CPU of the client process from wait4, over the messages delivered)"
              % (fmt(a.n), timing), "msg/s", 0, drain_extra("drain-sink"), cpu_col)
        if "drain-sink" in self.labels:
            # Issue 16's two targets, read straight off the table above.
            gs1, src1 = (self.median("drain-sink", k, "cpu_us") for k in ("gsemail", "source1"))
            gs4, src4 = (self.median("drain-sink", k) for k in ("gsemail4", "source4"))
            cpu_x, thr_x = ratio(gs1, src1), ratio(gs4, src4)
            lines = [
                ("CPU per message, sessions = 1: %s µs vs smtp-source -d -s 1's %s µs"
                 % (fmt(gs1, 1), fmt(src1, 1)), "<= 0.75x",
                 target("drain to smtp-sink, sessions = 1: CPU per message <= 0.75x "
                        "smtp-source -d -s 1's", cpu_x,
                        None if cpu_x is None else cpu_x <= 0.75, rx(cpu_x))),
                ("throughput, sessions = 4: %s msg/s vs smtp-source -d -s 4's %s"
                 % (fmt(gs4), fmt(src4)), ">= 0.6x",
                 target("drain to smtp-sink, sessions = 4: msg/s >= 0.6x smtp-source -d -s "
                        "4's", thr_x, None if thr_x is None else thr_x >= 0.6, rx(thr_x)))]
            w("  issue 16, same run, same client CPU:")
            for what, goal, verdict in lines:
                word = {"PASS": "met", "MISS": "missed"}.get(verdict.split()[0], "n/a")
                w("    %s = %s (target %s): %s" % (what, verdict.split()[-1], goal, word))
        if "drain-sink" in self.labels and not self.gs["sessions"]:
            self.note_target("drain to smtp-sink, parallel sessions >= 1.0x smtp-source 1 "
                             "session", "n/a (no sessions option)", targets)
        table("drain-postfix", "DRAIN to the private Postfix with STARTTLS: a queue of %s "
              "(msg/s; %s; CPU µs/msg of the client)" % (fmt(a.n_postfix), timing), "msg/s", 0,
              drain_extra("drain-postfix"), cpu_col)

        # -- latency
        def latency_extra(key: str) -> str:
            p50 = self.median("latency", key, "p50")
            p99 = self.median("latency", key, "p99")
            text = "p99 %s ms, max %s ms" % (fmt(p99, 2),
                                              fmt(self.median("latency", key, "max"), 1))
            if key == "gsemail":
                text += "; p50 < 5 ms: " + target(
                    "latency p50 < 5 ms", p50, None if p50 is None else p50 < 5,
                    "%s ms" % fmt(p50, 2))
                text += "; p99 < 50 ms: " + target(
                    "latency p99 < 50 ms", p99, None if p99 is None else p99 < 50,
                    "%s ms" % fmt(p99, 2))
            return text
        table("latency", "LATENCY: send_email to the final dot at our arrival sink, %s "
              "messages at %g/s (p50 ms)" % (fmt(a.latency_n), a.rate), "p50 ms", 2,
              latency_extra)

        # -- group post
        def group_extra(key: str) -> str:
            accepted = self.median("group", key, "accepted")
            left = self.median("group", key, "left")
            text = "%s of %s accepted%s" % (fmt(accepted), fmt(a.group_rcpts),
                                             ", still queued" if left else "")
            share = self.median("group", key, "cpu_share")
            if share is not None:
                text += " (busy: %.0f%% CPU)" % (100 * share)
            if key == "gsemail":
                secs = self.median("group", key)
                all_in = all(r.get("accepted") == a.group_rcpts
                             for r in self.runs["group"][key] if r.get("ok"))
                text += "; < 3 s, all accepted: " + target(
                    "group post to %s recipients < 3 s, every one accepted" % fmt(a.group_rcpts),
                    secs, None if secs is None else (secs < 3 and all_in),
                    "%s s, %s" % (fmt(secs, 2), "all accepted" if all_in else "NOT all"))
            return text
        table("group", "ONE GROUP POST: one message to %s recipients through Postfix "
              "(smtpd_recipient_limit 1000, STARTTLS), seconds" % fmt(a.group_rcpts),
              "seconds", 2, group_extra)

        # -- scale
        def idle_extra(key: str) -> str:
            share = self.median("scale-idle", key)
            return "%s CPU s a minute, peak RSS %s MB; < 1%% of one core: %s" % (
                fmt(self.median("scale-idle", key, "cpu_s_per_min"), 2),
                fmt(self.median("scale-idle", key, "peak_rss_mb"), 1), target(
                    "idle processor with %s deferred < 1%% of one core" % fmt(a.scale_n),
                    share, None if share is None else share < 1.0, "%s%%" % fmt(share, 2)))
        table("scale-idle", "SCALE, IDLE: %s messages deferred a week in cur/, %g new "
              "message(s)/s, CPU over %g s (%% of one core)" % (
                  fmt(a.scale_n), a.trickle, a.idle_seconds), "% core", 2, idle_extra)

        def rss_extra(key: str) -> str:
            mb = self.median("scale-rss", key)
            return "%s msg/s; < 60 MB: %s; issue 16's < 40 MB: %s" % (
                fmt(self.median("scale-rss", key, "msgs_per_s")), target(
                    "peak RSS draining %s < 60 MB" % fmt(a.scale_n), mb,
                    None if mb is None else mb < 60, "%s MB" % fmt(mb, 1)), target(
                    "peak RSS draining %s < 40 MB (issue 16)" % fmt(a.scale_n), mb,
                    None if mb is None else mb < 40, "%s MB" % fmt(mb, 1)))
        table("scale-rss", "SCALE, DRAIN: python -m gsemail --once over %s due messages to "
              "smtp-sink (peak RSS, MB)" % fmt(a.scale_n), "MB", 1, rss_extra)

        def ops_extra(key: str) -> str:
            secs, mb = self.median("scale-ops", key), self.median("scale-ops", key,
                                                                 "peak_rss_mb")
            first = self.median("scale-ops", key, "first_line_s")
            if key == "show-prefix":
                return ""
            if key in ("status", "status-json"):
                return "< 0.6 s and 40 MB: " + target(
                    "%s on %s deferred < 0.6 s and 40 MB" % (
                        "status" if key == "status" else "status --json", fmt(a.scale_n)),
                    secs, None if secs is None or mb is None else secs < 0.6 and mb < 40,
                    "%s s, %s MB" % (fmt(secs, 2), fmt(mb, 1)))
            if key == "show":
                return "< 0.3 s and 40 MB: " + target(
                    "show ID on %s deferred < 0.3 s and 40 MB" % fmt(a.scale_n), secs,
                    None if secs is None or mb is None else secs < 0.3 and mb < 40,
                    "%s s, %s MB" % (fmt(secs, 2), fmt(mb, 1)))
            limit = 40 if key == "list" else 60
            return "< %d MB, streams: " % limit + target(
                "%s on %s deferred: peak RSS < %d MB, first line before half its time" % (
                    "list" if key == "list" else "list --json", fmt(a.scale_n), limit), mb,
                None if mb is None or first is None or secs is None
                else mb < limit and first < secs / 2,
                "%s MB, first line at %s s" % (fmt(mb, 1), fmt(first, 3)))
        cmd_cols = (("first_line_s", "1st line s", 3), ("cpu_seconds", "CPU s", 2),
                    ("peak_rss_mb", "peak RSS MB", 1))
        table("scale-ops", "SCALE, OPERATOR COMMANDS: %s deferred + 10 dead letters on tmpfs, "
              "each command a whole process (seconds)" % fmt(a.scale_n), "seconds", 2,
              ops_extra, cmd_cols)

        def mailq_extra(key: str) -> str:
            secs = self.median("scale-mailq", key)
            if key in ("mailq", "postqueue-j"):
                return "+ showq: CPU %s s, peak RSS %s MB" % (
                    fmt(self.median("scale-mailq", key, "showq_cpu_s"), 2),
                    fmt(self.median("scale-mailq", key, "showq_rss_mb"), 1))
            other = "mailq" if key == "list" else "postqueue-j"
            vs = ratio(self.median("scale-mailq", other), secs)
            first = self.median("scale-mailq", key, "first_line_s")
            streams = first is not None and secs is not None and first < secs / 2
            return "%s as fast as %s; as fast as it, and streams: %s" % (
                rx(vs), "mailq" if key == "list" else "postqueue -j", target(
                    "%s on %s deferred at least as fast as Postfix's %s on as many, first "
                    "line before half its time" % ("list" if key == "list" else "list --json",
                                                   fmt(a.scale_n),
                                                   "mailq" if key == "list" else
                                                   "postqueue -j"),
                    vs, None if vs is None else vs >= 1.0 and streams,
                    "%s, first line at %s s" % (rx(vs), fmt(first, 3))))
        fill = self.mailq_fill
        table("scale-mailq", "SCALE, LISTING BESIDE POSTFIX: %s deferred messages, gsemail's "
              "queue and a private Postfix's (relay down), both on tmpfs; each command a whole "
              "process on the client CPU (seconds)%s" % (
                  fmt(a.scale_n), "; Postfix filled in %s s (%s msg/s)" % (
                      fill["postfix_deferred_s"], fmt(fill["postfix_msgs_per_s"]))
                  if "postfix_deferred_s" in fill else ""),
              "seconds", 2, mailq_extra, cmd_cols)

        if targets:
            w("")
            w("TARGETS")
            for t in targets:
                w("  %-4s  %-72s %s" % (t["result"], t["target"], t["figure"]))
        for note in self.notes:
            w("note: %s" % note)
        data = {"argv": sys.argv[1:], "info": self.info, "pinning": self.pinning,
                "seconds": elapsed, "interrupted": self.interrupted,
                "settings": vars(a), "runs": self.runs, "targets": targets,
                "medians": {s: {k: self.median(s, k) for k in peers}
                            for s, peers in self.runs.items()}}
        return "\n".join(out), data

    @staticmethod
    def note_target(name: str, shown: str, targets: List[dict]) -> None:
        targets.append({"target": name, "figure": shown, "value": None, "result": "n/a"})


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0],
        epilog="Cases: " + ", ".join(CASES) + ".  See the module docstring "
        "(and README.rst, Performance) for what each measures.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: N = 2,000, scale 10,000, latency 1,000, idle "
                         "window 20 s, 1 repeat (unless given)")
    ap.add_argument("--repeats", type=int, help="runs per peer, interleaved (default 3)")
    ap.add_argument("--only", metavar="CASE[,CASE]", help="run only these cases (or prefixes)")
    ap.add_argument("--n", type=int, help="messages for enqueue and drain (default 20,000)")
    ap.add_argument("--n-postfix", type=int, help="messages for the drain to Postfix "
                    "(default: --n)")
    ap.add_argument("--latency-n", type=int, help="messages for latency (default 2,000)")
    ap.add_argument("--rate", type=float, default=200.0,
                    help="latency: messages a second (default 200)")
    ap.add_argument("--group-rcpts", type=int, default=10000,
                    help="recipients of the group post (default 10,000)")
    ap.add_argument("--scale-n", type=int, help="messages for the scale cases "
                    "(default 100,000)")
    ap.add_argument("--idle-seconds", type=float,
                    help="scale-idle: CPU measuring window (default 310, which holds one of "
                         "gsemail's 5-minute reads of all of cur/; --quick's 20 s does not)")
    ap.add_argument("--trickle", type=float, default=1.0,
                    help="scale-idle: new messages a second (default 1)")
    ap.add_argument("--zope-interval", type=float, default=3.0,
                    help="latency: zope's poll interval (default its own, 3 s)")
    ap.add_argument("--with-zope", action="store_true",
                    help="add zope.sendmail (creates or reuses --venv with %s)"
                         % " ".join(ZOPE_PINS))
    ap.add_argument("--venv", default="/tmp/gsemail-bench-venv",
                    help="the zope.sendmail virtual environment (default %(default)s)")
    ap.add_argument("--gsemail", default=PROJECT,
                    help="gsemail.py to measure, or its directory (default: this project)")
    ap.add_argument("--tmpfs-dir", default="/dev/shm",
                    help="where tmpfs queues go (default %(default)s)")
    ap.add_argument("--disk-dir", help="where disk queues and logs go "
                    "(default /var/tmp)")
    ap.add_argument("--postfix-dir", help="where the private Postfix keeps its queue "
                    "(default: --tmpfs-dir, so that Postfix's file creation on this VM's "
                    "drifting ext4 does not bound the clients; --postfix-dir /var/tmp is "
                    "the shared README's anchor set-up)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    ap.add_argument("--json-out", metavar="FILE", help="write every run and the targets "
                    "as JSON")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work directories (for debugging)")
    a = ap.parse_args(argv)
    quick = a.quick
    a.repeats = a.repeats or (1 if quick else 3)
    a.n = a.n or (2000 if quick else 20000)
    a.n_postfix = a.n_postfix or a.n
    a.latency_n = a.latency_n or (1000 if quick else 2000)
    a.scale_n = a.scale_n or (10000 if quick else 100000)
    a.idle_seconds = a.idle_seconds or (20.0 if quick else 310.0)
    for name in ("repeats", "n", "n_postfix", "latency_n", "scale_n", "group_rcpts"):
        if getattr(a, name) < 1:
            ap.error("--%s must be at least 1" % name.replace("_", "-"))
    if a.rate <= 0 or a.trickle <= 0:
        ap.error("--rate and --trickle must be above zero")
    return a


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not benchlib.find_bin("smtp-sink"):
        print("bench/run.py: smtp-sink not found (Debian: apt-get install postfix)",
              file=sys.stderr)
        return 2

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    # even when started in the background, where the shell ignores SIGINT
    signal.signal(signal.SIGINT, interrupt)
    bench = Bench(args)
    status = 0
    try:
        bench.run()
    except KeyboardInterrupt:
        bench.interrupted = True
        status = 130
        print("\ninterrupted: stopping what was started and cleaning up", file=sys.stderr)
    finally:
        # a second Ctrl-C must not cut the clean-up short
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        bench.cleanup()
    text, data = bench.report()
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(data, f, indent=1, default=str)
    return status


if __name__ == "__main__":
    sys.exit(main())
