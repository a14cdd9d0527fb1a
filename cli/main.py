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

from vitprune.cli.device import device_options
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


def _is_onnx(model: Any) -> bool:
    """Whether the loader returned an ONNX graph (:class:`vitprune.frontends.onnx.OnnxModel`)."""
    from vitprune.frontends.onnx import OnnxModel

    return isinstance(model, OnnxModel)


#: commands whose MODEL may be an ONNX file (the ONNX frontend).
_READS_ONNX = ("inspect", "rewrite")


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
        from vitprune.io.load import load, parse_model_args

        loaded = load(model, arch=arch, weights=weights, model_args=parse_model_args(model_args),
                      trust_pickle=trust_pickle)
        if fn.__name__ not in _READS_ONNX and _is_onnx(loaded):
            raise VitpruneError(f"{model} is an ONNX graph; `vitprune {fn.__name__.replace('_', '-')}` takes a PyTorch "
                                "model (inspect, rewrite and bench read ONNX files)")
        inputs = [p for p in (model, weights) if p and not str(p).startswith("timm:")]
        return fn(loaded, source=model, inputs=inputs, input_size=_input_size(input_size), **kwargs)

    return wrapper


#: version of every ``--json`` document's layout; bump it when a field changes meaning or goes away.
JSON_SCHEMA_VERSION = 1


def normalisation_options(fn: Callable) -> Callable:
    """``--mean`` / ``--std``: override the normalisation the model records (:mod:`vitprune.io.preprocess`)."""
    fn = click.option("--std", metavar="A,B,C", help="Per-channel std of the input normalisation "
                      "[default: the model's own]")(fn)
    return click.option("--mean", metavar="A,B,C", help="Per-channel mean of the input normalisation [default: the "
                        "model's own: what a vitprune model recorded, else timm's pretrained_cfg, else 0.5]")(fn)


def say_preprocessing(model: Any, mean: Any, std: Any, input_size: Any) -> None:
    """Tell the user (stderr) which normalisation the command feeds the model with, and from where."""
    from vitprune.io.origin import default_input_size
    from vitprune.io.preprocess import resolve_preprocessing

    channels = (input_size or default_input_size(model))[0]
    click.echo(f"preprocessing    {resolve_preprocessing(model, mean, std, channels).describe()}", err=True)


def _emit_json(obj: Any) -> None:
    """Print ``obj`` as the command's JSON document: ``schema`` (``vitprune.COMMAND/VERSION``) and the
    ``versions`` of the stack first, then the command's fields (a list goes under ``rows``)."""
    command = click.get_current_context().info_name
    doc = {"schema": f"vitprune.{command}/{JSON_SCHEMA_VERSION}", "versions": stack_versions()}
    doc.update(obj if isinstance(obj, dict) else {"rows": obj})
    click.echo(json.dumps(doc, indent=2, default=str))


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_versions,
              help="Show the versions of vitprune, torch, timm, onnx and onnxruntime, then exit.")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Make Vision Transformers spend compute on fewer tokens, by rewriting their graph.

    MODEL (every command) is timm:NAME (random init; --model-arg KEY=VALUE to size it), a weights file
    with --arch timm:NAME, a pickled .pt with --trust-pickle, a folder vitprune wrote, a Hugging Face
    folder (save_pretrained), a torch.export .pt2 or an ONNX file (inspect, rewrite, bench).

    Examples:

    \b
      vitprune inspect timm:vit_small_patch16_224
      vitprune rewrite timm:vit_small_patch16_224 --method token-drop --keep-rate 0.5 -o vit_s_td
      vitprune show vit_s_td photo.png -o kept.png   # photo.png: any picture

    `vitprune COMMAND --help` explains a command.
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@cli.command()
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON.")
@click.option("--frontend", type=click.Choice(["auto", "fx", "export"]), default="auto", show_default=True,
              help="Capture with torch.fx symbolic trace, torch.export, or trace and export when tracing fails.")
