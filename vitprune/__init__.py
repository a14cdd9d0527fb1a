"""vitprune: graph transformations that make Vision Transformers spend compute on fewer tokens.

    import vitprune
    model = vitprune.load("timm:vit_small_patch16_224")
    rewritten, report = vitprune.rewrite(model, method="token-drop", keep_rate=0.5, at_inference=True)
    vitprune.save(rewritten, "vit_s_td"); again = vitprune.load("vit_s_td")
    vitprune.finetune(again, "train_dir", "vit_s_td_ft", val="val_dir", epochs=10)   # -> vit_s_td_ft/model
    vitprune.evaluate("vit_s_td_ft", "val_dir", keep_rates=[1.0, 0.5])

    # an ONNX file someone else exported: rewritten as ONNX, verified in ONNX Runtime
    proto, report = vitprune.rewrite_onnx("vit.onnx", method="importance-mask", flops=0.6)
    vitprune.save_onnx(proto, "vit_im.onnx")
"""

from vitprune.graph.analysis import ViTGraph, analyse
from vitprune.frontends.capture import capture
from vitprune.ship.compile import compile  # noqa: A004  (vitprune.compile, as the issue names it)
from vitprune.errors import (
    AnalysisError,
    CaptureError,
    LoadError,
    PassError,
    SaveError,
    VerificationError,
    VitpruneError,
)
from vitprune.train.evaluate import evaluate
from vitprune.ship.bench import bench
from vitprune.ship.export_onnx import export_onnx
from vitprune.train.finetune import finetune
from vitprune.io.load import load
from vitprune.rewrite import RewriteReport, inspect_model, rewrite
from vitprune.rewrite_onnx import inspect_onnx, rewrite_onnx, save_onnx
from vitprune.search import SearchError, SearchResult, search
from vitprune.io.save import save  # noqa: E402

__version__ = "0.1.0"



__all__ = [
    "AnalysisError", "CaptureError", "LoadError", "PassError", "RewriteReport", "SaveError",
    "VerificationError", "ViTGraph", "VitpruneError", "analyse", "bench", "capture", "compile", "evaluate",
    "export_onnx", "finetune", "inspect_model",
    "load", "rewrite", "save", "inspect_onnx", "rewrite_onnx", "save_onnx", "SearchError", "SearchResult", "search",
]
