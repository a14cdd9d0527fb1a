"""Fine-tune a ViT (rewritten or not) on a labelled image folder, with checkpoints, resume and DDP.

Loss: label-smoothed cross-entropy plus, optionally, ``distill_weight * T² * KL(teacher || student)``
on logits at temperature ``T`` (DynamicViT's distillation term, arXiv 2106.02034; DeiT-style soft
distillation). The default teacher of a rewritten model is a frozen deep copy of the model as it was
before fine-tuning, run in eval mode inside :func:`vitprune.modules.force_keep_all`: vitprune verified
at rewrite time that keep-all reproduces the original model exactly, so this *is* the original model,
without its source code. Optimiser: AdamW (no weight decay on 1-d parameters and on position / prefix
token embeddings), linear warm-up then cosine decay per step, gradient-norm clipping.

Token-drop models (``TokenDrop`` modules: PatchDropout, arXiv 2208.07220) can follow a Patch Sampling
Schedule (arXiv 2208.09520, :mod:`vitprune.keep_schedule`): each ``TokenDrop``'s int ``keep_count``
is set before every step; afterwards the rewrite's own ``keep_count`` is put back for saving.

Determinism: every epoch draws its randomness (sampler order, augmentation, random token selection,
dropout, worker seeds) from seeds derived from ``(seed, epoch, rank)`` only, so an epoch does not
depend on what ran before it, and ``resume=True`` from the checkpoint written after epoch ``e``
replays epochs ``e+1..`` bit for bit on CPU (same torch build and thread count). On CUDA, bf16
autocast is used and kernels need not be deterministic.

Output folder ``OUT``: ``OUT/checkpoints/epoch-NNNN/{model.safetensors,state.pt}`` (written to a temporary
folder, then ``os.replace``-d into place; ``state.pt`` holds only tensors and plain containers and is
read back with ``weights_only=True``), ``OUT/metrics.jsonl`` (one JSON object per epoch) and the final
model in ``OUT/model`` (:func:`vitprune.save`). The model is one level down because ``vitprune.save``
replaces a whole folder, which would take the checkpoints with it; ``vitprune eval OUT`` and
:func:`vitprune.evaluate` accept ``OUT`` and read ``OUT/model``.

Data-parallel: under ``torchrun`` (``WORLD_SIZE > 1``) each process trains on its ``DistributedSampler``
shard inside ``DistributedDataParallel`` (gloo on CPU, NCCL on GPU); ``batch_size`` is per process;
metrics are all-reduced; rank 0 alone writes checkpoints, metrics and the model. ``--resume`` on
several machines needs ``OUT`` on a shared file system.
"""

from __future__ import annotations

import copy
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import fx, nn

from vitprune.errors import VitpruneError
from vitprune.evaluate import (MODEL_SUBDIR, accuracy_counts, check_classes, logits_of, pick_device,
                               resolve_model_path, token_drops)
from vitprune.images import DEFAULT_MEAN, DEFAULT_STD
from vitprune.keep_schedule import SCHEDULES, KeepSchedule, keep_count
from vitprune.modules import force_keep_all, token_modules
from vitprune.token_ops import SELECTIONS

CHECKPOINTS, METRICS = "checkpoints", "metrics.jsonl"
_OUTPUT_ENTRIES = {CHECKPOINTS, METRICS, MODEL_SUBDIR}
_NO_DECAY = ("pos_embed", "cls_token", "dist_token", "reg_token")
_NOT_COMPARED_ON_RESUME = {"keep_checkpoints"}