def inspect(model, source, inputs, input_size, as_json, frontend) -> None:
    """Analyse MODEL's graph: patch embedding, prefix tokens, blocks, readout.

    MODEL is timm:NAME, a weights file with --arch, a pickled .pt with --trust-pickle, a folder
    written by vitprune, a Hugging Face folder, a torch.export .pt2 or an ONNX file.
    """
    from vitprune.graph.analysis import plain_params
    from vitprune.rewrite import inspect_model

    from vitprune.graph.keep_counts import prunable_shares

    if _is_onnx(model):
        from vitprune.rewrite_onnx import inspect_onnx, onnx_flops_per_image, recipe_of

        if recipe_of(model.proto):  # vitprune rewrote it: what its recipe and graph say, not the analysis
            return _inspect_rewritten_onnx(model, source, input_size, as_json)
        vit = inspect_onnx(model.proto, input_size=input_size)
        total = onnx_flops_per_image(model.proto, input_size=input_size)
    else:
        from vitprune.rewrite import flops_per_image

        vit = inspect_model(model, input_size=input_size, frontend=frontend)
        total = flops_per_image(model, input_size=input_size)
    # what a token method pruning from block k on can cut at all (a dense decoder, the embedding stay)
    shares = prunable_shares(vit, total)
    meta = getattr(model, "meta", {}).get("vitprune", {}) if hasattr(model, "meta") else {}
    if as_json:
        out = vit.to_dict()
        out["flops_per_image"] = total
        out["prunable_flops_share"] = {str(b): share for b, share in enumerate(shares)}
        out["model"] = source
        if meta:
            out["recipe"] = meta.get("recipe", [])
            out["source"] = meta.get("source")
        _emit_json(out)
        return
    click.echo(f"model            {source}")
    click.echo(vit.describe())
    click.echo(f"FLOPs            {total / 1e9:.3f} G per image; prunable from block k on (the blocks k..): "
               + ", ".join(f"{b}: {share:.0%}" for b, share in enumerate(shares)))
    for step in meta.get("recipe", []):
        click.echo(f"recipe           {step['pass']} {plain_params(step['params'])}")


def _inspect_rewritten_onnx(model: Any, source: str, input_size: Any, as_json: bool) -> None:
    """``inspect`` of an ONNX file vitprune rewrote: its recipe, token counts and FLOPs."""
    from vitprune.graph.analysis import plain_params
    from vitprune.rewrite_onnx import describe_rewritten_onnx

    found = describe_rewritten_onnx(model.proto, input_size=input_size)
    if as_json:
        _emit_json({"model": source, "rewritten_by_vitprune": True, **found})
        return
    click.echo(f"model            {source} (rewritten by vitprune; its token ops are not analysed again)")
    for step in found["recipe"]:
        click.echo(f"recipe           {step['pass']} {plain_params(step['params'])}")
    if found["tokens_per_block"] is not None:
        click.echo(f"tokens/block     {', '.join(map(str, found['tokens_per_block']))} (the recipe's)")
    click.echo(f"attention reads  {', '.join(str(a['tokens']) for a in found['attention_tokens']) or 'no attention op'}"
               " tokens (each attention op of the graph, in order)")
    click.echo(f"FLOPs            {found['flops_per_image'] / 1e9:.3f} G per image")


def _check_output(output: Path, inputs: list[str], overwrite: bool = False, kind: str = "file",
                  what: str = "-o") -> None:
    """Before any work: ``output`` is not, in or around an input, its folder is writable, and an existing
    one is replaced only with --overwrite (a folder only if vitprune saved a model to it); see vitprune.io.outputs."""
    from vitprune.io.outputs import check_output_path

    check_output_path(output, inputs, what=what, overwrite=overwrite, kind=kind)


