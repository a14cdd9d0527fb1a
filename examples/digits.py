"""The main job end to end on real images: scikit-learn's handwritten digits, speed at kept accuracy.

1. Train a small timm ViT (random init, no hub; 4 blocks, width 64, 64 patches) on the digits (1,797 real 8x8
   scans, 10 classes, upsampled to 32x32), stratified 75/25 train/test split, or reuse it from ``--out`` when
   ``digits_vit.json`` there records the same training config and code (:func:`training_key`). Saved the ways
   users save models: weights (``digits_vit.safetensors``) and a pickled module (``digits_vit.pt``).
2. Inspect it, then rewrite it at FLOPs 0.6 three ways: token-merge (one merge in block 0), importance-mask on a
   ``vitprune.search`` schedule, token-drop (``distinct``, at inference). Each rewrite verifies itself; each is
   saved, reloaded from disk and evaluated on the test split.
3. Fine-tune each briefly without labels (distillation from the original, ``vitprune finetune --no-labels``'s
   code), evaluate again; time all against the original in interleaved rounds (``vitprune bench``'s code);
   export the most accurate to ONNX (parity checked); draw the kept patches of one digit (``vitprune show``).
4. Print one table: method, FLOPs, measured speed-up, top-1 without and with fine-tuning, ONNX parity.

    python examples/digits.py                 # results in examples/out/results.json
    python examples/digits.py --epochs 5 --out /tmp/digits
    python examples/digits.py --write-folders /tmp/digits_folders   # only write train/ and val/ PNG folders
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ARCH = "timm:vit_small_patch16_224"
MODEL_ARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2, "num_classes": 10}
IMAGE_SIZE = 32


def digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train [1347, 3, 32, 32], y_train, x_test [450, 3, 32, 32], y_test)``, pixels scaled to [-1, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.25, random_state=seed, stratify=labels.numpy()
    )
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]


def write_image_folders(out_dir: str | Path, seed: int = 0, max_train: int | None = None,
                        max_val: int | None = None) -> dict[str, int]:
    """Write the digits as ImageFolder trees ``out_dir/train/<digit>/*.png`` and ``out_dir/val/<digit>/*.png``.

    The split is :func:`digits_split` (stratified 75/25: 1,347 train / 450 val); each image is the
    ``IMAGE_SIZE x IMAGE_SIZE`` upsampled digit the training here uses, as an 8-bit greyscale PNG
    (``(pixel + 1) / 2 * 255``, so ``vitprune finetune``'s default mean/std 0.5 maps it back to ``[-1, 1]``).
    ``max_train`` / ``max_val`` keep only the first images of each split (the split is shuffled).

    Returns:
        ``{"train": images written, "val": images written}``.

    Raises:
        FileExistsError: ``out_dir/train`` or ``out_dir/val`` exists (nothing is overwritten).
    """
    from PIL import Image

    out_dir = Path(out_dir)
    targets = {"train": out_dir / "train", "val": out_dir / "val"}
    for path in targets.values():
        if path.exists():
            raise FileExistsError(f"{path} exists; choose another folder")
    x_train, y_train, x_test, y_test = digits_split(seed)
    counts = {}
    for name, (x, y, limit) in {"train": (x_train, y_train, max_train), "val": (x_test, y_test, max_val)}.items():
        pixels = ((x[:limit, 0] + 1.0) / 2.0 * 255.0).round().clamp(0, 255).to(torch.uint8)  # [N, H, W]
        for i, (img, label) in enumerate(zip(pixels, y[:limit].tolist())):
            folder = targets[name] / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.numpy()).save(folder / f"{i:04d}.png")
        counts[name] = len(pixels)
    return counts


def build_model(seed: int = 0) -> torch.nn.Module:
    """The example's ViT, randomly initialised from ``seed`` (so runs are repeatable)."""
    import vitprune

    torch.manual_seed(seed)
    return vitprune.load(ARCH, model_args=MODEL_ARGS)


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0,
          batch: int = 32, lr: float = 1e-3, log=None) -> None:
    """AdamW, cosine schedule with one warm-up epoch, random shifts of up to 2 pixels as augmentation.
    ``log`` (default: stderr) gets one line per epoch: epoch, mean loss, seconds since the start."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(x) / batch)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * s / total))
    )
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        loss_sum = 0.0
        for i in range(0, len(x), batch):
            xb, yb = x[order[i:i + batch]], y[order[i:i + batch]]
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,)))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(yb)
        log(f"train epoch {epoch + 1}/{epochs}  loss {loss_sum / len(x):.3f}  {time.perf_counter() - start:.0f} s")
    model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> float:
    """Top-1 accuracy in eval mode (seeded, so random token selection is repeatable)."""
    model.eval()
    torch.manual_seed(seed)
    correct = sum(int((model(x[i:i + 256]).argmax(-1) == y[i:i + 256]).sum()) for i in range(0, len(x), 256))
    return correct / len(x)


def vitprune_cli(*args: str) -> str:
    """Run the ``vitprune`` command line in a subprocess, as a user would; returns its stdout."""
    return vitprune_cli_many([list(args)])[0]


def vitprune_cli_many(commands: list[list[str]]) -> list[str]:
    """Run several ``vitprune`` commands side by side (each its own process, as a user's shell would);
    returns their stdouts in order. Most of a short command is starting Python and importing torch,
    which two cores do twice as fast in parallel."""
    procs = []
    for args in commands:
        print("$ vitprune " + " ".join(args), flush=True)
        procs.append(subprocess.Popen([sys.executable, "-m", "vitprune", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"vitprune failed ({proc.returncode}): {err.strip()}")
        outs.append(out)
    return outs


#: FLOPs per image of every rewrite, as a fraction of the original's.
FLOPS = 0.6
#: token-merge's schedule: one merge of 29 tokens in block 0 (FLOPs 0.587). Each merging block runs about
#: 20 small kernels (matching, sort, gathers) its FLOPs do not show; at this width (64) ToMe's constant r in
#: every block (r = 12, FLOPs 0.61) ran 0.73-0.76x the original's speed, one merge 1.17-1.19x (batch 64 and
#: 256, eager, 2 threads). Fewer merging blocks spend the same FLOPs faster (README, "Measured speed").
TOKEN_MERGE_R = [29, 0, 0, 0]
#: token-drop: keep 0.6 of the patches, by `distinct` (deterministic, so ONNX parity is comparable).
TOKEN_DROP_KEEP = 0.6


def training_key(epochs: int, batch: int, lr: float) -> str:
    """What determines the trained weights: the training config and the code that builds, feeds and trains
    the model (its source text), and the torch and timm versions."""
    import hashlib
    import inspect

    import timm

    config = {"arch": ARCH, "model_args": MODEL_ARGS, "image_size": IMAGE_SIZE, "epochs": epochs, "batch": batch,
              "lr": lr, "seed": 0, "torch": torch.__version__, "timm": timm.__version__}
    code = "".join(inspect.getsource(f) for f in (digits_split, build_model, train))
    return hashlib.sha256((json.dumps(config, sort_keys=True) + code).encode()).hexdigest()[:16]


def trained_model(out: Path, x_train, y_train, x_test, y_test, epochs: int, batch: int, lr: float,
                  retrain: bool = False) -> tuple[torch.nn.Module, float, str]:
    """The trained ViT: from ``out/digits_vit.safetensors`` when ``out/digits_vit.json`` records the same
    :func:`training_key`, else trained now and written there (weights, a pickled module, the key) atomically.
    Returns ``(model, test accuracy, what happened)``."""
    import os

    from safetensors.torch import load_file, save_file

    key = training_key(epochs, batch, lr)
    weights, pickled, record = out / "digits_vit.safetensors", out / "digits_vit.pt", out / "digits_vit.json"
    model = build_model()
    if not retrain and record.is_file() and weights.is_file() and pickled.is_file():
        try:
            cached = json.loads(record.read_text())
        except ValueError:
            cached = {}
        if cached.get("key") == key:
            model.load_state_dict(load_file(str(weights)))
            model.eval()
            return model, accuracy(model, x_test, y_test), f"reused {weights} (same training config and code, key {key})"
    start = time.perf_counter()
    train(model, x_train, y_train, epochs, batch=batch, lr=lr)
    seconds = time.perf_counter() - start
    acc = accuracy(model, x_test, y_test)
    for path, write in ((weights, lambda t: save_file(model.state_dict(), t)), (pickled, lambda t: torch.save(model, t)),
                        (record, lambda t: Path(t).write_text(json.dumps(
                            {"key": key, "epochs": epochs, "batch": batch, "lr": lr, "test_accuracy": acc}, indent=2)))):
        tmp = path.with_name(f".{path.name}.tmp")
        write(str(tmp))
        os.replace(tmp, path)  # the key is written last: a half-written cache is never "current"
    return model, acc, f"trained {epochs} epochs in {seconds:.0f} s, wrote {weights}"


def rewrites(model: torch.nn.Module, calibration: torch.Tensor, budget: int, out: Path) -> dict:
    """The three rewrites at :data:`FLOPS`: name -> ``(model, report, how)``. importance-mask's per-block keep
    counts come from ``vitprune.search`` (schedule written to ``out/schedule.json``)."""
    import vitprune

    found = vitprune.search(model, flops=FLOPS, calibration=calibration, methods=("importance-mask",),
                            budget=budget, calibration_limit=len(calibration))
    found.save(out / "schedule.json")
    plans = {
        "token-merge": ("token-merge", {"r": TOKEN_MERGE_R}, "r " + ",".join(map(str, TOKEN_MERGE_R))),
        "importance-mask": (found.method, found.params, "searched: tokens " + ",".join(map(str, found.tokens_per_block))),
        "token-drop": ("token-drop", {"keep_rate": TOKEN_DROP_KEEP, "selection": "distinct", "at_inference": True},
                       f"keep {TOKEN_DROP_KEEP}, distinct"),
    }
    done = {}
    for name, (method, params, how) in plans.items():
        rewritten, report = vitprune.rewrite(model, method, example_input=calibration[:2], **params)
        done[name] = (rewritten, report, how)
    return done


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch", type=int, default=32, help="training batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="label-free fine-tune epochs per rewrite")
    parser.add_argument("--finetune-images", type=int, default=None,
                        help="fine-tune on the first N training digits only (default: all 1,347)")
    parser.add_argument("--search-budget", type=int, default=12, help="rewrites the search scores")
    parser.add_argument("--calibration", type=int, default=64, help="training digits the search scores on")
    parser.add_argument("--bench-batch", type=int, default=128, help="batch size of the throughput measurement")
    parser.add_argument("--bench-rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--bench-iters", type=int, default=5, help="forward passes per timed run (longer runs: "
                        "less noise from other processes on a shared CPU)")
    parser.add_argument("--retrain", action="store_true", help="train even when out/ holds a current model")
    parser.add_argument("--out", default="examples/out", help="folder for the models and results")
    parser.add_argument("--write-folders", metavar="DIR", help="only write the digits as ImageFolder trees "
                        "DIR/train and DIR/val (PNG) for `vitprune finetune` / `vitprune eval`, then exit")
    args = parser.parse_args(argv)
    if args.write_folders:
        counts = write_image_folders(args.write_folders)
        print(f"wrote {counts['train']} train and {counts['val']} val images under {args.write_folders}")
        return counts
    import shutil

    import vitprune
    from vitprune.ship.bench import bench
    from vitprune.ship.export_onnx import export_onnx
    from vitprune.ship.show import show
    from vitprune.train.finetune import finetune

    job_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x_train, y_train, x_test, y_test = digits_split()

    # 1. the original: trained here, or reused from out/ when the training config and code are the same
    model, base_acc, how = trained_model(out, x_train, y_train, x_test, y_test, args.epochs, args.batch, args.lr,
                                         args.retrain)
    print(f"{ARCH} {MODEL_ARGS}: {how}; test top-1 {base_acc:.4f} on {len(y_test)} digits")
    print(vitprune.inspect_model(model).describe())  # what `vitprune inspect` prints

    # 2. rewrite at FLOPs 0.6 (each rewrite verifies: keep-all node for node, FLOPs before/after), save, reload
    images = out / "digits_images"  # PNG folders: `vitprune finetune --data`, `vitprune show`'s digit
    if not (images / "train").is_dir():
        shutil.rmtree(images, ignore_errors=True)
        write_image_folders(images)
    finetune_data = images / "train"
    if args.finetune_images:
        finetune_data = out / f"digits_images_{args.finetune_images}"
        if not (finetune_data / "train").is_dir():
            shutil.rmtree(finetune_data, ignore_errors=True)
            write_image_folders(finetune_data, max_train=args.finetune_images, max_val=1)
        finetune_data = finetune_data / "train"
    rows, written = {}, []
    for name, (rewritten, report, how) in rewrites(model, x_train[:args.calibration], args.search_budget, out).items():
        path = vitprune.save(rewritten, out / f"digits_{name}", overwrite=True)
        again = vitprune.load(path)  # from disk: no pickle, no timm code
        rows[name] = {"how": how, "flops_ratio": report.flops_ratio, "keep_all_max_abs_diff": report.keep_all_max_abs_diff,
                      "top1": accuracy(again, x_test, y_test), "path": str(path), "model": again}
        print(f"{name:<16} {how}: FLOPs x{report.flops_ratio:.3f}, keep-all diff {report.keep_all_max_abs_diff:.1e}, "
              f"top-1 {rows[name]['top1']:.4f}; saved {path}")

    # 3. fine-tune each briefly without labels: distillation from the original (what `finetune --no-labels` does)
    for name, row in rows.items():
        done = finetune(row["model"], finetune_data, out / f"digits_{name}_ft", labels=False,
                        epochs=args.finetune_epochs, batch_size=64, lr=3e-4, warmup_epochs=0.5, scale=(0.85, 1.0),
                        overwrite=True,
                        log=lambda msg: print(msg, file=sys.stderr, flush=True))
        row["ft_model"] = vitprune.load(done.model_path)
        row["ft_path"] = str(done.model_path)
        row["top1_ft"] = accuracy(row["ft_model"], x_test, y_test)
        print(f"{name:<16} fine-tuned {args.finetune_epochs} epochs label-free: top-1 {row['top1']:.4f} -> "
              f"{row['top1_ft']:.4f}; saved {done.model_path}")
        written.append(done.model_path)

    # 4. throughput against the original, interleaved rounds in this run (`vitprune bench`'s code)
    measured = bench({"original": model, **{n: r["ft_model"] for n, r in rows.items()}}, (3, IMAGE_SIZE, IMAGE_SIZE),
                     batches=(args.bench_batch,), repeats=args.bench_rounds, iters=args.bench_iters)
    speed = {r.model: r for r in measured}
    for name, row in rows.items():
        row["speedup"] = speed[name].speedup
    base_speed = speed["original"].images_per_s

    # 5. the best (most accurate after fine-tuning, then fastest) to ONNX, parity checked in ONNX Runtime
    best = max(rows, key=lambda n: (rows[n]["top1_ft"], rows[n]["speedup"]))
    onnx_path = out / f"digits_{best}.onnx"
    exported = export_onnx(rows[best]["ft_model"], onnx_path)
    rows[best]["onnx_parity"] = max(v for v in exported.parity.values() if v is not None) \
        if exported.parity_comparable else None

    # 6. the kept patches of one test digit, per stage of the importance-mask model
    picture = out / "digits_kept.png"
    digit = sorted((images / "val" / "3").glob("*.png"))[0]
    show(rows["importance-mask"]["ft_model"], digit, picture)

    header = f"{'method':<52} {'FLOPs':>6} {'speed-up':>9} {'top-1':>7} {'fine-tuned':>11} {'ONNX parity':>12}"
    lines = [header, "-" * len(header),
             f"{'original (' + ARCH.split(':')[1] + ', 4 blocks, width 64)':<52} {1.0:>6.3f} {'1.00x':>9} "
             f"{base_acc:>7.4f} {'-':>11} {'-':>12}"]
    for name, row in rows.items():
        parity = row.get("onnx_parity")
        parity = "-" if name != best else (f"{parity:.1e}" if parity is not None else "not comparable")
        lines.append(f"{name + ' (' + row['how'] + ')':<52} {row['flops_ratio']:>6.3f} {row['speedup']:>8.2f}x "
                     f"{row['top1']:>7.4f} {row['top1_ft']:>11.4f} {parity:>12}")
    table = "\n".join(lines)
    seconds = time.perf_counter() - job_start
    print()
    print(f"FLOPs 0.6 on {len(y_test)} test digits; speed-up: eager, batch {args.bench_batch}, "
          f"{torch.get_num_threads()} threads, median of {args.bench_rounds} interleaved rounds of {args.bench_iters} "
          f"forwards "
          f"(original {base_speed:.0f} images/s); job {seconds:.0f} s")
    print(table)
    files = [*(r["ft_path"] for r in rows.values()), str(onnx_path), str(picture), str(out / "schedule.json")]
    print("wrote " + ", ".join(files))
    results = {"epochs": args.epochs, "batch": args.batch, "lr": args.lr, "test_images": len(y_test),
               "original_accuracy": base_acc, "trained": how, "seconds": seconds, "best": best,
               "onnx": str(onnx_path), "picture": str(picture), "table": table,
               "rows": {n: {k: v for k, v in r.items() if not k.endswith("model")} for n, r in rows.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results in {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
