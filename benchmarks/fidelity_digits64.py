"""Fidelity and throughput of every vitprune method and stock ToMe, side by side, on a 64x64 digits ViT.

The model: a timm VisionTransformer (``vit_small_patch16_224`` with ``MODEL_ARGS``: 64x64 input, patch 4, so
16x16 = 256 patches + CLS; depth 6, no LayerScale, CLS readout), trained here on scikit-learn's digits with
``examples/digits.py``'s own ``digits_split`` / ``build_model`` / ``train`` (its module constants
``IMAGE_SIZE`` and ``MODEL_ARGS`` set to this script's on the loaded module; the example is not edited).
The weights are cached (``--model``: loaded if the file exists, else trained and saved there, with the
training record in the file's metadata).

Rows, without fine-tuning, at each FLOPs target (default 0.7, 0.6, 0.5):

- importance-mask dynamic (``first_block`` 1 and the default 3; score ``distinct``, the default, and ``cls``,
  EViT's CLS row) and static (``first_block`` 1; calibration: the train split in chunks of 64);
- lifespan-gather (``after_block`` 1 and 3, ``exact=False``; the same two scores);
- token-drop at inference, ``selection`` magnitude and random (keep count by bisection on the measured
  FLOPs ratio, ``common.token_drop_keep_count``);
- token-merge (``flops=TARGET``, proportional attention);
- stock ToMe (``--tome-src``: facebookresearch/ToMe's ``tome.patch.timm`` on a deep copy, ``model.r = r``, the
  constant ``r`` whose FLOPs ratio, counted with ``torch.utils.flop_counter`` on the patched model, is closest
  to the target);
- one row per ``--schedule FILE`` (``{"method": ..., "params": {...}}``, e.g. from ``vitprune search``).

Per row, on the 450 test digits in eval mode after ``torch.manual_seed(0)`` (batches of 256): accuracy,
top-1 agreement and mean logit cosine similarity with the original, the FLOPs ratio (vitprune: the rewrite
report's; ToMe: counted here), tokens each block sees; throughput in images/s, eager at batch 16 and 1 and
compiled at batch 16 (vitprune: ``vitprune.compile``; ToMe and the original: ``torch.compile``): after
warm-up (compilation included), ``--rounds`` rounds, in each round every model timed once per setting
(interleaved), the median over rounds. Each call gets its own view of the input: ``vitprune.compile`` marks
its input tensor's batch dimension dynamic, and a ``torch.compile``d model later given that same tensor
object would recompile for a dynamic batch (this made compiled ToMe slower than eager before).

FLOPs are counted alike for all (``vitprune.graph.flops``: matmuls, convolutions, attention), so a merge is
charged what it runs as: token-merge's one-hot merge matmul counts, ToMe's ``scatter_reduce`` does not (at
the same ``r`` on this model, token-merge's ratio is about 0.014 higher; so at a target it merges a little more).

    python benchmarks/fidelity_digits64.py --tome-src /tmp/tome_src     # full: ~25-30 min on 2 idle cores
    python benchmarks/fidelity_digits64.py --tome-src /tmp/tome_src --quick --threads 1 [--no-compile]

Most of the full run is compiling 28 models (~45 s each on a cold inductor cache; a rerun hits the cache),
plus training (~5 min on 2 idle threads) when the weights are not cached.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import vitprune
from common import ROOT, load_example, token_drop_keep_count, write_atomic
from vitprune.errors import VitpruneError
from vitprune.graph.flops import count_flops

ARCH = "timm:vit_small_patch16_224"
MODEL_ARGS = {"img_size": 64, "patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 2, "num_classes": 10}
IMAGE_SIZE = 64
EPOCHS = 30
LR = 1e-3  # AdamW peak learning rate for digits.train (its batch: the default, 32)
BATCHES = {"eager_b16": 16, "eager_b1": 1, "compiled_b16": 16}  # throughput settings: name -> batch
ITERS = {16: 3, 1: 20}  # forward passes per timed run, by batch
COMPARE_AT = 0.6  # the FLOPs target of the closing paragraph
SCORES = ("distinct", "cls")  # importance-mask dynamic and lifespan-gather: the default and EViT's CLS row


def digits_module():
    """``examples/digits.py`` loaded as a module, with this script's image size and model config."""
    digits = load_example()
    digits.IMAGE_SIZE, digits.MODEL_ARGS = IMAGE_SIZE, MODEL_ARGS
    return digits


