"""Integration tests of jobs/launch.py through submitit on a real SLURM cluster (slurm/local/start.sh:
2 virtual CPU nodes on this machine). Small runs: resnet18, the bundled sample, 64 px, a few steps.

Skipped (with the reason) when there is no SLURM here, unless SKINHPC_REQUIRE_SLURM=1 (.ci/run), then
they fail. Jobs get the launcher's environment (sbatch --export=ALL), so the venv's python and the
package are used on the nodes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import submitit

from skinhpc import REPO_DIR

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

LAUNCH = [sys.executable, str(REPO_DIR / "jobs" / "launch.py")]
PROFILE = "cluster.profile=local"
SAMPLE_CONFIG = str(REPO_DIR / "configs" / "sample.yaml")


def slurm_problem() -> str:
    """Why the local cluster cannot be used ('' when it can)."""
    if not shutil.which("sbatch"):
        return "sbatch is not on PATH"
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()}"
    nodes = {line.split()[0] for line in out.stdout.splitlines() if line.split()[1].rstrip("*") in ("idle", "mixed", "allocated")}
    if len(nodes) < 2:
        return f"fewer than 2 usable nodes ({out.stdout.strip()!r})"
    return ""


@pytest.fixture(autouse=True, scope="module")
def need_slurm() -> None:
    problem = slurm_problem()
    if not problem:
        return
    message = f"no usable SLURM cluster ({problem}); start one with: bash slurm/local/start.sh"
    if os.environ.get("SKINHPC_REQUIRE_SLURM") == "1":
        pytest.fail(f"SKINHPC_REQUIRE_SLURM=1 but {message}")
    pytest.skip(message)


# --------------------------------------------------------------------------- helpers

def launch(args: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "SKINHPC_TEST_FAIL_TASKS"}
    proc = subprocess.run(LAUNCH + args, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**full_env, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def wait_for(cond: Callable[[], bool], timeout: float, what: str, poll: float = 1.0) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if cond():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{subprocess.run(['squeue'], capture_output=True, text=True).stdout}")


def jobs_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "launch" / "jobs.json").read_text())


def live_jobs(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout
    return out.split()


def sacct(job_id: str) -> dict[str, str]:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State,Start,End,NodeList", "-j", job_id.split("_")[0]],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        jid, state, start, end, nodes = line.split("|")
        if jid == job_id:
            return {"state": state, "start": start, "end": end, "nodes": nodes}
    return {}


def ensemble_done(run_dir: Path) -> bool:
    return (run_dir / "ensemble" / "report.md").is_file() and not live_jobs(f"skinhpc-ensemble-{run_dir.name}")


def metrics(run_dir: Path, fold: int, backbone: str = "resnet18") -> dict:
    return json.loads((run_dir / backbone / f"fold{fold}" / "metrics.json").read_text())


def task_log(run_dir: Path, key: str) -> str:
    path = Path(jobs_of(run_dir)["tasks"][key]["log"])
    return path.read_text() if path.is_file() else ""


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`launch.py --folds 2` on the sample (conversion job, 2-task array, ensemble), run to the end."""
    base = tmp_path_factory.mktemp("slurm-e2e")
    run_dir = base / "e2e"
    proc = launch(["--folds", "2", f"run_dir={run_dir}", PROFILE], cwd=base)
    wait_for(lambda: ensemble_done(run_dir), 900, "the e2e experiment's ensemble report", poll=3)
    return run_dir, proc.stdout


@pytest.mark.timeout(1200)
def test_launch_runs_conversion_then_array_then_ensemble_and_its_report(e2e_run: tuple[Path, str]) -> None:
    run_dir, out = e2e_run
    assert "sample preset" in out and "submitted conversion job" in out
    jobs = jobs_of(run_dir)
    conv = sacct(jobs["convert"]["job_id"])
    tasks = [sacct(jobs["tasks"][f"resnet18/fold{k}"]["job_id"]) for k in range(2)]
    ens = sacct(jobs["ensemble"]["job_id"])
    assert [t["state"] for t in tasks] == ["COMPLETED", "COMPLETED"] and ens["state"] == "COMPLETED"
    assert jobs["tasks"]["resnet18/fold0"]["job_id"].split("_")[0] == jobs["tasks"]["resnet18/fold1"]["job_id"].split("_")[0], \
        "one job array over backbone x fold"
    assert all(t["start"] >= conv["end"] for t in tasks), "training waits for the conversion (afterok)"
    assert ens["start"] >= max(t["end"] for t in tasks), "the ensemble starts only after every task (afterok)"
    assert all(metrics(run_dir, k)["status"] == "done" for k in range(2))
    assert json.loads((run_dir / "ensemble" / "metrics.json").read_text())["test"]


