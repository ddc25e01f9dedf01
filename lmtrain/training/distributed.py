"""Several training processes under torchrun: the process group, each rank's share of the streams,
sums across ranks, and the launcher behind `lmtrain train --nproc N`.

torchrun starts one process per rank and tells each where it stands through environment
variables: RANK (0 .. WORLD_SIZE - 1 over all machines), WORLD_SIZE, LOCAL_RANK (its index on this
machine, which picks its GPU) and LOCAL_WORLD_SIZE. Without them there is one process and every
function here is the identity or does nothing, so the training loop calls them unconditionally.
The process group's state lives in torch.distributed; nothing is kept here.

The global batch of train.batch_size streams (lmtrain.text.tokens.batchify) is cut into equal
contiguous shares, so N ranks of B/N streams see what one process of B streams sees:

    stream   0 1 2 3 | 4 5 6 7        train.batch_size 8, 2 ranks; rows are time steps
             rank 0  | rank 1

Each rank backpropagates the mean loss over its own tokens; DDP averages the gradients during
backward, which is the mean over the whole batch because every share holds as many tokens.
Clipping and the optimizer step then see the same averaged gradients on every rank, and the
weights stay equal (`check_in_sync`). Validation splits the eval streams the same way and sums
the NLL and token counts over ranks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lmtrain.errors import LmtrainError, require
from lmtrain.training.rendezvous import env_int, group_environment, join_group

MAIN_RANK = 0
USER_ERROR_EXIT = 2  # what lmtrain.cli.app exits with after printing `error: ...`


class ReportedByMainRank(LmtrainError):
    """An error every rank met alike, raised on the ranks other than the main one, which prints it;
    the others exit with the same code without repeating the line."""


def launched() -> bool:
    """Whether torchrun started this process (it sets WORLD_SIZE, RANK, LOCAL_RANK, ...).

    WORLD_SIZE=1 alone, without torchrun's other variables (left in the environment by another
    tool), is one process, as without it; any other WORLD_SIZE asks for a process group, and
    `setup` says what is missing for one."""
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        return False
    return world.strip() != "1" or "LOCAL_RANK" in os.environ


def rank() -> int:
    """This process' rank over all machines; 0 outside a process group (before `setup`, too)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the process group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """The rank that writes the run directory, the checkpoints, the logs and the terminal output."""
    return rank() == MAIN_RANK


def every_rank_error(message: str) -> LmtrainError:
    """The error for a problem every rank finds alike: the main rank reports it, the others are quiet."""
    return LmtrainError(message) if is_main() else ReportedByMainRank(message)


def threads_per_rank(local_world_size: int) -> int:
    """Torch threads for each of `local_world_size` processes on this machine: the cores shared out."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_world_size)


def batch_split_problem(batch_size: int, processes: int) -> str | None:
    """Why train.batch_size streams cannot be shared out equally over `processes`, or None."""
    if batch_size % processes == 0:
        return None
    return (f"train.batch_size {batch_size} does not split into {processes} equal shares of streams "
            f"(use a multiple of {processes}, or another process count)")


def setup(device: torch.device, batch_size: int) -> None:
    """Join torchrun's process group, if torchrun started this process: NCCL with each rank on
    cuda:LOCAL_RANK when `device` is CUDA, gloo on CPUs; torch threads = cores // LOCAL_WORLD_SIZE.

    Then checks that `batch_size` streams split equally over the ranks.
    """
    if not launched():
        return
    world, _, local_rank = group_environment()
    torch.set_num_threads(threads_per_rank(env_int("LOCAL_WORLD_SIZE", world, 1)))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LmtrainError(f"rank {os.environ.get('RANK')}: LOCAL_RANK {local_rank} needs GPU {local_rank}, but this machine "
                               f"shows {torch.cuda.device_count()} (start at most that many processes per machine)")
        torch.cuda.set_device(local_rank)
        join_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        join_group("gloo")
    problem = batch_split_problem(batch_size, world)
    if problem:
        raise every_rank_error(problem)


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK for CUDA under torchrun, else `device` itself."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> None:
    """End a rank's process with `code` without the interpreter's shutdown.

    Gloo's worker threads release a finished collective's tensors a moment after the caller has
    its result; a tensor made in Python then needs the interpreter lock to be freed. If the
    process is already shutting down, the worker cannot take it and the process aborts
    ("terminate called without an active exception"), after the run has finished and been
    saved (seen in 1 to 3 runs of 8 on our 2-core machine). The rank's files are written and
    closed by then, so it flushes its output and exits at once."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def session():
    """Leave the process group (if `setup` joined one) when the block ends, however it ends."""
    try:
        yield
    finally:
        teardown()