@dataclass
class FinetuneConfig:
    """Every option of a fine-tuning run (stored in each checkpoint; ``--resume`` requires the same).

    Units: ``lr``/``min_lr`` per step (peak / floor of the cosine), ``warmup_epochs`` epochs (may be
    fractional), ``clip_grad`` max global L2 norm (None: off), ``scale`` fractions of the image area,
    keep rates fractions of the patch tokens, ``batch_size`` images per process.
    """

    data: str
    val: str | None = None
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
    teacher: str | None = None  # what the teacher was loaded from (record only)
    schedule: str | None = None  # None: TokenDrop modules keep their rewrite-time keep_count
    keep_start: float = 0.8
    keep_end: float = 0.0
    cooldown_epochs: int = 0
    bucket: float = 0.2
    selection: str | None = None  # override every TokenDrop's selection ("random" / "magnitude")
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    scale: tuple[float, float] = (0.6, 1.0)
    hflip: bool = False
    num_workers: int = 0
    seed: int = 0
    amp: bool | None = None  # None: bf16 autocast on CUDA, off on CPU
    keep_checkpoints: int = 2  # the last N epoch checkpoints are kept (0: all)

    def check(self) -> None:
        """Raises VitpruneError naming the first option out of range."""
        rules = [("epochs", self.epochs >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
                 ("lr", self.lr > 0, "> 0"), ("min_lr", 0 <= self.min_lr <= self.lr, "in [0, lr]"),
                 ("weight_decay", self.weight_decay >= 0, ">= 0"), ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
                 ("clip_grad", self.clip_grad is None or self.clip_grad > 0, "> 0"),
                 ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
                 ("distill_weight", self.distill_weight >= 0, ">= 0"),
                 ("distill_temperature", self.distill_temperature > 0, "> 0"),
                 ("schedule", self.schedule in (None, *SCHEDULES), f"one of {', '.join(SCHEDULES)}"),
                 ("selection", self.selection in (None, *SELECTIONS), f"one of {', '.join(SELECTIONS)}"),
                 ("num_workers", self.num_workers >= 0, ">= 0"), ("keep_checkpoints", self.keep_checkpoints >= 0, ">= 0")]
        for name, ok, want in rules:
            if not ok:
                raise VitpruneError(f"--{name.replace('_', '-')} must be {want}, got {getattr(self, name)!r}")
        if self.schedule:
            KeepSchedule(self.schedule, self.keep_start, self.keep_end, self.epochs, 1, self.cooldown_epochs, self.bucket)

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass
class FinetuneResult:
    """``model``: the fine-tuned GraphModule (eval mode); ``model_path``: ``OUT/model`` (None on ranks > 0);
    ``history``: the per-epoch metrics (as in ``metrics.jsonl``); ``resumed_from``: the checkpoint epoch, if any."""

    model: fx.GraphModule
    output: Path
    model_path: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up over ``warmup_steps``, then
    cosine from 1 to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) || softmax(student/T))``, mean over the batch (logits ``[B, K]``)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)


def make_teacher(model: nn.Module) -> tuple[nn.Module, Callable[[], Any]]:
    """A frozen eval-mode deep copy of ``model`` and the context to run it in (keep-all for token modules).

    For a vitprune-rewritten model this computes the original model's output (keep-all is verified exact).
    """
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if token_modules(teacher):
        return teacher, lambda: force_keep_all(teacher)
    return teacher, contextlib.nullcontext


def as_graph_module(model: nn.Module, input_size: Sequence[int] | None = None) -> fx.GraphModule:
    """A deep copy of ``model`` as a GraphModule (captured if needed) whose recipe records its input shape,
    so :func:`vitprune.save` can verify and save it."""
    from vitprune.capture import capture
    from vitprune.load import default_input_size, source_of

    size = list(input_size or default_input_size(model))
    gm = capture(copy.deepcopy(model))
    meta = dict(getattr(model, "meta", {}).get("vitprune") or {"source": source_of(model), "recipe": []})
    meta.setdefault("input_shape", [1, *size])
    gm.meta["vitprune"] = meta
    return gm


def _fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_009 + rank) % (2**63)


def _seed_worker(worker_id: int) -> None:  # numpy / random in loader workers, from the worker's torch seed
    import random

    import numpy as np

    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def _last_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / CHECKPOINTS).glob("epoch-[0-9][0-9][0-9][0-9]")
                  if (p / "model.safetensors").is_file() and (p / "state.pt").is_file())
    return done[-1] if done else None


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def _check_output(out: Path, protect: Sequence[Any], resume: bool, overwrite: bool) -> None:
    """Refuse an output that is, holds or lies inside an input, or an existing folder we may not touch."""
    res = out.resolve()
    for p in protect:
        if isinstance(p, (str, os.PathLike)) and not str(p).startswith("timm:") and Path(p).exists():
            q = Path(p).resolve()
            if _inside(res, q) or _inside(q, res):
                raise VitpruneError(f"the output {out} overlaps the input {p}; choose another -o")
    if not out.parent.is_dir():
        raise VitpruneError(f"the folder {out.parent} for -o does not exist")
    if resume:
        if _last_checkpoint(out) is None:
            raise VitpruneError(f"--resume: no checkpoint in {out / CHECKPOINTS} to resume from")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise VitpruneError(f"{out} exists; pass --resume to continue its run or --overwrite to start again")
        if not out.is_dir() or any(e.name not in _OUTPUT_ENTRIES and not e.name.startswith(".") for e in out.iterdir()):
            raise VitpruneError(f"{out} exists and is not a vitprune finetune output; refusing to replace it")


