"""What a per-image relative-position bias costs once tokens are dropped (BEiT), and what a RoPE gather costs (EVA-02).

When each image keeps its own tokens, BEiT's bias ``[1, H, N, N]`` (one for every image) becomes ``[B, H, K', K']``
(``K' = prefix + K`` kept tokens): vitprune gathers it per image in every block after a pruning point
(:class:`vitprune.ops.modules.TokenIndexedGather`). This measures, at batch ``--batch`` on the rewritten model's
own shapes (FLOPs ratio about ``--flops``, token-drop at inference):

- **memory**: the gathered biases per forward (``B·H·K'²`` floats per block) beside the shared one;
- **gather time**: the gathers alone, per forward (every gathered block), and as a share of the rewritten
  model's eager forward;
- **attention with a per-image mask**: one block's SDPA with the ``[B, H, K', K']`` mask vs the same mask
  shared across the batch (``[1, H, K', K']``), the kernel-side cost of a mask that differs per image;
- the same gather time for EVA-02's RoPE tables (``[P, d]`` -> ``[B, 1, K, d]``).

Median of ``--rounds`` interleaved rounds; timings only on an idle machine.

    python benchmarks/relative_bias_cost.py --batch 16 --flops 0.5
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vitprune
from common import token_drop_keep_count, write_results
from vitprune.ops.modules import TokenIndexedGather


def seconds(fn, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def median_times(fns: dict, rounds: int, iters: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(seconds(fn, iters))
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def measure(arch: str, batch: int, flops: float, rounds: int) -> dict:
    torch.manual_seed(0)
    model = vitprune.load(f"timm:{arch}").eval()
    x2 = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    k = token_drop_keep_count(model, flops, x2)
    vit = vitprune.inspect_model(model, example_input=x2)
    rewritten, report = vitprune.rewrite(model, "token-drop", keep_rate=k / vit.num_patches, at_inference=True,
                                         example_input=x2)
    gathers = [m for m in rewritten.modules() if isinstance(m, TokenIndexedGather)]
    # the gathers' real inputs, recorded on one forward
    inputs = []
    hooks = [g.register_forward_hook(lambda m, args, out: inputs.append((m, args, out))) for g in gathers]
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    rewritten(x)
    for h in hooks:
        h.remove()
    gather_bytes = sum(out.numel() * out.element_size() for _, _, out in inputs)
    table_bytes = sum(args[0].numel() * args[0].element_size() for _, args, _ in inputs)
    fns = {"rewritten forward": lambda: rewritten(x),
           "gathers alone": lambda: [m(*args) for m, args, _ in inputs]}
    result = {"arch": arch, "batch": batch, "keep_count": k, "flops_ratio": report.flops_ratio,
              "gathered_uses": len(inputs), "gathered_shape": list(inputs[0][2].shape),
              "table_shape": list(inputs[0][1][0].shape), "gathered_mb": gather_bytes / 2 ** 20,
              "tables_mb": table_bytes / 2 ** 20}
    mask = next((out for _, _, out in inputs if out.dim() == 4 and out.shape[-1] == out.shape[-2]), None)
    if mask is not None:  # one block's attention, with the per-image mask and with it shared across the batch
        b, h, n, _ = mask.shape
        head_dim = vit.blocks[0].head_dim
        q, kk, v = (torch.randn(b, h, n, head_dim) for _ in range(3))
        shared = mask[:1].contiguous()
        fns["sdpa, per-image mask"] = lambda: F.scaled_dot_product_attention(q, kk, v, attn_mask=mask)
        fns["sdpa, shared mask"] = lambda: F.scaled_dot_product_attention(q, kk, v, attn_mask=shared)
    times = median_times(fns, rounds, iters=2)
    result["ms"] = {k: v * 1000 for k, v in times.items()}
    result["gather_share"] = times["gathers alone"] / times["rewritten forward"]
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--flops", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--archs", default="beit_base_patch16_224,eva02_small_patch14_224")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "relative_bias_cost.json")
    args = p.parse_args(argv)
    rows = [measure(a, args.batch, args.flops, args.rounds) for a in args.archs.split(",")]
    result = {"machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
                          "date": datetime.datetime.now().isoformat(timespec="seconds")},
              "config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    lines = [f"batch {args.batch}, token-drop at inference at FLOPs ≈ {args.flops}, {args.rounds} interleaved rounds, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, {result['machine']['date']}", "",
             "| model | FLOPs | gathered per forward | forward | gathers | share | SDPA per-image mask | SDPA shared mask |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = r["ms"]
        sdpa = (f"{ms['sdpa, per-image mask']:.2f} ms", f"{ms['sdpa, shared mask']:.2f} ms") \
            if "sdpa, shared mask" in ms else ("–", "–")
        lines.append(f"| {r['arch']} | {r['flops_ratio']:.3f} | {r['gathered_uses']} × {r['gathered_shape']} "
                     f"({r['gathered_mb']:.1f} MB; tables {r['tables_mb']:.2f} MB) | {ms['rewritten forward']:.1f} ms | "
                     f"{ms['gathers alone']:.2f} ms | {100 * r['gather_share']:.1f}% | {sdpa[0]} | {sdpa[1]} |")
    write_results(args.out, result, "\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
