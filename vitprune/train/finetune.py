"""Fine-tune a ViT (rewritten or not) on a labelled image folder, or label-free on any image folder, with
checkpoints, resume and DDP.

Loss: label-smoothed cross-entropy + ``distill_weight · T² · KL(teacher ‖ student)`` on logits (DynamicViT's
distillation term, arXiv 2106.02034). The default teacher of a rewritten model is a frozen copy of the model
before fine-tuning, run in eval mode inside :func:`vitprune.ops.modules.force_keep_all`: rewrite verified that
keep-all reproduces the original model exactly, so this *is* the original model, without its source.
AdamW (no decay on 1-d parameters and position / prefix-token embeddings), linear warm-up then cosine per
step, gradient clipping. Token-drop models can follow a Patch Sampling Schedule (arXiv 2208.09520,
:mod:`vitprune.train.keep_rate_schedule`): each ``TokenDrop``'s int ``keep_count`` is set before every step.

Label-free (``labels=False``, ``--no-labels``): a user with only unlabelled images distils the rewritten model
from the original. Any folder of images (:class:`vitprune.train.data.ImageFiles`), no classes, no cross-entropy:
the loss is the distillation term alone, by output kind (:func:`distillation_loss_for`: per image for logits
``[B, K]``, per pixel for dense logits ``[B, K, H, W]``, MSE for features; ``distill_weight`` unused), and the
teacher sees the student's augmented batch. Metrics: ``train_distill``; on ``val`` ``val_distill``,
``val_agreement`` (top-1 agreement with the teacher, per image or per pixel) and ``val_cosine``
(:func:`sharded_agreement`).

Determinism: each epoch draws all its randomness (sampler order, augmentation, random token selection,
dropout, worker seeds) from seeds derived from ``(seed, epoch, rank)``, so resuming from the checkpoint of
epoch ``e`` replays epochs ``e+1..`` bit for bit on CPU (same torch build and thread count).

Output folder ``OUT``: ``checkpoints/epoch-NNNN/{model.safetensors, state.pt}`` (written to a temporary folder,
then ``os.replace``-d; ``state.pt`` holds tensors and plain containers, read with ``weights_only=True``),
``metrics.jsonl`` (one JSON object per epoch) and the model in ``OUT/model`` (:func:`vitprune.save` replaces
a whole folder, so it cannot be ``OUT`` itself); ``vitprune eval OUT`` and :func:`vitprune.evaluate` accept ``OUT``.
Under ``torchrun``: DDP (gloo on CPU, NCCL on GPU) over ``DistributedSampler`` shards, ``batch_size`` per
process, metrics all-reduced, rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter, namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import fx, nn

from vitprune.device import autocast, dtype_name, grad_scaler, resolve_dtype
from vitprune.errors import VitpruneError
from vitprune.train.evaluate import (MODEL_SUBDIR, all_reduce_sum, check_classes, fork_rng, logits_of, pick_device,
                                     resolve_model_path, sharded_accuracy, token_drops)
from vitprune.io.outputs import clean_stale_temporaries
from vitprune.io.preprocess import metadata as preprocessing_metadata
from vitprune.io.preprocess import resolve_preprocessing
from vitprune.train.keep_rate_schedule import SCHEDULES, KeepSchedule, keep_count
from vitprune.train.progress import Progress
from vitprune.ops.modules import auxiliary_losses, force_keep_all, set_training_progress, token_modules
from vitprune.ops.token_ops import SELECTIONS

CHECKPOINTS, METRICS = "checkpoints", "metrics.jsonl"
_OUTPUT_ENTRIES = (CHECKPOINTS, METRICS, MODEL_SUBDIR)


def no_decay_names(gm: fx.GraphModule) -> set[str]:
    """Parameters the graph reads directly (``get_attr``): position embeddings, prefix tokens, norm scales,
    LayerScale gammas. Found from the graph, not from names; with 1-d parameters they get no weight
    decay (timm's convention). Weights of linear and conv layers live inside leaf modules and decay."""
    return {n.target for n in gm.graph.nodes if n.op == "get_attr"}


@dataclass
class FinetuneConfig:
    """Every option of a run (in each checkpoint; ``--resume`` needs the same). ``lr``/``min_lr``: peak / floor
    of the per-step cosine; ``warmup_epochs`` may be fractional; ``clip_grad``: max global L2 norm (None: off);
    ``scale``: fractions of the image area; keep rates: fractions of the patch tokens; ``batch_size``: per process."""

    data: str
    val: str | None = None
    labels: bool = True  # False: label-free distillation on any image folder (no cross-entropy, no classes)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    clip_grad: float | None = 1.0
    label_smoothing: float = 0.1
    distill: bool | None = None  # None: on when there is a teacher (a rewritten model, or `teacher=`)
    distill_weight: float = 0.5
    distill_temperature: float = 1.0
    teacher: str | None = None  # what the teacher was loaded from (a record)
    schedule: str | None = None  # None: TokenDrop modules keep their rewrite-time keep_count
    keep_start: float = 0.8
    keep_end: float = 0.0
    cooldown_epochs: int = 0
    bucket: float = 0.2
    selection: str | None = None  # overrides every TokenDrop's selection: "random" / "magnitude"
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None  # None: from the model (vitprune.io.preprocess), recorded in OUT/model
    std: tuple[float, ...] | None = None
    scale: tuple[float, float] = (0.6, 1.0)
    hflip: bool = False
    num_workers: int = 0
    seed: int = 0
    dtype: str | None = None  # autocast precision: float32, bfloat16, float16; None: bfloat16 on CUDA, else float32
    keep_checkpoints: int = 2  # keep the last N epoch checkpoints (0: all)

    def check(self) -> None:
        """Raises VitpruneError naming the first option out of range."""
        rules = {"epochs": (self.epochs >= 1, ">= 1"), "batch_size": (self.batch_size >= 1, ">= 1"),
                 "lr": (self.lr > 0, "> 0"), "min_lr": (0 <= self.min_lr <= self.lr, "in [0, lr]"),
                 "weight_decay": (self.weight_decay >= 0, ">= 0"), "warmup_epochs": (self.warmup_epochs >= 0, ">= 0"),
                 "clip_grad": (self.clip_grad is None or self.clip_grad > 0, "> 0"),
                 "label_smoothing": (0 <= self.label_smoothing < 1, "in [0, 1)"),
                 "distill_weight": (self.distill_weight >= 0, ">= 0"),
                 "distill_temperature": (self.distill_temperature > 0, "> 0"),
                 "schedule": (self.schedule in (None, *SCHEDULES), "one of " + ", ".join(SCHEDULES)),
                 "selection": (self.selection in (None, *SELECTIONS), "one of " + ", ".join(SELECTIONS)),
                 "num_workers": (self.num_workers >= 0, ">= 0"), "keep_checkpoints": (self.keep_checkpoints >= 0, ">= 0")}
        for name, (ok, want) in rules.items():
            if not ok:
                raise VitpruneError(f"--{name.replace('_', '-')} must be {want}, got {getattr(self, name)!r}")
        resolve_dtype(self.dtype)  # the message every command gives: --dtype: expected one of ...
        if not self.labels and self.distill is False:
            raise VitpruneError("--no-labels trains on the teacher's outputs alone; it cannot go with --no-distill")
        if self.schedule:
            KeepSchedule(self.schedule, self.keep_start, self.keep_end, self.epochs, 1, self.cooldown_epochs, self.bucket)

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass
class FinetuneResult:
    """The fine-tuned GraphModule (eval mode), ``OUT/model`` (None on ranks > 0), the per-epoch metrics
    (as in ``metrics.jsonl``) and the epoch of the checkpoint resumed from."""

    model: fx.GraphModule
    output: Path
    model_path: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up over ``warmup_steps``, then a
    cosine from 1 down to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))``, batch mean; logits ``[B, K]``."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor a loss reads from a model output: the output itself, else a mapping's (Hugging Face
    ``ModelOutput``'s) ``logits`` or first tensor value, else a tuple's / list's first tensor.

    Raises:
        VitpruneError: the output holds no tensor.
    """
    if isinstance(out, dict):
        out = [out["logits"]] if isinstance(out.get("logits"), torch.Tensor) else list(out.values())
    if isinstance(out, (tuple, list)):
        out = next((v for v in out if isinstance(v, torch.Tensor)), out)
    if not isinstance(out, torch.Tensor):
        raise VitpruneError(f"the model returns {type(out).__name__} without a tensor; fine-tuning needs one")
    return out


def distillation_loss_for(student_out: Any, teacher_out: Any, temperature: float) -> torch.Tensor:
    """The label-free distillation loss of a student output against its teacher's (same shape), by kind:

    - class logits ``[B, K]``: ``T² · KL(softmax(teacher / T) ‖ softmax(student / T))``, batch mean
      (:func:`distillation_loss`; DynamicViT's distillation term, arXiv 2106.02034);
    - dense logits ``[B, K, H, W]`` (any 4-d output): the same term per pixel, the softmax over ``K`` (dim 1),
      averaged over the ``B·H·W`` pixels;
    - any other output, e.g. token features ``[B, N, C]``: features have no softmax, so the mean squared error
      ``mean((student - teacher)²)`` over every element (``temperature`` unused). A 2-d output is always read
      as logits, pooled features ``[B, C]`` included.

    Tuples and mappings (Hugging Face ``ModelOutput``) are reduced to one tensor by :func:`output_tensor`.

    Raises:
        VitpruneError: the two outputs differ in shape.
    """
    s, t = output_tensor(student_out), output_tensor(teacher_out)
    if s.shape != t.shape:
        raise VitpruneError(f"the model returns {list(s.shape)} and the teacher {list(t.shape)}; distillation "
                            "needs outputs of the same shape")
    if s.dim() == 2:
        return distillation_loss(s, t, temperature)
    if s.dim() == 4:
        k = s.shape[1]
        return distillation_loss(s.movedim(1, -1).reshape(-1, k), t.movedim(1, -1).reshape(-1, k), temperature)
    return F.mse_loss(s, t)


@torch.no_grad()
def sharded_agreement(model: nn.Module, teacher: nn.Module, teacher_ctx: Callable[[], Any], dataset, batch_size: int,
                      temperature: float, rank: int = 0, world: int = 1, device: torch.device = torch.device("cpu"),
                      dtype: torch.dtype = torch.float32, seed: int = 0, num_workers: int = 0, prefix: str = "val_"
                      ) -> dict[str, Any]:
    """Eval-mode agreement of ``model`` with ``teacher`` (run inside ``teacher_ctx()``) on ``dataset``:
    ``{distill, agreement, cosine, images}`` (keys prefixed). ``distill``: mean :func:`distillation_loss_for`;
    ``agreement``: fraction of equal argmaxes over dim 1, per image for ``[B, K]``, per pixel for
    ``[B, K, H, W]`` (None for other outputs); ``cosine``: mean cosine similarity of each image's flattened output
    to the teacher's. Sharded, seeded and under autocast to ``dtype`` as
    :func:`vitprune.train.evaluate.sharded_accuracy`."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=list(range(rank, len(dataset), world)),
                                         num_workers=num_workers)
    sums = torch.zeros(5, dtype=torch.float64)  # distill, equal argmaxes, argmaxes, cosine (sums), images
    was_training = model.training
    model.eval()
    with fork_rng(device):
        torch.manual_seed(seed)
        for x, _ in loader:
            x = x.to(device)
            with autocast(device, dtype):
                s = output_tensor(model(x)).float()
                with teacher_ctx():
                    t = output_tensor(teacher(x)).float()
            same = s.argmax(1) == t.argmax(1) if s.dim() in (2, 4) else torch.zeros(0)
            sums += torch.tensor([distillation_loss_for(s, t, temperature).item() * len(x), same.sum().item(),
                                  same.numel(), F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1).sum().item(),
                                  len(x)], dtype=torch.float64)
    model.train(was_training)
    kd, hits, positions, cosine, n = all_reduce_sum(sums, world, device).tolist()
    return {f"{prefix}distill": kd / n, f"{prefix}agreement": hits / positions if positions else None,
            f"{prefix}cosine": cosine / n, f"{prefix}images": int(n)}