def trained_model(digits, path: Path, epochs: int, seed: int, lr: float, x_train, y_train, x_test, y_test):
    """``(model, training record)``: loaded from ``path`` if it exists (the record is its metadata; a model
    trained with another config, epochs, seed or lr is refused), else built from ``seed``, trained
    ``epochs`` epochs at peak ``lr`` with ``digits.train`` and saved to ``path`` (atomically)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = digits.build_model(seed)
    if path.exists():
        with safe_open(str(path), "pt") as f:
            record = json.loads((f.metadata() or {}).get("training", "{}"))
        want = {"model_args": MODEL_ARGS, "epochs": epochs, "seed": seed, "lr": lr}
        if {k: record.get(k) for k in want} != want:
            raise SystemExit(f"{path} holds a model trained with {({k: record.get(k) for k in want})}, not {want}")
        model.load_state_dict(load_file(str(path)))
        return model.eval(), {**record, "loaded_from": str(path)}
    start = time.perf_counter()
    digits.train(model, x_train, y_train, epochs, seed=seed, lr=lr)
    record = {"arch": ARCH, "model_args": MODEL_ARGS, "seed": seed, "epochs": epochs, "lr": lr,
              "threads": torch.get_num_threads(),
              "seconds": round(time.perf_counter() - start, 1), "test_accuracy": digits.accuracy(model, x_test, y_test),
              "torch": torch.__version__, "train": "examples/digits.py train(), its default batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(model.state_dict(), str(tmp), metadata={"training": json.dumps(record)})
    os.replace(tmp, path)
    return model.eval(), {**record, "saved_to": str(path)}


@torch.no_grad()
def logits_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits in eval mode after ``torch.manual_seed(0)``, in batches of 256 (as ``digits.accuracy``)."""
    model.eval()
    torch.manual_seed(0)
    return torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])


def fidelity(logits: torch.Tensor, reference: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy, top-1 agreement and mean cosine similarity of ``logits`` with the original's ``reference``."""
    pred = logits.argmax(-1)
    return {"accuracy": float((pred == y).float().mean()),
            "agreement": float((pred == reference.argmax(-1)).float().mean()),
            "logit_cosine": float(F.cosine_similarity(logits, reference, dim=-1).mean())}


def tokens_seen(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    """Tokens each block of a timm ViT receives on ``x`` (forward pre-hooks on ``model.blocks``)."""
    seen: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1])) for b in model.blocks]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def tome_model(tome, model: torch.nn.Module, r: int) -> torch.nn.Module:
    """A deep copy of ``model`` patched with stock ToMe (``tome.patch.timm``, proportional attention) at ``r``."""
    patched = copy.deepcopy(model)
    tome.patch.timm(patched)
    patched.r = r
    return patched.eval()


def tome_r_for(ratio: Callable[[int], float], target: float, max_r: int) -> int:
    """The ``r`` in ``0..max_r`` whose FLOPs ``ratio(r)`` (non-increasing in ``r``) is closest to ``target``."""
    lo, hi = 0, max_r  # smallest r with ratio(r) <= target lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if ratio(mid) > target else (lo, mid)
    return min({max(0, lo - 1), lo}, key=lambda r: abs(ratio(r) - target))


def tome_ratio(tome, model: torch.nn.Module, one: torch.Tensor) -> Callable[[int], float]:
    """``r -> FLOPs ratio`` of stock ToMe at ``r`` on ``model`` (counted on a patched copy, cached)."""
    base_flops, probe, ratios = count_flops(model, one), tome_model(tome, model, 0), {}

    def ratio(r: int) -> float:
        if r not in ratios:
            probe.r = r
            ratios[r] = count_flops(probe, one) / base_flops
        return ratios[r]

    return ratio