def collective_device() -> torch.device:
    """Where tensors for collectives live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(*values: float) -> list[float]:
    """Each value summed over every rank (float64); the values themselves without a process group."""
    if not dist.is_initialized():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(total)
    return total.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any, so that ranks take decisions together."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def stream_share(streams: int) -> slice:
    """This rank's contiguous share of `streams` streams: [r·S/N, (r+1)·S/N); some may be empty
    when S is not a multiple of N (validation allows that, training does not)."""
    n, r = world_size(), rank()
    return slice(r * streams // n, (r + 1) * streams // n)


def shard_streams(inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(steps, B) inputs and targets -> this rank's (steps, B/N) share of the streams."""
    share = stream_share(inputs.size(1))
    return inputs[:, share].contiguous(), targets[:, share].contiguous()


def preparation_stage() -> int:
    """When this rank prepares the run in `main_first`: 0 the main rank, 1 the first rank of each
    other machine (LOCAL_RANK 0; it fills that machine's cache), 2 every other rank."""
    if is_main():
        return 0
    return 1 if int(os.environ.get("LOCAL_RANK", "0")) == 0 else 2


def failures_everywhere(failure: str | None) -> list[str]:
    """Every rank's `failure` (None where it had none) on every rank, the Nones left out."""
    everyone = [None] * world_size()
    dist.all_gather_object(everyone, failure)
    return [f for f in everyone if f is not None]


@contextmanager
def main_first():
    """Run the block on the main rank, then on the first rank of each other machine, then on the
    rest; the ranks wait for each stage to end before the next begins.

    What a rank writes in the block (the tokenizer and token caches, the run directory) is
    written once per machine, by the first rank there, and only read by the ranks after it, so
    no two ranks write the same file. If the block fails on some rank, every rank raises at the
    end of that stage: the failed rank its own error, the main rank a LmtrainError naming it,
    the others ReportedByMainRank (quiet), and no later stage runs.
    """
    if not dist.is_initialized():
        yield
        return
    mine = preparation_stage()
    for stage in range(3):
        failure, error = None, None
        if stage == mine:
            try:
                yield
            except BaseException as e:
                failure, error = f"{type(e).__name__}: {e}", e
        failures = failures_everywhere(None if failure is None else f"rank {rank()} failed: {failure}")
        if failures:  # every rank is here: let the gather's traffic end everywhere before any rank leaves
            dist.barrier()
        if error is not None:
            raise error
        if failures:
            raise every_rank_error(failures[0])


def check_same(what: str, data: bytes) -> None:
    """Raise on every rank unless all ranks hold the same `data` (compared by sha256)."""
    if not dist.is_initialized():
        return
    digests = [None] * world_size()
    dist.all_gather_object(digests, hashlib.sha256(data).hexdigest())
    if len(set(digests)) > 1:
        dist.barrier()  # as in main_first: every rank leaves together
        raise every_rank_error(f"the ranks prepared different {what}; on several machines, point "
                               "LMTRAIN_CACHE at a directory they all share")


