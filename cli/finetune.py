"""``vitprune finetune`` and ``vitprune eval``: train a (rewritten) ViT on an image folder, measure accuracy.

Registered on the ``vitprune`` group by :mod:`vitprune.cli.main` (import that module, not this one).
Engine: :mod:`vitprune.train.finetune`, :mod:`vitprune.train.evaluate`; data layout: :mod:`vitprune.train.data`.
"""

from __future__ import annotations

import functools
from typing import Callable

import click

from vitprune.cli.device import device_options
from vitprune.cli.main import _emit_json, _floats3, model_options, normalisation_options, say_preprocessing
from vitprune.train.evaluate import resolve_model_path
from vitprune.train.finetune import FinetuneConfig
from vitprune.train.keep_rate_schedule import SCHEDULES
from vitprune.ops.token_ops import SELECTIONS

_DEFAULTS = {f.name: f.default for f in FinetuneConfig.__dataclass_fields__.values()}


def _accepts_finetune_output(fn: Callable) -> Callable:
    """Let MODEL be a ``vitprune finetune`` output folder (its model is in OUT/model)."""

    @functools.wraps(fn)
    def wrapper(**kwargs):
        kwargs["model"] = str(resolve_model_path(kwargs["model"]))
        return fn(**kwargs)

    return wrapper


def _floats(value: str | None, name: str, count: int | None = None) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = _floats3(value, name)
    if count is not None and len(values) != count:
        raise click.BadParameter(f"expected {count} comma-separated numbers, got {value!r}", param_hint=name)
    return values


def _summary(history: list[dict]) -> str:
    """A plain-text table of the per-epoch metrics (label-free runs: agreement with the teacher, not accuracy)."""
    if history and history[0].get("train_top1") is None:  # label-free
        scores = [("keep", "keep_rate_mean", "{:.2f}"), ("val distill", "val_distill", "{:.4f}"),
                  ("val agree", "val_agreement", "{:.4f}"), ("val cos", "val_cosine", "{:.4f}")]
    else:
        scores = [("train acc", "train_top1", "{:.4f}"), ("keep", "keep_rate_mean", "{:.2f}"),
                  ("val top-1", "val_top1", "{:.4f}"), ("val top-5", "val_top5", "{:.4f}")]
    cols = [("epoch", "epoch", "{}"), ("loss", "train_loss", "{:.4f}"), *scores,
            ("s", "seconds", "{:.1f}"), ("img/s", "images_per_s", "{:.0f}")]
    rows = [[name for name, _, _ in cols]]
    rows += [[fmt.format(h[key]) if h.get(key) is not None else "-" for _, key, fmt in cols] for h in history]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


@click.command("finetune")
@_accepts_finetune_output
@model_options
@click.option("--data", required=True, type=click.Path(), help="Training images: DIR/CLASS/IMAGE (ImageFolder); "
              "with --no-labels any folder of images, at any depth.")
@click.option("--val", type=click.Path(), help="Validation images (same classes; with --no-labels any folder of "
              "images), evaluated after every epoch.")
@click.option("--no-labels", is_flag=True, help="Distil from the original model on any image folder: no labels, "
              "no cross-entropy (needs a rewritten MODEL or --teacher).")
@click.option("--teacher", metavar="MODEL", help="Distillation teacher (anything MODEL can be) "
              "[default for a rewritten MODEL: MODEL itself before fine-tuning, with every token kept].")
@click.option("--no-distill", is_flag=True, help="Cross-entropy only, no distillation.")
@click.option("--distill-weight", type=float, default=_DEFAULTS["distill_weight"], show_default=True,
              help="Weight of the KL term (with labels; a --no-labels loss is the distillation term alone).")
@click.option("--distill-temperature", type=float, default=_DEFAULTS["distill_temperature"], show_default=True,
              help="Softmax temperature T of the KL term (scaled by T²).")
@click.option("--epochs", type=int, default=_DEFAULTS["epochs"], show_default=True)
@click.option("--batch-size", type=int, default=_DEFAULTS["batch_size"], show_default=True, help="Images per step and process.")
@click.option("--lr", type=float, default=_DEFAULTS["lr"], show_default=True, help="AdamW peak learning rate.")
@click.option("--min-lr", type=float, default=_DEFAULTS["min_lr"], show_default=True, help="End of the cosine decay.")
@click.option("--weight-decay", type=float, default=_DEFAULTS["weight_decay"], show_default=True)
@click.option("--warmup-epochs", type=float, default=_DEFAULTS["warmup_epochs"], show_default=True,
              help="Linear learning-rate warm-up.")
@click.option("--clip-grad", type=float, default=_DEFAULTS["clip_grad"], show_default=True,
              help="Max gradient L2 norm; 0 turns clipping off.")
@click.option("--label-smoothing", type=float, default=_DEFAULTS["label_smoothing"], show_default=True)
@click.option("--schedule", type=click.Choice(SCHEDULES), help="Token-drop models: keep rate per step (Patch Sampling "
              "Schedule) [default: the rewrite's fixed keep count].")
@click.option("--keep-start", type=float, default=_DEFAULTS["keep_start"], show_default=True,
              help="Schedule's keep rate at the start (cyclic: at each epoch's start and end).")
@click.option("--keep-end", type=float, default=_DEFAULTS["keep_end"], show_default=True,
              help="Schedule's keep rate at the end (cyclic: mid-epoch). Any number: each step's rate is rounded "
              "to --bucket, then clipped to [bucket, 1] (to (0, 1] with --bucket 0), so the default 0.0 means "
              "the fewest tokens: 20% with --bucket 0.2, one token with --bucket 0.")
@click.option("--cooldown-epochs", type=int, default=_DEFAULTS["cooldown_epochs"], show_default=True,
              help="Last epochs at keep rate 1.0.")
