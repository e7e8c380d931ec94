"""Train one backbone on one fold; resumes automatically from the fold's newest checkpoint.

    python jobs/train.py [--config FILE] model.backbone=resnet18 fold=0 run_dir=runs/x [key=value ...]
    python -m torch.distributed.run --nproc_per_node 2 jobs/train.py ...      # DDP / DeepSpeed
    srun python jobs/train.py ...                                              # one SLURM task per GPU

Exit codes: 0 finished (or already finished), 0 after a preemption signal once the checkpoint is
saved (rerun the same command to resume), 130 after Ctrl-C (the checkpoint of the step it stopped at
is saved once training has started), 2 for a configuration or input error (or another process training the
fold), 1 when a file cannot be written (a full disk: the newest complete checkpoint is kept).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML config file (below the key=value overrides)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=5")
    args = ap.parse_intermixed_args(argv)  # --config may come after key=value overrides

    from skinhpc.checkpoint import ResumeMismatch
    from skinhpc.config import ConfigError, load_config, os_error_text
    from skinhpc.convert import InputError
    from skinhpc.distributed import DistributedError, first_rank
    from skinhpc.load import LoaderError
    from skinhpc.models import ModelFileError, PretrainedWeightsError
    from skinhpc.split import SplitError
    from skinhpc.train import FoldBusy, train_fold

    user_errors = (ConfigError, InputError, SplitError, ResumeMismatch, LoaderError, DistributedError,
                   PretrainedWeightsError, ModelFileError, FoldBusy)
    try:
        cfg = load_config(args.overrides, args.config)
        result = train_fold(cfg)
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a read-only run directory: said, not a traceback
        print(f"error: {os_error_text(e)}; once fixed, run the same command again (it resumes from the newest "
              "complete checkpoint, if there is one)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C in the set-up (nothing new to keep) or in the final step (kept)
        if first_rank():
            print("interrupted; run the same command again: it starts the fold, or finds it finished",
                  file=sys.stderr)
        return 130
    if result.get("status") in ("preempted", "interrupted") and first_rank():
        print(f"{result['status']} at epoch {result.get('epoch')} step {result.get('step')}: checkpoint saved; "
              "run the same command again to resume", file=sys.stderr)
    return 130 if result.get("status") == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
