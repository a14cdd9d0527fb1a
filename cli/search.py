"""``vitprune search``: the per-block schedule that keeps the most of MODEL's output at a FLOPs or latency budget,
written as a schedule file that ``vitprune rewrite MODEL --schedule FILE`` applies.

Registered on the ``vitprune`` group by :mod:`vitprune.cli.main` (import that module, not this one).
Engine: :mod:`vitprune.search`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vitprune.cli.device import device_options
from vitprune.device import resolve_device, resolve_dtype
from vitprune.cli.main import _check_output, _emit_json, _floats3, model_options, normalisation_options, say_preprocessing
from vitprune.errors import VitpruneError

_BACKENDS = ("eager", "compile", "onnxruntime")


@click.command("search")
@model_options
@click.option("--flops", type=float, help="Target eval FLOPs per image as a fraction of the original's, in (0, 1); "
              "a schedule is admissible when its predicted ratio is at most FLOPS + 0.005.")
@click.option("--latency-ms", type=float, help="Milliseconds one forward of a --batch input may take on --backend on "
              "this machine (instead of --flops, or as well: both must hold). Predicted from FLOPs plus each "
              "token merge's time, measured here; the schedule found is timed.")
@click.option("--speedup", type=float, help="Instead of --latency-ms: the original's time on --backend at --batch "
              "over this (> 1), e.g. 1.5 for 1.5x its throughput.")
@click.option("--batch", type=int, default=1, show_default=True, help="--latency-ms / --speedup: batch size timed.")
@click.option("--backend", type=click.Choice(_BACKENDS), default="eager", show_default=True,
              help="--latency-ms / --speedup: where the latency is measured.")
@click.option("--calibration", required=True, type=click.Path(), help="Folder of calibration images (any layout, "
              "read recursively; resized, center-cropped, normalised with the model's own mean/std).")
@click.option("--calibration-limit", type=int, default=64, show_default=True,
              help="Calibration images used (sampled with --seed when the folder holds more).")
@click.option("--methods", default="importance-mask,token-merge", show_default=True,
              help="Methods to schedule, comma-separated.")
@click.option("--budget", type=int, default=48, show_default=True,
              help="Most rewrites scored on the calibration images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which calibration images are sampled.")
@normalisation_options
@click.option("--frontend", type=click.Choice(["auto", "fx", "export"]), default="auto", show_default=True,
              help="Capture with torch.fx symbolic trace, torch.export, or trace and export when tracing fails.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The schedule file to write (JSON).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--min-keep", type=int, help="The fewest patch tokens a schedule may leave a block "
              "[default: min(10% of the patches, 16), at least 1].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the search result as JSON.")
@device_options("Precision of the calibration forwards and timings (model and images cast to it) [default: float32].")
def search(model, source, inputs, input_size, flops, latency_ms, speedup, batch, backend, calibration,
           calibration_limit, methods, budget, seed, mean, std, frontend, output, overwrite, min_keep, quiet,
           as_json, device, dtype) -> None:
    """Search the per-block keep counts / merges that keep MODEL's output closest to the original at a FLOPs
    (--flops) and/or latency (--latency-ms or --speedup) budget, on calibration images, without fine-tuning.

    Writes a schedule file; `vitprune rewrite MODEL --schedule OUTPUT -o OUT` applies it (and verifies).
    """
    from vitprune.search import search as run_search

    if flops is None and latency_ms is None and speedup is None:
        raise click.UsageError("give --flops, --latency-ms (or --speedup), or both")
    if latency_ms is not None and speedup is not None:
        raise click.UsageError("give --latency-ms or --speedup, not both")
    if speedup is not None and not speedup > 1:
        raise click.BadParameter(f"must be above 1, got {speedup}", param_hint="--speedup")
    if flops is not None and not 0.0 < flops < 1.0:
        raise click.BadParameter(f"must be in (0, 1), got {flops}", param_hint="--flops")
    if latency_ms is not None and not latency_ms > 0:
        raise click.BadParameter(f"must be a positive number of milliseconds, got {latency_ms}", param_hint="--latency-ms")
    resolve_device(device), resolve_dtype(dtype)  # a bad value fails before any work
    output = Path(output)
    _check_output(output, [*inputs, calibration], overwrite)
    mean, std = _floats3(mean, "--mean"), _floats3(std, "--std")
    result = run_search(model, flops=flops, latency_ms=latency_ms, speedup=speedup, calibration=calibration,
                        methods=methods, budget=budget, seed=seed, batch=batch, backend=backend,
                        calibration_limit=calibration_limit, progress=not quiet, input_size=input_size, mean=mean,
                        std=std, frontend=frontend, min_keep=min_keep, device=device, dtype=dtype)
    result.model = source
    result.save(output)
    say_preprocessing(model, mean, std, input_size)  # after the work: a refused command's error stays one line
    if as_json:
        _emit_json({**result.to_dict(), "output": str(output)})
        return
    for line in summary(result):
        click.echo(line)
    click.echo(f"wrote            {output} (apply: vitprune rewrite MODEL --schedule {output} -o OUT)")


def summary(result) -> list[str]:
    """Readable lines for a :class:`vitprune.search.SearchResult`."""
    if result.keep_counts is not None:
        sched = "keep " + ",".join(f"{b}:{k}" for b, k in result.keep_counts.items())
    else:
        sched = "merge " + ",".join(f"{b}:{r}" for b, r in result.merges.items())
    agree = f", top-1 agreement {result.agreement:.3f}" if result.agreement is not None else ""
    if result.default_cosine is not None:
        dagree = f", {result.default_agreement:.3f}" if result.default_agreement is not None else ""
        default = f" (default {result.default_method}: {result.default_cosine:.5f}{dagree})"
    else:
        default = " (no method's default schedule is admissible at this target)"
    at = f"FLOPs {result.flops_target:g}"
    if result.latency_target_ms is not None:
        at = f"{result.latency_target_ms:.3g} ms" + (f" and {at}" if result.flops_limit is not None
                                                   else f" (seeds solved at FLOPs {result.flops_target:g})")
    lines = [
        f"search           {result.method} at {at}: {result.evaluations} evaluations on "
        f"{result.calibration_images} calibration images ({result.seconds:.1f} s)",
        f"schedule         {sched} of {result.num_patches} patches; tokens per block {result.tokens_per_block}",
        f"FLOPs            predicted {result.predicted_flops_ratio:.4f}, measured {result.measured_flops_ratio:.4f}",
        f"fidelity         cosine {result.cosine:.5f}{agree}{default}",
    ]
    if result.latency_ms is not None:
        met = "met" if result.latency_met else "NOT met"
        lines.append(f"latency          {result.latency_ms:.3g} ms at batch {result.batch} on {result.backend}, "
                     f"predicted {result.predicted_latency_ms:.3g} (target {result.latency_target_ms:.3g} ms {met}; "
                     f"original {result.latency_original_ms:.3g} ms; speed-up {result.speedup:.2f}x, "
                     f"{result.speedup_target:.2f}x asked)")
    return lines


def schedule_method(schedule: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """For ``vitprune rewrite --schedule FILE``: ``(method, options)`` with the method's parameters from the file.

    Raises:
        click.UsageError: --method or a method parameter given as well.
        VitpruneError: the file is not a schedule (:func:`vitprune.search.read_schedule`) or names a method
            ``vitprune rewrite`` does not know.
    """
    from click.core import ParameterSource

    from vitprune.cli.main import _METHOD_OPTIONS
    from vitprune.search import read_schedule

    ctx = click.get_current_context()
    if ctx.get_parameter_source("method") not in (ParameterSource.DEFAULT, None):
        raise click.UsageError("--method does not apply with --schedule: the schedule file gives the method and "
                               "its parameters")
    given = sorted(k for k, v in options.items() if v is not None)
    if given:
        raise click.UsageError(f"--{given[0].replace('_', '-')} does not apply with --schedule: the schedule file "
                               "gives the method and its parameters")
    method, params = read_schedule(schedule)
    if method not in _METHOD_OPTIONS:
        raise VitpruneError(f"{schedule}: method {method!r} is not one vitprune rewrites "
                            f"({', '.join(sorted(_METHOD_OPTIONS))})")
    return method, {**options, **params}
