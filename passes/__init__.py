"""vitprune's graph passes, one a file; importing this package registers them all."""

from vitprune.passes import importance_mask, lifespan_gather, token_drop, token_merge  # noqa: F401  (registers them)
from vitprune.passes.base import PASSES, REQUIREMENTS, VitPass, register_pass
from vitprune.passes.manager import make_pass, run_passes

__all__ = ["PASSES", "REQUIREMENTS", "VitPass", "make_pass", "register_pass", "run_passes"]