@torch.no_grad()
def _output_shape(model: nn.Module, dataset) -> list[int]:
    """The per-image shape of ``model``'s eval-mode output on ``dataset``'s first image, on the CPU (global RNG
    untouched)."""
    was = model.training
    with fork_rng(torch.device("cpu")):
        shape = list(output_tensor(model.eval()(dataset[0][0][None])).shape[1:])
    model.train(was)
    return shape


def make_teacher(model: nn.Module) -> tuple[nn.Module, Callable[[], Any]]:
    """A frozen eval-mode deep copy of ``model`` and the context to run it in: keep-all when it has token
    modules, so for a vitprune-rewritten model it computes the original model's output."""
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    return teacher, (lambda: force_keep_all(teacher)) if token_modules(teacher) else contextlib.nullcontext


def as_graph_module(model: nn.Module, input_size: Sequence[int] | None = None) -> fx.GraphModule:
    """A deep copy of ``model`` as a GraphModule (captured if need be) whose recipe has its input shape,
    so :func:`vitprune.save` can verify and save it like a rewritten model."""
    from vitprune.frontends.capture import capture
    from vitprune.io.origin import default_input_size, example_input, source_of

    size = list(input_size or default_input_size(model))
    gm = capture(copy.deepcopy(model), example_input(model, tuple(size)))  # export when tracing fails
    meta = dict(getattr(model, "meta", {}).get("vitprune") or {"source": source_of(model), "recipe": []})
    if input_size is not None:  # what the user asked for, over what the model recorded (checked on an image later)
        meta["input_shape"] = [1, *size]
    meta.setdefault("input_shape", [1, *size])
    meta.setdefault("preprocessing", preprocessing_metadata(model))
    gm.meta["vitprune"] = meta
    return gm


