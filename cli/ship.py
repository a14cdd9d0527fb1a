"""``vitprune export`` (optimised ONNX) and ``vitprune bench`` (speed, memory, accuracy)."""

from __future__ import annotations

from pathlib import Path

import click

from vitprune.cli.device import device_options
from vitprune.device import resolve_device, resolve_dtype
from vitprune.cli.main import _check_output, _emit_json, _input_size, model_options


@click.command()
@model_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--opset", type=int, default=18, show_default=True,
              help="ONNX opset (23 exports attention as one Attention op).")
@click.option("--optimize", type=click.Choice(["none", "basic", "ort"]), default=None,
              help="Graph optimisation: none; basic = onnx-graphsurgeon constant folding; ort = ONNX Runtime's "
                   "transformer optimizer (SkipLayerNormalization, BiasGelu, ...) after folding.  [default: basic]")
@click.option("--no-optimize", is_flag=True, hidden=True, help="The same as --optimize none.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Weights and compute; float16 keeps float32 inputs/outputs, checked to 1e-2 of the output's scale.")
@click.option("--quantize", type=click.Choice(["none", "dynamic"]), default="none", show_default=True,
              help="dynamic: int8 weights (ONNX Runtime's quantize_dynamic), checked by top-1 agreement.")
@click.option("--check-images", type=click.Path(file_okay=False), metavar="FOLDER",
              help="Real images on which an int8 export must agree with PyTorch's top-1 (>= 95%).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
def export(model, source, inputs, input_size, output, opset, optimize, no_optimize, dtype, quantize, check_images,
           overwrite, as_json) -> None:
    """Export MODEL to optimised ONNX (dynamic batch, static token counts), checked against PyTorch in ONNX Runtime."""
    from vitprune.errors import VitpruneError
    from vitprune.ship.export_onnx import export_onnx
    from vitprune.ship.onnx_optimize import check_options
    from vitprune.io.origin import example_input

    if no_optimize and optimize not in (None, "none"):
        raise VitpruneError(f"--no-optimize and --optimize {optimize} contradict each other; give one")
    optimize = "none" if no_optimize else optimize or "basic"
    check_options(optimize, dtype, quantize)  # before any work
    output = Path(output)
    _check_output(output, [*inputs, *([check_images] if check_images else [])], overwrite)
    report = export_onnx(model, output, example_input=example_input(model, input_size), opset=opset,
                         optimize=optimize, dtype=dtype, quantize=quantize, check_images=check_images)
    if as_json:
        _emit_json({"model": source, **report.to_dict()})
        return
    parity = ", ".join(f"batch {b}: {'n/a (random selection)' if d is None else f'{d:.1e}'}" for b, d in report.parity.items())
    click.echo(f"wrote {output} ({report.bytes / 2**20:.1f} MiB, opset {opset}, optimize {optimize}, {dtype}"
               f"{', int8 weights' if quantize == 'dynamic' else ''}, "
               f"{report.nodes_before_optimize} -> {report.nodes_after_optimize} nodes); ORT vs PyTorch max abs diff {parity}")
    if report.relative_diff is not None:
        click.echo(f"max abs diff / output scale {report.relative_diff:.2e} (tolerance {report.tolerance:g})")
    if report.top1_agreement is not None:
        on = "the check images" if report.agreement_inputs == "images" else "random inputs (give --check-images)"
        click.echo(f"top-1 agreement with PyTorch float32 {report.top1_agreement:.1%} on {on}")
    if report.fused_after is not None:
        changed = [f"{op} {report.fused_before[op]} -> {n}" for op, n in report.fused_after.items()
                   if n or report.fused_before[op]]
        click.echo("ORT optimizer: " + ", ".join(changed))


def _ints(value: str, name: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise click.BadParameter(f"expected positive integers such as 1,32, got {value!r}", param_hint=name)
    return out


@click.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--batch", "batches", default="1,32", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--backend", "backends", default="eager", show_default=True,
              help="Comma list of eager, compile, onnxruntime.")
@click.option("--repeats", type=int, default=5, show_default=True, help="Interleaved timing rounds.")
@click.option("--iters", type=int, default=3, show_default=True, help="Forward passes per timed run.")
@click.option("--trust-pickle", is_flag=True, help="Allow unpickling whole-module .pt files.")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="Constructor argument for every timm: MODEL (img_size=32, depth=4, ...). Repeatable.")
@click.option("--input-size", metavar="C,H,W", help="Input size when it cannot be read from the first model.")
@click.option("--data", type=click.Path(file_okay=False), help="ImageFolder to measure top-1 accuracy on (eager).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a Pareto picture (a .png file).")
@click.option("--overwrite", is_flag=True, help="Replace the --plot picture if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--quiet", is_flag=True, help="No progress display.")
@device_options("Precision the models run in (weights and inputs cast to it; FLOPs counted in float32) "
                "[default: float32].")
