"""The launcher without a SLURM cluster: config layering, refusals, dry-run scripts (golden), lock,
and the local (LocalExecutor) mode end to end. The SLURM integration tests are in test_launch_slurm.py."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skinhpc import REPO_DIR
from skinhpc.config import ConfigError, ExperimentConfig, load_config, save_config
from skinhpc.train import STEP_SLEEP_ENV
from skinhpc.launch import (
    FAIL_ENV,
    LaunchError,
    TrainTask,
    absolute_paths,
    check_compatible,
    ensemble_parameters,
    launch_lock,
    load_launch_config,
    read_jobs,
    result_keys,
    sbatch_extra,
    slot_devices,
    task_parameters,
)

GOLDEN = Path(__file__).parent / "golden"
LAUNCH = [sys.executable, str(REPO_DIR / "jobs" / "launch.py")]


def run_launch(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(LAUNCH + args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def normalise(text: str, run_dir: Path) -> str:
    """Machine-specific paths → placeholders, as submitit's own sbatch tests do."""
    return (text.replace(str(run_dir), "<RUN>").replace(sys.executable, "<PYTHON>")
            .replace(str(REPO_DIR), "<REPO>"))


@pytest.mark.timeout(60)
def test_dry_run_prints_plan_and_sbatch_scripts_matching_golden_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp"
    proc = run_launch(["--dry-run", "--folds", "3", f"run_dir={run_dir}", "backbones=[resnet18,vgg16_gap]",
                       "cluster.profile=example-gpu-cluster", "cluster.nodes=2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = normalise(proc.stdout, run_dir)
    golden = GOLDEN / "dry_run_gpu_cluster.txt"
    if os.environ.get("SKINHPC_UPDATE_GOLDEN") == "1":
        golden.write_text(got)
    assert got == golden.read_text(), "dry-run output changed; if intended, rerun with SKINHPC_UPDATE_GOLDEN=1"
    assert not run_dir.exists(), "a dry run must not write anything"


@pytest.mark.timeout(30)
def test_status_shows_the_val_balanced_accuracy_of_the_epoch_the_select_metric_keeps() -> None:
    from skinhpc.rundir import kept_val_balanced_accuracy
    rows = [{"epoch": 0, "val_balanced_accuracy": 0.30, "val_loss": 1.2, "val_auroc_macro": 0.80},
            {"epoch": 1, "val_balanced_accuracy": None, "val_loss": None},  # not validated
            {"epoch": 2, "val_balanced_accuracy": 0.50, "val_loss": 1.4, "val_auroc_macro": 0.70},
            {"epoch": 3, "val_balanced_accuracy": 0.40, "val_loss": 1.0, "val_auroc_macro": 0.75}]
    assert kept_val_balanced_accuracy(rows, None, "balanced_accuracy") == 0.50
    assert kept_val_balanced_accuracy(rows, None, "loss") == 0.40
    assert kept_val_balanced_accuracy(rows, None, "auroc_macro") == 0.30
    assert kept_val_balanced_accuracy(rows, None, "last") == 0.40
    assert kept_val_balanced_accuracy(rows[:2], None, "last") == 0.30
    assert kept_val_balanced_accuracy([], None, "loss") is None
    assert kept_val_balanced_accuracy(rows, {"status": "done", "val": {"balanced_accuracy": 0.45}}, "loss") == 0.45


@pytest.mark.timeout(60)
def test_a_misspelled_backbone_is_refused_at_launch_not_in_its_jobs(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp"
    for args in (["--dry-run"], ["cluster.kind=local"]):
        proc = run_launch([*args, f"run_dir={run_dir}", "backbones=[resnet81,vgg16_gap]"], cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "error: model.backbone='resnet81' is neither a timm model nor vgg16_gap. Similar timm names: resnet18" \
            in proc.stderr
        assert not (run_dir / "launch" / "jobs.json").exists()


@pytest.mark.timeout(60)
def test_dry_run_checks_the_data_paths_the_launch_would_read(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp"
    meta = tmp_path / "meta.csv"
    proc = run_launch(["--dry-run", f"run_dir={run_dir}", f"data.images={tmp_path / 'nope'}",
                       f"data.metadata={meta}"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: data.images: image folder not found: {tmp_path / 'nope'}" in proc.stderr
    proc = run_launch(["--dry-run", f"run_dir={run_dir}", f"data.images={tmp_path}", f"data.metadata={meta}"],
                      cwd=tmp_path)
    assert proc.returncode == 2 and f"{meta}: metadata CSV not found" in proc.stderr, proc.stderr
    assert not run_dir.exists(), "a dry run must not write anything"


@pytest.mark.timeout(120)
def test_a_weights_file_that_does_not_fit_a_backbone_is_refused_before_any_job(tmp_path: Path) -> None:
    # One file for two backbones (no {backbone} in the path): it fits resnet18, not resnet34, whose
    # tasks would otherwise each fail on a compute node after their wait in the queue.
    import timm
    import torch

    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), weights)
    run_dir = tmp_path / "exp"
    base = ["--dry-run", "--folds", "3", f"run_dir={run_dir}", f"model.pretrained={weights}"]
    proc = run_launch(base + ["backbones=[resnet18,resnet34]"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "weights that do not fit their backbone" in proc.stderr and f"resnet34: weights file {weights}" in proc.stderr
    assert "resnet18: weights file" not in proc.stderr and "{backbone}" in proc.stderr
    assert run_launch(base + ["backbones=[resnet18]"], cwd=tmp_path).returncode == 0


@pytest.mark.timeout(120)
def test_debug_kind_refuses_several_processes_per_task(tmp_path: Path) -> None:
    # It trains in the launcher's own process: two per task would silently be one (another batch).
    proc = run_launch([f"run_dir={tmp_path / 'exp'}", "cluster.kind=debug", "cluster.gpus_per_node=2"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "cluster.kind=debug trains in this one process" in proc.stderr
    assert not list((tmp_path / "exp").glob("*/fold*"))


@pytest.mark.timeout(60)
def test_golden_training_array_requests_nodes_gpus_and_profile_settings() -> None:
    text = (GOLDEN / "dry_run_gpu_cluster.txt").read_text()
    array = text.split("----- sbatch script: training array")[1].split("-----")[0]
    for line in ("#SBATCH --array=0-5%6", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu", "#SBATCH --account=my-project",
                 "#SBATCH --exclusive", "#SBATCH --mail-type=FAIL", "#SBATCH --signal=USR2@120",
                 "#SBATCH --time=720", "#SBATCH --mem=64GB", "module load cuda/12.4",
                 "export PYTHONPATH=<REPO>"):
        assert line in array, line


@pytest.mark.timeout(60)
def test_cpu_only_jobs_take_neither_the_gpu_constraint_nor_training_only_options() -> None:
    text = (GOLDEN / "dry_run_gpu_cluster.txt").read_text()
    for job in ("conversion", "ensemble"):
        script = text.split(f"----- sbatch script: {job}")[1].split("-----")[0]
        assert "#SBATCH --mail-type=FAIL" in script and "#SBATCH --partition=gpu" in script, job
        for line in ("--constraint", "--exclusive", "--gpus-per-node", "--requeue"):
            assert line not in script, (job, line)
    cfg, _ = load_launch_config(["cluster.profile=example-gpu-cluster", "cluster.cpu_partition=cpu"])
    assert ensemble_parameters(cfg)["partition"] == "cpu" and task_parameters(cfg)["partition"] == "gpu"


@pytest.mark.timeout(60)
def test_cluster_profile_fills_cluster_section_below_command_line() -> None:
    cfg, notes = load_launch_config(["cluster.profile=local", "cluster.cpus_per_task=3"])
    assert cfg.cluster.partition == "debug" and cfg.cluster.use_gpus is False
    assert cfg.cluster.cpus_per_task == 3  # the command line wins over the profile
    assert any("slurm/local.yaml" in n for n in notes)


@pytest.mark.timeout(60)
def test_no_data_configured_uses_sample_preset_and_says_so() -> None:
    cfg, notes = load_launch_config([])
    assert cfg.preset == "sample" and cfg.backbones == ["resnet18"]
    assert any("sample preset" in n for n in notes)
    assert Path(cfg.run_dir).is_absolute()


@pytest.mark.timeout(60)
def test_profile_with_unknown_key_is_refused_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "site.yaml"
    bad.write_text("partition: gpu\ngpus: 4\n")
    with pytest.raises(ConfigError, match=r"site.yaml.*gpus"):
        load_launch_config([f"cluster.profile={bad}"])
    bad.write_text("partition: gpu\npartition: cpu\n")  # not valid YAML: no parser traceback
    with pytest.raises(ConfigError, match=r"site.yaml is not valid YAML: line 2 .*duplicate key partition"):
        load_launch_config([f"cluster.profile={bad}"])


@pytest.mark.timeout(60)
def test_sbatch_extra_lines_become_sbatch_flags() -> None:
    assert sbatch_extra(["--exclusive", "--reservation=x", "#SBATCH --mail-type=FAIL"]) == {
        "exclusive": True, "reservation": "x", "mail-type": "FAIL"}
    with pytest.raises(ConfigError, match="long sbatch option"):
        sbatch_extra(["-p gpu"])
    with pytest.raises(ConfigError, match=r"^cluster\.train_sbatch_extra: 'reservation=x'"):
        sbatch_extra(["--mail-type=FAIL", "reservation=x"], "cluster.train_sbatch_extra")


@pytest.mark.timeout(60)
def test_sbatch_extra_cannot_override_what_the_launcher_sets_and_names_the_setting_to_use() -> None:
    # --time=30 would win over --time=720 while submitit's requeue logic still counted with 720.
    with pytest.raises(ConfigError, match=r"'--time=30' is set by the launcher: use cluster.time_min"):
        sbatch_extra(["--time=30"])
    assert sbatch_extra(["--mem=0", "--qos=gpu"], "cluster.train_sbatch_extra") == {"mem": "0", "qos": "gpu"}
    with pytest.raises(ConfigError, match=r"'--dependency=afterok:1' is set by the launcher itself"):
        sbatch_extra(["--dependency=afterok:1"], "cluster.train_sbatch_extra")
    # The hint to bracket a list value with commas split it into a bogus option: say how to quote it.
    with pytest.raises(ConfigError, match=r"'FAIL' must be a long sbatch option.*\['--mail-type=END,FAIL'\]"):
        sbatch_extra(["--mail-type=END", "FAIL"])


@pytest.mark.timeout(60)
def test_no_wckey_line_unless_one_is_set() -> None:
    cfg = load_config([], sample_preset=False)
    assert task_parameters(cfg)["wckey"] is None  # submitit leaves None out; its default was 'submitit'
    with_key = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, wckey="proj1"))
    assert task_parameters(with_key)["wckey"] == "proj1"


@pytest.mark.timeout(60)
def test_a_slurm_launch_with_a_signal_delay_past_half_a_time_limit_is_refused(tmp_path: Path) -> None:
    from skinhpc.launch import check_signal_delay, launch
    cfg = load_config([f"run_dir={tmp_path / 'exp'}", "cluster.kind=slurm", "cluster.time_min=3"])
    with pytest.raises(LaunchError, match=r"cluster.signal_delay_s=120 must be at most half of cluster.time_min=3"):
        launch(cfg, dry_run=True, echo=lambda line: None)
    check_signal_delay(dataclasses.replace(cfg.cluster, time_min=4))
    with pytest.raises(LaunchError, match=r"half of cluster.ensemble_time_min=2 minutes"):
        check_signal_delay(dataclasses.replace(cfg.cluster, time_min=4, ensemble_time_min=2))


@pytest.mark.timeout(60)
def test_relaunch_with_other_split_or_image_size_is_refused_naming_the_keys(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp"
    saved = absolute_paths(load_config([f"run_dir={run_dir}", "split.folds=2"]))
    save_config(saved, run_dir / "config.yaml")
    save_config(saved, run_dir / "resnet18" / "fold0" / "config.yaml")  # a task has trained: the run is pinned
    proc = run_launch(["--dry-run", "--folds", "3", f"run_dir={run_dir}", "model.image_size=96"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "split.folds: 2 -> 3" in proc.stderr and "model.image_size: 64 -> 96" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(60)
def test_relaunch_with_other_cluster_or_more_backbones_is_accepted(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp"
    saved = absolute_paths(load_config([f"run_dir={run_dir}", "split.folds=2"]))
    save_config(saved, run_dir / "config.yaml")
    now = absolute_paths(load_config([f"run_dir={run_dir}", "split.folds=2", "backbones=[resnet18,resnet34]",
                                      "cluster.time_min=5", "train.log_every=1"]))
    check_compatible(run_dir, now)  # no error
    # The same number of processes per task in another shape is fine; another number is not.
    check_compatible(run_dir, load_config([f"run_dir={run_dir}", "split.folds=2", "cluster.nodes=1"]))
    with pytest.raises(LaunchError, match=r"processes per task \(cluster.nodes x cluster.gpus_per_node\): 1 -> 4"):
        check_compatible(run_dir, absolute_paths(load_config([f"run_dir={run_dir}", "split.folds=2",
                                                              "cluster.gpus_per_node=4"])))
    assert "train.lr" in result_keys(now) and "cluster.time_min" not in result_keys(now)


@pytest.mark.timeout(60)
def test_second_launch_while_locked_stops_and_says_why(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp"
    with launch_lock(run_dir):
        with pytest.raises(LaunchError, match="another launch .* is in progress"):
            with launch_lock(run_dir):
                pass
    with launch_lock(run_dir):  # released: the next launch proceeds
        pass


@pytest.mark.timeout(60)
def test_status_of_a_run_never_launched_lists_tasks_not_submitted(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp"
    proc = run_launch(["--status", "--folds", "2", f"run_dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("not submitted") == 3  # two tasks + the ensemble
    task_lines = [line for line in proc.stdout.splitlines() if line.startswith("resnet18 ")]
    assert len(task_lines) == 2 and all(line.endswith(" -") for line in task_lines)  # no log to point at yet
    assert read_jobs(run_dir) == {"tasks": {}}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_kind_runs_whole_experiment_then_relaunch_does_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp"
    args = ["--folds", "2", f"run_dir={run_dir}", "cluster.kind=local", "train.epochs=1",
            "train.max_steps_per_epoch=2"]
    proc = run_launch(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sample preset" in proc.stdout
    assert (run_dir / "ensemble" / "report.md").is_file()
    assert f"report: {run_dir / 'ensemble' / 'report.md'}" in proc.stdout
    for k in range(2):
        assert json.loads((run_dir / "resnet18" / f"fold{k}" / "metrics.json").read_text())["status"] == "done"
    assert re.search(r"ensemble: job local \d+ done", run_launch(["--status", *args], cwd=tmp_path).stdout)
    again = run_launch(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "0 to submit" in again.stdout and "ensemble done, nothing to do" in again.stdout


@pytest.mark.timeout(300)  # two local jobs at once on 2 cores: slow when the machine is busy
def test_local_parallel_runs_folds_side_by_side_and_a_failure_spares_the_others(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp"
    args = ["--folds", "2", f"run_dir={run_dir}", "cluster.kind=local", "cluster.local_parallel=2",
            "train.epochs=1", "train.max_steps_per_epoch=2"]
    proc = run_launch(args, cwd=tmp_path, env={FAIL_ENV: "resnet18/fold0"})
    assert proc.returncode != 0
    assert "train resnet18/fold0 failed: RuntimeError: injected failure" in proc.stderr + proc.stdout
    lines = proc.stdout.splitlines()
    started = [i for i, line in enumerate(lines) if line.startswith("train ") and ": local job " in line]
    assert len(started) == 2 and "train resnet18/fold1: done" in lines[started[1] + 1:]  # both started first
    assert json.loads((run_dir / "resnet18" / "fold1" / "metrics.json").read_text())["status"] == "done"
    again = run_launch(args, cwd=tmp_path)  # the relaunch runs only what is missing, then the ensemble
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 to submit" in again.stdout and (run_dir / "ensemble" / "report.md").is_file()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stop", ["ctrl-c", "kill", "hang-up", "ctrl-c-ignored-by-the-launcher"])
def test_ctrl_c_or_kill_of_a_local_launch_stops_its_task_at_a_saved_checkpoint_without_a_traceback(
        tmp_path: Path, stop: str) -> None:
    run_dir, out = tmp_path / "exp", tmp_path / "launch.out"
    args = ["--folds", "2", f"run_dir={run_dir}", "cluster.kind=local", "train.epochs=2",
            "train.max_steps_per_epoch=8"]
    with open(out, "w") as f:  # a session of its own: Ctrl-C reaches its whole process group, as in a terminal
        # `launch.py &` in a script starts it with SIGINT ignored; its tasks handle SIGINT all the same.
        ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if stop.endswith("ignored-by-the-launcher") else None
        proc = subprocess.Popen(LAUNCH + args, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env={**os.environ, STEP_SLEEP_ENV: "0.4"}, preexec_fn=ignore)
    try:
        deadline = time.monotonic() + 150
        while "fresh start" not in _fold0_log(out) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)  # a few optimizer steps in
        if stop.startswith("ctrl-c"):
            os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C reaches every process of the group
        elif stop == "hang-up":
            os.killpg(proc.pid, signal.SIGHUP)  # a closed terminal: every process of the group
        else:
            os.kill(proc.pid, signal.SIGTERM)  # `kill PID`, as --status advises: the launcher alone
        rc = proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    said = out.read_text()
    assert rc == 130, said
    assert "interrupted: finished folds" in said
    if stop.endswith("ignored-by-the-launcher"):  # the task stopped first; the launch follows it
        assert "train resnet18/fold0: stopped by an interrupt" in said and "failed" not in said
    else:
        assert "stopping 1 running job(s)" in said
    assert "Traceback" not in said  # submitit's controller waited for its task instead of dying on SIGINT
    assert "SIGINT: checkpoint saved at epoch" in _fold0_log(out)
    fold0 = next(line for line in run_launch(["--status", *args], cwd=tmp_path).stdout.splitlines()
                 if line.startswith("resnet18  0"))
    assert " stopped " in fold0, fold0
    time.sleep(1.0)
    with pytest.raises(ProcessLookupError):  # nothing of the launch is left running
        os.killpg(proc.pid, 0)
    if stop == "ctrl-c":  # the relaunch resumes where the task saved
        again = run_launch(args, cwd=tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "resuming from epoch" in _fold0_log(again.stdout)


def _fold0_log(launch_output: Path | str) -> str:
    """What the local job of resnet18/fold0 printed so far (its log path is in the launch's output)."""
    text = launch_output.read_text() if isinstance(launch_output, Path) else launch_output
    found = re.search(r"train resnet18/fold0: local job \d+, log (\S+)", text)
    return Path(found.group(1)).read_text() if found and Path(found.group(1)).is_file() else ""


def test_a_failed_jobs_multi_line_error_is_shown_whole_not_its_last_line() -> None:
    import traceback
    from skinhpc.convert import InputError
    from skinhpc.launch import _failure_reason
    try:
        try:
            raise OSError("first")
        except OSError:
            raise InputError(["m.csv:3: ISIC_1: image missing", "m.csv:9: ISIC_2.jpg: truncated JPEG"]) from None
    except InputError:
        trace = traceback.format_exc()
    # submitit's FailedJobError: the task's traceback between dashed lines, then the log paths
    message = (f"Job (task=0) failed during processing with trace:\n----------------------\n{trace}\n"
               "----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at "
               "paths:\n  - a.err\n  - a.out")
    assert _failure_reason(Exception(message)) == ("skinhpc.convert.InputError: 2 input problems:\n"
                                                   "  m.csv:3: ISIC_1: image missing\n  m.csv:9: ISIC_2.jpg: truncated JPEG")
    assert _failure_reason(Exception("no trace")) == "no trace"


@pytest.mark.timeout(300)
def test_a_run_whose_conversion_failed_is_launched_again_once_the_csv_is_mended(tmp_path: Path) -> None:
    import shutil
    from skinhpc import SAMPLE_IMAGES, SAMPLE_METADATA
    images, csv = tmp_path / "images", tmp_path / "meta.csv"
    shutil.copytree(SAMPLE_IMAGES, images)
    lines = SAMPLE_METADATA.read_text().splitlines(keepends=True)
    csv.write_text("".join(lines))
    gone = [line.split(",")[1] for line in lines[1:3]]  # two images listed but not there
    for image_id in gone:
        (images / f"{image_id}.jpg").unlink()
    args = ["--folds", "2", f"run_dir={tmp_path / 'exp'}", f"data.dir={tmp_path / 'data'}", f"data.images=[{images}]",
            f"data.metadata={csv}", "preset=sample", "cluster.kind=local", "train.epochs=1",
            "train.max_steps_per_epoch=1"]
    failed = run_launch(args, cwd=tmp_path)
    assert failed.returncode == 2 and all(i in failed.stderr for i in gone), failed.stdout + failed.stderr
    assert (tmp_path / "exp" / "split.json").is_file()  # made from the CSV before the conversion ran
    csv.write_text(lines[0] + "".join(lines[3:]))  # mended: no row for the missing images
    shutil.copy(next(images.iterdir()), images / "ISIC_9999999.jpg")  # and an image the CSV does not list
    again = run_launch([*args, "train.lr=0.003"], cwd=tmp_path)  # and, nothing having trained, another setting
    assert again.returncode == 0, again.stdout + again.stderr
    assert "its split is made anew" in again.stdout and "its config is made anew" in again.stdout
    assert "warning: 1 image(s) in the folders are not in" in again.stdout  # the conversion job's, on the console
    assert (tmp_path / "exp" / "ensemble" / "report.md").is_file()
    refused = run_launch([*args, "train.lr=0.004"], cwd=tmp_path)  # once folds trained, the run is pinned
    assert refused.returncode == 2 and "train.lr" in refused.stderr


def test_a_run_counts_as_started_once_a_fold_trained_or_a_job_of_it_may_still_run(tmp_path: Path) -> None:
    from skinhpc.launch import nothing_started, write_jobs
    run_dir = tmp_path / "exp"
    cfg = absolute_paths(load_config([f"run_dir={run_dir}"]))
    assert not nothing_started(run_dir)  # a new run: nothing to make anew
    save_config(cfg, run_dir / "config.yaml")
    assert nothing_started(run_dir)  # launched, nothing trained (say, its conversion failed)
    write_jobs(run_dir, {"tasks": {"resnet18/fold0": {"job_id": "987654321"}}})
    assert not nothing_started(run_dir)  # a job SLURM does not (or cannot) confirm ended may still start
    write_jobs(run_dir, {"tasks": {}})
    save_config(cfg, run_dir / "resnet18" / "fold0" / "config.yaml")
    assert not nothing_started(run_dir)  # a fold has trained


@pytest.mark.timeout(120)
def test_local_tasks_one_at_a_time_stop_at_a_failure_and_the_launch_ends(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp"
    args = ["--folds", "2", f"run_dir={run_dir}", "cluster.kind=local", "train.epochs=1",
            "train.max_steps_per_epoch=2"]
    proc = run_launch(args, cwd=tmp_path, env={FAIL_ENV: "resnet18/fold0"}, timeout=100)
    assert proc.returncode != 0
    assert "train resnet18/fold0 failed: RuntimeError: injected failure" in proc.stderr + proc.stdout
    assert "not started after the failure: resnet18/fold1" in proc.stdout
    assert not (run_dir / "resnet18" / "fold1").exists()
    table = run_launch(["--status", *args], cwd=tmp_path).stdout.splitlines()
    fold0 = next(line for line in table if line.startswith("resnet18  0"))
    fold1 = next(line for line in table if line.startswith("resnet18  1"))
    assert " failed " in fold0 and " local " in fold0 and fold0.endswith("_0_log.err")  # its traceback
    assert "not submitted" in fold1


def test_parallel_local_tasks_get_their_own_gpus_while_there_are_enough_then_share() -> None:
    assert [slot_devices(s, 2, ["0", "1", "2", "3"]) for s in range(3)] == ["0,1", "2,3", "0,1"]
    assert [slot_devices(s, 1, ["GPU-a", "GPU-b"]) for s in range(3)] == ["GPU-a", "GPU-b", "GPU-a"]
    assert [slot_devices(s, 2, ["0"]) for s in range(2)] == ["0", "0"]  # one GPU: all share it


@pytest.mark.parametrize("launching_shell", ["1,0", None])
def test_local_task_sees_the_launching_shells_gpus_not_submitits_empty_list(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launching_shell: str | None) -> None:
    import pickle

    cfg, _ = load_launch_config([f"run_dir={tmp_path / 'exp'}"], None, 2)
    task = pickle.loads(pickle.dumps(TrainTask(cfg, visible_devices=launching_shell)))  # as submitit ships it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what LocalExecutor sets when no GPUs are requested
    monkeypatch.setenv(FAIL_ENV, task.key)  # stop right after the environment is set up
    with pytest.raises(RuntimeError, match="injected failure"):
        task()
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == launching_shell


@pytest.mark.parametrize("saved, uncaught, exit_status", [
    (("success", {"status": "done"}), False, 0),  # the teardown is skipped, so it cannot abort
    (("error", "Traceback ..."), False, -signal.SIGABRT),  # a failed task keeps its exit as it was
    (None, False, -signal.SIGABRT),  # no result saved (submitit failed to write it)
    (("success", {"status": "done"}), True, -signal.SIGABRT),  # something raised after the result
])
def test_a_task_whose_success_submitit_saved_exits_0_even_where_the_teardown_would_abort(
        tmp_path: Path, saved: tuple | None, uncaught: bool, exit_status: int) -> None:
    from submitit.core.utils import cloudpickle_dump

    result = tmp_path / "7_0_result.pkl"
    if saved is not None:
        cloudpickle_dump(saved, result)
    script = "\n".join([
        "import atexit, os",
        "from pathlib import Path",
        "from skinhpc.launch import leave_without_teardown",
        "atexit.register(os.abort)  # stands for a communication library that aborts in the teardown",
        f"atexit.register(leave_without_teardown, Path({str(result)!r}))",
        "print('fold done', flush=True)",
        "raise RuntimeError('after the result')" if uncaught else "",
    ])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == exit_status, proc.stderr[-2000:]
    assert proc.stdout == "fold done\n"


@pytest.mark.timeout(120)
def test_a_converted_data_dir_whose_beton_went_is_refused_at_launch_naming_the_file(
        tmp_path: Path, sample_data_dir: Path) -> None:
    import shutil
    data = tmp_path / "data"
    shutil.copytree(sample_data_dir, data)
    args = ["--dry-run", "--folds", "2", f"run_dir={tmp_path / 'exp'}", f"data.dir={data}"]
    assert run_launch(args, cwd=tmp_path).returncode == 0
    with open(data / "ham10000.beton", "r+b") as f:  # cut short, e.g. by a full disk while copying
        f.truncate(1000)
    proc = run_launch(args, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{data / 'ham10000.beton'} has 1000 bytes but manifest.json records" in proc.stderr
    (data / "ham10000.beton").unlink()
    proc = run_launch(args, cwd=tmp_path)
    assert proc.returncode == 2 and f"({data / 'ham10000.beton'} is missing)" in proc.stderr, proc.stderr[-2000:]
    assert "if the conversion was moved, pass data.dir=<its new folder>; else convert again with jobs/convert.py" in proc.stderr


@pytest.mark.timeout(120)
def test_a_missing_or_bad_deepspeed_config_is_refused_at_launch_not_after_the_queue(tmp_path: Path) -> None:
    args = ["--dry-run", "--folds", "2", f"run_dir={tmp_path / 'exp'}", "train.strategy=deepspeed"]
    proc = run_launch([*args, f"train.deepspeed.config={tmp_path / 'nope.json'}"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"train.deepspeed.config: {tmp_path / 'nope.json'} not found" in proc.stderr
    (tmp_path / "ds.json").write_text('{"optimizer": {"type": "Adam"}}')
    proc = run_launch([*args, f"train.deepspeed.config={tmp_path / 'ds.json'}"], cwd=tmp_path)
    assert proc.returncode == 2 and "sets optimizer, which come from the train section" in proc.stderr


# --------------------------------------------------------------------------- relaunch decisions

def _plan_for(tmp_path: Path, infos: dict, jobs: dict, converted: bool, done: tuple[int, ...] = ()):
    from skinhpc.launch import make_plan

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    if converted:  # the files launch.data_up_to_date looks at (no .beton: one made without FFCV)
        (data / "index.csv").write_text("x\n")
        (data / "manifest.json").write_text(json.dumps({"beton": None, "index": {"size": 2}}))
    cfg, _ = load_launch_config([f"run_dir={tmp_path / 'exp'}", f"data.dir={data}", "backbones=[resnet18]"], None, 2)
    for k in done:
        d = tmp_path / "exp" / "resnet18" / f"fold{k}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.json").write_text(json.dumps({"status": "done"}))
    return make_plan(cfg, "slurm", {"tasks": {}, **jobs}, infos)


@pytest.mark.timeout(60)
def test_a_done_fold_the_ensemble_left_out_is_named_by_status_and_does_not_resubmit_the_ensemble(
        tmp_path: Path) -> None:
    from skinhpc.launch import status
    _plan_for(tmp_path, {}, {}, converted=True, done=(0, 1))
    ens = tmp_path / "exp" / "ensemble"
    ens.mkdir()
    reason = "metrics.json says done but its predictions are unreadable: predictions_test.npz: truncated"
    (ens / "metrics.json").write_text(json.dumps({"finished": [{"backbone": "resnet18", "fold": 1}], "missing": [
        {"backbone": "resnet18", "fold": 0, "reason": reason, "done": True, "trained_otherwise": False}]}))
    plan = _plan_for(tmp_path, {}, {}, converted=True)
    assert plan.ensemble == "skip" and not plan.submit  # another ensemble job would leave it out again
    cfg, _ = load_launch_config([f"run_dir={tmp_path / 'exp'}", "backbones=[resnet18]"], None, 2)
    text = status(cfg)[0]
    assert (f"left out of the ensemble: resnet18/fold0: {reason}; to train it again, move "
            f"{tmp_path / 'exp' / 'resnet18' / 'fold0'} away and relaunch") in text
    import torch

    from skinhpc.checkpoint import save_checkpoint
    from skinhpc.distributed import DistEnv
    model = torch.nn.Linear(4, 3)  # the fold kept its checkpoints: it need not be trained again
    save_checkpoint(tmp_path / "exp" / "resnet18" / "fold0" / "checkpoints", 3, 0,
                    env=DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), train_state={},
                    resume_keys={}, model=model, optimizer=torch.optim.AdamW(model.parameters()))
    assert (f"left out of the ensemble: resnet18/fold0: {reason}; to write its outputs again, delete "
            f"{tmp_path / 'exp' / 'resnet18' / 'fold0' / 'metrics.json'} and relaunch: it resumes from its "
            "newest readable checkpoint (e003-s000000 is the newest)") in status(cfg)[0]
    (ens / "metrics.json").write_text(json.dumps({"finished": [{"backbone": "resnet18", "fold": 1}], "missing": [
        {"backbone": "resnet18", "fold": 0, "reason": "trained with another config", "done": True,
         "trained_otherwise": True}]}))  # its outputs would be left out again: only training it anew helps
    assert (f"resnet18/fold0: trained with another config; to train it again, move "
            f"{tmp_path / 'exp' / 'resnet18' / 'fold0'} away and relaunch") in status(cfg)[0]
    (ens / "metrics.json").write_text(json.dumps({"finished": [{"backbone": "resnet18", "fold": 1}], "missing": [
        {"backbone": "resnet18", "fold": 0, "reason": reason, "done": True, "trained_otherwise": False}]}))
    later = ens.stat().st_mtime + 10  # the fold finished again after the ensemble ran
    os.utime(tmp_path / "exp" / "resnet18" / "fold0" / "metrics.json", (later, later))
    assert "it has finished since: relaunch to ensemble it too" in status(cfg)[0]
    assert _plan_for(tmp_path, {}, {}, converted=True).ensemble == "submit"
    # Left out as not started, then copied in with its old mtime (cp -a, rsync -a): not covered.
    (ens / "metrics.json").write_text(json.dumps({"finished": [{"backbone": "resnet18", "fold": 1}], "missing": [
        {"backbone": "resnet18", "fold": 0, "reason": "not started", "done": False}]}))
    earlier = ens.stat().st_mtime - 100
    os.utime(tmp_path / "exp" / "resnet18" / "fold0" / "metrics.json", (earlier, earlier))
    assert _plan_for(tmp_path, {}, {}, converted=True).ensemble == "submit"
    assert "not started; it has finished since: relaunch to ensemble it too" in status(cfg)[0]


@pytest.mark.timeout(60)
def test_an_ensemble_is_current_by_the_content_of_its_folds_so_a_copied_run_is_not_ensembled_again(
        tmp_path: Path) -> None:
    from skinhpc.launch import status
    from skinhpc.rundir import fold_digests
    _plan_for(tmp_path, {}, {}, converted=True, done=(0, 1))
    run_dir = tmp_path / "exp"
    ens = run_dir / "ensemble"
    ens.mkdir()
    reason = "metrics.json says done but its predictions are unreadable"
    (ens / "metrics.json").write_text(json.dumps({  # as run_ensemble records it
        "finished": [{"backbone": "resnet18", "fold": 1}], "fold_digests": fold_digests(run_dir),
        "missing": [{"backbone": "resnet18", "fold": 0, "reason": reason, "done": True}]}))
    later = ens.stat().st_mtime + 100  # cp -r copies ensemble/ first: every fold looks newer
    for k in (0, 1):
        os.utime(run_dir / "resnet18" / f"fold{k}" / "metrics.json", (later, later))
    assert _plan_for(tmp_path, {}, {}, converted=True).ensemble == "skip"
    cfg, _ = load_launch_config([f"run_dir={run_dir}", "backbones=[resnet18]"], None, 2)
    assert "resnet18/fold0: " + reason + "; to train it again, move" in status(cfg)[0]
    (run_dir / "resnet18" / "fold0" / "metrics.json").write_text(json.dumps({"status": "done", "best_epoch": 2}))
    assert "it has finished since: relaunch to ensemble it too" in status(cfg)[0]  # trained again: other content
    assert _plan_for(tmp_path, {}, {}, converted=True).ensemble == "submit"


@pytest.mark.timeout(60)
def test_relaunch_keeps_running_task_and_waiting_ensemble_and_skips_done_one(tmp_path: Path) -> None:
    from skinhpc.launch import JobInfo

    infos = {"6_1": JobInfo("RUNNING", "None", live=True), "7": JobInfo("PENDING", "Dependency", live=True)}
    jobs = {"tasks": {"resnet18/fold0": {"job_id": "6_0"}, "resnet18/fold1": {"job_id": "6_1"}},
            "ensemble": {"job_id": "7"}}
    plan = _plan_for(tmp_path, infos, jobs, converted=True, done=(0,))
    assert plan.convert == "skip" and not plan.submit and plan.active == {"resnet18/fold1": "6_1"}
    assert [t.key for t in plan.done] == ["resnet18/fold0"] and plan.ensemble == "wait:7"


@pytest.mark.timeout(60)
def test_a_relaunch_with_fewer_backbones_keeps_the_others_in_the_run_and_its_ensemble_waits_for_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skinhpc import launch as launch_mod
    from skinhpc.config import from_yaml_file
    from skinhpc.launch import JobInfo, _prepare_run

    run_dir = tmp_path / "exp"
    first, _ = load_launch_config([f"run_dir={run_dir}", "backbones=[resnet18,vgg16]"], None, 2)
    _prepare_run(first, converted=False)
    # resnet18's fold 1 was cancelled and the user relaunches resnet18 alone, while vgg16 still runs.
    infos = {"6_2": JobInfo("RUNNING", "None", live=True), "6_3": JobInfo("PENDING", "Priority", live=True),
             "6_1": JobInfo("CANCELLED by 0"), "7": JobInfo("PENDING", "DependencyNeverSatisfied", live=True)}
    jobs = {"tasks": {f"{b}/fold{k}": {"job_id": f"6_{i}"} for i, (b, k) in
                      enumerate([("resnet18", 0), ("resnet18", 1), ("vgg16", 0), ("vgg16", 1)])},
            "ensemble": {"job_id": "7"}}
    plan = _plan_for(tmp_path, infos, jobs, converted=True, done=(0,))
    assert [t.key for t in plan.submit] == ["resnet18/fold1"]
    assert plan.others == {"vgg16/fold0": "6_2", "vgg16/fold1": "6_3"} and plan.ensemble == "submit"
    assert "  keep   vgg16/fold1 (job 6_3; a backbone of the run not in this launch's backbones)" in plan.lines()
    again, _ = load_launch_config([f"run_dir={run_dir}", "backbones=[resnet18]"], None, 2)
    _prepare_run(again, converted=False, running={"vgg16"})
    assert from_yaml_file(run_dir / "config.yaml").backbones == ["resnet18", "vgg16"]  # --status shows both
    _prepare_run(again, converted=False)  # vgg16 with nothing queued, running or on disk: dropped, as asked
    assert from_yaml_file(run_dir / "config.yaml").backbones == ["resnet18"]
    _prepare_run(first, converted=False)
    (run_dir / "vgg16" / "fold0").mkdir(parents=True)  # one that trained stays until its folder is moved away
    _prepare_run(again, converted=False)
    assert from_yaml_file(run_dir / "config.yaml").backbones == ["resnet18", "vgg16"]
    launch_mod.write_jobs(run_dir, jobs)
    monkeypatch.setattr(launch_mod, "query_jobs", lambda ids, waits=None: infos)
    said: list[str] = []
    launch_mod._dry_run(again, "slurm", said.append)
    ensemble_script = "\n".join(said).split("sbatch script: ensemble job")[1]
    assert "#SBATCH --dependency='afterok:6_2:6_3:<training array>'" in ensemble_script


@pytest.mark.timeout(60)
def test_a_copied_run_keeps_its_logs_but_never_counts_waits_on_or_cancels_the_originals_jobs_and_a_moved_one_keeps_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skinhpc import launch as launch_mod
    from skinhpc.launch import JobInfo, _prepare_run, cancel, recorded_job_ids, status, write_jobs
    from skinhpc.rundir import recorded_task_job

    orig = tmp_path / "A"
    cfg_a, _ = load_launch_config([f"run_dir={orig}", "backbones=[resnet18]"], None, 2)
    _prepare_run(cfg_a, converted=False)
    log = str(orig / "launch" / "submitit" / "5001_1_0_log.out")
    write_jobs(orig, {"kind": "slurm", "tasks": {"resnet18/fold0": {"job_id": "5001_0", "log": log},
                                                 "resnet18/fold1": {"job_id": "5001_1", "log": log, "err": "/elsewhere/x.err"}},
                      "ensemble": {"job_id": "5002", "log": "/x.out"}})
    infos = {"5001_0": JobInfo("RUNNING", "None", live=True), "5001_1": JobInfo("RUNNING", "None", live=True),
             "5002": JobInfo("PENDING", "Dependency", live=True)}
    asked: list[list[str]] = []
    monkeypatch.setattr(launch_mod, "query_jobs", lambda ids, waits=None: (asked.append(list(ids)), infos)[1])
    scancelled: list[list[str]] = []
    monkeypatch.setattr(launch_mod.subprocess, "run", lambda cmd, **kw: scancelled.append(cmd))
    (tmp_path / "alias").symlink_to(orig)  # one folder under another name: still the original's jobs
    assert len(recorded_job_ids(read_jobs(tmp_path / "alias"))) == 3

    shutil.copytree(orig, tmp_path / "B")
    jobs = read_jobs(tmp_path / "B")
    assert recorded_job_ids(jobs) == [] and jobs["copied_from"] == str(orig)
    assert jobs["tasks"]["resnet18/fold1"] == {"copied_job_id": "5001_1", "log": str(tmp_path / "B" / log[len(str(orig)) + 1:]),
                                              "err": "/elsewhere/x.err"}  # a path outside the run stays
    assert recorded_task_job(tmp_path / "B", "resnet18/fold0")["log"].startswith(str(tmp_path / "B"))
    cfg_b, _ = load_launch_config([f"run_dir={tmp_path / 'B'}", "backbones=[resnet18]"], None, 2)
    text, _ = status(cfg_b)
    assert f"note: this run was copied or moved from {orig}" in text and " 5001_" not in text  # no job of its own
    said: list[str] = []
    assert cancel(cfg_b, echo=said.append) == [] and scancelled == []
    assert said[0].startswith(f"note: this run was copied or moved from {orig}") and said[1] == "no pending or running jobs"
    plan = launch_mod._dry_run(cfg_b, "slurm", said.append)
    assert [t.key for t in plan.submit] == ["resnet18/fold0", "resnet18/fold1"] and plan.ensemble == "submit"
    assert asked and all(ids == [] for ids in asked)  # the original's ids were never asked about for the copy

    jobs = read_jobs(tmp_path / "B")
    write_jobs(tmp_path / "B", jobs)  # the copy's own launch writes its record: from now on its own
    again = read_jobs(tmp_path / "B")
    assert "copied_from" not in again and again["run_dir"] == str(tmp_path / "B")
    assert again["tasks"]["resnet18/fold1"]["copied_job_id"] == "5001_1"
    # Moved, or its recorded folder not mounted on this node: unsure, so the jobs stay the run's own
    # (taken for a copy of itself, a run would submit its live jobs a second time).
    (tmp_path / "A").rename(tmp_path / "A2")
    assert len(recorded_job_ids(read_jobs(tmp_path / "A2"))) == 3 and "copied_from" not in read_jobs(tmp_path / "A2")
    (tmp_path / "A").write_text("not a folder")
    assert len(recorded_job_ids(read_jobs(tmp_path / "A2"))) == 3
    relative = json.loads((tmp_path / "A2" / "launch" / "jobs.json").read_text())
    (tmp_path / "A2" / "launch" / "jobs.json").write_text(json.dumps({**relative, "run_dir": "A"}))
    assert len(recorded_job_ids(read_jobs(tmp_path / "A2"))) == 3
    assert not list((tmp_path / "B").glob(".same-dir-probe-*"))  # the probe that told B from A is gone
    (tmp_path / "A").unlink()
    (tmp_path / "A2").rename(tmp_path / "A")
    write_jobs(orig, {"kind": "local", "tasks": {"resnet18/fold0": {"local_job": "7", "state": "done", "log": log}}})
    shutil.copytree(orig, tmp_path / "L")  # a local run's copy: its logs rebased, no SLURM jobs to speak of
    jobs = read_jobs(tmp_path / "L")
    assert jobs["tasks"]["resnet18/fold0"]["log"].startswith(str(tmp_path / "L")) and "copied_from" not in jobs


@pytest.mark.timeout(60)
def test_relaunch_resubmits_failed_task_and_replaces_ensemble_that_can_never_start(tmp_path: Path) -> None:
    from skinhpc.launch import JobInfo

    infos = {"6_1": JobInfo("FAILED"), "7": JobInfo("PENDING", "DependencyNeverSatisfied", live=True)}
    jobs = {"tasks": {"resnet18/fold0": {"job_id": "6_0"}, "resnet18/fold1": {"job_id": "6_1"}},
            "ensemble": {"job_id": "7"}}
    plan = _plan_for(tmp_path, infos, jobs, converted=True, done=(0,))
    assert [t.key for t in plan.submit] == ["resnet18/fold1"]
    assert plan.ensemble == "submit" and plan.cancel_ensemble == "7"


@pytest.mark.timeout(60)
def test_status_says_why_an_ensemble_waits_forever_when_slurm_failed_a_finished_fold(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import skinhpc.launch as launch_mod
    from skinhpc.launch import JobInfo, status, write_jobs

    # A USR2 that came after the fold had finished: SLURM says FAILED, the fold says done.
    infos = {"6_0": JobInfo("COMPLETED"), "6_1": JobInfo("FAILED"),
             "7": JobInfo("PENDING", "DependencyNeverSatisfied", live=True)}
    _plan_for(tmp_path, infos, {}, converted=True, done=(0, 1))
    cfg, _ = load_launch_config([f"run_dir={tmp_path / 'exp'}", "backbones=[resnet18]"], None, 2)
    write_jobs(tmp_path / "exp", {"tasks": {"resnet18/fold0": {"job_id": "6_0"}, "resnet18/fold1": {"job_id": "6_1"}},
                                  "ensemble": {"job_id": "7"}})
    monkeypatch.setattr(launch_mod, "query_jobs", lambda ids, waits=None: infos)
    text, summary = status(cfg)
    assert summary["failed"] == [] and "although its fold finished; relaunch" in text, text
    assert "did not finish:" not in text


@pytest.mark.timeout(60)
def test_status_shows_why_slurm_keeps_a_job_pending_and_an_ensemble_that_cannot_start_as_blocked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import skinhpc.launch as launch_mod
    from skinhpc.launch import JobInfo, status, write_jobs

    # fold 0 asked for more time than the partition allows (it never starts); fold 1 failed.
    infos = {"6_0": JobInfo("PENDING", "PartitionTimeLimit", live=True), "6_1": JobInfo("FAILED"),
             "7": JobInfo("PENDING", "DependencyNeverSatisfied", live=True)}
    _plan_for(tmp_path, infos, {}, converted=True, done=())
    cfg, _ = load_launch_config([f"run_dir={tmp_path / 'exp'}", "backbones=[resnet18]"], None, 2)
    log = tmp_path / "exp" / ".launch" / "submitit" / "6_0_0_log.out"  # SLURM creates it when the job starts
    write_jobs(tmp_path / "exp", {"tasks": {"resnet18/fold0": {"job_id": "6_0", "log": str(log)},
                                            "resnet18/fold1": {"job_id": "6_1"}},
                                  "ensemble": {"job_id": "7"}})
    monkeypatch.setattr(launch_mod, "query_jobs", lambda ids, waits=None: infos)
    text, summary = status(cfg)
    row = next(line for line in text.splitlines() if line.startswith("resnet18  0"))
    assert " pending (PartitionTimeLimit) " in row and row.endswith(f"{log} (not written yet)")
    assert summary["tasks"]["resnet18/fold0"]["state"] == "pending" and summary["tasks"]["resnet18/fold0"]["log"] == str(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    assert next(line for line in status(cfg)[0].splitlines() if line.startswith("resnet18  0")).endswith(str(log))
    assert "ensemble: job 7 blocked" in text and "a training task it waits for did not finish" in text
    infos["6_0"] = JobInfo("PENDING", "Priority", live=True)  # an ordinary wait for a turn: no reason shown
    assert " pending " in next(line for line in status(cfg)[0].splitlines() if line.startswith("resnet18  0"))


@pytest.mark.timeout(60)
def test_relaunch_after_failed_conversion_cancels_blocked_tasks_and_resubmits_everything(tmp_path: Path) -> None:
    from skinhpc.launch import JobInfo

    blocked = JobInfo("PENDING", "DependencyNeverSatisfied", live=True)
    infos = {"5": JobInfo("FAILED"), "6_0": blocked, "6_1": blocked, "7": blocked}
    jobs = {"convert": {"job_id": "5"}, "tasks": {"resnet18/fold0": {"job_id": "6_0"}, "resnet18/fold1": {"job_id": "6_1"}},
            "ensemble": {"job_id": "7"}}
    plan = _plan_for(tmp_path, infos, jobs, converted=False)
    # data.dir without a manifest and no raw data: the conversion is resubmitted (and would say why it fails)
    assert plan.convert == "submit" and len(plan.submit) == 2 and sorted(plan.stale) == ["6_0", "6_1"]
    assert plan.ensemble == "submit" and plan.cancel_ensemble == "7"


@pytest.mark.timeout(60)
def test_ensemble_that_predates_or_misses_a_finished_fold_is_run_again(tmp_path: Path) -> None:
    def write_ensemble(folds: tuple[int, ...]) -> None:
        ens = tmp_path / "exp" / "ensemble"
        ens.mkdir(parents=True, exist_ok=True)
        (ens / "metrics.json").write_text(json.dumps({"finished": [{"backbone": "resnet18", "fold": k} for k in folds]}))

    assert _plan_for(tmp_path, {}, {}, converted=True, done=(0,)).ensemble == "submit"  # fold 1 to train
    write_ensemble((0,))
    # fold 1 finished after that ensemble was written (e.g. its ensemble job was cancelled or timed out)
    plan = _plan_for(tmp_path, {}, {}, converted=True, done=(1,))
    assert not plan.submit and plan.ensemble == "submit"
    write_ensemble((0, 1))
    assert _plan_for(tmp_path, {}, {}, converted=True).ensemble == "skip"
    fold0 = tmp_path / "exp" / "resnet18" / "fold0" / "metrics.json"
    os.utime(fold0, (time.time() + 60, time.time() + 60))  # fold 0 trained again since
    assert _plan_for(tmp_path, {}, {}, converted=True).ensemble == "submit"


@pytest.mark.timeout(60)
def test_recorded_jobs_are_not_resubmitted_when_squeue_does_not_answer(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from skinhpc import launch as launch_mod

    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("squeue", "sacct"):
        (fake / name).write_text("#!/bin/sh\necho 'slurm_load_jobs error: Socket timed out' >&2\nexit 1\n")
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    with pytest.raises(launch_mod.LaunchError, match="squeue did not answer.*nothing was submitted, cancelled or shown"):
        launch_mod.query_jobs(["4242_0"])
    (fake / "squeue").write_text("#!/bin/sh\necho '4242_0|RUNNING|None'\n")  # sacct still failing: accounting off
    assert launch_mod.query_jobs(["4242_0"])["4242_0"].live


def _fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, squeue: str, sacct: str) -> None:
    """squeue and sacct on PATH that print the given lines (their -o formats: id|state|reason, id|state)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for name, text in (("squeue", squeue), ("sacct", sacct)):
        (fake / name).write_text(f"#!/bin/sh\ncat <<'EOF'\n{text}\nEOF\n")
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")


@pytest.mark.timeout(60)
def test_array_tasks_cancelled_before_they_started_read_cancelled_from_sacct_s_one_row_for_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skinhpc import launch as launch_mod

    # sacct -X gives tasks that never started one row, throttle and all; started ones their own.
    # sacct -X gives tasks that never started one row, throttle and all, or the array's own id when
    # none of them started; started ones their own.
    _fake_slurm(tmp_path, monkeypatch, "", "132_[0-1,3%2]|CANCELLED by 0\n132_2|FAILED\n1320_0|COMPLETED\n"
                                           "147|CANCELLED by 0\n150|FAILED\n150_1|COMPLETED")
    ids = ["132_0", "132_1", "132_2", "132_3", "1320_1", "147_0", "147_1", "150_0", "150_1"]
    infos = launch_mod.query_jobs(ids)
    assert {j: launch_mod.job_state(infos.get(j)) for j in ids} == {
        "132_0": "cancelled", "132_1": "cancelled", "132_2": "failed", "132_3": "cancelled", "1320_1": "unknown",
        "147_0": "cancelled", "147_1": "cancelled", "150_0": "failed", "150_1": "completed"}


def _saved_run(tmp_path: Path, backbones: str) -> tuple[Path, ExperimentConfig]:
    """A run directory holding only a 2-fold config.yaml, as a launch leaves it before any task starts."""
    run_dir = tmp_path / "exp"
    cfg, _ = load_launch_config([f"run_dir={run_dir}", f"backbones=[{backbones}]"], None, 2)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir, cfg


@pytest.mark.timeout(60)
def test_after_a_failed_conversion_the_ensemble_waiting_on_blocked_tasks_is_blocked_and_the_run_remade(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skinhpc.launch import nothing_started, status, write_jobs

    run_dir, cfg = _saved_run(tmp_path, "resnet18")
    write_jobs(run_dir, {"convert": {"job_id": "5"}, "ensemble": {"job_id": "7", "depends_on": ["6_0", "6_1"]},
                         "tasks": {"resnet18/fold0": {"job_id": "6_0"}, "resnet18/fold1": {"job_id": "6_1"}}})
    # SLURM's own view: the tasks' afterok failed; the ensemble's tasks are still pending.
    tasks = "6_0|PENDING|DependencyNeverSatisfied\n6_1|PENDING|DependencyNeverSatisfied"
    _fake_slurm(tmp_path, monkeypatch, f"{tasks}\n7|PENDING|Dependency", "5|FAILED")
    assert nothing_started(run_dir)  # so a launch with the CSV mended makes the split and config anew
    text, summary = status(cfg)
    assert summary["ensemble"]["state"] == "blocked" and {t["state"] for t in summary["tasks"].values()} == {"blocked"}
    assert "the conversion job they wait for failed; mend what its log names and relaunch" in text, text
    assert "a training task it waits for did not finish" not in text
    _fake_slurm(tmp_path, monkeypatch, f"{tasks}\n7|PENDING|Dependency\n8|RUNNING|None", "5|FAILED")
    write_jobs(run_dir, {"convert": {"job_id": "5"}, "ensemble": {"job_id": "7", "depends_on": ["6_0", "8"]},
                         "tasks": {"resnet18/fold0": {"job_id": "6_0"}, "resnet18/fold1": {"job_id": "8"}}})
    assert not nothing_started(run_dir)  # a job of the run runs: its fold will pin the split
    assert status(cfg)[1]["ensemble"]["state"] == "blocked"  # afterok on a task that can never start
    # The conversion completed, everything else was cancelled before it started: no fold pins the run.
    _fake_slurm(tmp_path, monkeypatch, "", "5|COMPLETED\n6|CANCELLED by 0\n7|CANCELLED by 0")
    write_jobs(run_dir, {"convert": {"job_id": "5"}, "ensemble": {"job_id": "7", "depends_on": ["6_0", "6_1"]},
                         "tasks": {"resnet18/fold0": {"job_id": "6_0"}, "resnet18/fold1": {"job_id": "6_1"}}})
    assert nothing_started(run_dir)
    _fake_slurm(tmp_path, monkeypatch, f"{tasks}\n7|PENDING|Dependency", "5|CANCELLED by 0")
    assert "the conversion job they wait for was cancelled; relaunch (the same" in status(cfg)[0]


@pytest.mark.timeout(60)
def test_an_ensemble_waiting_on_tasks_whose_conversion_failed_is_blocked_beside_finished_jobs_of_an_earlier_launch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skinhpc.launch import query_jobs, recorded_waits, status, write_jobs

    run_dir, cfg = _saved_run(tmp_path, "resnet18,resnet34")
    # resnet18 ran to the end in an earlier launch; a later one added a backbone whose conversion failed.
    jobs = {"convert": {"job_id": "5"}, "ensemble": {"job_id": "7", "depends_on": ["6_0", "6_1"]},
            "tasks": {"resnet18/fold0": {"job_id": "3_0"}, "resnet18/fold1": {"job_id": "3_1"},
                      "resnet34/fold0": {"job_id": "6_0"}, "resnet34/fold1": {"job_id": "6_1"}}}
    write_jobs(run_dir, jobs)
    ids = ["3_0", "3_1", "5", "6_0", "6_1", "7"]
    blocked = "6_0|PENDING|DependencyNeverSatisfied\n6_1|PENDING|DependencyNeverSatisfied\n7|PENDING|Dependency"
    _fake_slurm(tmp_path, monkeypatch, blocked, "3_0|COMPLETED\n3_1|COMPLETED\n5|FAILED")
    assert query_jobs(ids, recorded_waits(jobs))["7"].reason == "DependencyNeverSatisfied"
    text, summary = status(cfg)
    assert summary["ensemble"]["state"] == "blocked", text
    assert "the conversion job they wait for failed; mend what its log names and relaunch" in text, text
    assert query_jobs(ids)["7"].reason == "Dependency"  # nothing recorded of what it waits for: as SLURM says
    # While the tasks it waits for may still start, the ensemble keeps waiting.
    waiting = "5|RUNNING|None\n6_0|PENDING|Dependency\n6_1|PENDING|Dependency\n7|PENDING|Dependency"
    _fake_slurm(tmp_path, monkeypatch, waiting, "3_0|COMPLETED\n3_1|COMPLETED")
    assert query_jobs(ids, recorded_waits(jobs))["7"].reason == "Dependency"


@pytest.mark.timeout(60)
def test_a_held_or_suspended_job_is_kept_and_the_plan_and_status_say_so_and_a_timed_out_task_says_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skinhpc.launch import JobInfo, status, write_jobs

    infos = {"6_0": JobInfo("PENDING", "JobHeldAdmin", live=True), "6_1": JobInfo("SUSPENDED", "None", live=True),
             "7": JobInfo("PENDING", "Dependency", live=True)}
    jobs = {"tasks": {"resnet18/fold0": {"job_id": "6_0"}, "resnet18/fold1": {"job_id": "6_1"}},
            "ensemble": {"job_id": "7"}}
    plan = _plan_for(tmp_path, infos, jobs, converted=True)
    assert not plan.submit and plan.ensemble == "wait:7"  # a suspended job resumes in place: never a second copy
    assert "  keep   resnet18/fold0 (job 6_0; pending (JobHeldAdmin))" in plan.lines()
    assert "  keep   resnet18/fold1 (job 6_1; suspended)" in plan.lines()
    cfg, _ = load_launch_config([f"run_dir={tmp_path / 'exp'}", "backbones=[resnet18]"], None, 2)
    write_jobs(tmp_path / "exp", jobs)
    _fake_slurm(tmp_path, monkeypatch, "6_1|SUSPENDED|None", "6_0|TIMEOUT\n7|CANCELLED by 0")
    text, summary = status(cfg)
    assert summary["tasks"]["resnet18/fold1"]["state"] == "suspended"
    assert (summary["tasks"]["resnet18/fold0"]["state"], summary["tasks"]["resnet18/fold0"]["reason"]) == ("failed", "TIMEOUT")
    assert "the relaunch resumes it from its newest checkpoint (a larger cluster.time_min needs fewer requeues)" in text
    assert f"cluster.time_min={cfg.cluster.time_min}" in text and f"cluster.max_requeues={cfg.cluster.max_requeues}" in text


@pytest.mark.timeout(60)
def test_status_says_to_relaunch_when_a_completed_ensemble_s_outputs_are_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skinhpc.launch import status, write_jobs

    _plan_for(tmp_path, {}, {}, converted=True, done=(0, 1))
    cfg, _ = load_launch_config([f"run_dir={tmp_path / 'exp'}", "backbones=[resnet18]"], None, 2)
    write_jobs(tmp_path / "exp", {"tasks": {}, "ensemble": {"job_id": "7"}})
    _fake_slurm(tmp_path, monkeypatch, "", "7|COMPLETED")
    text, summary = status(cfg)
    assert summary["ensemble"]["state"] == "completed"
    assert "ensemble/metrics.json) are missing or unreadable: relaunch" in text, text


@pytest.mark.timeout(60)
def test_a_relaunch_waits_for_a_completing_job_to_tell_a_cancelled_task_from_a_requeued_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skinhpc import launch as launch_mod

    fake, calls = tmp_path / "bin", tmp_path / "calls"
    fake.mkdir()
    # scancel'ed a moment ago: COMPLETING for the first two squeue calls, then gone; sacct: CANCELLED.
    (fake / "squeue").write_text(f"#!/bin/sh\necho x >> {calls}\n"
                                 f"[ $(wc -l < {calls}) -le 2 ] && echo '4242_0|COMPLETING|None'\nexit 0\n")
    (fake / "sacct").write_text("#!/bin/sh\necho '4242_0|CANCELLED by 0'\n")
    for name in ("squeue", "sacct"):
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    assert launch_mod.job_state(launch_mod.query_jobs(["4242_0"])["4242_0"]) == "running"  # what status sees
    infos = launch_mod.settled_jobs(["4242_0"], wait_s=30, poll_s=0.05)
    assert launch_mod.job_state(infos["4242_0"]) == "cancelled"  # so the relaunch submits its task again
    calls.unlink()
    infos = launch_mod.settled_jobs(["4242_0"], wait_s=0, poll_s=0.05)  # still completing after the wait
    assert launch_mod.job_state(infos["4242_0"]) == "running"  # never a second copy of a task


@pytest.mark.timeout(60)
def test_status_names_a_running_local_launch_and_cancel_fails_naming_it_and_a_missing_run_dir_is_said(tmp_path: Path) -> None:
    from skinhpc.launch import cancel, launch_lock, status
    cfg, _ = load_launch_config([f"run_dir={tmp_path / 'exp'}", "backbones=[resnet18]"], None, 2)
    assert "does not exist: nothing launched there yet" in status(cfg)[0]
    with launch_lock(tmp_path / "exp"):  # what a local launch holds while it runs the tasks itself
        text, _ = status(cfg)
        with pytest.raises(LaunchError, match=f"no SLURM jobs to cancel; .*kill {os.getpid()}"):
            cancel(cfg)  # nothing cancelled, the run goes on: jobs/launch.py exits 2
    assert f"a local launch (pid {os.getpid()} on" in text and f"kill {os.getpid()}" in text
    assert "local launch" not in status(cfg)[0]  # once it ended


@pytest.mark.timeout(60)
def test_status_of_a_local_run_shows_its_conversion_and_ensemble_jobs_failed_or_stopped(tmp_path: Path) -> None:
    from skinhpc.launch import status, write_jobs
    run_dir = tmp_path / "exp"
    cfg, _ = load_launch_config([f"run_dir={run_dir}", "backbones=[resnet18]"], None, 2)
    entry = {"local_job": "77", "log": "/x/77.out", "err": "/x/77.err"}
    write_jobs(run_dir, {"kind": "local", "tasks": {}, "convert": {**entry, "state": "failed"},
                         "ensemble": {**entry, "local_job": "78", "err": "/x/78.err", "state": "running"}})
    text, summary = status(cfg)
    assert "conversion: job local 77 failed, log /x/77.err" in text
    assert "to submit a new ensemble job" not in text  # stopped, not failed: the relaunch says what it does
    assert "ensemble: job local 78 stopped, log /x/78.err" in text  # no launch holds the run any more
    assert summary["ensemble"] == {"job_id": "local 78", "state": "stopped"}
    write_jobs(run_dir, {"kind": "local", "tasks": {}, "ensemble": {**entry, "state": "done"}})
    text = status(cfg)[0]
    assert "ensemble: job local 77 failed, log /x/77.err" in text  # done, but metrics.json is gone
    assert "relaunch (the same jobs/launch.py command) to submit a new ensemble job" in text
    (run_dir / "ensemble").mkdir()
    (run_dir / "ensemble" / "metrics.json").write_text("{}")
    assert "ensemble: job local 77 done" in status(cfg)[0]
    # Stopped, then run by hand (jobs/ensemble.py): its metrics.json is newer than the record.
    write_jobs(run_dir, {"kind": "local", "tasks": {}, "ensemble": {**entry, "state": "stopped", "time": 1.0}})
    assert "ensemble: job local 77 done" in status(cfg)[0]
    write_jobs(run_dir, {"kind": "local", "tasks": {}, "ensemble": {**entry, "state": "failed", "time": 4e9}})
    assert "ensemble: job local 77 failed" in status(cfg)[0]  # what is there is older than the failure


@pytest.mark.timeout(60)
def test_status_during_a_local_launch_shows_the_tasks_and_ensemble_it_has_yet_to_run_as_queued(
        tmp_path: Path) -> None:
    from skinhpc.launch import _record_local, _record_queued, launch_lock, status
    run_dir = tmp_path / "exp"
    cfg, _ = load_launch_config([f"run_dir={run_dir}", "backbones=[resnet18]"], None, 2)
    _record_queued(run_dir, ["resnet18/fold0", "resnet18/fold1", "ensemble"])  # what a local launch records first
    job = type("Job", (), {"job_id": "77", "paths": type("Paths", (), {"stdout": "/x/77.out", "stderr": "/x/77.err"})})
    _record_local(run_dir, "resnet18/fold0", job, "running")  # its one slot: fold 0 started
    with launch_lock(run_dir):
        text = status(cfg)[0]
    assert re.search(r"resnet18 +0 +local 77 +running", text)
    assert re.search(r"resnet18 +1 +- +queued", text) and "ensemble: job - queued" in text
    assert "not submitted" not in text
    text = status(cfg)[0]  # the launch was killed before it got to them: nothing will run them
    assert re.search(r"resnet18 +1 +- +not submitted", text) and "ensemble: job - not submitted" in text


@pytest.mark.timeout(60)
def test_a_local_launch_that_ends_without_running_its_queued_tasks_puts_back_what_was_recorded_before(
        tmp_path: Path) -> None:
    from skinhpc.launch import _record_queued, _unqueue, read_jobs, write_jobs
    from skinhpc.ensemble import _not_started
    run_dir = tmp_path / "exp"
    failed = {"local_job": "77", "log": "/x/77.out", "err": "/x/77.err", "state": "failed"}
    write_jobs(run_dir, {"kind": "local", "tasks": {"resnet18/fold1": failed}})
    _record_queued(run_dir, ["resnet18/fold0", "resnet18/fold1", "ensemble"])
    _unqueue(run_dir, ["resnet18/fold1", "ensemble"])  # a task failed: these will not start
    jobs = read_jobs(run_dir)
    assert jobs["tasks"]["resnet18/fold1"] == failed and "ensemble" not in jobs
    assert jobs["tasks"]["resnet18/fold0"]["state"] == "queued"
    assert "its local job 77 failed before training began" in _not_started(run_dir, "resnet18/fold1")
    _unqueue(run_dir)  # the launch ends
    assert "resnet18/fold0" not in read_jobs(run_dir)["tasks"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ['{"tasks": {"resnet18/fold0": {"job_id"', '[1]', '{"tasks": "x", "ensemble": 5}',
                                    '{"tasks": {"resnet18/fold0": 3}}', '{"tasks": {}, "ensemble": 5}'])
def test_a_damaged_jobs_record_is_refused_naming_it_by_status_and_launch(tmp_path: Path, damage: str) -> None:
    from skinhpc.launch import JOBS_FILE, launch_dir, make_plan, read_jobs, status
    run_dir = tmp_path / "exp"
    cfg, _ = load_launch_config([f"run_dir={run_dir}", "backbones=[resnet18]"], None, 2)
    path = launch_dir(run_dir) / JOBS_FILE
    path.parent.mkdir(parents=True)
    path.write_text(damage)
    for read in (lambda: status(cfg), lambda: make_plan(cfg, "local", read_jobs(run_dir), {})):
        with pytest.raises(LaunchError, match=rf"{path}: not .*; move it away to start the bookkeeping afresh"):
            read()


@pytest.mark.timeout(60)
def test_status_says_a_finished_folds_metrics_file_is_unreadable_and_counts_epochs_from_a_readable_one(
        tmp_path: Path) -> None:
    from skinhpc.launch import status, write_jobs
    run_dir = tmp_path / "exp"
    cfg, _ = load_launch_config([f"run_dir={run_dir}", "backbones=[resnet18]", "train.epochs=3"], None, 2)
    entry = {"local_job": "77", "log": "/x/77.out", "err": "/x/77.err", "state": "done"}
    write_jobs(run_dir, {"kind": "local", "tasks": {"resnet18/fold0": entry, "resnet18/fold1": {**entry, "local_job": "78"}}})
    for fold in (0, 1):
        d = run_dir / "resnet18" / f"fold{fold}"
        d.mkdir(parents=True)
        (d / "log.jsonl").write_text('{"epoch": 0}\n{"epoch": 1}\n{"epo')  # the last line cut by a crash
    (run_dir / "resnet18" / "fold0" / "metrics.json").write_text('{"status": "done", "epochs_trained": 3}')
    (run_dir / "resnet18" / "fold1" / "metrics.json").write_text('{"status": "do')  # damaged since
    text = status(cfg)[0]
    assert re.search(r"resnet18 +0 +local 77 +done +3/3", text)
    assert re.search(r"resnet18 +1 +local 78 +failed \(its metrics.json is unreadable\) +2/3", text)


@pytest.mark.timeout(60)
def test_a_lock_that_cannot_be_written_on_a_full_disk_names_its_file_and_is_not_left_held(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from skinhpc import rundir
    from skinhpc.config import os_error_text
    path = tmp_path / "launch" / "lock"

    def full_disk(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file name

    monkeypatch.setattr(rundir.os, "write", full_disk)
    with pytest.raises(OSError) as caught:
        with rundir.exclusive_lock(path):
            pass
    assert os_error_text(caught.value) == f"{path}: No space left on device"
    monkeypatch.undo()
    assert rundir.lock_holder(path) == ""  # released: the next launch is not refused as busy


@pytest.mark.timeout(60)
def test_folds_given_twice_must_agree() -> None:
    assert load_launch_config(["split.folds=3"], None, 3)[0].split.folds == 3
    assert load_launch_config(["split.folds=03"], None, 3)[0].split.folds == 3
    with pytest.raises(ConfigError, match=r"--folds 2 and split.folds=3 disagree"):
        load_launch_config(["split.folds=3"], None, 2)
    with pytest.raises(ConfigError, match=r"not key=value"):  # not an IndexError
        load_launch_config(["split.folds"], None, 2)


@pytest.mark.timeout(60)
def test_a_fold_still_trained_after_its_local_launch_was_killed_shows_running_and_blocks_a_relaunch(
        tmp_path: Path) -> None:
    from skinhpc.launch import LaunchError, make_plan, status, write_jobs
    from skinhpc.rundir import exclusive_lock, train_lock
    run_dir = tmp_path / "exp"
    cfg, _ = load_launch_config([f"run_dir={run_dir}", "backbones=[resnet18]"], None, 2)
    # The launch was killed (no launch lock) while fold 1's task ran: the record still says running.
    tasks = {"resnet18/fold1": {"local_job": "77", "log": "/x/77.out", "err": "/x/77.err", "state": "running"}}
    write_jobs(run_dir, {"kind": "local", "tasks": tasks})
    assert re.search(r"resnet18 +1 +local 77 +stopped", status(cfg)[0])
    with exclusive_lock(train_lock(run_dir, "resnet18", 1)):  # its task, still training
        assert re.search(r"resnet18 +1 +local 77 +running", status(cfg)[0])
        with pytest.raises(LaunchError, match=rf"resnet18 fold 1 is being trained by pid {os.getpid()} on "):
            make_plan(cfg, "local", {"tasks": tasks}, {})
        with pytest.raises(LaunchError, match="is being trained by"):  # a SLURM relaunch would start a second
            make_plan(cfg, "slurm", {"tasks": tasks}, {})
    assert [t.fold for t in make_plan(cfg, "local", {"tasks": tasks}, {}).submit] == [0, 1]


@pytest.mark.timeout(60)
def test_status_of_a_run_made_by_hand_shows_its_split_folds_and_its_backbones(tmp_path: Path) -> None:
    from skinhpc.launch import status
    run_dir = tmp_path / "exp"
    (run_dir / "resnet10t" / "fold1").mkdir(parents=True)  # jobs/train.py by hand: no RUN/config.yaml
    (run_dir / "resnet10t" / "fold1" / "metrics.json").write_text(json.dumps({"status": "done"}))
    (run_dir / "split.json").write_text(json.dumps({"folds": [{}, {}, {}], "test": []}))
    save_config(load_config([f"run_dir={run_dir}", "model.backbone=resnet10t", "fold=1", "split.folds=3",
                             "train.epochs=3"]), run_dir / "resnet10t" / "fold1" / "config.yaml")
    (run_dir / "resnet10t" / "fold1" / "log.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(3)))
    cfg, _ = load_launch_config([f"run_dir={run_dir}"], None, None)  # the command line names neither
    rows = [line.split()[:5] for line in status(cfg)[0].splitlines()[2:5]]
    assert rows == [["resnet10t", "0", "-", "not", "submitted"], ["resnet10t", "1", "-", "done", "3/3"],
                    ["resnet10t", "2", "-", "not", "submitted"]]
    assert "resnet10t  3" not in status(cfg)[0]


@pytest.mark.timeout(120)
def test_sbatch_refusing_a_job_is_a_one_line_error_quoting_it(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Invalid account or account/partition combination' >&2\n"
                                 "exit 1\n")
    (fake / "sbatch").chmod(0o755)
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it (a machine without SLURM has none)
    (fake / "srun").chmod(0o755)
    proc = run_launch(["cluster.kind=slurm", f"run_dir={tmp_path / 'exp'}"], cwd=tmp_path,
                      env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(r"error: sbatch refused the (conversion job|training array): sbatch: error: Invalid account",
                     proc.stderr), proc.stderr


@pytest.mark.timeout(120)
def test_a_slurm_launch_without_srun_on_path_says_so_without_a_traceback(tmp_path: Path) -> None:
    only_sbatch = tmp_path / "bin"
    only_sbatch.mkdir()
    (only_sbatch / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (only_sbatch / "sbatch").chmod(0o755)
    proc = run_launch(["cluster.kind=slurm", f"run_dir={tmp_path / 'exp'}"], cwd=tmp_path,
                      env={"PATH": str(only_sbatch)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error: cluster.kind=slurm but srun is not on PATH (no SLURM here)" in proc.stderr


@pytest.mark.timeout(120)
def test_a_fold_trained_with_other_settings_is_refused_not_resumed_or_counted(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp"
    fold = absolute_paths(load_config([f"run_dir={run_dir}", "split.folds=2", "train.lr=0.01", "fold=1"]))
    save_config(fold, run_dir / "resnet18" / "fold1" / "config.yaml")  # e.g. by hand with jobs/train.py
    proc = run_launch(["--dry-run", "--folds", "2", f"run_dir={run_dir}", "train.lr=0.003"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "resnet18/fold1 was trained with another config" in proc.stderr and "train.lr: 0.01 -> 0.003" in proc.stderr
    from skinhpc.train import train_fold
    with pytest.raises(ConfigError, match=r"train.lr: 0.01 -> 0.003"):
        train_fold(absolute_paths(load_config([f"run_dir={run_dir}", "split.folds=2", "fold=1", "train.lr=0.003"])))
    # Paths written relative by hand and absolute by the launcher are not a conflict.
    from skinhpc.config import fold_config_conflicts
    by_hand = load_config([f"run_dir={run_dir}", "fold=0", "data.metadata=rel.csv", "data.images=[rel]"])
    save_config(absolute_paths(by_hand), run_dir / "resnet18" / "fold0" / "config.yaml")
    assert fold_config_conflicts(run_dir / "resnet18" / "fold0", by_hand) == ""


@pytest.mark.timeout(120)
def test_a_fold_trained_from_other_weights_is_refused_but_the_same_weights_moved_are_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skinhpc.config import fold_config_conflicts
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "a.pth").write_bytes(b"A" * 100)
    (tmp_path / "weights" / "b.pth").write_bytes(b"B" * 100)
    run_dir, fold = tmp_path / "exp", tmp_path / "exp" / "resnet18" / "fold0"

    def cfg(*extra: str) -> ExperimentConfig:
        return load_config([f"run_dir={run_dir}", "fold=0", *extra])

    save_config(absolute_paths(cfg("model.pretrained=weights/a.pth")), fold / "config.yaml")  # by hand
    assert fold_config_conflicts(fold, cfg("model.pretrained=weights/a.pth")) == ""
    for other in ("false", "true", "weights/b.pth"):
        assert "model.pretrained" in fold_config_conflicts(fold, cfg(f"model.pretrained={other}")), other
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "a2.pth").write_bytes(b"A" * 100)  # the same weights, elsewhere
    assert fold_config_conflicts(fold, cfg(f"model.pretrained={tmp_path / 'copy' / 'a2.pth'}")) == ""
    (tmp_path / "ds.json").write_text("{}")
    assert "train.deepspeed.config" in fold_config_conflicts(fold, cfg("model.pretrained=weights/a.pth",
                                                                       "train.deepspeed.config=ds.json"))


@pytest.mark.timeout(60)
def test_a_relaunch_accepts_the_weights_files_moved_but_not_other_ones(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from skinhpc.launch import LaunchError, check_compatible
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "exp"

    def cfg(pretrained: str) -> ExperimentConfig:
        return absolute_paths(load_config([f"run_dir={run_dir}", f"model.pretrained={pretrained}"]))

    save_config(cfg("w/{backbone}.pth"), run_dir / "config.yaml")  # as the launch saved it
    check_compatible(run_dir, cfg("w2/{backbone}.pth"))  # the same files, moved
    for other in ("w2/{backbone}-in21k.pth", "true", "false"):
        with pytest.raises(LaunchError, match="model.pretrained"):
            check_compatible(run_dir, cfg(other))


@pytest.mark.timeout(120)
def test_a_relaunch_accepts_the_download_moved_or_copied_but_not_other_data(tmp_path: Path) -> None:
    from skinhpc import SAMPLE_IMAGES, SAMPLE_METADATA
    from skinhpc.convert import convert
    from skinhpc.launch import LaunchError, check_compatible
    raw, run_dir, data = tmp_path / "raw", tmp_path / "exp", tmp_path / "data"
    shutil.copytree(SAMPLE_IMAGES, raw / "images")
    shutil.copy2(SAMPLE_METADATA, raw / "meta.csv")

    def cfg(root: Path) -> ExperimentConfig:
        return absolute_paths(load_config([f"run_dir={run_dir}", f"data.dir={data}", f"data.images=[{root / 'images'}]",
                                           f"data.metadata={root / 'meta.csv'}"]))

    convert([raw / "images"], raw / "meta.csv", data, workers=1)
    save_config(cfg(raw), run_dir / "config.yaml")  # as the launch saved it
    (raw).rename(tmp_path / "moved")
    check_compatible(run_dir, cfg(tmp_path / "moved"))  # mv keeps names, sizes, mtimes and bytes
    shutil.copytree(tmp_path / "moved", tmp_path / "copied", copy_function=shutil.copy)  # new mtimes
    check_compatible(run_dir, cfg(tmp_path / "copied"))  # cp -r, scp: the same names and bytes
    shutil.copytree(tmp_path / "moved", tmp_path / "edited", copy_function=shutil.copy)
    image = sorted((tmp_path / "edited" / "images").iterdir())[7]
    data_bytes = bytearray(image.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF  # another image of the same name and size
    image.write_bytes(bytes(data_bytes))
    with pytest.raises(LaunchError, match=r"data.metadata: .*meta.csv' \(not what the conversion in .*data was made from"):
        check_compatible(run_dir, cfg(tmp_path / "edited"))
    manifest = json.loads((data / "manifest.json").read_text())
    old = {**manifest, "images": {k: v for k, v in manifest["images"].items()
                                  if k not in ("layout_sha256", "content_sha256", "copies_sha256")}}
    (data / "manifest.json").write_text(json.dumps(old))  # as skinhpc < 0.2.3 wrote it
    shutil.copytree(tmp_path / "moved", tmp_path / "copied2", copy_function=shutil.copy)
    with pytest.raises(LaunchError, match=r"made by skinhpc < 0.2.3, .* convert it once into data.dir "
                                          r"\(jobs/convert.py --images .*copied2/images --metadata .*copied2/meta.csv --out"):
        check_compatible(run_dir, cfg(tmp_path / "copied2"))
    check_compatible(run_dir, cfg(tmp_path / "moved"))  # the original still matches by its mtimes
    with pytest.raises(LaunchError, match=r"data.images: \[.*\] -> \[\]; data.metadata"):
        check_compatible(run_dir, absolute_paths(load_config([f"run_dir={run_dir}", f"data.dir={data}"])))
    with pytest.raises(LaunchError, match=r"typo.*meta.csv' \(a metadata file or image folder named is not there\)"):
        check_compatible(run_dir, cfg(tmp_path / "typo"))  # the intact conversion alone must not let a typo through
    (tmp_path / "moved").rename(tmp_path / "again")
    shutil.rmtree(data)
    with pytest.raises(LaunchError, match=r"\(no conversion in .*data to compare them with: .*; give the run's data.dir\)"):
        check_compatible(run_dir, cfg(tmp_path / "again"))


@pytest.mark.timeout(60)
def test_a_weights_or_deepspeed_file_replaced_under_its_name_since_the_fold_trained_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skinhpc.config import INPUTS_NAME, fold_config_conflicts, input_file_digests
    monkeypatch.chdir(tmp_path)
    weights, ds = tmp_path / "a.pth", tmp_path / "ds.json"
    weights.write_bytes(b"A" * 100)
    ds.write_text('{"zero_optimization": {"stage": 1}}')
    fold = tmp_path / "exp" / "resnet18" / "fold0"
    cfg = absolute_paths(load_config([f"run_dir={tmp_path / 'exp'}", "fold=0", "model.pretrained=a.pth",
                                      "train.strategy=deepspeed", "train.deepspeed.config=ds.json"]))
    save_config(cfg, fold / "config.yaml")
    assert fold_config_conflicts(fold, cfg) == ""  # a fold from before inputs.json: names only
    (fold / INPUTS_NAME).write_text(json.dumps(input_file_digests(cfg)))  # what train_fold records
    assert fold_config_conflicts(fold, cfg) == ""
    weights.write_bytes(b"B" * 100)  # other weights under the same name and size
    os.utime(weights, ns=(1, 1))
    assert "model.pretrained: " + str(weights) + " changed since the fold trained on it" in fold_config_conflicts(fold, cfg)
    weights.write_bytes(b"A" * 100)
    assert fold_config_conflicts(fold, cfg) == ""
    ds.write_text('{"zero_optimization": {"stage": 2}}')  # edited in place
    assert "train.deepspeed.config: " + str(ds) + " changed" in fold_config_conflicts(fold, cfg)
    ddp = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, strategy="ddp"))
    assert list(input_file_digests(ddp)) == ["model.pretrained"]  # DDP never reads the DeepSpeed file
    for damaged in ("[]", "null", '{"model.pretrained": {"path": "%s", "sha256": null}}' % weights):
        (fold / INPUTS_NAME).write_text(damaged)
        assert fold_config_conflicts(fold, cfg) == "", damaged  # no usable record: names only, as for older folds


@pytest.mark.timeout(60)
def test_once_the_trained_on_weights_file_is_gone_its_recorded_content_decides_a_moved_or_renamed_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skinhpc.config import INPUTS_NAME, fold_config_conflicts, input_file_digests
    from skinhpc.launch import LaunchError, check_compatible
    monkeypatch.chdir(tmp_path)
    run_dir, fold = tmp_path / "exp", tmp_path / "exp" / "resnet18" / "fold0"
    original = tmp_path / "old" / "resnet18.pth"
    original.parent.mkdir()
    original.write_bytes(b"A" * 100)

    def cfg(pretrained: Path | str) -> ExperimentConfig:
        return absolute_paths(load_config([f"run_dir={run_dir}", "fold=0", f"model.pretrained={pretrained}"]))

    save_config(cfg(original), fold / "config.yaml")  # what train_fold writes
    (fold / INPUTS_NAME).write_text(json.dumps(input_file_digests(cfg(original))))
    save_config(cfg(original.parent / "{backbone}.pth"), run_dir / "config.yaml")  # the launch's
    original.unlink()
    new = tmp_path / "new"
    new.mkdir()
    (new / "r18-imagenet.pth").write_bytes(b"A" * 100)  # the same weights, renamed
    (new / "resnet18.pth").write_bytes(b"B" * 100)  # the old name, other weights
    assert fold_config_conflicts(fold, cfg(new / "r18-imagenet.pth")) == ""
    assert "model.pretrained" in fold_config_conflicts(fold, cfg(new / "resnet18.pth"))
    check_compatible(run_dir, cfg(new / "r18-imagenet.pth"))
    (new / "resnet18_v2.pth").write_bytes(b"A" * 100)
    check_compatible(run_dir, cfg(new / "{backbone}_v2.pth"))  # a renamed template: each backbone's file
    with pytest.raises(LaunchError, match="model.pretrained"):
        check_compatible(run_dir, cfg(new / "resnet18.pth"))
    (fold / INPUTS_NAME).unlink()  # a fold from before inputs.json: the file name is all there is
    assert "model.pretrained" in fold_config_conflicts(fold, cfg(new / "r18-imagenet.pth"))
    assert fold_config_conflicts(fold, cfg(new / "resnet18.pth")) == ""


@pytest.mark.timeout(120)
def test_each_backbone_gets_its_own_weights_file_and_a_missing_one_is_refused_at_launch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skinhpc.launch import Task, task_config
    import timm
    import torch

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "weights" / "resnet18.pth")
    args = ["--dry-run", "--folds", "2", f"run_dir={tmp_path / 'exp'}", "backbones=[resnet18,resnet34]",
            "model.pretrained=weights/{backbone}.pth"]
    proc = run_launch(args, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"resnet34: {tmp_path / 'weights' / 'resnet34.pth'}" in proc.stderr and "resnet18:" not in proc.stderr
    torch.save(timm.create_model("resnet34").state_dict(), tmp_path / "weights" / "resnet34.pth")
    proc = run_launch(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg, _ = load_launch_config([f"run_dir={tmp_path / 'exp'}", "model.pretrained=weights/{backbone}.pth"], None, 2)
    for backbone in ("resnet18", "resnet34"):
        assert task_config(cfg, Task(backbone, 1)).model.pretrained == str(tmp_path / "weights" / f"{backbone}.pth")


@pytest.mark.timeout(30)
def test_a_relative_weights_file_is_made_absolute_for_jobs_started_elsewhere(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(load_config(["model.pretrained=weights/r.pth"]))
    assert cfg.model.pretrained == str(tmp_path / "weights" / "r.pth")
    for flag in ("true", "false"):
        assert absolute_paths(load_config([f"model.pretrained={flag}"])).model.pretrained.lower() == flag


@pytest.mark.timeout(60)
@pytest.mark.parametrize("job, target, argv", [
    ("train", "skinhpc.train.train_fold", ["run_dir=x"]),
    ("ensemble", "skinhpc.ensemble.run_ensemble", ["RUN"]),
    ("predict", "skinhpc.predict.run_predict", ["--run", "RUN", "a.jpg"]),
    ("launch", "launch", ["--folds", "2"]),
])
def test_every_job_says_a_failed_write_in_one_line_and_exits_1(job: str, target: str, argv: list[str],
                                                               monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A full disk or a read-only run directory: the path and the system's reason, no traceback."""
    import importlib
    import runpy

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", "/full/RUN/ensemble/.report.md.tmp-1")

    main = runpy.run_path(str(REPO_DIR / "jobs" / f"{job}.py"))["main"]
    if "." in target:  # imported inside main() when it runs
        module, name = target.rsplit(".", 1)
        monkeypatch.setattr(importlib.import_module(module), name, full_disk)
    else:  # imported at the top of the job's file
        monkeypatch.setitem(main.__globals__, target, full_disk)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: /full/RUN/ensemble/.report.md.tmp-1: No space left on device")
    assert "Traceback" not in err


def test_a_task_ignores_rendezvous_variables_inherited_from_the_launching_shell(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # sbatch passes the submitting shell's environment on: a launch from a shell that ran torchrun
    # made every task fail ("Cannot export environment variables as MASTER_ADDR is already set").
    import skinhpc.train
    from skinhpc.launch import RENDEZVOUS_VARS
    for key in list(os.environ):
        if key.startswith(("SLURM_", "SUBMITIT_")):
            monkeypatch.delenv(key)
    job = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4321", "SLURM_JOB_NODELIST": "node[3-4]",
           "SLURM_STEP_NODELIST": "node[3-4]", "SLURM_NODEID": "1", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
           "SLURM_LOCALID": "1", "SLURM_JOB_NUM_NODES": "2"}
    stale = {key: "0" for key in RENDEZVOUS_VARS} | {"MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}
    for key, value in {**job, **stale}.items():  # (monkeypatch undoes every one of them)
        monkeypatch.setenv(key, value)
    seen = {}
    monkeypatch.setattr(skinhpc.train, "train_fold", lambda cfg: seen.update(os.environ) or {"status": "done"})
    cfg = load_config(["cluster.use_gpus=false", "backbones=[resnet18]"])
    assert TrainTask(cfg)() == {"status": "done"}
    assert seen["MASTER_ADDR"] == "node3" and seen["MASTER_PORT"] != "29500"
    assert (seen["RANK"], seen["WORLD_SIZE"], seen["LOCAL_RANK"]) == ("3", "4", "1")


def test_a_slurm_task_that_asked_for_gpus_and_sees_none_fails_at_once_saying_why(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import skinhpc.launch as launch_mod
    import skinhpc.train
    cfg = load_config(["cluster.use_gpus=true", "train.device=auto", "backbones=[resnet18]"], sample_preset=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(launch_mod, "export_rendezvous", lambda: None)  # (no SLURM job here)
    monkeypatch.setattr(skinhpc.train, "train_fold", lambda c: {"status": "done", "device": c.train.device})
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    with pytest.raises(RuntimeError, match=r"asked SLURM for GPUs .* sees none.*cluster.use_gpus=false"):
        TrainTask(cfg)()
    as_asked = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cpu"))
    assert TrainTask(as_asked)()["device"] == "cpu"
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    assert TrainTask(cfg)()["device"] == "auto"  # a local launch on a CPU machine trains on the CPU


@pytest.mark.timeout(60)
def test_a_bad_value_in_a_cluster_profile_names_the_profile(tmp_path: Path) -> None:
    profile = tmp_path / "my-cluster.yaml"
    profile.write_text("kind: slurm\nnodes: two\n")
    with pytest.raises(ConfigError, match=rf"bad config value for cluster.nodes \(profile {re.escape(str(profile))}\)"):
        load_launch_config([f"cluster.profile={profile}"], None, 2)
    profile.write_text("kind: slurm\naccount:\n")
    with pytest.raises(ConfigError, match=r"cluster.account \(profile .*for an empty string write account: ''"):
        load_launch_config([f"cluster.profile={profile}"], None, 2)


@pytest.mark.timeout(120)
def test_a_relaunch_is_refused_when_the_images_changed_under_the_same_paths_since_a_fold_trained(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import skinhpc.convert as convert_mod
    from skinhpc import SAMPLE_IMAGES, SAMPLE_METADATA
    from skinhpc.config import INPUTS_NAME, data_input_record
    from skinhpc.convert import INDEX_NAME, convert, read_manifest, source_record
    from skinhpc.launch import LaunchError, check_data_unchanged, data_up_to_date, make_plan
    raw, data = tmp_path / "raw", tmp_path / "data"
    shutil.copytree(SAMPLE_IMAGES, raw / "images")
    shutil.copy2(SAMPLE_METADATA, raw / "meta.csv")
    convert([raw / "images"], raw / "meta.csv", data, workers=1)
    cfg, _ = load_launch_config([f"run_dir={tmp_path / 'exp'}", f"data.dir={data}", f"data.images=[{raw / 'images'}]",
                                 f"data.metadata={raw / 'meta.csv'}", "backbones=[resnet18]"], None, 2)
    folds = [tmp_path / "exp" / "resnet18" / f"fold{k}" for k in range(2)]
    record = data_input_record(data, source_record(read_manifest(data)))
    for fold in folds:
        fold.mkdir(parents=True)
        (fold / "metrics.json").write_text(json.dumps({"status": "done"}))
        (fold / INPUTS_NAME).write_text(json.dumps(record))
    assert make_plan(cfg, "local", {"tasks": {}}, {}).convert == "skip"

    # A damaged conversion whose manifest still knows the images by their mtimes: no bytes read.
    index = (data / INDEX_NAME).read_bytes()
    (data / INDEX_NAME).write_bytes(b"")
    with monkeypatch.context() as m:
        m.setattr(convert_mod, "_images_content_hash", lambda *a: pytest.fail("read the images' bytes"))
        assert make_plan(cfg, "local", {"tasks": {}}, {}).convert == "submit"
    (data / INDEX_NAME).write_bytes(index)

    # One cell of the metadata CSV edited: refused for the metadata, without reading the images.
    meta = (raw / "meta.csv").read_bytes()
    (raw / "meta.csv").write_bytes(meta.replace(b",45.0,", b",46.0,", 1))
    with monkeypatch.context() as m:
        m.setattr(convert_mod, "_images_content_hash", lambda *a: pytest.fail("read the images' bytes"))
        with pytest.raises(LaunchError, match=r"the metadata CSV's content changed since it trained"):
            make_plan(cfg, "local", {"tasks": {}}, {})
    (raw / "meta.csv").write_bytes(meta)

    image = sorted((raw / "images").iterdir())[11]
    original = image.read_bytes()
    edited = bytearray(original)
    edited[len(edited) // 2] ^= 0xFF  # e.g. a colour-corrected copy put in its place
    image.write_bytes(bytes(edited))
    assert not data_up_to_date(cfg)
    with pytest.raises(LaunchError, match=rf"{folds[0]} was trained on other data \(its conversion in {data}\): the "
                                          r"images' content \(names or bytes\) changed since it trained\. Use a "
                                          r"new run_dir, or restore the data it trained on\. The same holds for "
                                          r"resnet18/fold1\.$"):
        make_plan(cfg, "local", {"tasks": {}}, {})
    image.write_bytes(original)  # restored: a new mtime, the same bytes
    check_data_unchanged(cfg, data_up_to_date(cfg))

    # The run's download given by another path (a copy) while the conversion is damaged: the folds'
    # record says it is their data.
    from skinhpc.launch import check_compatible
    save_config(cfg, tmp_path / "exp" / "config.yaml")
    shutil.copytree(raw, tmp_path / "copy", copy_function=shutil.copy)
    (data / INDEX_NAME).unlink()
    copied = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, images=[str(tmp_path / "copy" / "images")], metadata=str(tmp_path / "copy" / "meta.csv")))
    check_compatible(tmp_path / "exp", copied)
    edited_copy = tmp_path / "copy" / "images" / image.name
    edited_copy.write_bytes(bytes(edited))
    with pytest.raises(LaunchError, match=r"was trained on other data .*images' content"):
        check_compatible(tmp_path / "exp", copied)
    (data / INDEX_NAME).write_bytes(index)

    # A conversion format of another skinhpc: the same images give other pixels.
    older = json.loads((folds[0] / INPUTS_NAME).read_text())
    older["data"]["settings"]["format_version"] -= 1
    older["data"]["sha256"] = "0" * 64
    (folds[0] / INPUTS_NAME).write_text(json.dumps(older))
    with pytest.raises(LaunchError, match=r"the conversion settings \(format_version 1 -> 2\): this skinhpc stores "
                                          r"other pixels .* finish the run with the skinhpc version that started it"):
        check_data_unchanged(cfg, True)
    for fold in folds:  # folds of skinhpc < 0.2.3 record no data: nothing to compare
        (fold / INPUTS_NAME).write_text("{}")
    image.write_bytes(bytes(edited))
    check_data_unchanged(cfg, False)
