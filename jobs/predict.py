"""Classify new images with a run's fold ensemble.

python jobs/predict.py --run RUN IMAGE_OR_DIR [...] [--tta | --no-tta] [--out FILE.csv] [--batch-size N]

Writes a CSV (image, one probability column per class, prediction) to --out or stdout. Folders
contribute every *.jpg/*.jpeg/*.png inside (what else they hold is counted in a warning). An unreadable image is named on stderr, the others are
still predicted, and the exit status is 1; when none can be read, nothing is written. See skinhpc/predict.py.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory with <backbone>/fold<k>/model_best.pt")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average over identity, horizontal and vertical flips (default: as the run's "
                             "folds were evaluated, train.tta)")
    parser.add_argument("--out", help="CSV file to write (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    args = parser.parse_args(argv)
    if args.batch_size < 1:  # said before the models are loaded
        parser.error(f"--batch-size must be >= 1, not {args.batch_size}")

    from skinhpc.config import os_error_text
    from skinhpc.models import ModelFileError
    from skinhpc.predict import PredictError, run_predict
    try:
        return run_predict(args.run, args.inputs, tta=args.tta, out=args.out, batch_size=args.batch_size,
                           device=args.device)
    except (PredictError, ModelFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out cannot be written (a full disk): an earlier file there is intact
        print(f"error: {os_error_text(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # --out is written at the end, in one rename: an earlier one is intact
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
