"""The measured programs of the gsemail benchmark, one subcommand each.

bench/run.py starts these as child processes, pinned to the client CPU.
gsemail's commands run under the system Python with gsemail on PYTHONPATH;
zope.sendmail's run under the benchmark's virtual environment.  Each ends
by printing one JSON line with what it measured.  Messages are built
before the clock starts; the clock covers only the work named.

    probe                   gsemail's file, version, and whether it has a
                            ``sessions`` option
    enqueue-gsemail         send_email() N times, processorthread = false
    enqueue-zope            QueuedMailDelivery.send() + transaction.commit()
                            N times, as a GroupServer request does
    enqueue-fs              the file system's ceiling: create + write +
                            fsync + rename + fsync(dir), bare os calls
    drain-zope              QueueProcessorThread.run(forever=False): one
                            pass over a queue run.py filled
    raw-smtplib             smtplib, one reused connection, N sendmail()s
                            (with the CPU seconds of that loop, from
                            getrusage)
    latency-gsemail         the processor thread running; send_email() at a
                            steady rate, each message stamped X-Bench-Sent
    latency-zope            the same with QueueProcessorThread (3 s poll)
    latency-smtplib         the floor: smtplib sends each at once, no queue
"""

import argparse
import json
import logging
import os
import smtplib
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402


def emit(result: dict) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def count_files(path: str) -> int:
    return sum(1 for n in os.listdir(path) if not n.startswith("."))


# -- gsemail ----------------------------------------------------------------

def probe(args: argparse.Namespace) -> None:
    import dataclasses

    import gsemail
    fields = {f.name for f in dataclasses.fields(gsemail.SMTPConfig)}
    # -q (warnings only): the run's own log line a delivery is not printed
    quiet = any("--quiet" in a.option_strings for a in gsemail._parser()._actions) \
        if hasattr(gsemail, "_parser") else False
    emit({"file": os.path.abspath(gsemail.__file__), "version": gsemail.__version__,
          "sessions": "sessions" in fields, "quiet": quiet, "python": sys.version.split()[0]})


def enqueue_gsemail(args: argparse.Namespace) -> None:
    import gsemail
    msgs = benchlib.make_messages(args.n)
    config = gsemail.configure(args.ini, args.instance)
    if config.processorthread:
        sys.exit("the enqueue case needs processorthread = false")
    send = gsemail.send_email
    t0 = time.perf_counter()
    for to, m in msgs:
        send(benchlib.SENDER, [to], m)
    seconds = time.perf_counter() - t0
    emit({"n": args.n, "seconds": seconds,
          "queued": count_files(os.path.join(config.queuepath, "new"))})


def latency_gsemail(args: argparse.Namespace) -> None:
    import gsemail
    config = gsemail.configure(args.ini, args.instance)
    if not config.processorthread:
        sys.exit("the latency case needs processorthread = true")

    def send(i: int, stamp: bytes, message: bytes) -> None:
        gsemail.send_email(benchlib.SENDER, [benchlib.rcpt(i)], stamp + message)

    result = _steady_rate(args, send)
    gsemail.shutdown(10)
    emit(result)


def _steady_rate(args: argparse.Namespace, send) -> dict:
    """Call send(i, stamp, message) for n messages at args.rate a second,
    then wait for the arrival sink to have them all."""
    msgs = [benchlib.make_message(i) for i in range(args.n)]
    time.sleep(args.settle)         # let the processor reach its idle wait
    calls = []
    behind = 0
    start = time.perf_counter()
    for i, m in enumerate(msgs):
        due = start + i / args.rate
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        elif pause < -1.0 / args.rate:
            behind += 1
        t = time.perf_counter()
        send(i, b"X-Bench-Sent: %.6f\r\n" % time.time(), m)
        calls.append(time.perf_counter() - t)
    send_seconds = time.perf_counter() - start

    def arrived() -> int:
        with open(args.arrivals, "rb") as f:
            return f.read().count(b"\n")
    try:
        benchlib.wait_for(lambda: arrived() >= args.n, args.timeout, "arrivals", 0.05)
    except TimeoutError:
        pass
    calls.sort()
    return {"n": args.n, "rate": args.rate, "send_seconds": send_seconds,
            "behind": behind, "arrived": arrived(),
            "call_p50_ms": benchlib.percentile(calls, 50) * 1e3,
            "call_p99_ms": benchlib.percentile(calls, 99) * 1e3}


# -- zope.sendmail ------------------------------------------------------------

def _zope_versions() -> dict:
    from importlib.metadata import version
    return {"zope.sendmail": version("zope.sendmail"), "transaction": version("transaction")}


def enqueue_zope(args: argparse.Namespace) -> None:
    import transaction
    from zope.sendmail.delivery import QueuedMailDelivery
    msgs = benchlib.make_messages(args.n)
    delivery = QueuedMailDelivery(args.queue)
    t0 = time.perf_counter()
    for to, m in msgs:
        delivery.send(benchlib.SENDER, [to], m)
        transaction.commit()
    seconds = time.perf_counter() - t0
    emit({"n": args.n, "seconds": seconds,
          "queued": count_files(os.path.join(args.queue, "new")), **_zope_versions()})


def drain_zope(args: argparse.Namespace) -> None:
    from zope.sendmail.mailer import SMTPMailer
    from zope.sendmail.queue import QueueProcessorThread
    logging.basicConfig(level=logging.WARNING)
    qp = QueueProcessorThread()
    qp.setMailer(SMTPMailer(benchlib.HOST, args.port))
    qp.setQueuePath(args.queue)
    t0 = time.perf_counter()
    qp.run(forever=False)
    seconds = time.perf_counter() - t0
    emit({"seconds": seconds, **benchlib.queue_count(args.queue), **_zope_versions()})