@pytest.mark.timeout(1200)
def test_status_shows_every_task_done_and_ensemble_metrics(e2e_run: tuple[Path, str]) -> None:
    run_dir, _ = e2e_run
    out = launch(["--status", f"run_dir={run_dir}"], cwd=run_dir.parent).stdout
    rows = [line for line in out.splitlines() if line.startswith("resnet18")]
    assert len(rows) == 2 and all(" done " in r and " 3/3 " in r for r in rows), out
    assert re.search(r"ensemble: job \d+ done", out) and "balanced_accuracy" in out and "report.md" in out


@pytest.mark.timeout(1200)
def test_relaunch_of_finished_experiment_submits_nothing(e2e_run: tuple[Path, str]) -> None:
    run_dir, _ = e2e_run
    before = jobs_of(run_dir)
    out = launch(["--folds", "2", f"run_dir={run_dir}", PROFILE], cwd=run_dir.parent).stdout
    assert "nothing to submit" in out and "submitted" not in out
    assert jobs_of(run_dir) == before


@pytest.mark.timeout(1200)
def test_submitted_array_script_is_what_dry_run_prints(e2e_run: tuple[Path, str], tmp_path: Path) -> None:
    run_dir, _ = e2e_run
    array_id = jobs_of(run_dir)["tasks"]["resnet18/fold0"]["job_id"].split("_")[0]
    submitted = (run_dir / "launch" / "submitit" / f"{array_id}_submission.sh").read_text()
    other = tmp_path / "e2e"  # same name: same job names
    dry = launch(["--dry-run", "--folds", "2", f"run_dir={other}", PROFILE], cwd=tmp_path).stdout
    script = dry.split("----- sbatch script: training array (2 tasks)\n")[1].split("-----")[0]

    def norm(text: str, root: Path) -> str:
        return re.sub(r"#SBATCH --dependency=.*", "#SBATCH --dependency=X", text.replace(str(root), "<RUN>")).strip()
    assert norm(submitted, run_dir) == norm(script, other)


# --------------------------------------------------------------------------- requeue / preemption

@pytest.mark.timeout(1500)
def test_scontrol_requeue_and_usr2_preemption_resume_to_the_same_metrics(e2e_run: tuple[Path, str], tmp_path: Path) -> None:
    """fold0: an outside `scontrol requeue` mid-epoch (restart from the original pickle); fold1: a
    preemption (SIGTERM + USR2, as submitit's job._interrupt sends it). Both resume from their
    checkpoints and end with exactly the metrics of the uninterrupted e2e run."""
    ref_dir, _ = e2e_run
    run_dir = tmp_path / "requeue"
    # Same experiment as e2e (the sample preset's values, the converted sample), printing every step.
    # Each step sleeps 1.5 s: otherwise a fast machine finishes the last epochs inside SLURM's kill
    # window (KillWait=5 s) after the requeue's SIGTERM, and there is nothing left to resume.
    launch(["--folds", "2", "--config", SAMPLE_CONFIG, f"run_dir={run_dir}", f"data.dir={ref_dir / 'data'}",
            PROFILE, "train.log_every=1"], cwd=tmp_path, env={"SKINHPC_TEST_STEP_SLEEP": "1.5"})
    jobs = jobs_of(run_dir)
    job0, job1 = (jobs["tasks"][f"resnet18/fold{k}"]["job_id"] for k in range(2))

    def mid_epoch(key: str) -> bool:
        return re.search(r"epoch 2/\d+ step [1-3]/", task_log(run_dir, key)) is not None
    wait_for(lambda: mid_epoch("resnet18/fold0"), 600, "fold0 in the middle of epoch 2", poll=0.3)
    subprocess.run(["scontrol", "requeue", job0], check=True)
    wait_for(lambda: mid_epoch("resnet18/fold1"), 600, "fold1 in the middle of epoch 2", poll=0.3)
    submitit.SlurmJob(folder=run_dir / "launch" / "submitit", job_id=job1)._interrupt(timeout=False)

    out = launch(["--status", f"run_dir={run_dir}"], cwd=tmp_path).stdout
    assert "requeued" in out or "pending" in out or "running" in out, out
    wait_for(lambda: ensemble_done(run_dir), 900, "the requeued experiment's ensemble", poll=3)
    for k, key in enumerate(("resnet18/fold0", "resnet18/fold1")):
        log = task_log(run_dir, key)
        assert re.search(r"resuming from epoch [12] step \d+", log), f"{key} did not resume from a checkpoint:\n{log[-3000:]}"
        got, ref = metrics(run_dir, k), metrics(ref_dir, k)
        assert got["best_epoch"] == ref["best_epoch"]
        for part in ("val", "test"):
            assert got[part]["balanced_accuracy"] == ref[part]["balanced_accuracy"], (key, part)
            assert got[part]["loss"] == pytest.approx(ref[part]["loss"], rel=1e-6), (key, part)
    assert "USR2" in task_log(run_dir, "resnet18/fold1")
    assert sacct(job0)["state"] == "COMPLETED" and sacct(job1)["state"] == "COMPLETED"


