"""last.pt's resume entry, checked whole before `train --resume` changes anything in the run.

lmtrain.training.setup.resume_run cuts the logs back, restores best.pt and removes partial files only after
these checks, which cover everything lmtrain.training.loop.train does with the entry when it starts
(`restore_loop`), so that a crafted or broken last.pt fails with the run as it was:

    resume      a dict with loop, hidden, average, trained, rng, data (and processes, optional)
    loop        every field of lmtrain.training.resume.LoopState and no other, typed and in range, its
                window and position within the epoch's window lengths
    hidden      None between epochs, else one state per layer: the layer's tensors, each
                (train.batch_size, its width: the layer's units; the qrnn's x_prev its inputs), float32 and finite
    average     NT-ASGD's {"average": one tensor per parameter, "count": int >= 1} with `trained`
    trained     the trained weights while `model` holds the average, checked as `model` is
    rng         the generators' states, set (and put back) exactly as lmtrain.training.resume sets them
    data        the sha256 of the training and validation tokens (hex)
    optimizer   loaded into the optimizer the config builds (over stand-ins: no storage);
                every state tensor of its parameter's shape, float32, finite; its hyperparameters
                those of the config

What needs the encoded corpus (the windows cover exactly its rows) is `check_resume_data`.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtrain.config import Config
from lmtrain.errors import LmtrainError
from lmtrain.model import (
    WEIGHT_DTYPE,
    Checked,
    Fields,
    check_floats,
    check_payload,
    check_state_dict,
    check_weight_dict,
    show,
    state_widths,
)
from lmtrain.training.loop import make_optimizer, min_train_tokens
from lmtrain.training.resume import LoopState, set_rng_states

ENTRY = ("loop", "hidden", "average", "trained", "rng", "data")
RNGS = ("python", "numpy", "torch", "cuda", "window_lengths")
SQUARES = ("exp_avg_sq", "max_exp_avg_sq")  # AdamW's: their square roots are taken
RNG_ERRORS = (TypeError, ValueError, KeyError, IndexError, OverflowError, RuntimeError, AttributeError)


def check_resume_payload(path: Path, payload: dict[str, Any]) -> tuple[Checked, LoopState]:
    """lmtrain.model.payload.check_payload and then every part of the resume entry; returns what it
    built and the loop state. Raises LmtrainError with one line naming `path` and the field."""
    checked = check_payload(path, payload)
    f = Fields(path)
    if "resume" not in payload:
        f.fail("the checkpoint has no 'resume' field: it was written by an lmtrain without exact resume and can be "
               "evaluated, not resumed")
    entry = f.dict("resume", payload["resume"], ENTRY)
    processes = f.int("resume['processes']", entry.get("processes", 1), 1)
    if processes != 1:  # its carried state is rank 0's share of the streams only
        raise LmtrainError(f"{path} was written by a run of {processes} processes (--nproc); --resume continues "
                           "single-process runs only: start it again, or train it in one process")
    loop = check_loop(f, entry["loop"])
    if payload["progress"]["step"] != loop.step:
        f.field("progress['step']", f"= {loop.step:,} in resume['loop'] but {payload['progress']['step']:,} here")
    check_hidden(f, entry["hidden"], loop, checked)
    check_average(f, payload, checked)
    check_rng(f, entry["rng"])
    if not isinstance(entry["data"], str) or not re.fullmatch(r"[0-9a-f]{64}", entry["data"]):
        f.field("resume['data']", f"must be the tokens' sha256 in hex, got {show(entry['data'])}")
    check_optimizer(f, payload["optimizer"], checked)
    return checked, loop


def check_loop(f: Fields, value: Any) -> LoopState:
    """Every LoopState field present with its type and range; window and position in the epoch."""
    loop = f.dict("resume['loop']", value)
    fields = {field.name: field.type for field in dataclasses.fields(LoopState)}
    for key in loop:
        if key not in fields:
            f.field("resume['loop']", f"has an unknown key {show(key)}")
    for name, kind in fields.items():
        where = f"resume['loop']['{name}']"
        if name not in loop:
            f.field("resume['loop']", f"has no key '{name}'")
        if kind == "int":
            f.int(where, loop[name], 1 if name == "epoch" else 0)
        elif kind == "float":
            f.number(where, loop[name], 0.0, allow_inf=name == "best_valid_nll")
    lengths, history = loop["lengths"], loop["valid_history"]
    if not isinstance(history, list):
        f.field("resume['loop']['valid_history']", f"must be a list, got {show(history)}")
    for k, nll in enumerate(history):
        f.number(f"resume['loop']['valid_history'][{k}]", nll, 0.0, allow_inf=True)
    window, position = loop["window"], loop["position"]
    if lengths is None:
        if window or position:
            f.field("resume['loop']", f"has window {window:,} and position {position:,} between epochs (lengths None)")
        return LoopState(**loop)
    if not isinstance(lengths, list) or not lengths:
        f.field("resume['loop']['lengths']", f"must be None or a list of window lengths, got {show(lengths)}")
    for k, length in enumerate(lengths):
        f.int(f"resume['loop']['lengths'][{k}]", length, 1)
    if window > len(lengths):
        f.field("resume['loop']['window']", f"= {window:,} is past the end of the epoch's {len(lengths):,} windows")
    if position != sum(lengths[:window]):
        f.field("resume['loop']['position']", f"= {position:,}, but the first {window:,} windows cover "
                f"{sum(lengths[:window]):,} rows")
    return LoopState(**{**loop, "lengths": list(lengths), "valid_history": list(history)})


def check_hidden(f: Fields, hidden: Any, loop: LoopState, checked: Checked) -> None:
    """The state carried into the next window: one per layer, each the cell's tensors (B, H_l)."""
    if hidden is None:
        if loop.lengths is not None:
            f.field("resume['hidden']", "is None in the middle of an epoch, whose next window carries a state")
        return
    layers = state_widths(checked.config.model)
    if not isinstance(hidden, (list, tuple)) or len(hidden) != len(layers):
        f.field("resume['hidden']", f"must be one state for each of the {len(layers)} layers, got {show(hidden)}")
    for i, (state, widths) in enumerate(zip(hidden, layers)):
        names = list(widths)
        if not isinstance(state, (list, tuple)) or len(state) != len(names) or \
                not all(isinstance(t, torch.Tensor) for t in state):
            f.field(f"resume['hidden'][{i}]", f"must be the cell's {len(names)} tensors ({', '.join(names)}), got {show(state)}")
        for j, (t, (name, width)) in enumerate(zip(state, widths.items())):
            want = (checked.config.train.batch_size, width)
            if tuple(t.shape) != want:
                f.field(f"resume['hidden'][{i}][{j}]", f"has shape {tuple(t.shape)}, the config gives {want} "
                        f"(train.batch_size, the width of the layer's {name})")
        check_floats(f, f"resume['hidden'][{i}]", dict(enumerate(state)))


