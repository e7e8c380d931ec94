"""Launch a cross-validated experiment (conversion, split, backbone x fold job array, ensemble).

    python jobs/launch.py --folds K [--config FILE] [key=value ...]     launch or relaunch
    python jobs/launch.py --status  [--config FILE] [key=value ...]     table of tasks and the ensemble
    python jobs/launch.py --dry-run --folds K [...]                     plan + sbatch scripts, no submission
    python jobs/launch.py --cancel  [--config FILE] [key=value ...]     cancel pending and running jobs

With no arguments: the bundled sample (sample preset), on SLURM when a SLURM controller answers,
else with submitit's LocalExecutor on this machine. cluster.profile=NAME|PATH fills the cluster section from
slurm/NAME.yaml; cluster.kind=auto|slurm|local|debug. See skinhpc/launch.py.
"""

import argparse
import sys

from skinhpc.config import ConfigError, os_error_text
from skinhpc.launch import LaunchError, cancel, launch, load_launch_config, status
from skinhpc.rundir import Busy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. run_dir=runs/x backbones=[resnet18])")
    ap.add_argument("--folds", type=int, help="number of cross-validation folds (shorthand for split.folds=K)")
    ap.add_argument("--config", help="YAML config file (below the key=value overrides)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--status", action="store_true", help="show the state of every task and of the ensemble")
    mode.add_argument("--dry-run", action="store_true", help="print the plan and sbatch scripts, submit nothing")
    mode.add_argument("--cancel", action="store_true", help="cancel the experiment's pending and running jobs")
    args = ap.parse_intermixed_args(argv)  # --config may come after key=value overrides
    try:
        cfg, notes = load_launch_config(args.overrides, args.config, args.folds)
        if args.status:
            print(status(cfg)[0])
            return 0
        if args.cancel:
            cancel(cfg)
            return 0
        for note in notes:
            print(note)
        launch(cfg, dry_run=args.dry_run)
    except (ConfigError, LaunchError, Busy) as e:  # Busy: a fold another process trains (debug launch)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # SplitError, InputError (convert): user errors with file and row
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the run directory cannot be written (read-only, a file, a full disk)
        print(f"error: {os_error_text(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # cluster.kind=local waits for its tasks: Ctrl-C lands here
        print("interrupted: finished folds and checkpoints are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