_METHOD_OPTIONS = {
    "token-drop": ("keep_rate", "selection", "at_inference", "restore"),
    "importance-mask": ("keep", "flops", "mode", "calibration", "first_block", "score", "min_keep", "restore"),
    "lifespan-gather": ("flops", "after_block", "exact", "score", "min_keep", "restore"),
    "token-merge": ("r", "flops", "first_block", "proportional_attention", "min_keep"),
}


@cli.command()
@model_options
@click.option("--method", type=click.Choice(sorted(_METHOD_OPTIONS)), default="token-drop", show_default=True,
              help="Which rewrite to apply.")
@click.option("--keep-rate", type=float, help="token-drop: fraction of patch tokens kept, in (0, 1] [default: 0.5].")
@click.option("--selection", type=click.Choice(["random", "magnitude", "distinct"]),
              help="token-drop: random patches (PatchDropout), largest L1 norm (PSS) or near-duplicates dropped "
              "first (for dense models) [default: random].")
@click.option("--at-inference", is_flag=True, default=None, help="token-drop: also drop tokens in eval mode.")
@click.option("--keep", metavar="BLOCK:RATE,...", help="importance-mask: before BLOCK keep RATE of the alive patches.")
@click.option("--flops", type=float, help="importance-mask, lifespan-gather and token-merge: target eval FLOPs as a "
              "fraction of the original's, in (0, 1] [lifespan-gather default: 0.5; importance-mask: --flops or "
              "--keep; token-merge: --flops or --r].")
@click.option("--min-keep", type=int, help="importance-mask, lifespan-gather, token-merge with --flops: the fewest "
              "patch tokens the solver leaves a block [default: min(10% of the patches, 16), at least 1]; a target "
              "that needs fewer is refused with the least reachable.")
@click.option("--mode", type=click.Choice(["dynamic", "static"]), help="importance-mask: per-image top-k "
              "(dynamic, default) or fixed index sets from calibration images (static).")
@click.option("--calibration", type=click.Path(), help="importance-mask static: folder of calibration images.")
@click.option("--score", type=click.Choice(["auto", "cls", "mean-query", "attention-received", "l1", "l2", "cls-norm",
                                            "distinct"]),
              help="importance-mask dynamic and lifespan-gather: how patches are scored [default: auto, distinct: "
              "near-duplicate patches go first].")
@click.option("--restore", type=click.Choice(["last", "nearest"]), help="token-drop, importance-mask, lifespan-gather "
              "on a dense model: a dropped token comes back with its features when dropped (last) or with its most "
              "similar kept token's final features (nearest) [default: last; token-merge always unmerges].")
@click.option("--first-block", type=int, help="importance-mask with --flops: first pruned block [default: 3]; "
              "token-merge: first merging block [default: 0].")
@click.option("--r", "r", metavar="R|R0,R1,...", help="token-merge: tokens merged per block (ToMe's r), or one "
              "count per block.")
@click.option("--proportional-attention/--no-proportional-attention", default=None,
              help="token-merge: weigh merged keys by their size in later blocks' attention [default: on].")
@click.option("--after-block", type=int, help="lifespan-gather: the life regressor sits before this block [default: 3].")
@click.option("--exact", is_flag=True, default=None, help="lifespan-gather: batch 1, keep exactly the tokens whose "
              "life > block (variable token counts: no static shapes).")
@click.option("--schedule", type=click.Path(dir_okay=False), help="A schedule file from `vitprune search`: the method "
              "and its parameters come from it (no --method or method options then).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder to write the rewritten model to.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it is a model saved by vitprune.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the verification run.")
