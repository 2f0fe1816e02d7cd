"""``canestra watch`` in the terminal: signals stop the stream cleanly (exit 0) with one plain line.

The work (and its audit record) is ``canestra.api.watch``, which stops when its ``stop`` event is
set; the signal handling that sets it belongs to the command line, not to the library.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from canestra import api
from canestra.progress import Progress


def install_stop_handlers(stop_event: threading.Event) -> dict:
    """SIGINT/SIGTERM set ``stop_event`` (with ``.reason``) instead of killing the driver mid-batch."""

    def handler(signum, _frame):
        if stop_event.is_set():  # a second Ctrl-C: leave now, like a crash (the batch is redone on restart)
            print("canestra: watch: stopped at once; the batch in progress was abandoned and the next "
                  "`canestra watch` with this --out redoes it", file=sys.stderr, flush=True)
            os._exit(130)
        stop_event.reason = signal.Signals(signum).name
        stop_event.set()

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore_handlers(old: dict) -> None:
    for sig, h in old.items():
        signal.signal(sig, h)


def run_watch_cli(args, cfg, make_spark, progress: Progress):
    """Run ``canestra.api.watch`` until it ends or a signal stops it; print the last line."""
    stop = threading.Event()
    old = install_stop_handlers(stop)  # before the JVM starts: a Ctrl-C during start-up stops cleanly too
    try:
        spark = make_spark(cfg, args.out)
        # PySpark's SparkContext puts its own SIGINT handler in (cancel all jobs, raise
        # KeyboardInterrupt mid-batch): put ours back.
        install_stop_handlers(stop)
        res = api.watch(args.model, args.images, args.out, once=args.once, trigger=args.trigger, stop=stop,
                        include_paths=args.include_paths, spark=spark, settings=cfg, progress=progress)
    finally:
        restore_handlers(old)
    done = (f"{res.predicted} predicted, {res.quarantined} quarantined in {res.batches} batch(es) -> "
            f"{res.predictions_path}")
    if res.stopped_by:
        redo = " the batch in progress was abandoned and will be redone;" if res.abandoned_batch else ""
        print(f"canestra: watch stopped ({res.stopped_by}): {done};{redo} the next `canestra watch` with this --out "
              "resumes where it stopped", file=sys.stderr)
    else:
        print(f"canestra: watch done: {done}", file=sys.stderr)
    return res