def _init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """``(rank, world_size, we_started_the_group)``: joins the torchrun process group when WORLD_SIZE > 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _all_reduce(t: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    if world > 1:
        t = t.to(device)
        dist.all_reduce(t)
    return t.cpu()


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_checkpoint(out: Path, epoch: int, model: nn.Module, opt, sched, state: dict[str, Any], keep: int) -> None:
    from safetensors.torch import save_model

    ckdir = out / CHECKPOINTS
    ckdir.mkdir(exist_ok=True)
    final = ckdir / f"epoch-{epoch:04d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=ckdir))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        torch.save({**state, "epoch": epoch, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng},
                   tmp / "state.pt")
        if final.exists():  # an epoch re-run after an interruption
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = sorted(ckdir.glob("epoch-[0-9][0-9][0-9][0-9]"))
    for old in done[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(out: Path, model: nn.Module, opt, sched, expect: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_model

    path = _last_checkpoint(out)
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VitpruneError(f"--resume: cannot read {path / 'state.pt'}: {str(exc).splitlines()[0]}") from exc
    for key, want in expect.items():
        have = state.get(key)
        if isinstance(want, dict):
            diff = [k for k in want if k not in _NOT_COMPARED_ON_RESUME and have.get(k) != want[k]]
            if diff:
                k = diff[0]
                raise VitpruneError(f"--resume: {path} was written with {k}={have.get(k)!r}, this run has "
                                    f"{k}={want[k]!r}; resume with the same options")
        elif have != want:
            raise VitpruneError(f"--resume: {path} was written with {key} {have!r}, this run has {want!r} "
                                "(the same MODEL and the same number of processes are needed)")
    load_model(model, str(path / "model.safetensors"), strict=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])  # each epoch re-seeds anyway; restored for completeness
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


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
    """Fine-tune ``model`` on the ImageFolder ``data`` and save it to ``output/model``.

    Args:
        model: any ViT vitprune can capture, rewritten or not (it is deep-copied, never modified).
        data, val: ImageFolder layouts (:mod:`vitprune.data`); ``val`` (optional) is evaluated after
            every epoch and must have the same classes.
        output: the run's folder (module docstring); created if missing.
        teacher: a module, or anything :func:`vitprune.load` reads; default: the original model for a
            rewritten one (see module docstring).
        resume: continue from the last checkpoint in ``output`` (same options, model and process count).
        overwrite: replace an earlier run in ``output`` (only if it is one).
        device: default CUDA (``cuda:LOCAL_RANK`` under torchrun) when available, else CPU.
        progress: a tqdm bar per epoch; default: when stderr is a terminal, on rank 0.
        protect: input paths ``output`` must not overlap (besides ``data``, ``val``, ``teacher``).
        log: called with one-line messages (resume point, saved model); default: silent.
        **options: :class:`FinetuneConfig` fields (``epochs``, ``lr``, ``schedule``, ``keep_start``, ...).

    Returns:
        A :class:`FinetuneResult`.

    Raises:
        VitpruneError: bad option, data folder (missing, no classes, no images, classes that differ
            between ``data`` and ``val`` or outnumber the model's outputs), output folder refused,
            ``resume`` without a checkpoint or with other options, a schedule or selection for a model
            without ``TokenDrop``, a non-finite loss.
    """
    from vitprune.data import eval_transform, image_folder, train_transform
    from vitprune.load import load

    say = log or (lambda _msg: None)
    if isinstance(teacher, (str, os.PathLike)):
        options["teacher"] = str(teacher)
    cfg = FinetuneConfig(data=os.path.abspath(data), val=os.path.abspath(val) if val else None, **options)
    cfg.check()
    out = Path(output)
    dev = pick_device(device)
    if dev.type == "cuda" and "LOCAL_RANK" in os.environ and device is None:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    rank, world, own_group = _init_distributed(dev)
    try:
        _check_output(out, [cfg.data, cfg.val, teacher, *protect], resume, overwrite)
        _barrier(world)
        if rank == 0 and not resume:
            out.mkdir(exist_ok=True)
            for name in _OUTPUT_ENTRIES:  # an earlier run's (checked above: only --overwrite gets here)
                if (out / name).is_dir():
                    shutil.rmtree(out / name)
                else:
                    (out / name).unlink(missing_ok=True)
        _barrier(world)

        torch.manual_seed(cfg.seed)
        student = as_graph_module(model, cfg.input_size)
        size = tuple(student.meta["vitprune"]["input_shape"][1:])
        train_ds = image_folder(cfg.data, train_transform(size, cfg.mean, cfg.std, cfg.scale, cfg.hflip), "--data")
        val_ds = image_folder(cfg.val, eval_transform(size, cfg.mean, cfg.std), "--val") if cfg.val else None
        if val_ds is not None and val_ds.classes != train_ds.classes:
            raise VitpruneError(f"--val has classes {val_ds.classes[:5]}..., --data {train_ds.classes[:5]}...: they must match")
        num_outputs = check_classes(student, train_ds, torch.device("cpu"))
        drops = token_drops(student)
        if (cfg.schedule or cfg.selection) and not drops:
            raise VitpruneError(f"--{'schedule' if cfg.schedule else 'selection'} needs a token-drop model "
                                "(vitprune rewrite --method token-drop); this model has no TokenDrop module")
        for m in drops:
            m.selection = cfg.selection or m.selection
        rewrite_counts = [m.keep_count for m in drops]

        student.to(dev)
        if world > 1:  # every rank starts from rank 0's weights (DDP would too), the teacher included
            for t in student.state_dict().values():
                dist.broadcast(t, 0)
        fingerprint = _fingerprint(student)
        teacher_ctx: Callable[[], Any] = contextlib.nullcontext
        use_distill = cfg.distill if cfg.distill is not None else bool(teacher is not None or token_modules(student))
        if use_distill and teacher is None:
            teacher, teacher_ctx = make_teacher(student)
        elif use_distill:
            teacher = load(resolve_model_path(teacher)) if not isinstance(teacher, nn.Module) else teacher
            teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
            if check_classes(teacher, train_ds, torch.device("cpu"), "--data (teacher)") != num_outputs:
                raise VitpruneError("the teacher and the model have different numbers of outputs")
        teacher = teacher.to(dev) if use_distill else None

        g = torch.Generator()
        decay = [p for n, p in student.named_parameters() if p.requires_grad and p.ndim > 1 and not n.endswith(_NO_DECAY)]
        no_decay = [p for n, p in student.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith(_NO_DECAY))]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        if world > 1:
            sampler: Any = torch.utils.data.DistributedSampler(train_ds, world, rank, shuffle=True, seed=cfg.seed)
        else:
            sampler = torch.utils.data.RandomSampler(train_ds, generator=g)
        spe = math.ceil(len(sampler) / cfg.batch_size)
        total = cfg.epochs * spe
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, total, round(cfg.warmup_epochs * spe), cfg.min_lr / cfg.lr))
        keep = KeepSchedule(cfg.schedule, cfg.keep_start, cfg.keep_end, cfg.epochs, spe, cfg.cooldown_epochs,
                            cfg.bucket) if cfg.schedule else None
        ddp = nn.parallel.DistributedDataParallel(student, device_ids=[dev.index] if dev.type == "cuda" else None) \
            if world > 1 else student
        amp = cfg.amp if cfg.amp is not None else dev.type == "cuda"
        if amp and dev.type != "cuda":
            raise VitpruneError("--amp (bf16 autocast) is for CUDA; this run is on the CPU")

        history: list[dict[str, Any]] = []
        start_epoch, resumed_from = 0, None
        expect = {"config": cfg.to_json(), "world_size": world, "model_fingerprint": fingerprint}
        if resume:
            state = _load_checkpoint(out, student, opt, sched, expect)
            start_epoch = resumed_from = int(state["epoch"])
            history = list(state["history"])
            if rank == 0:
                _write_atomic(out / METRICS, "".join(json.dumps(h) + "\n" for h in history))
            say(f"resumed from {out / CHECKPOINTS}/epoch-{start_epoch:04d} ({start_epoch} of {cfg.epochs} epochs done)")
        show = progress if progress is not None else (rank == 0 and sys.stderr.isatty())
        if not show and rank == 0:
            say(f"training {cfg.epochs - start_epoch} epochs of {spe} steps on {len(train_ds)} images, {world} process(es)")

        for epoch in range(start_epoch, cfg.epochs):
            seed = _epoch_seed(cfg.seed, epoch, rank)
            torch.manual_seed(seed)
            g.manual_seed(seed)
            if world > 1:
                sampler.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(seed),
                pin_memory=dev.type == "cuda")
            ddp.train()
            sums = torch.zeros(5, dtype=torch.float64)  # loss, ce, kd (sums over images), top-1 hits, images
            rates: Counter = Counter()
            bar = _progress(loader, show, f"epoch {epoch + 1}/{cfg.epochs}")
            started = time.perf_counter()
            for i, (x, y) in enumerate(bar):
                step = epoch * spe + i
                if keep is not None:
                    rate = keep.rate(step)
                    for m in drops:
                        m.keep_count = keep_count(m.num_patches, rate)
                else:  # the rewrite's own static count (PatchDropout), or every token
                    rate = drops[0].keep_count / drops[0].num_patches if drops else 1.0
                rates[f"{rate:.3g}"] += 1
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    logits = logits_of(ddp(x)).float()
                    ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                    kd = torch.zeros((), device=dev)
                    if teacher is not None:
                        with torch.no_grad(), teacher_ctx():
                            kd = distillation_loss(logits, logits_of(teacher(x)).float(), cfg.distill_temperature)
                    loss = ce + cfg.distill_weight * kd
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad:
                    nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
                opt.step()
                sched.step()
                n = len(y)
                sums += torch.tensor([float(loss) * n, float(ce) * n, float(kd) * n,
                                      float((logits.argmax(1) == y).sum()), n], dtype=torch.float64)
                if show:
                    bar.set_postfix(loss=f"{sums[0] / sums[4]:.3f}", acc=f"{sums[3] / sums[4]:.3f}", keep=f"{rate:.2f}",
                                    img_s=f"{sums[4] * world / (time.perf_counter() - started):.0f}")
            seconds = time.perf_counter() - started
            sums = _all_reduce(sums, world, dev)
            if not math.isfinite(float(sums[0])):
                raise VitpruneError(f"the training loss is not finite in epoch {epoch + 1}; lower --lr or check the data")
            record = {"epoch": epoch + 1, "steps": spe, "lr": opt.param_groups[0]["lr"],
                      "train_loss": float(sums[0] / sums[4]), "train_ce": float(sums[1] / sums[4]),
                      "train_distill": float(sums[2] / sums[4]) if teacher is not None else None,
                      "train_top1": float(sums[3] / sums[4]), "train_images": int(sums[4]), "seconds": seconds,
                      "images_per_s": float(sums[4]) / seconds,
                      "keep_rate_mean": sum(float(r) * c for r, c in rates.items()) / sum(rates.values()),
                      "keep_rate_steps": dict(sorted(rates.items()))}
            if val_ds is not None:
                record.update(_validate(student, val_ds, cfg, rank, world, dev, amp, drops, rewrite_counts))
            history.append(record)
            if rank == 0:
                _save_checkpoint(out, epoch + 1, student, opt, sched, {**expect, "history": history}, cfg.keep_checkpoints)
                with open(out / METRICS, "a") as f:
                    f.write(json.dumps(record) + "\n")

        for m, k in zip(drops, rewrite_counts):
            m.keep_count = k
        student.eval()
        model_path = None
        if rank == 0:
            from vitprune.save import save

            report = dict(student.meta["vitprune"].get("report") or {})
            report["finetune"] = {"config": cfg.to_json(), "world_size": world, "epochs": history[-1:]}
            model_path = save(student, out / MODEL_SUBDIR, overwrite=True, report=report)
            say(f"saved {model_path}")
        _barrier(world)
        return FinetuneResult(student, out, model_path, history, resumed_from)
    finally:
        if own_group:
            dist.destroy_process_group()


def _progress(loader, show: bool, desc: str):
    if not show:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _validate(model, dataset, cfg, rank, world, dev, amp, drops, rewrite_counts) -> dict[str, Any]:
    """Validation in eval mode with the rewrite's own keep counts; this rank's shard, all-reduced."""
    from vitprune.evaluate import fork_rng

    training_counts = [m.keep_count for m in drops]
    for m, k in zip(drops, rewrite_counts):
        m.keep_count = k
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=list(range(rank, len(dataset), world)),
                                         num_workers=cfg.num_workers)
    with fork_rng(dev):
        torch.manual_seed(cfg.seed)
        loss, top1, top5, n = _all_reduce(accuracy_counts(model, loader, dev, amp), world, dev).tolist()
    for m, k in zip(drops, training_counts):
        m.keep_count = k
    return {"val_loss": loss / n, "val_top1": top1 / n, "val_top5": top5 / n if len(dataset.classes) >= 5 else None,
            "val_images": int(n)}
