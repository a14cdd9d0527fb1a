"""``vitprune`` command line: ``inspect``, ``rewrite``, ``show``, ``export`` and ``bench``.

User errors print one line, ``vitprune: error: ...``, on stderr and exit with status 2 (usage) or 1
(anything else vitprune refused); a bug keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from vitprune.errors import VitpruneError


def _input_size(value: str | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    try:
        size = tuple(int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise click.BadParameter(f"expected C,H,W such as 3,224,224, got {value!r}", param_hint="--input-size")
    return size  # type: ignore[return-value]


def model_options(fn: Callable) -> Callable:
    """The options every command that reads a MODEL takes."""

    @click.argument("model")
    @click.option("--arch", metavar="timm:NAME", help="Architecture of a weights-only MODEL file.")
    @click.option("--weights", type=click.Path(dir_okay=False), help="Weights (safetensors or state dict) for a timm: MODEL.")
    @click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
                  help="Constructor argument for a timm architecture (img_size=32, depth=4, ...). Repeatable.")
    @click.option("--trust-pickle", is_flag=True, help="Allow unpickling a whole-module .pt file (runs code from it).")
    @click.option("--input-size", metavar="C,H,W", help="Input size when it cannot be read from the model.")
    @functools.wraps(fn)
    def wrapper(model, arch, weights, model_args, trust_pickle, input_size, **kwargs):
        from vitprune.load import load, parse_model_args

        loaded = load(model, arch=arch, weights=weights, model_args=parse_model_args(model_args),
                      trust_pickle=trust_pickle)
        inputs = [p for p in (model, weights) if p and not str(p).startswith("timm:")]
        return fn(loaded, source=model, inputs=inputs, input_size=_input_size(input_size), **kwargs)

    return wrapper


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


#: the distributions whose versions decide what vitprune computes (FLOPs counting, capture, export).
STACK = ("vitprune", "torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxscript", "onnx_graphsurgeon")


def stack_versions() -> dict[str, str | None]:
    """Installed version of each :data:`STACK` distribution (``None`` when it is missing); no imports."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in STACK:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _print_versions(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    for name, v in stack_versions().items():
        click.echo(f"{name:<18} {v or 'not installed'}")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_versions,
              help="Show the versions of vitprune, torch, timm, onnx and onnxruntime, then exit.")
def cli() -> None:
    """Make Vision Transformers spend compute on fewer tokens, by rewriting their graph."""


@cli.command()
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON.")
def inspect(model, source, inputs, input_size, as_json) -> None:
    """Analyse MODEL's graph: patch embedding, prefix tokens, blocks, readout.

    MODEL is timm:NAME, a weights file with --arch, a pickled .pt with --trust-pickle, or a folder
    written by vitprune.
    """
    from vitprune.rewrite import inspect_model

    vit = inspect_model(model, input_size=input_size)
    meta = getattr(model, "meta", {}).get("vitprune", {}) if hasattr(model, "meta") else {}
    if as_json:
        out = vit.to_dict()
        out["model"] = source
        if meta:
            out["recipe"] = meta.get("recipe", [])
            out["source"] = meta.get("source")
        _emit_json(out)
        return
    click.echo(f"model            {source}")
    click.echo(vit.describe())
    for step in meta.get("recipe", []):
        click.echo(f"recipe           {step['pass']} {step['params']}")


def _check_output(output: Path, inputs: list[str]) -> None:
    if not output.parent.is_dir():
        raise VitpruneError(f"the folder {output.parent} for -o does not exist")
    from vitprune.load import same_file

    for inp in inputs:
        if Path(inp).exists() and same_file(output, inp):
            raise VitpruneError(f"the output {output} is the input {inp}; choose another -o")


_METHOD_OPTIONS = {
    "token-drop": ("keep_rate", "selection", "at_inference"),
    "importance-mask": ("keep", "flops", "mode", "calibration", "first_block"),
    "lifespan-gather": ("flops", "after_block", "exact"),
}


@cli.command()
@model_options
@click.option("--method", type=click.Choice(sorted(_METHOD_OPTIONS)), default="token-drop", show_default=True,
              help="Which rewrite to apply.")
@click.option("--keep-rate", type=float, help="token-drop: fraction of patch tokens kept, in (0, 1] [default: 0.5].")
@click.option("--selection", type=click.Choice(["random", "magnitude"]),
              help="token-drop: random patches (PatchDropout) or largest L1 norm (PSS) [default: random].")
@click.option("--at-inference", is_flag=True, default=None, help="token-drop: also drop tokens in eval mode.")
@click.option("--keep", metavar="BLOCK:RATE,...", help="importance-mask: before BLOCK keep RATE of the alive patches.")
@click.option("--flops", type=float, help="importance-mask: target FLOPs ratio to the original, in (0, 1].")
@click.option("--mode", type=click.Choice(["dynamic", "static"]), help="importance-mask: per-image top-k "
              "(dynamic, default) or fixed index sets from calibration images (static).")