# --------------------------------------------------------------------------- failure and recovery

@pytest.mark.timeout(1200)
def test_failed_task_blocks_ensemble_status_names_it_and_relaunch_recovers(e2e_run: tuple[Path, str], tmp_path: Path) -> None:
    ref_dir, _ = e2e_run
    run_dir = tmp_path / "failing"
    args = ["--folds", "2", "--config", SAMPLE_CONFIG, f"run_dir={run_dir}", f"data.dir={ref_dir / 'data'}", PROFILE,
            "train.epochs=1", "train.max_steps_per_epoch=2"]
    launch(args, cwd=tmp_path, env={"SKINHPC_TEST_FAIL_TASKS": "resnet18/fold1"})
    ens_job = jobs_of(run_dir)["ensemble"]["job_id"]

    def blocked() -> bool:
        out = subprocess.run(["squeue", "-h", "-j", ens_job, "-o", "%r"], capture_output=True, text=True).stdout
        return "DependencyNeverSatisfied" in out and (run_dir / "resnet18" / "fold0" / "metrics.json").is_file()
    wait_for(blocked, 600, "the ensemble to be blocked by the failed task", poll=2)
    assert not (run_dir / "ensemble").exists(), "the ensemble must not run after a failed task"
    out = launch(["--status", f"run_dir={run_dir}"], cwd=tmp_path).stdout
    assert "DependencyNeverSatisfied" in out and "failed: resnet18/fold1" in out, out
    err_log = jobs_of(run_dir)["tasks"]["resnet18/fold1"]["err"]
    assert err_log in out and "injected failure" in Path(err_log).read_text()

    again = launch(args, cwd=tmp_path).stdout  # without the failure switch
    assert "submit resnet18/fold1" in again and "submit resnet18/fold0" not in again
    assert f"cancelled stale ensemble job {ens_job}" in again
    wait_for(lambda: ensemble_done(run_dir), 600, "the recovered experiment's ensemble", poll=3)
    out = launch(["--status", f"run_dir={run_dir}"], cwd=tmp_path).stdout
    rows = [line for line in out.splitlines() if line.startswith("resnet18")]
    assert len(rows) == 2 and all(" done " in r for r in rows) and "failed:" not in out, out
    assert re.search(r"ensemble: job \d+ done", out), out


@pytest.mark.timeout(1200)
def test_a_conversion_failed_on_a_bad_csv_blocks_the_run_and_a_launch_with_the_csv_mended_remakes_it(
        tmp_path: Path) -> None:
    from skinhpc import SAMPLE_IMAGES, SAMPLE_METADATA
    csv = tmp_path / "meta.csv"
    good = SAMPLE_METADATA.read_text()
    csv.write_text(good + "HAM_9999999,ISIC_9999999,nv,histo,50.0,male,back\n")  # an image that is not there
    run_dir = tmp_path / "mended"
    args = ["--folds", "2", "--config", SAMPLE_CONFIG, f"run_dir={run_dir}", f"data.dir={tmp_path / 'data'}", PROFILE,
            f"data.images=[{SAMPLE_IMAGES}]", f"data.metadata={csv}", "train.epochs=1", "train.max_steps_per_epoch=2"]
    launch(args, cwd=tmp_path)
    conv = jobs_of(run_dir)["convert"]["job_id"]
    wait_for(lambda: sacct(conv).get("state") == "FAILED", 300, "the conversion job to fail", poll=2)
    wait_for(lambda: "blocked" in launch(["--status", f"run_dir={run_dir}"], cwd=tmp_path).stdout, 60,
             "the tasks to read DependencyNeverSatisfied", poll=2)
    out = launch(["--status", f"run_dir={run_dir}"], cwd=tmp_path).stdout
    # SLURM says Dependency of the ensemble, which waits for tasks that can never start: blocked too.
    assert re.search(r"ensemble: job \d+ blocked", out) and "the conversion job they wait for failed" in out, out
    launch(["--cancel", f"run_dir={run_dir}"], cwd=tmp_path)
    wait_for(lambda: not live_jobs(f"skinhpc-train-{run_dir.name}"), 60, "the cancelled tasks to leave the queue")
    out = launch(["--status", f"run_dir={run_dir}"], cwd=tmp_path).stdout
    rows = [line for line in out.splitlines() if line.startswith("resnet18")]
    assert len(rows) == 2 and all(" cancelled " in r for r in rows), out  # sacct's one row for the whole array

    csv.write_text(good)
    again = launch(args, cwd=tmp_path).stdout
    assert "its split is made anew" in again and "submitted conversion job" in again, again
    wait_for(lambda: ensemble_done(run_dir), 600, "the mended experiment's ensemble", poll=3)
    assert all(metrics(run_dir, k)["status"] == "done" for k in range(2))