def check_average(f: Fields, payload: dict[str, Any], checked: Checked) -> None:
    """NT-ASGD's average and the trained weights come together, only under ntasgd."""
    entry = payload["resume"]
    average, trained = entry["average"], entry["trained"]
    averaging = payload["progress"].get("averaging", average is not None)
    if (average is None) != (trained is None) or averaging != (average is not None):
        f.field("resume['average']", "resume['trained'] and progress['averaging'] disagree: NT-ASGD's average, the "
                "trained weights and the flag come together")
    if average is None:
        return
    if checked.config.train.optimizer != "ntasgd":
        f.field("resume['average']", f"is set, but train.optimizer is '{checked.config.train.optimizer}' (only ntasgd averages)")
    check_state_dict(f, "resume['trained']", check_weight_dict(f, "resume['trained']", trained), checked.shapes)
    f.dict("resume['average']", average, ("average", "count"))
    f.int("resume['average']['count']", average["count"], 1)
    params, tensors = checked.parameter_shapes, average["average"]
    if not isinstance(tensors, (list, tuple)) or len(tensors) != len(params) or \
            not all(isinstance(t, torch.Tensor) for t in tensors):
        f.field("resume['average']['average']", f"must be one tensor for each of the {len(params)} parameters, "
                f"got {show(tensors)}")
    for i, (t, shape) in enumerate(zip(tensors, params)):
        if tuple(t.shape) != shape:
            f.field(f"resume['average']['average'][{i}]", f"has shape {tuple(t.shape)}, the config gives {shape}")
    check_floats(f, "resume['average']['average']", dict(enumerate(tensors)))


def check_rng(f: Fields, value: Any) -> None:
    """The generators' states, set exactly as `train` will set them, then put back as they were."""
    rng = f.dict("resume['rng']", value, RNGS)
    cpu, want = rng["torch"], torch.get_rng_state()
    if not isinstance(cpu, torch.Tensor) or cpu.dtype != torch.uint8 or cpu.shape != want.shape:
        f.field("resume['rng']['torch']", f"must be torch's generator state (uint8, {want.numel():,} bytes), got {show(cpu)}")
    cuda = rng["cuda"]
    if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1
                                             for t in cuda):
        f.field("resume['rng']['cuda']", f"must be a list of CUDA generator states (uint8 tensors), got {show(cuda)}")
    python = rng["python"]
    if not isinstance(python, (list, tuple)) or len(python) != 3 or not isinstance(python[1], (list, tuple)):
        f.field("resume['rng']['python']", f"must be random.getstate()'s (version, state, gauss), got {show(python)}")
    uses_cuda = torch.cuda.is_available() and bool(cuda) and len(cuda) == torch.cuda.device_count()
    kept = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if uses_cuda else None)
    try:
        set_rng_states(rng, np.random.default_rng())
    except RNG_ERRORS as e:
        f.field("resume['rng']", f"cannot be set as the random generators' states ({first_line(e)})")
    finally:
        random.setstate(kept[0])
        np.random.set_state(kept[1])
        torch.set_rng_state(kept[2])
        if kept[3] is not None:
            torch.cuda.set_rng_state_all(kept[3])


