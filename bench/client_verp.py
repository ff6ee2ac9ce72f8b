"""One post to many recipients through a private Postfix, with XVERP
authorised (Postfix does the VERP) and without it (gsemail does: client
VERP, a transaction per recipient).  Prints the seconds until the relay
has accepted every recipient (QueueProcessor.drain returns when each has
its 250), median of --repeats runs, interleaved.

    python3 bench/client_verp.py [--rcpts 10000] [--repeats 3]

Run as root from the repository (it starts test_gsemail's Postfix
harness); recipients are @discard.test, which that Postfix discards, so
its own delivery costs little.  Not a unit test.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import gsemail          # noqa: E402
import test_gsemail     # noqa: E402


def post(port: int, rcpts: list, tmp: str, label: str) -> float:
    queuepath = os.path.join(tmp, label)
    config = gsemail.SMTPConfig(hostname="127.0.0.1", port=port, queuepath=queuepath,
                                processorthread=False, ehlo_name="client.test",
                                timeout=60)
    queue = gsemail.Queue(queuepath)
    data = gsemail._prepare_message(test_gsemail.message(subject="group post"),
                                    "bounces@gsemail.test")
    queue.add("bounces@gsemail.test", rcpts, data, True)
    processor = gsemail.QueueProcessor(config)
    started = time.monotonic()
    processor.drain()
    seconds = time.monotonic() - started
    left = os.listdir(os.path.join(queuepath, "new")) + os.listdir(os.path.join(queuepath, "cur"))
    if left:
        raise SystemExit("%s: %d file(s) left in the queue: %s" % (label, len(left), left[:3]))
    shutil.rmtree(queuepath)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rcpts", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rcpts = ["member%05d@discard.test" % i for i in range(args.rcpts)]
    pf = test_gsemail.Postfix()
    tmp = tempfile.mkdtemp(prefix="client-verp-bench-")
    runs = {"xverp": [], "client": []}
    try:
        pf.start()
        for i in range(args.repeats):
            for label, port in (("xverp", pf.port), ("client", pf.noverp_port)):
                seconds = post(port, rcpts, tmp, "%s%d" % (label, i))
                runs[label].append(seconds)
                print("run %d %-6s %.2f s" % (i + 1, label, seconds), flush=True)
                test_gsemail.wait_for(lambda: not os.listdir(os.path.join(
                    pf.dir, "queue", "active")), 600, "postfix to settle")
        for label, what in (("xverp", "XVERP authorised (Postfix does the VERP; "
                                      "transactions of 1000)"),
                            ("client", "XVERP not authorised (client VERP, a transaction "
                                       "per recipient)")):
            values = runs[label]
            print("%d recipients, %s: median %.2f s (runs %s), %.0f recipients/s"
                  % (args.rcpts, what, statistics.median(values),
                     ", ".join("%.2f" % v for v in values),
                     args.rcpts / statistics.median(values)))
    finally:
        pf.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
