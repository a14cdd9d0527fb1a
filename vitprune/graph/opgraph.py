"""The frontend-neutral op graph the analysis reads: a ``networkx.DiGraph`` of kinded ops.

Each frontend (``vitprune.frontends``: torch-level ``torch.fx``, aten-level ``torch.export``) maps its own
nodes onto a small set of op kinds and keeps its node names, so what the analysis finds refers to the
frontend's nodes by name and a frontend-specific lowering can insert there.

A node carries:

- ``kind``: one of :data:`KINDS`;
- ``shape``: the propagated output shape (one example input), ``None`` for non-tensors;
- ``tensor``: whether it produces a tensor (or a tuple holding tensors);
- ``data``: whether its value depends on the image's values (not only on its shape);
- ``inputs``: its positional operands in order, each a node name or ``None`` (a Python constant);
- ``order``: its position in the frontend's (topological) node order;
- ``label``: the frontend's own name for the op (``call_function layer_norm``), for messages;
- ``attrs``: kind-specific facts, normalised across frontends:

  ==================  =========================================================================
  kind                attrs
  ==================  =========================================================================
  ``sdpa``            ``scale`` (None: ``head_dim ** -0.5``)
  ``softmax``         ``dim``
  ``mha``             ``heads``, ``head_dim``, ``embed_dim``, ``batch_first``
  ``linear``          ``in_features``, ``out_features``
  ``conv``            ``stride`` ``[sh, sw]``
  ``permute``         ``perm``: the output's axes as input axes (absent when not known)
  ``cat``             ``dim``
  ``mean``            ``dims`` (tuple)
  ``index``           ``axes``: ``{axis: int | slice}`` of the non-trivial axes, ``tensor_axes``: axes
                      indexed by a tensor or a computed value; ``opaque`` when not even that is known
  ``token_op``        ``module`` (vitprune leaf class name), ``config``, ``changes_tokens``
  ==================  =========================================================================

Edges run from operand to user; the analysis uses networkx's ``ancestors`` / ``descendants`` for
"depends on" questions rather than hand-written walks.
"""

from __future__ import annotations

from typing import Any, Iterable

import networkx as nx

#: op kinds every frontend maps its ops onto.
KINDS = ("input", "constant", "output", "add", "mul", "matmul", "linear", "conv", "conv_transpose", "embedding", "sdpa",
         "softmax", "mha", "cat", "index", "mean", "max", "norm", "reshape", "permute", "token_op", "other")


class OpGraph:
    """A kinded op graph over one frontend's nodes (see the module docstring)."""

    def __init__(self, batch: int) -> None:
        self.g = nx.DiGraph()
        self.batch = batch  # the example input's batch size (tells the batch axis apart)
        self._names: list[str] = []

    # ---- construction (frontends)

    def add(self, name: str, kind: str, *, shape: tuple[int, ...] | None, tensor: bool,
            inputs: Iterable[str | None] = (), extra_inputs: Iterable[str] = (), label: str = "",
            **attrs: Any) -> None:
        """Add a node; ``inputs``: positional operands (``None`` for constants); ``extra_inputs``: other
        nodes it reads (keyword operands). ``data`` is derived from the operands already added."""
        if kind not in KINDS:
            raise ValueError(f"unknown op kind {kind!r}")
        inputs = list(inputs)
        reads = [i for i in [*inputs, *extra_inputs] if i is not None]
        data = kind == "input" or any(self.g.nodes[i]["data"] and self.g.nodes[i]["tensor"] for i in reads)
        self.g.add_node(name, kind=kind, shape=shape, tensor=tensor, data=data, inputs=inputs,
                        order=len(self._names), attrs=attrs, label=label or kind)
        for i in reads:
            self.g.add_edge(i, name)
        self._names.append(name)

    # ---- queries (analysis)

    @property
    def nodes(self) -> list[str]:
        """Node names in topological (frontend) order."""
        return self._names

    def __getitem__(self, name: str) -> dict[str, Any]:
        return self.g.nodes[name]

    def label(self, name: str) -> str:
        return self.g.nodes[name]["label"]

    def kind(self, name: str) -> str:
        return self.g.nodes[name]["kind"]

    def shape(self, name: str | None) -> tuple[int, ...] | None:
        return None if name is None else self.g.nodes[name]["shape"]

    def attrs(self, name: str) -> dict[str, Any]:
        return self.g.nodes[name]["attrs"]

    def order(self, name: str) -> int:
        return self.g.nodes[name]["order"]

    def inputs(self, name: str) -> list[str | None]:
        return self.g.nodes[name]["inputs"]

    def users(self, name: str) -> list[str]:
        return sorted(self.g.successors(name), key=self.order)

    def is_data(self, name: str | None) -> bool:
        return name is not None and self.g.nodes[name]["data"]

    def is_tensor(self, name: str | None) -> bool:
        return name is not None and self.g.nodes[name]["tensor"]

    def is_constant_tensor(self, name: str | None) -> bool:
        """An image-independent tensor (a parameter, a buffer, something computed from them only)."""
        return name is not None and self.is_tensor(name) and not self.is_data(name)

    def data_inputs(self, name: str) -> list[str]:
        """The image-dependent tensors ``name`` reads, in operand order."""
        return [i for i in self.g.predecessors(name) if self.is_data(i) and self.is_tensor(i)]

    def is_per_token(self, name: str) -> bool:
        """One data input of the same shape as the output: dropout, norm, identity, activation."""
        ins = self.data_inputs(name)
        return len(ins) == 1 and self.shape(name) is not None and self.shape(ins[0]) == self.shape(name)

    def ancestors(self, name: str) -> set[str]:
        return nx.ancestors(self.g, name)

    def descendants(self, name: str) -> set[str]:
        return nx.descendants(self.g, name)

    def named(self, kind: str) -> list[str]:
        """Every node of ``kind``, in order."""
        return [n for n in self._names if self.g.nodes[n]["kind"] == kind]
