"""Make the lesion-grouped, class-stratified split of a HAM10000 metadata CSV.

    python jobs/split.py --metadata CSV --folds K --out FILE [--test-fraction F] [--seed S]
"""

import argparse
import sys
import warnings

from skinhpc.config import ConfigError, SplitConfig
from skinhpc.split import SplitError, class_counts, format_class_counts, make_split, read_metadata, save_split


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metadata", required=True, help="HAM10000 metadata CSV (image_id, lesion_id, dx)")
    ap.add_argument("--folds", type=int, required=True, help="number of cross-validation folds")
    ap.add_argument("--out", required=True, help="output JSON file")
    ap.add_argument("--test-fraction", type=float, default=SplitConfig.test_fraction,
                    help="share of lesions held out as the test set, in (0, 0.5] (default %(default)s)")
    ap.add_argument("--seed", type=int, default=SplitConfig.seed, help="seed (default %(default)s)")
    args = ap.parse_args(argv)
    warnings.simplefilter("always")
    warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
    try:
        cfg = SplitConfig(folds=args.folds, test_fraction=args.test_fraction, seed=args.seed)
        df = read_metadata(args.metadata)
        split = make_split(df, cfg)
        save_split(split, args.out)
    except (ConfigError, SplitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out in a missing or read-only folder, or naming a folder
        print(f"error: --out {args.out}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 2
    print(format_class_counts(class_counts(split, df)))
    print(f"wrote {args.out}: {len(split['test'])} test images, {cfg.folds} folds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
