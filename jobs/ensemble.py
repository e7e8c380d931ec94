"""Evaluate a run's finished folds and their ensembles: python jobs/ensemble.py RUN [--n-boot N].

Writes RUN/ensemble/{metrics.json, report.md, *.png}; works with any subset of finished folds and
lists the missing ones. See skinhpc/ensemble.py.
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
    args = parser.parse_args(argv)

    from skinhpc.ensemble import EnsembleError, run_ensemble, summary
    try:
        results = run_ensemble(args.run_dir, n_boot=args.n_boot, seed=args.seed, plots=not args.no_plots)
    except EnsembleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
