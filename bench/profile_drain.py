#!/usr/bin/env python3
"""Profile gsemail's drain: where does python -m gsemail --once spend its time?

    python bench/profile_drain.py [--n 20000] [--sort cumtime] [--top 40]
                                  [--gsemail PATH] [--out FILE.pstats]

Fills a queue of N messages (zope format, on /dev/shm), starts smtp-sink on
127.0.0.1 (pinned to the server CPU, as in run.py) and runs

    python -m cProfile -o FILE -m gsemail -c INI -i bench --once

pinned to the client CPU.  Prints the wall time with and without the
profiler (cProfile slows Python code down, so compare shares, not
seconds), then the top functions by --sort, and by tottime.  Standard
library only; cleans up what it started.
"""

import argparse
import os
import pstats
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--sort", default="cumtime")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--gsemail", default=PROJECT, help="gsemail.py or its directory")
    ap.add_argument("--out", help="keep the pstats file here")
    ap.add_argument("--no-pin", action="store_true")
    args = ap.parse_args()
    gs = os.path.abspath(args.gsemail)
    gsdir = os.path.dirname(gs) if gs.endswith(".py") else gs
    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    server, client = (cpus[0], cpus[1]) if pin else (None, None)
    procs = benchlib.Procs(pin)
    work = tempfile.mkdtemp(prefix="gsemail-profile-", dir="/dev/shm")
    env = dict(os.environ, PYTHONPATH=gsdir,
               PYTHONPYCACHEPREFIX=os.path.join(work, "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    try:
        stats = args.out or os.path.join(work, "drain.pstats")
        for profiled in (False, True):
            queue = os.path.join(work, "queue-%d" % profiled)
            benchlib.write_queue(queue, args.n)
            with benchlib.SmtpSink(procs, work, server) as sink:
                ini = os.path.join(work, "gsconfig.ini")
                with open(ini, "w") as f:
                    f.write("[smtp-bench]\nhostname = 127.0.0.1\nport = %d\nqueuepath = %s\n"
                            "processorthread = false\nehlo_name = gsemail.bench.test\n"
                            % (sink.port, queue))
                cmd = [sys.executable] + (["-m", "cProfile", "-o", stats] if profiled else [])
                cmd += ["-m", "gsemail", "-c", ini, "-i", "bench", "--once"]
                r = procs.run(cmd, client, env=env, cwd=work)
                got = sink.wait_messages(args.n)
            if r.returncode or got != args.n:
                print("drain failed (exit %d, %d of %d arrived): %s"
                      % (r.returncode, got, args.n, r.stderr[-1000:]), file=sys.stderr)
                return 1
            print("%s: %d messages in %.2f s = %.0f msg/s; CPU %.2f s (%.0f%% of wall)"
                  % ("with cProfile" if profiled else "without profiler", args.n, r.wall,
                     args.n / r.wall, r.cpu, 100 * r.cpu / r.wall))
        print()
        p = pstats.Stats(stats)
        p.strip_dirs().sort_stats(args.sort).print_stats(args.top)
        p.sort_stats("tottime").print_stats(args.top)
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
