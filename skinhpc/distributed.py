"""Process-group setup for one training task: one process alone, torchrun, or a SLURM task.

Rank, world size and local rank come from the environment, in this order:
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, or submitit's
``TorchDistributedEnvironment().export()``), then ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS`` (or
``SLURM_NTASKS``)/``SLURM_LOCALID`` inside an ``srun`` job step (``SLURM_STEP_ID`` set; a batch script
has ``SLURM_PROCID=0`` and the job's task count too, but is one process); else one process. The rendezvous uses ``MASTER_ADDR``/``MASTER_PORT``;
under plain SLURM without them the first host of the allocation and a port derived from the job id
are used, so every task finds the same address without talking to the others.

DDP with one process runs without a process group; DeepSpeed always needs one (a 1-rank group).
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """The distributed environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the task."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is initialised (ranks must take part in collectives)."""
        return dist.is_available() and dist.is_initialized()


def _int_env(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None
    return None


def read_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun/submitit variables, else from SLURM's inside an
    srun job step, else (0, 1, 0)."""
    if os.environ.get("WORLD_SIZE") not in (None, ""):
        world = _int_env("WORLD_SIZE")
        rank = _int_env("RANK") or 0
        local = _int_env("LOCAL_RANK")
        local = rank if local is None else local
    elif os.environ.get("SLURM_STEP_ID") not in (None, "") and os.environ.get("SLURM_PROCID") not in (None, ""):
        # Only inside a job step (srun): a batch script also has SLURM_PROCID=0 and the job's
        # SLURM_NTASKS, and a lone process there must not wait for partners that never come.
        world = _int_env("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
        rank = _int_env("SLURM_PROCID") or 0
        local = _int_env("SLURM_LOCALID") or 0
    else:
        return 0, 1, 0
    assert world is not None
    if not 0 <= rank < world:
        raise DistributedError(f"rank {rank} is outside world size {world} (check RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)")
    return rank, world, local


def first_rank() -> bool:
    """Whether this process is rank 0 (or alone), before any process group exists: the one that
    says how a run stopped, where every rank stops alike."""
    try:
        return read_ranks()[0] == 0
    except DistributedError:
        return True


def _slurm_master() -> tuple[str, str]:
    """First host of the SLURM allocation and a port from the job id (same on every task)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise DistributedError("MASTER_ADDR is not set and SLURM_JOB_NODELIST is missing: cannot find the rendezvous host")
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise DistributedError(f"MASTER_ADDR is not set and 'scontrol show hostnames {nodelist}' failed: {e}") from None
    job_id = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
    return hosts[0], str(20000 + job_id % 20000)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def pick_device(device: str, local_rank: int) -> torch.device:
    """train.device (auto/cuda/cpu) → this process's device; cuda uses GPU ``local_rank``."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DistributedError("train.device=cuda but no CUDA GPU is visible")
        n = torch.cuda.device_count()
        if local_rank >= n:
            # DeepSpeed, too, sets the device from LOCAL_RANK: every process must see all the node's GPUs.
            raise DistributedError(
                f"local rank {local_rank} has no GPU: only {n} visible on this node (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}); more processes per node than GPUs, or a "
                "site that binds one GPU to each task (--gpu-bind, --gpus-per-task): the tasks need all of the "
                "node's GPUs visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device: str, strategy: str) -> DistEnv:
    """Initialise the process group this task needs (NCCL on GPU, gloo on CPU) and pick the device.

    ``device`` is train.device, ``strategy`` train.strategy. Idempotent: an existing group is reused.
    """
    rank, world, local = read_ranks()
    dev = pick_device(device, local)
    need_group = world > 1 or strategy == "deepspeed"
    if need_group and not dist.is_initialized():
        if world > 1 and not os.environ.get("MASTER_ADDR"):
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = _slurm_master()
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", _free_port())
        # DeepSpeed reads these rather than the init arguments.
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(minutes=60), **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def max_int(env: DistEnv, value: int) -> int:
    """The largest ``value`` over ranks (all-reduce MAX of one number), the same on every rank."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int32, device=env.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(env: DistEnv, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    return bool(max_int(env, 1 if flag else 0))


def all_sum(env: DistEnv, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64, so sums of losses stay exact enough)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def cleanup(env: DistEnv) -> None:
    """Leave the process group cleanly (ZeRO processes abort at exit without barrier + destroy)."""
    if env.distributed:
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