@click.option("--frontend", type=click.Choice(["auto", "fx", "export"]), default="auto", show_default=True,
              help="Capture with torch.fx symbolic trace, torch.export, or trace and export when tracing fails "
              "(or when the method needs the queries and keys an nn.MultiheadAttention module hides).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@normalisation_options
def rewrite(model, source, inputs, input_size, method, output, overwrite, seed, frontend, as_json, schedule,
            mean, std, **options) -> None:
    """Rewrite MODEL with METHOD, verify it and save it to OUTPUT.

    MODEL is one of: timm:NAME (random init, sized with --model-arg KEY=VALUE), a weights file
    (.safetensors or a state-dict .pt) with --arch timm:NAME, a pickled whole-module .pt with
    --trust-pickle (unpickling runs code from the file), a folder vitprune wrote (rewrite again), a
    Hugging Face folder (save_pretrained: config.json + safetensors), a torch.export .pt2, or an ONNX file.

    OUTPUT is a new folder; --overwrite replaces it only if vitprune saved a model there. For an ONNX
    MODEL (model.onnx), OUTPUT is the rewritten .onnx file (never the input file).
    """
    from vitprune.rewrite import rewrite as do_rewrite
    from vitprune.io.save import save

    if schedule is not None:  # the method and its parameters from `vitprune search`'s file
        from vitprune.cli.search import schedule_method

        method, options = schedule_method(schedule, options)
        inputs = [*inputs, schedule]
    output = Path(output)
    is_onnx = _is_onnx(model)
    if is_onnx and output.suffix.lower() != ".onnx":
        raise click.BadParameter(f"{str(output)!r}: an ONNX model is rewritten to an ONNX file; name it NAME.onnx",
                                 param_hint="-o")
    _check_output(output, inputs, overwrite, kind="file" if is_onnx else "model")
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
    mean, std = _floats3(mean, "--mean"), _floats3(std, "--std")
    calibrated = given.get("calibration") is not None  # a folder of images the rewrite reads
    if is_onnx:
        from vitprune.rewrite_onnx import rewrite_onnx, save_onnx

        if given.get("exact"):
            raise click.BadParameter("per-image token counts need dynamic shapes; an ONNX rewrite keeps static counts",
                                     param_hint="--exact")
        given.pop("at_inference", None)  # an ONNX graph runs inference: token-drop is always active there
        if (mean is not None or std is not None) and not calibrated:
            raise click.UsageError("--mean/--std normalise calibration images (--calibration); an ONNX file "
                                   "records no normalisation for them to change")
        if calibrated:  # an ONNX file records no normalisation: the user's, else 0.5
            from vitprune.io.images import DEFAULT_MEAN, DEFAULT_STD

            given.update(mean=mean or DEFAULT_MEAN, std=std or DEFAULT_STD)
        rewritten, report = rewrite_onnx(model.proto, method, input_size=input_size, seed=seed, **given)
    else:
        rewritten, report = do_rewrite(model, method, input_size=input_size, seed=seed, frontend=frontend,
                                       mean=mean, std=std, **given)
    report.output = str(output)
    summary = report.to_dict()
    summary.pop("analysis")
    if is_onnx:
        save_onnx(rewritten, output)
    else:
        save(rewritten, output, overwrite=overwrite, report=summary)
    if as_json:
        summary["model"] = source
        _emit_json(summary)
        return
    if calibrated or mean is not None or std is not None:  # which normalisation the images got, from where
        if is_onnx:
            from vitprune.io.preprocess import Preprocessing

            source = "--mean/--std" if mean is not None or std is not None else "default (an ONNX file records none)"
            click.echo(f"preprocessing    {Preprocessing(given['mean'], given['std'], source).describe()}", err=True)
        else:
            say_preprocessing(model, mean, std, input_size)
    d = report.decisions
    if method == "token-drop":
        when = "in training and inference" if given.get("at_inference") or is_onnx else "in training"
        click.echo(f"{method}: keep {d['keep_count']} of {d['num_patches']} patch tokens "
                   f"(+{d['num_prefix_tokens']} prefix) {when}")
    elif method == "token-merge":
        merges = ", ".join(f"block {b}: {r}" for b, r in d["merges"].items()) or "none"
        click.echo(f"{method} (tokens merged: {merges}): tokens per block {', '.join(map(str, d['tokens_per_block']))}")
    else:
        click.echo(f"{method} ({d['score']}): tokens per block {', '.join(map(str, d['tokens_per_block']))}")
    per = max(1, int((report.analysis.get("input_shape") or [1])[0]))  # FLOPs were counted on the example batch
    click.echo(f"FLOPs            {report.flops_before / per / 1e9:.3f} G -> {report.flops_after / per / 1e9:.3f} G "
               f"per image, eval ({report.flops_ratio:.3f}x); {report.flops_after_train / per / 1e9:.3f} G train")
    if d.get("prunable_flops_share") is not None:
        click.echo(f"prunable         {d['prunable_flops_share']:.1%} of the FLOPs (the blocks from the pruning "
                   "point on: all the method can cut)")
    click.echo(f"keep-all diff    {report.keep_all_max_abs_diff:.2e} (max abs vs original)")
    click.echo(f"saved            {output} ({report.seconds:.1f} s)")


def _floats3(value: str | None, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value.split(","))
    except ValueError:
        values = ()
    if not values:
        raise click.BadParameter(f"expected comma-separated numbers such as 0.5,0.5,0.5, got {value!r}", param_hint=name)
    return values


def _check_picture_suffix(output: str, what: str) -> None:
    """A picture's file name must end in a format matplotlib writes (.png, .jpg, .pdf, .svg, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = sorted(FigureCanvasAgg.get_supported_filetypes())
    suffix = Path(output).suffix.lower().lstrip(".")
    if suffix not in formats:
        raise click.BadParameter(f"{output!r} does not end in a picture format matplotlib writes "
                                 f"(.png, .jpg, .pdf, .svg, ...: {', '.join(formats)})", param_hint=what)


@cli.command()
@model_options
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Picture to write; its suffix is the format: .png, .jpg, .pdf, .svg (any matplotlib saves).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@normalisation_options
@device_options("Autocast precision of the forward [default: float32].")
def show(model, source, inputs, input_size, image, output, overwrite, mean, std, device, dtype) -> None:
    """Draw IMAGE with the patches MODEL keeps at each pruning stage, one panel a stage.

    MODEL is usually a folder written by `vitprune rewrite`. IMAGE is resized (shorter side) and
    center-cropped to the model's input size; dropped patches are drawn darkened and tinted blue (so
    they show on a dark background too); panels wrap four to a row.
    """
    from vitprune.ship.show import show as do_show

    _check_picture_suffix(output, "-o")
    _check_output(Path(output), [image, *inputs], overwrite)
    mean, std = _floats3(mean, "--mean"), _floats3(std, "--std")
    stages = do_show(model, image, output, mean=mean, std=std, input_size=input_size, protect=inputs, device=device,
                     dtype=dtype)
    say_preprocessing(model, mean, std, input_size)  # after the work: a refused command's error stays one line
    click.echo(f"wrote {output} ({len(stages)} stage{'' if len(stages) == 1 else 's'})")


from vitprune.cli.finetune import evaluate_cmd, finetune  # noqa: E402  (needs model_options above)
cli.add_command(finetune), cli.add_command(evaluate_cmd)


def _register_commands() -> None:
    from vitprune.cli.ship import bench, export
    from vitprune.cli.search import search

    cli.add_command(export)
    cli.add_command(bench)
    cli.add_command(search)


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
        click.echo(f"vitprune: error: {_one_line(str(exc))}", err=True)
        sys.exit(1)
    except OSError as exc:  # the file system refused (permissions, full disk, a path under a file): the user's
        where = f": {exc.filename}" if exc.filename else ""
        click.echo(f"vitprune: error: {exc.strerror or type(exc).__name__}{where}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _one_line(message: str) -> str:
    """An error message as one line (a data-loader worker's error carries the worker's traceback: its last line)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) > 1 and any(line.startswith("Original Traceback") for line in lines):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)


if __name__ == "__main__":
    main()