@click.option("--cuda-graphs", is_flag=True, help="The compile backend records CUDA graphs (inductor's "
              "reduce-overhead mode; CUDA only).")
def bench(models, batches, backends, repeats, iters, trust_pickle, model_args, input_size, data, plot, overwrite,
          as_json, quiet, device, dtype, cuda_graphs) -> None:
    """Measure MODELS (timm:NAME, saved folders, ONNX files, ...): params, FLOPs, throughput, latency, peak memory.

    ONNX files run on the onnxruntime backend only (with ONNX Runtime's graph optimisations), in float32 on
    the CPU. On CUDA, runs are timed with CUDA events and peak memory is torch.cuda.max_memory_allocated.

    The first model is the baseline for speed-up and FLOPs ratio. Runs of the models are interleaved.
    """
    from vitprune.ship.bench import BACKENDS, bench as run_bench, pareto_plot, table
    from vitprune.io.load import load, parse_model_args
    from vitprune.io.origin import default_input_size
    from vitprune.io.preprocess import resolve_preprocessing

    batches = _ints(batches, "--batch")
    backends = tuple(b.strip() for b in backends.split(",") if b.strip())
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        raise click.BadParameter(f"unknown backend {unknown[0] if unknown else ''!r}; choose from {', '.join(BACKENDS)}",
                                 param_hint="--backend")
    resolve_device(device), resolve_dtype(dtype)  # a bad value fails before any model is read
    if repeats < 1 or iters < 1:
        raise click.BadParameter("must be >= 1", param_hint="--repeats/--iters")
    if plot:
        if Path(plot).suffix.lower() != ".png":
            raise click.BadParameter(f"{plot!r}: the Pareto picture is a PNG; name it NAME.png", param_hint="--plot")
        _check_output(Path(plot), list(models), overwrite, what="--plot")
    loaded = {}
    for spec in models:
        name = spec if spec not in loaded else f"{spec} #{len(loaded)}"
        loaded[name] = load(spec, trust_pickle=trust_pickle, model_args=parse_model_args(model_args))
    from vitprune.frontends.onnx import OnnxModel

    first = next(iter(loaded.values()))
    size = _input_size(input_size)
    if size is None:
        size = first.input_size if isinstance(first, OnnxModel) else default_input_size(first)
    if size is None:
        raise click.BadParameter("the first model's input size is symbolic; give C,H,W", param_hint="--input-size")
    from vitprune.train.evaluate import evaluate

    def accuracy(m):
        return evaluate(m, data, input_size=size, seed=0, device=device, dtype=dtype, progress=False)["rows"][0]["top1"]

    rows = run_bench(loaded, size, backends=backends, batches=batches, repeats=repeats, iters=iters,
                     accuracy=accuracy if data else None, progress=not quiet, device=device, dtype=dtype,
                     cuda_graphs=cuda_graphs)
    if data:  # after the work: a refused command's error stays one line
        for name, m in loaded.items():
            if not isinstance(m, OnnxModel):
                click.echo(f"preprocessing    {name}: {resolve_preprocessing(m, None, None, size[0]).describe()}",
                           err=True)
    if plot:
        pareto_plot(rows, plot)
        click.echo(f"wrote {plot}", err=True)
    if as_json:
        _emit_json([r.to_dict() for r in rows])
    else:
        click.echo(table(rows), nl=False)
