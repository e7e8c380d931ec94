"""Evaluate a run's finished folds and their ensembles:

    python jobs/ensemble.py RUN [--n-boot N] [--reference NAME=PREDICTIONS_TEST.npz ...]

Writes RUN/ensemble/{metrics.json, report.md, *.png}; works with any subset of finished folds and
lists the missing ones. A reference is the test predictions of a model trained outside the run on
the same test set (e.g. one model on a single split: jobs/train.py run_dir=REF split.folds=10 fold=0
with the run's split seed and test fraction); the report puts it beside the ensembles and gives
the paired differences. See skinhpc/ensemble.py.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the run directory (holds config.yaml, split.json, <backbone>/fold<k>/)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the test lesions (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    parser.add_argument("--reference", action="append", default=[], metavar="NAME=FILE",
                        help="test predictions (predictions_test.npz) of an outside model to compare with; repeatable")
    args = parser.parse_args(argv)
    if args.n_boot < 0:
        parser.error(f"--n-boot must be >= 0 (0: no intervals), not {args.n_boot}")
    references = {}
    for item in args.reference:
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            parser.error(f"--reference {item!r}: expected NAME=FILE, e.g. single_split=runs/ref/resnet18/fold0/"
                         "predictions_test.npz")
        if name in references:
            parser.error(f"--reference: the name {name!r} is given twice")
        references[name] = path

    from skinhpc.config import os_error_text
    from skinhpc.ensemble import EnsembleError, run_ensemble, summary
    try:
        results = run_ensemble(args.run_dir, n_boot=args.n_boot, seed=args.seed, plots=not args.no_plots,
                               references=references)
    except EnsembleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a full disk or a read-only run directory
        print(f"error: {os_error_text(e)}", file=sys.stderr)
        return 1
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
