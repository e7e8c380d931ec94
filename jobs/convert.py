"""Convert the raw HAM10000 download into DATA/{ham10000.beton, index.csv, manifest.json}.

    python jobs/convert.py --images HAM10000_images_part_1 HAM10000_images_part_2 \
        --metadata HAM10000_metadata.csv --out data/ham10000

Checks everything first (columns, classes, unique ids, every image present and decodable) and
writes nothing on a problem; re-running on an up-to-date folder does nothing.

Exit codes: 0 converted (or already up to date), 2 for bad input (each problem named with its file
and CSV row), 1 when writing failed, 130 after Ctrl-C (nothing written).
"""

from __future__ import annotations

import argparse
import sys

from skinhpc.config import MAX_RESOLUTION
from skinhpc.convert import WRITE_MODES, ConversionError, InputError, convert


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", nargs="+", required=True, metavar="DIR",
                        help="folder(s) holding <image_id>.jpg (the download splits them over two)")
    parser.add_argument("--metadata", required=True, metavar="CSV", help="HAM10000_metadata.csv")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder of the converted data")
    parser.add_argument("--max-resolution", type=int, default=MAX_RESOLUTION, metavar="N",
                        help=f"longest side of the stored images, never upscaled (default {MAX_RESOLUTION})")
    parser.add_argument("--write-mode", choices=WRITE_MODES, default="jpg",
                        help="how FFCV stores pixels (default jpg)")
    parser.add_argument("--jpeg-quality", type=int, default=90, metavar="Q", help="JPEG quality (default 90)")
    parser.add_argument("--workers", type=int, default=0, metavar="N", help="processes; 0 = all cores (default)")
    args = parser.parse_args(argv)
    if args.workers < 0:  # as data.convert_workers: 0 is "all cores", a negative count is a typo
        parser.error(f"--workers must be >= 0 (0 = all cores), not {args.workers}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        convert(args.images, args.metadata, args.out, max_resolution=args.max_resolution,
                write_mode=args.write_mode, jpeg_quality=args.jpeg_quality, workers=args.workers)
    except InputError as e:  # 2, as every job's configuration or input error
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the output folder cannot be made or written (checked inputs raise InputError)
        print(f"error: {args.out}: cannot write the conversion there ({e.strerror or e}); nothing was written",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
