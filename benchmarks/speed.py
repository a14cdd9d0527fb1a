"""Speed of every method on this machine: eager, torch.compile and ONNX Runtime, vs the FLOPs-ideal speed-up.

For each FLOPs target F (default 0.6 and 0.5) the original timm model, or a Hugging Face one (``--model
hf-vit-small``, captured with torch.export) (random init; speed does not depend on the weights) is rewritten three ways, each at FLOPs ratio ≈ F:
- token-drop at inference (random selection; keep rate found by bisection on the measured FLOPs ratio),
- importance-mask dynamic (``flops=F``),
- importance-mask static (``flops=F``, calibrated on scikit-image's photographs),
- lifespan-gather (``flops=F``, regressor after block 3, before any fine-tuning),
and all models run through :func:`vitprune.ship.bench.bench` (interleaved rounds, median images/s). The
speed-up / FLOPs-ideal column is the figure of merit: 1.0 means the saved FLOPs all became time.

    python benchmarks/speed.py --model vit_small_patch16_224 --batch 32
    python benchmarks/speed.py --model vit_base_patch16_224 --batch 8 --repeats 3 --iters 1
    python benchmarks/speed.py --model hf-vit-small --batch 16 --targets 0.5 --backend eager,compile
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

import vitprune
from common import token_drop_keep_count, write_atomic
from vitprune.ship.bench import bench, table
from vitprune.io.origin import default_input_size


def photos(size: int) -> torch.Tensor:
    """scikit-image's natural photographs, ``[6, 3, size, size]``, normalised as timm ViTs expect."""
    from skimage import data, transform

    imgs = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry(),
            data.colorwheel()]
    x = torch.stack([torch.tensor(transform.resize(p[..., :3], (size, size), anti_aliasing=True), dtype=torch.float32)
                     .permute(2, 0, 1) for p in imgs])
    return (x - 0.5) / 0.5


#: Hugging Face models by name (random init, transformers' own classes; captured with torch.export).
HF_MODELS = {"hf-vit-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)}


def build(name: str) -> torch.nn.Module:
    """A timm architecture by name, or one of :data:`HF_MODELS` (a ViT-S/16-sized ViTForImageClassification)."""
    if name in HF_MODELS:
        import transformers

        from vitprune.io.hf import wrap

        return wrap(transformers.ViTForImageClassification(transformers.ViTConfig(**HF_MODELS[name])))
    return vitprune.load(f"timm:{name}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--targets", default="0.6,0.5")
    p.add_argument("--backend", default="eager,compile,onnxruntime")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    original = build(args.model).eval()
    size = default_input_size(original)
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    calib = photos(size[1])
    num_patches = vitprune.inspect_model(original, example_input=x).num_patches
    models, reports = {"original": original}, {}
    for target in (float(t) for t in args.targets.split(",")):
        k = token_drop_keep_count(original, target, x)
        gm, rep = vitprune.rewrite(original, "token-drop", keep_rate=k / num_patches, at_inference=True, example_input=x)
        models[f"token-drop@{target}"], reports[f"token-drop@{target}"] = gm, rep
        for mode in ("dynamic", "static"):
            kw = {"calibration": calib} if mode == "static" else {}
            gm, rep = vitprune.rewrite(original, "importance-mask", flops=target, mode=mode, example_input=x, **kw)
            models[f"importance-mask-{mode}@{target}"], reports[f"importance-mask-{mode}@{target}"] = gm, rep
        gm, rep = vitprune.rewrite(original, "lifespan-gather", flops=target, example_input=x)
        models[f"lifespan-gather@{target}"], reports[f"lifespan-gather@{target}"] = gm, rep
    rows = bench(models, size, backends=tuple(args.backend.split(",")), batches=(args.batch,), repeats=args.repeats,
                 iters=args.iters)
    result = {
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "loadavg": os.getloadavg()},
        "config": vars(args) | {"out": str(args.out)},
        "rewrites": {k: {"flops_ratio": r.flops_ratio, "decisions": r.decisions, "keep_all_max_abs_diff":
                         r.keep_all_max_abs_diff} for k, r in reports.items()},
        "rows": [r.to_dict() for r in rows],
    }
    md = f"`{args.model}`, batch {args.batch}, {args.repeats} interleaved rounds × {args.iters} forwards, " \
         f"torch {torch.__version__}, {torch.get_num_threads()} threads, {result['machine']['date']}\n\n" + table(rows)
    print(md)
    out = args.out or Path(__file__).parent / "results" / f"speed_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=2, default=str))
    write_atomic(out.with_suffix(".md"), md)


if __name__ == "__main__":
    sys.exit(main())