@click.option("--calibration", type=click.Path(), help="importance-mask static: folder of calibration images.")
@click.option("--first-block", type=int, help="importance-mask with --flops: first pruned block [default: 3].")
@click.option("--after-block", type=int, help="lifespan-gather: the life regressor sits before this block [default: 3].")
@click.option("--exact", is_flag=True, default=None, help="lifespan-gather: batch 1, keep exactly the tokens whose "
              "life > block (variable token counts: no static shapes).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder to write the rewritten model to.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it is a model saved by vitprune.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the verification run.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def rewrite(model, source, inputs, input_size, method, output, overwrite, seed, as_json, **options) -> None:
    """Rewrite MODEL with METHOD, verify it and save it to OUTPUT."""
    from vitprune.rewrite import rewrite as do_rewrite
    from vitprune.save import save

    output = Path(output)
    _check_output(output, inputs)
    given = {k: v for k, v in options.items() if v is not None}
    foreign = sorted(set(given) - set(_METHOD_OPTIONS[method]))
    if foreign:
        raise click.UsageError(f"--{foreign[0].replace('_', '-')} does not apply to --method {method}")
    if method == "token-drop":
        given.setdefault("keep_rate", 0.5)
        if not 0.0 < given["keep_rate"] <= 1.0:
            raise click.BadParameter(f"must be in (0, 1], got {given['keep_rate']}", param_hint="--keep-rate")
    if method == "lifespan-gather":
        given.setdefault("flops", 0.5)
    if given.get("flops") is not None and not 0.0 < given["flops"] <= 1.0:
        raise click.BadParameter(f"must be in (0, 1], got {given['flops']}", param_hint="--flops")
    if output.exists() and not overwrite:
        raise VitpruneError(f"{output} exists; pass --overwrite to replace it")
    rewritten, report = do_rewrite(model, method, input_size=input_size, seed=seed, **given)
    report.output = str(output)
    summary = report.to_dict()
    summary.pop("analysis")
    save(rewritten, output, overwrite=overwrite, report=summary)
    if as_json:
        summary["model"] = source
        _emit_json(summary)
        return
    d = report.decisions
    if method == "token-drop":
        when = "in training and inference" if given.get("at_inference") else "in training"
        click.echo(f"{method}: keep {d['keep_count']} of {d['num_patches']} patch tokens "
                   f"(+{d['num_prefix_tokens']} prefix) {when}")
    else:
        click.echo(f"{method} ({d['score']}): tokens per block {d['tokens_per_block']}")
    click.echo(f"FLOPs            {report.flops_before / 1e9:.3f} G -> {report.flops_after / 1e9:.3f} G eval "
               f"({report.flops_ratio:.3f}x), {report.flops_after_train / 1e9:.3f} G train")
    click.echo(f"keep-all diff    {report.keep_all_max_abs_diff:.2e} (max abs vs original)")
    click.echo(f"saved            {output} ({report.seconds:.1f} s)")


def _floats3(value: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in value.split(","))
    except ValueError:
        values = ()
    if not values:
        raise click.BadParameter(f"expected comma-separated numbers such as 0.5,0.5,0.5, got {value!r}", param_hint=name)
    return values


@cli.command()
@model_options
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Picture to write (PNG; the suffix picks another matplotlib format).")
@click.option("--mean", default="0.5,0.5,0.5", show_default=True, metavar="A,B,C",
              help="Per-channel mean the model's inputs are normalised with (timm ViT's default).")
@click.option("--std", default="0.5,0.5,0.5", show_default=True, metavar="A,B,C",
              help="Per-channel standard deviation of the normalisation.")
def show(model, source, inputs, input_size, image, output, mean, std) -> None:
    """Draw IMAGE with the patches MODEL keeps at each pruning stage, one panel a stage.

    MODEL is usually a folder written by `vitprune rewrite`. IMAGE is resized (shorter side) and
    center-cropped to the model's input size; dropped patches are drawn darkened.
    """
    from vitprune.show import show as do_show

    stages = do_show(model, image, output, mean=_floats3(mean, "--mean"), std=_floats3(std, "--std"),
                     input_size=input_size, protect=inputs)
    click.echo(f"wrote {output} ({len(stages)} stage{'' if len(stages) == 1 else 's'})")


from vitprune.cli.finetune import evaluate_cmd, finetune  # noqa: E402  (needs model_options above)
cli.add_command(finetune), cli.add_command(evaluate_cmd)


def _register_commands() -> None:
    from vitprune.cli.ship import bench, export

    cli.add_command(export)
    cli.add_command(bench)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, non-zero exit codes."""
    try:
        code = cli.main(args=argv, prog_name="vitprune", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("vitprune: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"vitprune: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except VitpruneError as exc:
        click.echo(f"vitprune: error: {exc}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