@torch.no_grad()
def check_in_sync(model: nn.Module) -> None:
    """Raise unless every rank holds the same weights (a float64 fingerprint of them); they can
    only drift apart if a training step bypassed DDP's forward and so its gradient averaging."""
    if not dist.is_initialized():
        return
    params = list(model.parameters())
    fingerprint = torch.stack([sum(p.double().sum() for p in params), sum(p.double().pow(2).sum() for p in params)])
    fingerprint = fingerprint.to(collective_device())
    gathered = [torch.empty_like(fingerprint) for _ in range(world_size())]
    dist.all_gather(gathered, fingerprint)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"rank {rank()}: the ranks' weights differ; gradients were not averaged over ranks")


class WindowForward(nn.Module):
    """One training window's forward as a single module call, so that DDP, which prepares its
    gradient averaging only inside its own forward, sees it:

    tokens (T, B), state -> last layer's output before and after dropout (T, B, H_L),
    logits (T, B, V), new state.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, state, compute_dtype: torch.dtype | None = None):
        raw, dropped, state = self.model.hidden(tokens, state, compute_dtype)
        return raw, dropped, self.model.decode(dropped, compute_dtype), state


def training_forward(model: nn.Module, seed: int) -> nn.Module:
    """The module the training loop calls on each window: WindowForward(model), wrapped in DDP in
    a process group (which first copies the main rank's weights to every rank).

    Each rank then reseeds torch from (seed, rank), so ranks draw independent dropout masks
    rather than repeating each other's.
    """
    step = WindowForward(model)
    if not dist.is_initialized():
        return step
    device = next(model.parameters()).device
    wrapped = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    if world_size() > 1:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank()]).generate_state(1)[0]))
    return wrapped


def on_main(path: Path) -> Path:
    """`path` on the main rank; os.devnull on the others, which write their copies of the logs nowhere."""
    return path if is_main() else Path(os.devnull)


# `lmtrain train --nproc N` runs this under sys.executable: torchrun itself (torch.distributed.run),
# only without its traceback when a rank fails, since that rank has printed its own error
TORCHRUN = "from lmtrain.training.distributed import run_torchrun; run_torchrun()"


def launch(processes: int, train_args: list[str], device: torch.device, batch_size: int) -> int:
    """Start `processes` ranks of `lmtrain train TRAIN_ARGS` on this machine with torchrun and wait
    for them; returns the exit code (that of the first rank to fail, if one did)."""
    require((processes >= 1, f"--nproc must be at least 1, got {processes}"),
            (not launched(), "--nproc starts torchrun itself: leave it out when running under torchrun"))
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and processes > gpus:
        raise LmtrainError(f"--nproc {processes} on CUDA needs {processes} GPUs, this machine shows {gpus} "
                           "(lower --nproc, or set train.device=cpu)")
    problem = batch_split_problem(batch_size, processes)
    if problem:
        raise LmtrainError(problem)
    command = [sys.executable, "-c", TORCHRUN, "--standalone", f"--nproc-per-node={processes}",
               "-m", "lmtrain", "train", *train_args]
    # the ranks import this same lmtrain, wherever it was imported from
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    # torchrun would set 1 and say so in a banner; each rank sets its torch threads itself anyway
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(processes)))
    child = subprocess.Popen(command, env=env)
    try:
        return child.wait()
    except KeyboardInterrupt:  # Ctrl-C reached torchrun and the ranks too: let them wind down
        return child.wait()


def run_torchrun() -> None:
    """torch.distributed.run's main on sys.argv[1:]; when a rank fails, exit with its code (2 after
    an `error: ...` line: bad input) instead of torchrun's traceback and code 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    # its "failed (exitcode: 2)" line repeats what the rank said; failures are reported below
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        main(sys.argv[1:])
    except ChildFailedError as e:
        failed_rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by signal N
        if code != USER_ERROR_EXIT:
            print(f"error: rank {failed_rank} exited with code {failure.exitcode} (its output is above)", file=sys.stderr)
        sys.exit(code)
    except SignalException as e:
        sys.exit(128 + int(e.sigval))
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
