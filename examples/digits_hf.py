"""The main job on a Hugging Face model: scikit-learn's digits, ``save_pretrained``, the CLI on the folder.

1. Train a small ``transformers.ViTForImageClassification`` (random init, no hub) on the digits (the
   split and training loop of ``examples/digits.py``), report its test accuracy.
2. Save it as Hugging Face users do: ``save_pretrained`` (config.json + model.safetensors) with a
   ``ViTImageProcessor`` (preprocessor_config.json: mean/std 0.5).
3. Run the vitprune command line on that folder: ``inspect``, ``rewrite --method importance-mask --flops
   0.6`` (captured with torch.export, verified node for node, saved without pickle), ``eval`` on the
   test images, ``export`` to ONNX (checked against ONNX Runtime); reload the rewritten model with
   ``vitprune.io.load`` and measure its accuracy on the test split.

    python examples/digits_hf.py                  # needs the hf extra: pip install -e '.[hf]'
    python examples/digits_hf.py --epochs 5 --out /tmp/digits_hf
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CONFIG = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
              intermediate_size=256, num_labels=10)


def _digits_example():
    spec = importlib.util.spec_from_file_location("digits_example", HERE / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="training batch size")
    parser.add_argument("--out", default="examples/out_hf", help="folder for the models and results")
    args = parser.parse_args(argv)
    import transformers

    import vitprune

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bar
    from vitprune.io.hf import wrap

    digits = _digits_example()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = digits.digits_split()

    torch.manual_seed(0)
    hf_model = transformers.ViTForImageClassification(transformers.ViTConfig(**CONFIG))
    model = wrap(hf_model)  # pixel_values in, logits out
    start = time.perf_counter()
    digits.train(model, x_train, y_train, args.epochs, batch=args.batch)
    base_acc = digits.accuracy(model, x_test, y_test)
    print(f"trained ViTForImageClassification {CONFIG} for {args.epochs} epochs in "
          f"{time.perf_counter() - start:.0f} s: test accuracy {base_acc:.4f} on {len(y_test)} digits")

    folder = out / "digits_vit_hf"
    hf_model.save_pretrained(folder)
    size = {"height": CONFIG["image_size"], "width": CONFIG["image_size"]}
    transformers.ViTImageProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    images = out / "digits_images"
    if not (images / "val").exists():
        digits.write_image_folders(images, max_train=1)

    print(digits.vitprune_cli("inspect", str(folder)))
    target = out / "digits_vit_hf_im"
    report = json.loads(digits.vitprune_cli("rewrite", str(folder), "--method", "importance-mask", "--flops", "0.6",
                                            "--first-block", "1", "-o", str(target), "--overwrite", "--json"))
    evaluated = json.loads(digits.vitprune_cli("eval", str(target), "--data", str(images / "val"), "--json"))
    onnx_path = out / "digits_vit_hf_im.onnx"
    exported = json.loads(digits.vitprune_cli("export", str(target), "-o", str(onnx_path), "--overwrite", "--json"))
    again = vitprune.load(target)  # no pickle, no transformers code: the saved aten graph
    acc = digits.accuracy(again, x_test, y_test)
    results = {"epochs": args.epochs, "original_accuracy": base_acc, "rewritten_accuracy": acc,
               "eval_top1": evaluated["rows"][0]["top1"], "flops_ratio": report["flops_ratio"],
               "keep_all_max_abs_diff": report["keep_all_max_abs_diff"],
               "keep_all_nodes_compared": report["keep_all_nodes_compared"],
               "tokens_per_block": report["decisions"]["tokens_per_block"],
               "onnx_parity": exported["parity"], "onnx": str(onnx_path)}
    print(f"importance-mask FLOPs x{report['flops_ratio']:.3f}: accuracy {base_acc:.4f} -> {acc:.4f} "
          f"(eval on the PNG folder: {results['eval_top1']:.4f}), ONNX parity {exported['parity']}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results in {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