def check_optimizer(f: Fields, stored: dict[str, Any], checked: Checked) -> None:
    """The optimizer's state_dict as `train` loads it: into the optimizer the config builds (here
    over stand-ins of the parameters' shapes that share one value: nothing is allocated), each
    state tensor of its parameter's shape (torch.optim does not check: a wrong one fails at the
    first step), float32 and finite, the hyperparameters the config's."""
    tc = checked.config.train
    one = torch.zeros((), dtype=WEIGHT_DTYPE)
    optimizer = make_optimizer(torch.nn.ParameterList(torch.nn.Parameter(one.expand(shape))
                                                      for shape in checked.parameter_shapes), tc)
    fresh = optimizer.state_dict()["param_groups"]
    groups = stored["param_groups"]
    for i, group in enumerate(groups):
        params = group.get("params")
        if not isinstance(params, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in params):
            f.field(f"optimizer['param_groups'][{i}]['params']", f"must be a list of parameter ids, got {show(params)}")
    ids = [k for group in groups for k in group["params"]]
    try:
        optimizer.load_state_dict(stored)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        f.field("optimizer", f"does not load into the {tc.optimizer} optimizer the config builds ({first_line(e)})")
    for i, (group, want) in enumerate(zip(groups, fresh)):
        for key, value in want.items():
            if key in ("params", "lr", "initial_lr") or key not in group:
                continue
            got = tuple(group[key]) if isinstance(group[key], list) else group[key]
            if isinstance(got, torch.Tensor) or type(got) is not type(value) or got != value:
                f.field(f"optimizer['param_groups'][{i}][{key!r}]", f"= {show(group[key])}, but the config's "
                        f"{tc.optimizer} optimizer has {show(value)}")
        f.number(f"optimizer['param_groups'][{i}]['lr']", group.get("lr"), 0.0)
    params = list(itertools.chain.from_iterable(g["params"] for g in optimizer.param_groups))
    by_id = dict(zip(ids, params))
    for k, state in stored["state"].items():
        where = f"optimizer['state'][{show(k)}]"
        if k not in by_id:
            f.field(where, "is the state of a parameter that no param_group holds")
        for key, value in f.dict(where, state).items():
            check_state_value(f, f"{where}[{show(key)}]", key, value, by_id[k])


def check_state_value(f: Fields, where: str, key: Any, value: Any, param: torch.Tensor) -> None:
    if value is None:  # SGD's momentum buffer when there is no momentum
        return
    if key == "step":
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or not value.is_floating_point():
                f.field(where, f"must be a float scalar, got {show(value)}")
            value = value.item()
        f.number(where, value, 0.0)
        return
    if not isinstance(value, torch.Tensor):
        f.field(where, f"must be a tensor, got {show(value)}")
    if value.shape != param.shape:
        f.field(where, f"has shape {tuple(value.shape)}, its parameter has {tuple(param.shape)}")
    check_floats(f, where.rpartition("[")[0], {key: value})
    if key in SQUARES and bool((value < 0).any()):
        f.field(where, "holds negative values (a running mean of squares)")


def check_resume_data(path: Path, loop: LoopState, config: Config, train_tokens: int) -> None:
    """What needs the encoded corpus: one batch's worth of tokens, and the epoch's windows covering
    exactly the training split's rows (train.batch_size streams), so that no window reads past it."""
    tc = config.train
    if train_tokens < min_train_tokens(tc):
        raise LmtrainError(f"{path}: the training split has {train_tokens:,} tokens, too few for one batch of "
                           f"train.batch_size {tc.batch_size} x train.bptt {tc.bptt}")
    rows = train_tokens // tc.batch_size
    if loop.lengths is not None and sum(loop.lengths) != rows:
        raise LmtrainError(f"{path}: field resume['loop']['lengths'] covers {sum(loop.lengths):,} rows, but the "
                           f"training split gives {rows:,} rows of train.batch_size {tc.batch_size} streams")


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
