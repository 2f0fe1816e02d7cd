"""EMR step entry point: ``spark-submit [spark options] emr_step.py <canestra command> [flags]``.

canestra's CLI picks its Spark master from ``--master`` (default ``local[*]``); under
spark-submit the master is whatever spark-submit was given (``yarn`` on EMR), so this
wrapper passes that on and then runs the ordinary ``canestra`` command line.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from pyspark import SparkConf

    import canestra
    from canestra.cli import main as canestra_main

    # Which canestra runs, for the step log (the wheel the bootstrap action installed).
    print(f"emr_step: canestra {canestra.__version__} from {canestra.__file__}", file=sys.stderr, flush=True)
    if "--master" not in argv:
        master = SparkConf().get("spark.master", "local[*]")
        argv = [*argv, "--master", master]
    return canestra_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