# --------------------------------------------------------------------------- multi-node

@pytest.mark.timeout(1200)
def test_ddp_task_over_two_nodes_learns_like_the_one_node_run_and_completes_though_its_ranks_abort_at_exit(
        e2e_run: tuple[Path, str], tmp_path: Path) -> None:
    """2 nodes x 1 process, gloo: the same global batch (2 x 16 = 32) as the 1-node e2e run.

    Every training process is also made to abort in Python's teardown, as one rank of this task
    once did in CI after its fold had finished ("terminate called without an active exception"):
    the job must still read COMPLETED, or the ensemble's afterok never fires."""
    ref_dir, _ = e2e_run
    run_dir = tmp_path / "multinode"
    hook = tmp_path / "abort_at_exit"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        "print('teardown abort armed', flush=True)\n"
        "atexit.register(lambda: 'skinhpc.train' in sys.modules and os.abort())  # training processes only\n")
    pythonpath = os.pathsep.join([str(hook), str(REPO_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])
    launch(["--folds", "2", "--config", SAMPLE_CONFIG, f"run_dir={run_dir}", f"data.dir={ref_dir / 'data'}", PROFILE,
            "cluster.nodes=2", "cluster.gpus_per_node=1", "train.batch_size=16"], cwd=tmp_path,
           env={"PYTHONPATH": pythonpath})
    wait_for(lambda: ensemble_done(run_dir), 900, "the 2-node experiment's ensemble", poll=3)
    job0 = jobs_of(run_dir)["tasks"]["resnet18/fold0"]["job_id"]
    assert sacct(job0)["nodes"] == "node[1-2]" and sacct(job0)["state"] == "COMPLETED"
    log = task_log(run_dir, "resnet18/fold0")
    assert "2 process(es)" in log and "teardown abort armed" in log
    for k in range(2):
        got, ref = metrics(run_dir, k), metrics(ref_dir, k)
        assert got["world_size"] == 2 and got["epochs_trained"] == ref["epochs_trained"]
        first = [json.loads(x) for x in (run_dir / "resnet18" / f"fold{k}" / "log.jsonl").read_text().splitlines()]
        base = [json.loads(x) for x in (ref_dir / "resnet18" / f"fold{k}" / "log.jsonl").read_text().splitlines()]
        # Same data, model, global batch and schedule: the losses track the 1-node run closely.
        assert first[-1]["train_loss"] == pytest.approx(base[-1]["train_loss"], abs=0.25)
        assert got["val"]["loss"] == pytest.approx(ref["val"]["loss"], abs=0.3)


# --------------------------------------------------------------------------- concurrency and cancel

@pytest.mark.timeout(600)
def test_two_simultaneous_launches_submit_each_job_once_then_cancel(e2e_run: tuple[Path, str], tmp_path: Path) -> None:
    ref_dir, _ = e2e_run
    run_dir = tmp_path / "twice"
    args = LAUNCH + ["--folds", "2", "--config", SAMPLE_CONFIG, f"run_dir={run_dir}", f"data.dir={ref_dir / 'data'}",
                     PROFILE]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    submitted = [o for o in outs if "submitted training array" in o]
    assert len(submitted) == 1, outs
    other = outs[1 - outs.index(submitted[0])]
    assert "another launch" in other or "nothing to submit" in other, other
    assert len(live_jobs(f"skinhpc-train-{run_dir.name}")) == 2
    assert len(live_jobs(f"skinhpc-ensemble-{run_dir.name}")) == 1

    out = launch(["--cancel", f"run_dir={run_dir}"], cwd=tmp_path).stdout
    assert "cancelled 3 job(s)" in out
    wait_for(lambda: not live_jobs(f"skinhpc-train-{run_dir.name}") and not live_jobs(f"skinhpc-ensemble-{run_dir.name}"),
             60, "the cancelled jobs to leave the queue")
    status = launch(["--status", f"run_dir={run_dir}"], cwd=tmp_path).stdout
    assert "cancelled" in status