@click.option("--bucket", type=float, default=_DEFAULTS["bucket"], show_default=True,
              help="Round keep rates to multiples of this (few token counts); 0: no rounding.")
@click.option("--selection", type=click.Choice(SELECTIONS), help="Override the TokenDrop selection: random "
              "(PatchDropout), magnitude (largest L1 norm, PSS) or distinct (near-duplicate patches dropped first).")
@normalisation_options
@click.option("--scale", default="0.6,1.0", show_default=True, metavar="MIN,MAX",
              help="RandomResizedCrop area range (fractions of the image).")
@click.option("--hflip", is_flag=True, help="Random horizontal flips (off: digits and text are not flip-invariant).")
@click.option("--workers", type=int, default=_DEFAULTS["num_workers"], show_default=True, help="Data-loader processes.")
@click.option("--seed", type=int, default=_DEFAULTS["seed"], show_default=True)
@device_options("Autocast precision of the forward (weights stay float32; float16 on CUDA with loss scaling) "
                "[default: bfloat16 on CUDA, float32 on the CPU].")
@click.option("--keep-checkpoints", type=int, default=_DEFAULTS["keep_checkpoints"], show_default=True,
              help="Keep the last N epoch checkpoints; 0 keeps all.")
@click.option("--resume", is_flag=True, help="Continue the run in OUTPUT from its last checkpoint (same options).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Run folder: OUTPUT/model, checkpoints/, metrics.jsonl.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier run in OUTPUT.")
@click.option("--quiet", is_flag=True, help="No progress bar and no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-epoch metrics as JSON.")
def finetune(model, source, inputs, input_size, data, val, no_labels, teacher, no_distill, clip_grad, mean, std, scale,
             workers, device, resume, output, overwrite, quiet, as_json, **options) -> None:
    """Fine-tune MODEL on the image folder DATA and save it to OUTPUT/model.

    MODEL is anything `vitprune rewrite` takes, usually a folder it wrote; a rewritten model learns
    from its own original (every token kept) by distillation unless --no-distill. With --no-labels DATA
    may be any folder of images: the model learns from its teacher's outputs alone (class logits, dense
    logits or features). Under torchrun the same command trains data-parallel.
    """
    from vitprune.train.finetune import finetune as run
    from vitprune.io.load import load

    teacher_model = None
    if teacher is not None and not no_distill:
        trust = click.get_current_context().params.get("trust_pickle", False)
        teacher_model = load(resolve_model_path(teacher), trust_pickle=trust)
    say = (lambda msg: click.echo(msg, err=True)) if not quiet else None
    result = run(model, data, output, val=val, teacher=teacher_model, resume=resume, overwrite=overwrite, device=device,
                 progress=False if quiet else None, protect=inputs, log=say, input_size=input_size,
                 labels=not no_labels, distill=False if no_distill else None, clip_grad=clip_grad or None,
                 num_workers=workers,
                 mean=_floats(mean, "--mean"), std=_floats(std, "--std"), scale=_floats(scale, "--scale", 2),
                 **({"teacher": teacher} if teacher_model is not None else {}), **options)
    if result.model_path is None:  # not rank 0
        return
    if as_json:
        _emit_json({"output": str(result.output), "model": str(result.model_path), "resumed_from": result.resumed_from,
                    "history": result.history})
    elif not quiet:
        click.echo(_summary(result.history))
        click.echo(f"saved            {result.model_path}")


@click.command("eval")
@_accepts_finetune_output
@model_options
@click.option("--data", required=True, type=click.Path(), help="Labelled images: DIR/CLASS/IMAGE (ImageFolder).")
@click.option("--keep-rate", "keep_rates", metavar="R,R,...", help="Token-drop models: inference keep rates, "
              "one row each (1.0 = every token) [default: the model as saved].")
@click.option("--batch-size", type=int, default=64, show_default=True)
@normalisation_options
@click.option("--workers", type=int, default=0, show_default=True, help="Data-loader processes.")
@device_options("Autocast precision of the forward (weights stay float32) [default: float32].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random token selection.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def evaluate_cmd(model, source, inputs, input_size, data, keep_rates, batch_size, mean, std, workers, device, dtype,
                 seed, as_json) -> None:
    """Top-1 / top-5 accuracy of MODEL on the image folder DATA, per inference keep rate.

    MODEL may be a `vitprune finetune` output folder. Images are resized (shorter side), center-cropped
    to the model's input size and normalised with the model's own mean / std (override: --mean / --std).
    """
    from vitprune.train.evaluate import evaluate

    rates = _floats(keep_rates, "--keep-rate")
    mean, std = _floats(mean, "--mean"), _floats(std, "--std")
    result = evaluate(model, data, keep_rates=rates, batch_size=batch_size, input_size=input_size,
                      mean=mean, std=std, num_workers=workers, device=device, dtype=dtype,
                      seed=seed)
    say_preprocessing(model, mean, std, input_size)  # after the work: a refused command's error stays one line
    result["model"] = source
    if as_json:
        _emit_json(result)
        return
    click.echo(f"model {source}: {result['images']} images, {result['classes']} classes, input {result['input_size']}")
    click.echo(f"{'keep rate':>9}  {'tokens':>10}  {'top-1':>7}  {'top-5':>7}  {'img/s':>7}")
    for row in result["rows"]:
        rate = "as saved" if row["keep_rate"] is None else f"{row['keep_rate']:.2f}"
        tokens = ",".join(map(str, row["keep_counts"])) or "-"
        top5 = "-" if row["top5"] is None else f"{row['top5']:.4f}"
        click.echo(f"{rate:>9}  {tokens:>10}  {row['top1']:.4f}  {top5:>7}  {row['images_per_s']:7.0f}")