def _fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode() + t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_009 + rank) % 2**63


def _last_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / CHECKPOINTS).glob("epoch-[0-9][0-9][0-9][0-9]")
                  if (p / "model.safetensors").is_file() and (p / "state.pt").is_file())
    return done[-1] if done else None


def _check_output(out: Path, protect: Sequence[Any], resume: bool, overwrite: bool) -> None:
    """Refuse an output that is, holds or lies in an input, or an existing folder that is not ours to replace."""
    res = out.resolve()
    for p in protect:
        if isinstance(p, (str, os.PathLike)) and not str(p).startswith("timm:") and Path(p).exists():
            q = Path(p).resolve()
            if res == q or q in res.parents or res in q.parents:
                raise VitpruneError(f"the output {out} overlaps the input {p}; choose another -o")
    if not out.parent.is_dir():
        raise VitpruneError(f"the folder {out.parent} for -o does not exist")
    from vitprune.io.outputs import check_writable_folder, refuse_unless_replaceable

    check_writable_folder(out.parent)
    if out.is_dir():
        check_writable_folder(out)
    if (out.parent / "graph.json").is_file() or (out.parent / "vitprune.json").is_file():
        raise VitpruneError(f"the output {out} is inside the model folder {out.parent}; choose another -o")
    if out.is_dir() and (out / MODEL_SUBDIR).exists() and (overwrite or resume):
        refuse_unless_replaceable(out / MODEL_SUBDIR)  # OUT/model is replaced at the end: only if vitprune saved it
    if resume:
        if _last_checkpoint(out) is None:
            raise VitpruneError(f"--resume: no checkpoint in {out / CHECKPOINTS} to resume from")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise VitpruneError(f"{out} exists; pass --resume to continue its run or --overwrite to start again")
        if not out.is_dir() or any(e.name not in _OUTPUT_ENTRIES and not e.name.startswith(".") for e in out.iterdir()):
            raise VitpruneError(f"{out} exists and is not a vitprune finetune output; refusing to replace it")


