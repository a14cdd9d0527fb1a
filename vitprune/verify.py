"""Verify a rewritten model against the original: keep-all exact node for node, outputs finite, FLOPs.

Keep-all runs every inserted token op with every patch token kept (the selection and gather still
execute, and keep the original order): ViT blocks are permutation-equivariant once position
embeddings are added, so every node of the original graph must have the same value in the rewritten
graph (passes only insert nodes; the original nodes keep their names). Both graphs are run side by
side with ``torch.fx.Interpreter``, node by node, so a wrong rewrite is caught where it happens even
when the output barely moves (a LayerScale model at random init scales every block by ~1e-5; a
zero-initialised head outputs zeros whatever the blocks compute). Every output of a multi-output
model is compared.

Pruned runs are only checked to be finite and of the right shape: top-k selection is discontinuous,
so a tight output tolerance on a pruned run is meaningless (``shared/DESIGN.md``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from vitprune.errors import VerificationError
from vitprune.graph.flops import flop_counter, frozen_parameters
from vitprune.ops.modules import force_keep_all


class FlopsRatios:
    """``flops_ratio`` (eval) and ``flops_ratio_train`` for a dataclass with ``flops_before/after(_train)``."""

    flops_before: int
    flops_after: int
    flops_after_train: int

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)  # type: ignore[call-overload]
        d["flops_ratio"] = self.flops_ratio
        d["flops_ratio_train"] = self.flops_after_train / self.flops_before
        return d


@dataclass
class Verification(FlopsRatios):
    """What verification measured. FLOPs are per forward pass of the example batch."""

    keep_all_max_abs_diff: float  # over every output
    keep_all_nodes_compared: int  # nodes of the original graph checked in the rewritten graph
    keep_all_worst_node: str | None  # the node with the largest (relative) keep-all difference
    keep_all_worst_node_diff: float  # max |a - b| / (1 + max |a|) at that node
    outputs_finite: bool
    output_shape: list[int]  # of the first output
    flops_before: int
    flops_after: int  # eval mode (inference)
    flops_after_train: int  # train mode, token ops active


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    was = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was)


def _tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


class _NamedFailures(fx.Interpreter):
    """An interpreter whose failures name the node (``VerificationError``), and that can be stepped."""

    def __init__(self, gm: fx.GraphModule, x: torch.Tensor) -> None:
        super().__init__(gm)
        self.env, self.args_iter = {}, iter([x])

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except VerificationError:
            raise
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            target = getattr(n.target, "__name__", n.target)
            raise VerificationError(f"the rewritten model fails at node {n.name!r} ({n.op} {target}): {reason}") from exc

    def step(self, n: fx.Node) -> Any:
        """Run one node (inputs must have run) and free the values nothing later reads."""
        value = self.run_node(n)
        self.env[n] = value
        for dead in self.user_to_last_uses.get(n, []):
            del self.env[dead]
        return value


def _run(model: nn.Module, x: torch.Tensor, training: bool, seed: int) -> tuple[Any, int]:
    """(output, FLOPs) of one seeded forward: the FLOPs are counted on the same pass, not a second one."""
    counter = flop_counter()
    with _mode(model, training), torch.no_grad(), frozen_parameters(model), torch.random.fork_rng(devices=[]), counter:
        torch.manual_seed(seed)
        out = _NamedFailures(model, x).run(x) if isinstance(model, fx.GraphModule) else model(x)
    return out, int(counter.get_total_flops())


def difference(reference: Any, value: Any) -> tuple[float, str | None]:
    """``(max |a - b| / (1 + max |a|), None)`` over the tensors of two node values, or ``(inf, why)``
    when they differ in structure, shape, dtype, a non-float tensor or a non-tensor value.

    Positions equal in both (``-inf`` in an additive mask, say) count as 0.
    """
    leaves_a, spec_a = tree_flatten(reference)
    leaves_b, spec_b = tree_flatten(value)
    if spec_a != spec_b:
        return math.inf, f"a different structure ({spec_b} instead of {spec_a})"
    worst = 0.0
    for a, b in zip(leaves_a, leaves_b):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return math.inf, f"{type(b).__name__} instead of {type(a).__name__}"
        if not isinstance(a, torch.Tensor):
            if isinstance(a, fx.GraphModule) and isinstance(b, fx.GraphModule):
                continue  # a higher-order op's body (torch.export's wrap_with_set_grad_enabled): its call's value says
            if a != b:
                return math.inf, f"{b!r} instead of {a!r}"
            continue
        if a.shape != b.shape:
            return math.inf, f"shape {list(b.shape)} instead of {list(a.shape)}"
        if a.dtype != b.dtype:
            return math.inf, f"dtype {b.dtype} instead of {a.dtype}"
        if a.numel() == 0:
            continue
        if not (a.is_floating_point() or a.is_complex()):
            if not torch.equal(a, b):
                return math.inf, "different values"
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        same = a64 == b64
        if bool(same.all()):
            continue
        gap = (a64 - b64).abs()[~same]
        if not bool(torch.isfinite(gap).all()):
            return math.inf, "non-finite values where the original has others"
        scale = 1.0 + float(a64[torch.isfinite(a64)].abs().max()) if bool(torch.isfinite(a64).any()) else 1.0
        worst = max(worst, float(gap.max()) / scale)
    return worst, None


@dataclass
class NodeComparison:
    """Keep-all node-for-node result: how many nodes were compared, the worst and the first failing node."""

    nodes_compared: int
    worst_node: str | None
    worst_diff: float
    output: Any  # the rewritten graph's keep-all output


# Ops that draw from the RNG whatever the mode. Dropout and SDPA carry torch's ``nondeterministic_seeded``
# tag too, but draw nothing in eval mode (p = 0), where verification runs them.
_RANDOM_DRAWS = {"rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli",
                 "bernoulli_", "normal", "normal_", "multinomial", "uniform_", "exponential_", "random_", "poisson"}


def _target_name(n: fx.Node) -> str:
    target = n.target
    if isinstance(target, torch._ops.OpOverload):
        return target.name()
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _is_random_draw(n: fx.Node) -> bool:
    if n.op not in ("call_function", "call_method"):
        return False
    target = n.target
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
        return (torch.Tag.nondeterministic_seeded in target.tags and "dropout" not in name
                and "scaled_dot_product" not in name)
    return _target_name(n).split(".")[-1] in _RANDOM_DRAWS


def _random_draw_behind(gm: fx.GraphModule, name: str) -> fx.Node | None:
    """The first random draw among the node called ``name`` of ``gm`` and its ancestors, or None."""
    node = next((n for n in gm.graph.nodes if n.name == name), None)
    frontier, seen = ([node], {node}) if node is not None else ([], set())
    while frontier:
        n = frontier.pop()
        if _is_random_draw(n):
            return n
        for m in n.all_input_nodes:
            if m not in seen:
                seen.add(m)
                frontier.append(m)
    return None


def compare_nodes(reference: fx.GraphModule, rewritten: fx.GraphModule, x: torch.Tensor, *,
                  tolerance: float = 1e-5, seed: int = 0) -> NodeComparison:
    """Run ``reference`` and ``rewritten`` side by side (eval, no grad, seeded, keep-all) and compare
    every node of ``reference`` with the node of the same name in ``rewritten``.

    Only the two graphs' live values are held at any time (each interpreter frees a value after its
    last reader), so memory stays near two forward passes.

    Raises:
        VerificationError: a node of ``reference`` is missing from ``rewritten``, the first node whose
            value differs by more than ``tolerance`` (relative to ``1 + max |value|``), with the
            difference, or a node of ``rewritten`` that fails to run.
    """
    names = {n.name for n in rewritten.graph.nodes}
    missing = [n.name for n in reference.graph.nodes if n.name not in names]
    if missing:
        raise VerificationError(f"node {missing[0]!r} of the original graph is not in the rewritten graph "
                                f"({len(missing)} missing): a pass removed or renamed it")
    ref_nodes = iter(reference.graph.nodes)
    ref_names = {n.name for n in reference.graph.nodes}
    pending: dict[str, Any] = {}  # reference values computed ahead of their rewritten counterpart
    compared, worst, worst_node, output = 0, 0.0, None, None
    with _mode(reference, False), _mode(rewritten, False), force_keep_all(rewritten), torch.no_grad(), \
            torch.random.fork_rng(devices=[]):
        ref, new = fx.Interpreter(reference), _NamedFailures(rewritten, x)
        ref.env, ref.args_iter = {}, iter([x])
        torch.manual_seed(seed)
        for node in rewritten.graph.nodes:
            value = new.step(node)
            if node.op == "output":
                output = value
            if node.name not in ref_names:
                continue
            while node.name not in pending:
                r = next(ref_nodes)
                ref_value = ref.run_node(r)
                ref.env[r] = ref_value
                for dead in ref.user_to_last_uses.get(r, []):
                    del ref.env[dead]
                pending[r.name] = ref_value
            diff, why = difference(pending.pop(node.name), value)
            compared += 1
            if why is not None or diff > tolerance:
                draw = _random_draw_behind(reference, node.name)
                if draw is not None:
                    raise VerificationError(
                        f"with every token kept, node {node.name!r} differs from the original because the "
                        f"original draws random numbers in eval mode (node {draw.name!r}, {_target_name(draw)}): "
                        "its output changes from call to call, so no rewrite can be checked against it; give "
                        "vitprune a model whose eval forward is deterministic")
                raise VerificationError(
                    f"with every token kept, node {node.name!r} differs from the original: "
                    f"{why or f'max difference {diff:.3g} (relative to 1 + max |value|; tolerance {tolerance:g})'}"
                    ": the rewrite is not exact")
            if diff > worst or worst_node is None:
                worst, worst_node = diff, node.name
    return NodeComparison(compared, worst_node, worst, output)


def verify(
    original: nn.Module, rewritten: fx.GraphModule, example_input: torch.Tensor, *, tolerance: float = 1e-5,
    seed: int = 0, reference: fx.GraphModule | None = None,
) -> Verification:
    """Check ``rewritten`` against ``original`` on ``example_input`` ``[B, C, H, W]``.

    Runs: the original (FLOPs before, its outputs); the captured original and the rewritten graph with
    every token kept, node for node (:func:`compare_nodes`); the rewritten graph in eval and in train
    mode (FLOPs after, finite outputs). FLOPs are counted on those same passes, attention included
    (:func:`vitprune.graph.flops.flop_counter`). ``reference``: ``original`` as captured before the rewrite
    (default: captured here).

    Raises:
        VerificationError: a node or an output differs with every token kept (message: the first such
            node and the difference), an output is not finite, the output shapes changed, or the rewritten
            graph fails at a node (named).
    """
    from vitprune.frontends.capture import capture

    reference_out, flops_before = _run(original, example_input, False, seed)
    reference_graph = reference if reference is not None else capture(original, example_input)
    nodes = compare_nodes(reference_graph, rewritten, example_input, tolerance=tolerance, seed=seed)
    ref_tensors, keep_all = _tensors(reference_out), _tensors(nodes.output)
    if [t.shape for t in keep_all] != [t.shape for t in ref_tensors]:
        raise VerificationError(f"keep-all output shapes {[list(t.shape) for t in keep_all]} != original "
                                f"{[list(t.shape) for t in ref_tensors]}")
    diff = max(((a - b).abs().max().item() for a, b in zip(keep_all, ref_tensors) if a.numel()), default=0.0)
    if not diff <= tolerance:
        raise VerificationError(
            f"keep-all output differs from the original by {diff:.3g} (tolerance {tolerance:g}): the rewrite is not exact")
    pruned_eval, flops_after = _run(rewritten, example_input, False, seed)
    pruned_train, flops_after_train = _run(rewritten, example_input, True, seed)
    outputs = keep_all + _tensors(pruned_eval) + _tensors(pruned_train)
    finite = all(bool(torch.isfinite(t).all()) for t in outputs if t.is_floating_point())
    if not finite:
        raise VerificationError("the rewritten model produces non-finite outputs on the example input")
    if [t.shape for t in _tensors(pruned_eval)] != [t.shape for t in ref_tensors]:
        raise VerificationError(f"rewritten output shapes {[list(t.shape) for t in _tensors(pruned_eval)]} != "
                                f"original {[list(t.shape) for t in ref_tensors]}")
    return Verification(
        keep_all_max_abs_diff=float(diff),
        keep_all_nodes_compared=nodes.nodes_compared,
        keep_all_worst_node=nodes.worst_node,
        keep_all_worst_node_diff=nodes.worst_diff,
        outputs_finite=finite,
        output_shape=list(ref_tensors[0].shape) if ref_tensors else [],
        flops_before=flops_before,
        flops_after=flops_after,
        flops_after_train=flops_after_train,
    )
