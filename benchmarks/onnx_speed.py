"""Speed of every method rewritten through the ONNX frontend, in ONNX Runtime (CPU), vs the FLOPs-ideal speed-up.

A timm ViT (random init: speed does not depend on the weights) is exported the ways third-party ONNX files are
made: the TorchScript exporter (``dynamo=False``, opset 17), the dynamo exporter (opset 18), and the TorchScript
export run through ``onnxruntime.transformers.optimizer`` (ONNX Runtime's fused transformer graph). Each file is
rewritten with :func:`vitprune.rewrite_onnx` (no PyTorch code of the model involved) at FLOPs ≈ F:

- token-drop (magnitude selection, keep rate F: the drop before block 0 scales every block),
- importance-mask dynamic and static (``flops=F``; static calibrated on scikit-image's photographs),
- lifespan-gather (``flops=F``, regressor after block 3),

and every file runs through :func:`vitprune.ship.bench.bench` on the ``onnxruntime`` backend (ONNX Runtime's
default graph optimisations, interleaved rounds, median images/s).

    python benchmarks/onnx_speed.py --model vit_small_patch16_224 --batch 16 --targets 0.5
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

import vitprune
from common import write_atomic
from speed import photos
from vitprune.frontends.onnx import OnnxModel
from vitprune.ship.bench import bench, table

KINDS = ("torchscript-17", "dynamo-18", "ort-fused")


def export(model: torch.nn.Module, kind: str, size: int, folder: Path) -> onnx.ModelProto:
    """``model`` as an ONNX file of ``kind`` (dynamic batch), read back."""
    x = torch.randn(2, 3, size, size)
    path = folder / f"{kind}.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        if kind == "dynamo-18":
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, input_names=["pixel_values"],
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
            program.save(str(path))
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["pixel_values"],
                              output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
            if kind == "ort-fused":
                from onnxruntime.transformers.optimizer import optimize_model

                c = model.embed_dim
                optimize_model(str(path), model_type="vit", num_heads=model.blocks[0].attn.num_heads,
                               hidden_size=c).save_model_to_file(str(path))
    return onnx.load(str(path))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--targets", default="0.5")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    original = vitprune.load(f"timm:{args.model}").eval()
    size = original.patch_embed.img_size[0]
    calibration = [photos(size)]
    rows, reports = [], {}
    with tempfile.TemporaryDirectory(prefix="vitprune-onnx-speed-") as tmp:
        for kind in args.kinds.split(","):
            proto = export(original, kind, size, Path(tmp))
            models = {f"{kind} original": OnnxModel(proto)}
            for target in (float(t) for t in args.targets.split(",")):
                runs = {
                    "token-drop": dict(keep_rate=target, selection="magnitude"),
                    "importance-mask-dynamic": dict(flops=target),
                    "importance-mask-static": dict(flops=target, mode="static", calibration=calibration),
                    "lifespan-gather": dict(flops=target),
                }
                for name, params in runs.items():
                    method = "importance-mask" if name.startswith("importance") else name
                    new, report = vitprune.rewrite_onnx(proto, method, **params)
                    label = f"{kind} {name}@{target}"
                    models[label] = OnnxModel(new)
                    reports[label] = {"flops_ratio": report.flops_ratio, "seconds": report.seconds,
                                      "keep_all_worst_node_diff": report.keep_all_worst_node_diff,
                                      "tokens_per_block": report.decisions.get("tokens_per_block")}
                    print(f"{label}: FLOPs {report.flops_ratio:.3f}, rewrite {report.seconds:.1f} s", file=sys.stderr)
            rows += bench(models, (3, size, size), backends=("onnxruntime",), batches=(args.batch,),
                          repeats=args.repeats, iters=args.iters)
    result = {
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "loadavg": os.getloadavg()},
        "config": vars(args) | {"out": str(args.out)},
        "rewrites": reports,
        "rows": [r.to_dict() for r in rows],
    }
    md = (f"`{args.model}` through the ONNX frontend, ONNX Runtime CPU, batch {args.batch}, {args.repeats} interleaved "
          f"rounds × {args.iters} runs, {torch.get_num_threads()} threads, {result['machine']['date']}; speed-up is "
          f"against the same file before the rewrite\n\n" + table(rows))
    print(md)
    out = args.out or Path(__file__).parent / "results" / f"onnx_speed_{args.model}.json"
    write_atomic(out, json.dumps(result, indent=2, default=str))
    write_atomic(out.with_suffix(".md"), md)


if __name__ == "__main__":
    sys.exit(main())