def latency_zope(args: argparse.Namespace) -> None:
    import transaction
    from zope.sendmail.delivery import QueuedMailDelivery
    from zope.sendmail.mailer import SMTPMailer
    from zope.sendmail.queue import QueueProcessorThread
    logging.basicConfig(level=logging.WARNING)
    delivery = QueuedMailDelivery(args.queue)
    qp = QueueProcessorThread(interval=args.interval)
    qp.setMailer(SMTPMailer(benchlib.HOST, args.port))
    qp.setQueuePath(args.queue)
    qp.start()

    def send(i: int, stamp: bytes, message: bytes) -> None:
        delivery.send(benchlib.SENDER, [benchlib.rcpt(i)], stamp + message)
        transaction.commit()

    result = _steady_rate(args, send)
    qp.stop()
    emit(dict(result, interval=args.interval, **_zope_versions()))


# -- baselines without a queue ---------------------------------------------------

def latency_smtplib(args: argparse.Namespace) -> None:
    """The floor for latency: smtplib sends each message at once on one
    open connection, no queue; what is left is smtplib, loopback and the
    arrival sink's own cost."""
    s = smtplib.SMTP(benchlib.HOST, args.port, local_hostname="raw.bench.test", timeout=60)
    s.ehlo()

    def send(i: int, stamp: bytes, message: bytes) -> None:
        s.sendmail(benchlib.SENDER, [benchlib.rcpt(i)], stamp + message)

    result = _steady_rate(args, send)
    s.quit()
    emit(result)


def enqueue_fs(args: argparse.Namespace) -> None:
    """What the file system allows for a durable Maildir enqueue: the same
    bytes as a queue file, with nothing but the os calls around them."""
    tmp, new = os.path.join(args.dir, "tmp"), os.path.join(args.dir, "new")
    os.makedirs(tmp, 0o700)
    os.makedirs(new, 0o700)
    data = [benchlib.zope_envelope(benchlib.SENDER, [to]) + m
            for to, m in benchlib.make_messages(args.n)]
    pid = os.getpid()
    newfd = os.open(new, os.O_RDONLY)
    t0 = time.perf_counter()
    for i, d in enumerate(data):
        name = "%d.%d" % (i, pid)
        src = os.path.join(tmp, name)
        fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, d)
        os.fsync(fd)
        os.close(fd)
        os.rename(src, os.path.join(new, name))
        os.fsync(newfd)
    seconds = time.perf_counter() - t0
    os.close(newfd)
    emit({"n": args.n, "seconds": seconds, "queued": count_files(new)})


def raw_smtplib(args: argparse.Namespace) -> None:
    """The pure-Python baseline: smtplib, one connection, sendmail() per
    message (four round trips each; smtplib never pipelines)."""
    import resource
    msgs = benchlib.make_messages(args.n)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    s = smtplib.SMTP(benchlib.HOST, args.port, local_hostname="raw.bench.test",
                     timeout=60)
    s.ehlo()
    if args.starttls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        s.starttls(context=context)
        s.ehlo()
    refused = 0
    for to, m in msgs:
        refused += len(s.sendmail(benchlib.SENDER, [to], m))
    s.quit()
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    # the CPU of the send loop alone, as its seconds are (the messages were
    # built before, and start-up is not in it)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    emit({"n": args.n, "seconds": seconds, "refused": refused, "cpu_seconds": cpu})


def main() -> None:
    ap = argparse.ArgumentParser(description="bench peers (run by bench/run.py)")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("probe")
    p = sub.add_parser("enqueue-gsemail")
    p.add_argument("--ini", required=True)
    p.add_argument("--instance", default="bench")
    p.add_argument("--n", type=int, required=True)
    p = sub.add_parser("enqueue-zope")
    p.add_argument("--queue", required=True)
    p.add_argument("--n", type=int, required=True)
    p = sub.add_parser("enqueue-fs")
    p.add_argument("--dir", required=True)
    p.add_argument("--n", type=int, required=True)
    p = sub.add_parser("drain-zope")
    p.add_argument("--queue", required=True)
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("raw-smtplib")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--starttls", action="store_true")
    for name in ("latency-gsemail", "latency-zope", "latency-smtplib"):
        p = sub.add_parser(name)
        p.add_argument("--n", type=int, required=True)
        p.add_argument("--rate", type=float, required=True)
        p.add_argument("--arrivals", required=True)
        p.add_argument("--timeout", type=float, default=60)
        p.add_argument("--settle", type=float, default=1.0)
        if name == "latency-gsemail":
            p.add_argument("--ini", required=True)
            p.add_argument("--instance", default="bench")
        elif name == "latency-zope":
            p.add_argument("--queue", required=True)
            p.add_argument("--port", type=int, required=True)
            p.add_argument("--interval", type=float, default=3.0)
        else:
            p.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    {"probe": probe, "enqueue-gsemail": enqueue_gsemail, "enqueue-zope": enqueue_zope,
     "enqueue-fs": enqueue_fs, "drain-zope": drain_zope, "raw-smtplib": raw_smtplib,
     "latency-gsemail": latency_gsemail, "latency-zope": latency_zope,
     "latency-smtplib": latency_smtplib}[args.command](args)


if __name__ == "__main__":
    main()