def tome_r_at(ratio: Callable[[int], float], target: float) -> int:
    """Stock ToMe's constant ``r`` whose FLOPs ratio is closest to ``target`` on the digits ViT."""
    return tome_r_for(ratio, target, max_r=(MODEL_ARGS["img_size"] // MODEL_ARGS["patch_size"]) ** 2 // 2)


def vitprune_rows(model, target: float, example, calibration, keep_ratios: dict) -> list[tuple[str, str, Callable]]:
    """``(method, setting, build)`` for every vitprune configuration at FLOPs ``target``; ``build()`` rewrites."""
    rw = lambda method, **p: lambda: vitprune.rewrite(model, method, example_input=example, **p)  # noqa: E731
    rows = [("importance-mask", f"dynamic, first_block={b}, score {s}",
             rw("importance-mask", flops=target, first_block=b, score=s)) for b in (1, 3) for s in SCORES]
    rows.append(("importance-mask", "static, first_block=1, calibration: train split",
                 lambda: vitprune.rewrite(model, "importance-mask", example_input=example, flops=target, mode="static",
                                          first_block=1, calibration=calibration())))
    rows += [("lifespan-gather", f"after_block={b}, exact=False, score {s}",
              rw("lifespan-gather", flops=target, after_block=b, exact=False, score=s)) for b in (1, 3) for s in SCORES]
    num_patches = vitprune.inspect_model(model, example_input=example).num_patches
    k = token_drop_keep_count(model, target, example, keep_ratios)
    rows += [("token-drop", f"{s}, at_inference, keep {k}/{num_patches}",
              rw("token-drop", keep_rate=k / num_patches, selection=s, at_inference=True))
             for s in ("magnitude", "random")]
    rows.append(("token-merge", "flops target, proportional attention",
                 rw("token-merge", flops=target, proportional_attention=True)))
    return rows


def schedule_rows(paths: list[Path], model, example, calibration) -> list[tuple[str, str, float | None, Callable]]:
    """``(method, setting, target, build)`` per schedule file ``{"method": ..., "params": {...}}`` (a missing
    or unreadable file is skipped with a note on stderr). Static importance-mask without calibration gets
    the train split."""
    rows = []
    for path in paths:
        try:
            spec = json.loads(path.read_text())
            method, params = spec["method"], dict(spec.get("params", {}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"schedule {path}: skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        if params.get("mode") == "static" and not isinstance(params.get("calibration"), str):
            params["calibration"] = calibration()
        target = spec.get("target", spec.get("flops_target", params.get("flops")))  # vitprune search: flops_target
        setting = f"schedule {path.name}: " + json.dumps({k: v for k, v in params.items() if k != "calibration"})
        build = lambda m=method, p=params: vitprune.rewrite(model, m, example_input=example, **p)  # noqa: E731
        rows.append((method, setting, target, build))
    return rows


def vitprune_entry(method: str, setting: str, target: float | None, build: Callable, num_blocks: int,
                   compiled: bool) -> tuple[dict, torch.nn.Module | None, Callable | None]:
    """``(row, model, compiler)`` for one vitprune rewrite (``build()``); a refusal gives a row with its
    error and no model."""
    row = {"method": method, "setting": setting, "target": target}
    try:
        gm, rep = build()
    except VitpruneError as exc:
        print(f"{method} {setting} @ {target}: refused ({exc})", flush=True)
        return {**row, "error": f"{type(exc).__name__}: {exc}"}, None, None
    tpb = rep.decisions.get("tokens_per_block")  # token-drop: one int, the same for every block
    params = {k: ("<train split>" if k == "calibration" and v else v) for k, v in rep.params.items()}
    row.update(params=params, flops_ratio=rep.flops_ratio, keep_all_max_abs_diff=rep.keep_all_max_abs_diff,
               tokens_per_block=tpb if isinstance(tpb, list) else [tpb] * num_blocks)
    print(f"{method} {setting} @ {target}: FLOPs {rep.flops_ratio:.3f}", flush=True)
    return row, gm.eval(), (lambda m: vitprune.compile(m.eval())) if compiled else None


def tome_rows(tome, model: torch.nn.Module, targets: list[float], x_test: torch.Tensor, reference: torch.Tensor,
              compiler: Callable | None) -> tuple[list[tuple[dict, torch.nn.Module, Callable | None]], dict]:
    """``(entries, notes)``: one stock-ToMe ``(row, model, compiler)`` per target, ``r`` chosen by FLOPs counted
    on the patched model; ``notes``: ToMe at ``r = 0`` against the original (max abs logit diff on the test
    images, FLOPs equal)."""
    one = x_test[:1]
    base_flops = count_flops(model, one)
    probe = tome_model(tome, model, 0)
    notes = {"tome_r0_max_abs_diff": float((logits_of(probe, x_test) - reference).abs().max()),
             "tome_r0_flops_equal": count_flops(probe, one) == base_flops}
    print(f"ToMe r=0 vs original: max abs logit diff {notes['tome_r0_max_abs_diff']:.2e}, "
          f"FLOPs equal: {notes['tome_r0_flops_equal']}", flush=True)
    ratio = tome_ratio(tome, model, one)
    entries = []
    for target in targets:
        r = tome_r_at(ratio, target)
        patched = tome_model(tome, model, r)
        entries.append(({"method": "ToMe (stock)", "setting": f"r={r}, prop_attn", "target": target,
                         "params": {"r": r, "prop_attn": True}, "flops_ratio": ratio(r),
                         "tokens_per_block": tokens_seen(patched, one)}, patched, compiler))
        print(f"ToMe @ {target}: r={r}, FLOPs {ratio(r):.3f}", flush=True)
    return entries, notes


def throughput(models: dict[str, dict[str, Callable]], x: torch.Tensor, rounds: int
               ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, str]]]:
    """``(images/s, errors)`` per model and setting: ``models[name][setting]`` runs a batch of
    ``BATCHES[setting]`` images of ``x``. Warm-up (compilation) first: a setting that fails there is recorded
    in ``errors`` and not timed; then ``rounds`` rounds, in each every setting of every model timed once
    (``ITERS[batch]`` forward passes); the median over rounds."""
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    errors: dict[str, dict[str, str]] = {}
    began = time.perf_counter()
    with torch.inference_mode():
        for name, fns in models.items():
            for setting, fn in fns.items():
                try:
                    fn(x[:BATCHES[setting]])
                    fn(x[:BATCHES[setting]])
                    runs[name][setting] = []
                except Exception as exc:  # e.g. torch.compile failing on a model: record it, time the rest
                    errors.setdefault(name, {})[setting] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
                    print(f"{name} {setting}: {errors[name][setting]}", file=sys.stderr, flush=True)
        print(f"warm-up (compilation included) {time.perf_counter() - began:.0f} s", flush=True)
        graphs = counters["stats"]["unique_graphs"]
        for i in range(rounds):
            for setting, batch in BATCHES.items():
                for name, fns in models.items():
                    if setting in runs[name]:
                        # a fresh view per call: vitprune.compile marks its input's batch dynamic, which would
                        # make a torch.compile'd model given the same tensor object recompile for a dynamic batch
                        xb, iters = x[:batch], ITERS[batch]
                        start = time.perf_counter()
                        for _ in range(iters):
                            fns[setting](xb)
                        runs[name][setting].append(batch * iters / (time.perf_counter() - start))
            print(f"timing round {i + 1}/{rounds} done", flush=True)
    if counters["stats"]["unique_graphs"] != graphs:
        print("warning: torch.compile compiled again while timing; compiled numbers include compilation",
              file=sys.stderr, flush=True)
    return {name: {s: statistics.median(v) for s, v in settings.items()} for name, settings in runs.items()}, errors


def measure(entries: list[tuple[dict, torch.nn.Module | None, Callable | None]], x: torch.Tensor, y: torch.Tensor,
            reference: torch.Tensor, rounds: int) -> list[dict]:
    """Fills each ``(row, model, compiler)``'s row with its fidelity on ``x, y`` and its throughput (eager at
    batch 16 and 1; ``compiler(model)`` at batch 16 unless ``compiler`` is None); returns the rows."""
    runners = {}
    for i, (row, m, compiler) in enumerate(entries):
        if m is None:  # refused by its pass
            continue
        row.update(fidelity(logits_of(m, x), reference, y))
        runners[i] = {"eager_b16": m, "eager_b1": m}
        if compiler is not None:
            runners[i]["compiled_b16"] = compiler(m)
    speeds, errors = throughput(runners, x, rounds)
    for i, ips in speeds.items():
        entries[i][0]["images_per_s"] = ips
    for i, errs in errors.items():
        entries[i][0]["throughput_errors"] = errs
    return [row for row, _, _ in entries]


def table(rows: list[dict]) -> str:
    """The markdown table, one row per model."""
    lines = ["| method | setting | target | FLOPs ratio | accuracy | agreement | logit cos | eager b16 img/s "
             "| eager b1 img/s | compiled b16 img/s | tokens/block |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else v if isinstance(v, str) else f"{v:.0f}"  # noqa: E731
    for r in rows:
        target = "-" if r["target"] is None else r["target"]
        if "error" in r:
            lines.append(f"| {r['method']} | {r['setting']} | {target} | refused: {r['error']} | | | | | | | |")
            continue
        ips = {**{s: "failed" for s in r.get("throughput_errors", {})}, **r.get("images_per_s", {})}
        lines.append(f"| {r['method']} | {r['setting']} | {target} | {r['flops_ratio']:.3f} | {r['accuracy']:.4f} "
                     f"| {r['agreement']:.4f} | {r['logit_cosine']:.4f} | {fmt(ips.get('eager_b16'))} "
                     f"| {fmt(ips.get('eager_b1'))} | {fmt(ips.get('compiled_b16'))} "
                     f"| {' '.join(map(str, r['tokens_per_block']))} |")
    return "\n".join(lines)


def comparison(rows: list[dict], at: float = COMPARE_AT, within: float = 0.02) -> str:
    """A paragraph: the vitprune row with the highest agreement among those whose measured FLOPs ratio is
    within ``within`` of ``at`` (the ``at`` target rows and any schedule row that lands there), against
    ToMe's row at target ``at``."""
    ok = [r for r in rows if "error" not in r and r["method"] != "original"]
    tome = next((r for r in ok if r["method"] == "ToMe (stock)" and r["target"] == at), None)
    ours = [r for r in ok if r["method"] != "ToMe (stock)" and abs(r["flops_ratio"] - at) <= within]
    if not ours:
        return f"No vitprune row at FLOPs {at}."
    best = max(ours, key=lambda r: (r["agreement"], r.get("images_per_s", {}).get("compiled_b16", 0.0)))
    text = (f"At FLOPs {at} (measured within ±{within}), the best vitprune row by agreement is {best['method']} "
            f"({best['setting']}): agreement {best['agreement']:.4f}, accuracy {best['accuracy']:.4f}, "
            f"FLOPs ratio {best['flops_ratio']:.3f}")
    if tome is None:
        return text + "; no ToMe row to compare with (run with --tome-src)."
    text += (f"; stock ToMe ({tome['setting']}, FLOPs ratio {tome['flops_ratio']:.3f}): "
             f"agreement {tome['agreement']:.4f}, accuracy {tome['accuracy']:.4f}, "
             f"so {best['agreement'] - tome['agreement']:+.4f} agreement for vitprune")
    speed = [f"{label} {best['images_per_s'][s] / tome['images_per_s'][s]:.2f}x ToMe's"
             for s, label in (("eager_b16", "eager batch 16"), ("compiled_b16", "compiled batch 16"))
             if s in best.get("images_per_s", {}) and s in tome.get("images_per_s", {})]
    return text + (f"; its throughput is {' and '.join(speed)}." if speed else ".")


def describe(command: str, training: dict, test_images: int, args, rounds: int, load_average: float,
             tome_notes: dict | None) -> str:
    """The markdown header: the command, the model and its training, the measurement setup, ToMe's check."""
    tome = ("ToMe rows skipped (no --tome-src)" if tome_notes is None else
            f"stock ToMe from {args.tome_src} (commit {tome_notes['tome_commit']}): r=0 vs the original, max abs logit "
            f"diff {tome_notes['tome_r0_max_abs_diff']:.1e}, FLOPs equal: {tome_notes['tome_r0_flops_equal']}; r per "
            "target: the constant r whose FLOPs ratio (counted on the patched model) is closest to it")
    return (f"`{command}`\n\nDigits ViT ({ARCH} {MODEL_ARGS}: {IMAGE_SIZE}x{IMAGE_SIZE}, 256 patches + CLS, no "
            f"LayerScale); training: seed {training['seed']}, {training['epochs']} epochs at lr {training['lr']}, "
            f"{training['seconds']} s on {training['threads']} thread(s), "
            f"test accuracy {training['test_accuracy']:.4f} on {test_images} images"
            f"{' (weights loaded from cache)' if 'loaded_from' in training else ''}. "
            f"torch {torch.__version__}, {args.threads} thread(s), {rounds} timing rounds (median), load average at "
            f"start {load_average:.2f}. No fine-tuning. {tome}. Compiled: vitprune.compile for vitprune rows, "
            f"torch.compile for the original and ToMe{' (skipped: --no-compile)' if args.no_compile else ''}.")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init and training")
    parser.add_argument("--lr", type=float, default=LR, help="AdamW peak learning rate of the training")
    parser.add_argument("--model", type=Path, help="weights cache (.safetensors): loaded if it exists, else the "
                        "trained model is saved there (default: in the temp dir, named by epochs, lr and seed)")
    parser.add_argument("--tome-src", type=Path, help="a checkout of facebookresearch/ToMe (its folder holding tome/)")
    parser.add_argument("--schedule", type=Path, nargs="*", default=[], help="schedule JSON files, one row each")
    parser.add_argument("--targets", default="0.7,0.6,0.5", help="comma-separated FLOPs targets")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (training and timing)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile throughput")
    parser.add_argument("--quick", action="store_true", help=f"target {COMPARE_AT} only, 2 rounds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fidelity_digits64.json")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/fidelity_digits64.py", *(sys.argv[1:] if argv is None else argv)])
    targets = [COMPARE_AT] if args.quick else [float(t) for t in args.targets.split(",")]
    rounds = 2 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    load_average, began = os.getloadavg()[0], time.perf_counter()
    tome = None
    if args.tome_src is not None:
        sys.path.insert(0, str(args.tome_src.resolve()))
        import tome

    digits = digits_module()
    x_train, y_train, x_test, y_test = digits.digits_split()
    default_path = f"vitprune_digits64_e{args.epochs}_lr{args.lr:g}_s{args.seed}.safetensors"
    path = args.model or Path(tempfile.gettempdir()) / default_path
    model, training = trained_model(digits, path, args.epochs, args.seed, args.lr, x_train, y_train, x_test, y_test)
    print(f"model: {json.dumps(training)}", flush=True)
    reference = logits_of(model, x_test)
    example, one = x_train[:8], x_test[:1]
    calibration = lambda: (x_train[i:i + 64] for i in range(0, len(x_train), 64))  # noqa: E731
    compile_fn = None if args.no_compile else torch.compile

    entries = [({"method": "original", "setting": "-", "target": 1.0, "flops_ratio": 1.0,
                 "tokens_per_block": tokens_seen(model, one)}, model, compile_fn)]
    keep_ratios: dict[int, float] = {}  # token-drop FLOPs ratio by keep count, shared across targets
    builds = [(m, s, t, b) for t in targets for m, s, b in vitprune_rows(model, t, example, calibration, keep_ratios)]
    builds += schedule_rows(args.schedule, model, example, calibration)
    for method, setting, target, build in builds:
        entries.append(vitprune_entry(method, setting, target, build, len(model.blocks), compiled=not args.no_compile))
    notes = {"tome": "skipped: no --tome-src"}
    if tome is not None:
        tome_entries, notes = tome_rows(tome, model, targets, x_test, reference, compile_fn)
        notes["tome_commit"] = subprocess.run(["git", "-C", str(args.tome_src), "rev-parse", "HEAD"],
                                              capture_output=True, text=True).stdout.strip() or None
        entries += tome_entries
    else:
        print("ToMe rows skipped: no --tome-src", flush=True)

    rows = measure(entries, x_test, y_test, reference, rounds)
    md, closing = table(rows), comparison(rows)
    header = describe(command, training, len(y_test), args, rounds, load_average, notes if tome else None)
    text = f"{header}\n\n{md}\n\n{closing}\n"
    print(text)
    result = {"command": command, "torch": torch.__version__, "arch": ARCH, "model_args": MODEL_ARGS,
              "training": training, "threads": args.threads, "rounds": rounds, "iters": ITERS, "targets": targets,
              "compiled": not args.no_compile, "load_average": load_average,
              "run_seconds": round(time.perf_counter() - began), "notes": notes, "rows": rows, "comparison": closing}
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    write_atomic(args.out.with_suffix(".md"), text)
    print(f"results in {args.out} and {args.out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