def _clear_output(out: Path) -> None:
    out.mkdir(exist_ok=True)
    for name in _OUTPUT_ENTRIES:  # an earlier run's (only with --overwrite, checked by _check_output)
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        (out / name).unlink(missing_ok=True)


def _save_checkpoint(out: Path, epoch: int, model: nn.Module, opt, sched, state: dict[str, Any], keep: int) -> None:
    from safetensors.torch import save_model

    ckdir, final = out / CHECKPOINTS, out / CHECKPOINTS / f"epoch-{epoch:04d}"
    ckdir.mkdir(exist_ok=True)
    clean_stale_temporaries(final, allowed={"model.safetensors", "state.pt"})  # a killed run's half checkpoint
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=ckdir))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        torch.save({**state, "epoch": epoch, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng},
                   tmp / "state.pt")
        if final.exists():  # an epoch run again after an interruption
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(ckdir.glob("epoch-[0-9][0-9][0-9][0-9]"))[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(out: Path, model: nn.Module, opt, sched, expect: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_model

    path = _last_checkpoint(out)
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VitpruneError(f"--resume: cannot read {path / 'state.pt'}: {str(exc).splitlines()[0]}") from exc
    have = {"labels": True, **state["config"]}  # a run from before the option was labelled
    have, want = dict(have, world_size=state["world_size"], model=state["model_fingerprint"]), \
        dict(expect["config"], world_size=expect["world_size"], model=expect["model_fingerprint"])
    for key in [k for k in want if k != "keep_checkpoints" and have.get(k) != want[k]][:1]:
        raise VitpruneError(f"--resume: {path} was written with {key}={have.get(key)!r}, this run has "
                            f"{key}={want[key]!r}; resume with the same MODEL, options and number of processes")
    load_model(model, str(path / "model.safetensors"), strict=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])  # each epoch re-seeds anyway; restored for completeness
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def _init_distributed(device: str | torch.device | None) -> tuple[torch.device, int, int, bool]:
    """``(device, rank, world_size, we_started_the_group)``; joins torchrun's group when WORLD_SIZE > 1."""
    dev = pick_device(device)
    if dev.type == "cuda" and device is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    if dist.is_available() and dist.is_initialized():
        return dev, dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return dev, 0, 1, False
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev, dist.get_rank(), dist.get_world_size(), True


def finetune(
    model: nn.Module,
    data: str | os.PathLike,
    output: str | os.PathLike,
    *,
    val: str | os.PathLike | None = None,
    teacher: nn.Module | str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    protect: Sequence[Any] = (),
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> FinetuneResult:
    """Fine-tune ``model`` on the ImageFolder ``data`` (label-free: any image folder); save it to ``output/model``
    (see the module docstring).

    Args:
        model: any ViT vitprune can capture, rewritten or not (deep-copied, never modified).
        data, val: ImageFolder layouts (:mod:`vitprune.train.data`); ``val``, evaluated after every epoch, needs
            the same classes. With ``labels=False``: any folders of images (:class:`vitprune.train.data.ImageFiles`).
        teacher: a module or anything :func:`vitprune.load` reads; default: the original model of a rewritten one.
        resume: continue from ``output``'s last checkpoint (same options, model and process count).
        overwrite: replace an earlier run in ``output`` (only if it is one).
        device: default ``cuda`` (``cuda:LOCAL_RANK`` under torchrun) when available, else CPU.
        dtype (in ``options``): ``float32``, ``bfloat16`` or ``float16`` (a name or a torch dtype): the forward runs
            under autocast to it, the weights and optimizer stay float32, float16 on CUDA with a ``GradScaler``
            (:mod:`vitprune.device`); default bfloat16 on CUDA, float32 on the CPU.
        progress: on stderr, a tqdm bar per epoch on a terminal, else a plain line every 10 s and at each
            epoch's end (:class:`vitprune.train.progress.Progress`); default: on rank 0.
        protect: input paths ``output`` must not overlap (``data``, ``val`` and ``teacher`` always are).
        log: called with one-line messages (resume point, saved model).
        **options: :class:`FinetuneConfig` fields (``epochs``, ``lr``, ``schedule``, ``keep_start``, ...).

    Raises:
        VitpruneError: an option out of range; a data folder missing, without classes or images, with other
            classes than ``val`` or more than the model's outputs; ``labels=False`` with ``distill=False``, without
            a teacher (no ``teacher`` and no token modules) or with a teacher of another output shape; an output
            refused; ``resume`` without a checkpoint or with other options; a schedule or selection without
            ``TokenDrop``; a non-finite loss.
    """
    from vitprune.train.data import check_images_open, match_classes, recorded_classes, seeded_loader, train_val_folders
    from vitprune.io.load import load

    say = log or (lambda _msg: None)
    if isinstance(teacher, (str, os.PathLike)):
        options["teacher"] = str(teacher)
    if isinstance(options.get("dtype"), torch.dtype):
        options["dtype"] = dtype_name(resolve_dtype(options["dtype"]))
    cfg = FinetuneConfig(data=os.path.abspath(data), val=os.path.abspath(val) if val else None, **options)
    cfg.check()
    out = Path(output)
    dev, rank, world, own_group = _init_distributed(device)
    barrier = dist.barrier if world > 1 else (lambda: None)
    try:
        _check_output(out, [cfg.data, cfg.val, teacher, *protect], resume, overwrite)

        # Model, data, teacher: every check before anything is written.
        torch.manual_seed(cfg.seed)
        student = as_graph_module(model, cfg.input_size)
        size = tuple(student.meta["vitprune"]["input_shape"][1:])
        prep = resolve_preprocessing(student, cfg.mean, cfg.std, channels=size[0])
        cfg.mean, cfg.std = prep.mean, prep.std  # what the model is trained with, recorded with it below
        student.meta["vitprune"]["preprocessing"] = {**prep.to_dict(), "source": "saved model"}
        if not cfg.labels and teacher is None and not token_modules(student):
            raise VitpruneError("a label-free run (--no-labels) learns from a teacher: pass a rewritten model (its "
                                "teacher is its original) or --teacher; this model has no vitprune token modules")
        train_ds, val_ds = train_val_folders(cfg.data, cfg.val, size, cfg.mean, cfg.std, cfg.scale, cfg.hflip,
                                             labels=cfg.labels)
        if cfg.labels:
            outputs = check_classes(student, train_ds, torch.device("cpu"))
            if len(train_ds.classes) < 2:
                raise VitpruneError(f"--data: {data} has one class folder ({train_ds.classes[0]!r}); "
                                    "fine-tuning a classifier needs at least two")
            recorded = recorded_classes(student)
            match_classes(train_ds, recorded, outputs, "--data")
            if val_ds is not None:
                match_classes(val_ds, recorded, outputs, "--val")
            student.meta["vitprune"]["classes"] = recorded or list(train_ds.classes)  # saved with the model
        else:  # no classes: any output shape, the teacher's must be the same
            shape = _output_shape(student, train_ds)
        for ds, option in ((train_ds, "--data"), (val_ds, "--val")):
            if ds is not None:
                check_images_open(ds, option)
        drops = token_drops(student)
        if (cfg.schedule or cfg.selection) and not drops:
            raise VitpruneError(f"--{'schedule' if cfg.schedule else 'selection'} needs a token-drop model "
                                "(vitprune rewrite --method token-drop); this model has no TokenDrop module")
        for m in drops:
            m.selection = cfg.selection or m.selection
        rewrite_counts = [m.keep_count for m in drops]
        student.to(dev)
        for t in student.state_dict().values() if world > 1 else []:
            dist.broadcast(t, 0)  # every rank starts from rank 0's weights (DDP would too), the teacher's included
        distill = cfg.distill if cfg.distill is not None else bool(teacher is not None or token_modules(student))
        teacher_ctx: Callable[[], Any] = contextlib.nullcontext
        if distill and teacher is None:
            teacher, teacher_ctx = make_teacher(student)
        elif distill:
            teacher = copy.deepcopy(teacher if isinstance(teacher, nn.Module) else load(resolve_model_path(teacher)))
            teacher.eval().requires_grad_(False)
            if cfg.labels and check_classes(teacher, train_ds, torch.device("cpu"), "--data") != outputs:
                raise VitpruneError("the teacher and the model have different numbers of outputs")
            if not cfg.labels and (got := _output_shape(teacher, train_ds)) != shape:
                raise VitpruneError(f"the teacher returns {got} per image and the model {shape}; label-free "
                                    "distillation needs outputs of the same shape")
        teacher = teacher.to(dev) if distill else None

        # Optimiser, schedules, sampler.
        named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        plain = no_decay_names(student)
        opt = torch.optim.AdamW([
            {"params": [p for n, p in named if p.ndim > 1 and n not in plain], "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in named if p.ndim <= 1 or n in plain], "weight_decay": 0.0}], lr=cfg.lr)
        generator = torch.Generator()
        sampler: Any = torch.utils.data.DistributedSampler(train_ds, world, rank, shuffle=True, seed=cfg.seed) \
            if world > 1 else torch.utils.data.RandomSampler(train_ds, generator=generator)
        spe = math.ceil(len(sampler) / cfg.batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, cfg.epochs * spe, round(cfg.warmup_epochs * spe), cfg.min_lr / cfg.lr))
        keep = KeepSchedule(cfg.schedule, cfg.keep_start, cfg.keep_end, cfg.epochs, spe, cfg.cooldown_epochs,
                            cfg.bucket) if cfg.schedule else None
        # float32 master weights, the forward under autocast; a loss scaler for float16 on CUDA (vitprune.device)
        amp = resolve_dtype(cfg.dtype, torch.bfloat16 if dev.type == "cuda" else torch.float32)
        scaler = grad_scaler(dev, amp)
        # OUT is made (an earlier run's files removed) only once the first epoch is done: epoch 1 reads every
        # training and validation image, so a corrupt one fails the run with nothing written.
        ddp = nn.parallel.DistributedDataParallel(student, device_ids=[dev.index] if dev.type == "cuda" else None) \
            if world > 1 else student
        loop = _Loop(cfg, world, dev, amp, scaler, ddp, teacher, teacher_ctx, drops, keep, opt, sched, spe,
                     progress if progress is not None else rank == 0)

        # Resume, then one checkpoint and one metrics line per epoch.
        history: list[dict[str, Any]] = []
        expect = {"config": cfg.to_json(), "world_size": world, "model_fingerprint": _fingerprint(student)}
        start = resumed_from = None
        if resume:
            state = _load_checkpoint(out, student, opt, sched, expect)
            start = resumed_from = int(state["epoch"])
            history = list(state["history"])
            if rank == 0:  # drop lines of an epoch whose checkpoint was never written
                (out / f".{METRICS}.tmp").write_text("".join(json.dumps(h) + "\n" for h in history))
                os.replace(out / f".{METRICS}.tmp", out / METRICS)
            say(f"resumed from {_last_checkpoint(out)} ({start} of {cfg.epochs} epochs done)")
        if rank == 0:
            say(f"preprocessing    {prep.describe()}")  # after every check: a refused run's error stays one line
            say(f"training {cfg.epochs - (start or 0)} epochs x {spe} steps of {cfg.batch_size} on {len(train_ds)} images"
                f"{f' in {world} processes' if world > 1 else ''}, "
                + (f"distillation {'on' if teacher is not None else 'off'}" if cfg.labels else "label-free distillation"))
        for epoch in range(start or 0, cfg.epochs):
            seed = _epoch_seed(cfg.seed, epoch, rank)
            torch.manual_seed(seed)
            generator.manual_seed(seed)
            if world > 1:
                sampler.set_epoch(epoch)
            loader = seeded_loader(train_ds, cfg.batch_size, sampler, cfg.num_workers, seed, dev.type == "cuda")
            record = _train_epoch(loop, loader, epoch)
            if val_ds is not None:
                for m, k in zip(drops, rewrite_counts):  # validate as the model will be saved
                    m.keep_count = k
                if cfg.labels:
                    record.update(sharded_accuracy(student, val_ds, cfg.batch_size, rank, world, dev, amp, cfg.seed,
                                                   cfg.num_workers, prefix="val_"))
                else:
                    record.update(sharded_agreement(student, teacher, teacher_ctx, val_ds, cfg.batch_size,
                                                    cfg.distill_temperature, rank, world, dev, amp, cfg.seed,
                                                    cfg.num_workers))
            history.append(record)
            if rank == 0:
                if not resume and epoch == 0:
                    _clear_output(out)
                _save_checkpoint(out, epoch + 1, student, opt, sched, {**expect, "history": history}, cfg.keep_checkpoints)
                with open(out / METRICS, "a") as f:
                    f.write(json.dumps(record) + "\n")

        for m, k in zip(drops, rewrite_counts):
            m.keep_count = k
        student.eval()
        model_path = None
        if rank == 0:
            from vitprune.io.save import save

            report = dict(student.meta["vitprune"].get("report") or {})
            report["finetune"] = {"config": cfg.to_json(), "world_size": world, "last_epoch": history[-1:]}
            model_path = save(student, out / MODEL_SUBDIR, overwrite=True, report=report)
            say(f"saved {model_path}")
        barrier()
        return FinetuneResult(student, out, model_path, history, resumed_from)
    finally:
        if own_group:
            dist.destroy_process_group()


# What one training epoch needs; ``model`` is the student or its DDP wrapper, ``spe`` the steps per epoch.
# ``amp`` is the autocast dtype, ``scaler`` the GradScaler (enabled for float16 on CUDA only).
_Loop = namedtuple("_Loop", "cfg world dev amp scaler model teacher teacher_ctx drops keep opt sched spe show")


def _train_epoch(loop: _Loop, loader, epoch: int) -> dict[str, Any]:
    """One epoch of optimizer steps; returns its metrics (all-reduced over ranks)."""
    cfg, dev, drops = loop.cfg, loop.dev, loop.drops
    loop.model.train()
    sums = torch.zeros(5, dtype=torch.float64)  # loss, ce, kd (sums over images), top-1 hits, images
    rates: Counter = Counter()
    bar = Progress(total=loop.spe, desc=f"finetune epoch {epoch + 1}/{cfg.epochs}", unit="steps", enabled=loop.show)
    started = time.perf_counter()
    for i, (x, y) in enumerate(bar.wrap(loader)):
        if loop.keep is not None:
            rate = loop.keep.rate(epoch * loop.spe + i)
            for m in drops:
                m.keep_count = keep_count(m.num_patches, rate)
        else:  # the rewrite's own static count (PatchDropout), or every token
            rate = drops[0].keep_count / drops[0].num_patches if drops else 1.0
        rates[f"{rate:.4g}"] += 1
        set_training_progress(loop.model, (epoch * loop.spe + i) / max(1, cfg.epochs * loop.spe))  # lifespan tau
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with autocast(dev, loop.amp):
            if cfg.labels:
                logits = logits_of(loop.model(x)).float()
                ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                kd = torch.zeros((), device=dev)
                if loop.teacher is not None:
                    with torch.no_grad(), loop.teacher_ctx():
                        target = logits_of(loop.teacher(x)).float()
                    # outside no_grad: the KL term trains the student (it used to be computed without a gradient)
                    kd = distillation_loss(logits, target, cfg.distill_temperature)
                loss = ce + cfg.distill_weight * kd
            else:  # the teacher sees the same augmented batch; its output is the only target
                out = output_tensor(loop.model(x)).float()
                with torch.no_grad(), loop.teacher_ctx():
                    target = output_tensor(loop.teacher(x)).float()
                kd = distillation_loss_for(out, target, cfg.distill_temperature)  # outside no_grad: it is the loss
                ce, loss = torch.zeros((), device=dev), kd
            aux = auxiliary_losses(loop.model)  # lifespan-gather's FLOPs budget loss
            if aux is not None:
                loss = loss + aux
        loop.opt.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()  # a disabled scaler (all but float16 on CUDA) passes the loss through
        if cfg.clip_grad:
            loop.scaler.unscale_(loop.opt)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(loop.model.parameters(), cfg.clip_grad)
        loop.scaler.step(loop.opt)  # skips the step when float16 gradients overflowed
        loop.scaler.update()
        loop.sched.step()
        n = len(y)
        hits = (logits.argmax(1) == y).sum().item() if cfg.labels else 0
        sums += torch.tensor([loss.item() * n, ce.item() * n, kd.item() * n, hits, n], dtype=torch.float64)
        if loop.show:
            acc = {"acc": f"{sums[3] / sums[4]:.3f}"} if cfg.labels else {}
            bar.set_postfix(loss=f"{sums[0] / sums[4]:.3f}", **acc, keep=f"{rate:.2f}",
                            img_s=f"{sums[4] * loop.world / (time.perf_counter() - started):.0f}")
    bar.close()
    seconds = time.perf_counter() - started
    sums = all_reduce_sum(sums, loop.world, dev)
    if not math.isfinite(float(sums[0])):
        raise VitpruneError(f"the training loss is not finite in epoch {epoch + 1}; lower --lr or check the data")
    loss, ce, kd, hits, n = (float(v) for v in sums)
    return {"epoch": epoch + 1, "steps": loop.spe, "lr": loop.opt.param_groups[0]["lr"], "train_loss": loss / n,
            "train_ce": ce / n if cfg.labels else None, "train_distill": kd / n if loop.teacher is not None else None,
            "train_top1": hits / n if cfg.labels else None,
            "train_images": int(n), "seconds": seconds, "images_per_s": n / seconds,
            "keep_rate_mean": sum(float(r) * c for r, c in rates.items()) / sum(rates.values()),
            "keep_rate_steps": dict(sorted(rates.items()))}
