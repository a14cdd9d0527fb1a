"""Which axes of each tensor are token axes: forward propagation over the neutral op graph from the stream.

One propagation for every frontend (``torch.fx``, ``torch.export``, ONNX all build an
:class:`~vitprune.graph.opgraph.OpGraph`). A token axis is described by its *multiplicity* ``m``: the axis'
size is ``m · N`` plus a part that does not depend on the token count ``N`` (``[B, N, C]``: ``m = 1`` on axis
1; an attention map ``[B, H, N, N]``: ``m = 1`` on axes 2 and 3; ``x[:, 1:]``: ``m = 1``, size ``N - 1``; the
exporters' flattened ``[B·N, C]``: ``m = B``). Starting from the residual stream (every stream tensor is
``[B, N, C]``, axis 1), each op maps its inputs' token axes to its output's by what the op does, not by
sizes: broadcasting ops (``add``, ``mul``, activations, norms) align from the right, ``linear`` keeps every
axis but the contracted last one, ``matmul`` keeps rows of the left and columns of the right operand (the
rows and columns of attention scores), ``sdpa`` keeps the query's token axis, ``permute`` moves axes by its
permutation, ``reshape`` aligns axes by their prefix products, an int index or a reduction removes an axis,
a fixed slice of the token axis (the prefix tokens) is no longer token-sized, ``cat`` on the token axis adds
multiplicities. An op with no rule of its own is mapped by its shapes only where the token axes can be
placed one way (same rank with the token sizes in place, one axis inserted or removed); otherwise its output
is *unknown*, and so is everything computed from it — except the residual stream itself, which the analysis
found independently and re-seeds.

A size equal to the token count is never evidence on its own: a decoder's 256 channels in a 256-patch model
carry no token axis unless data flow puts one there. Propagation does not enter ``stop`` nodes (the readout,
the token restores for other readers) nor anything computed from them: past them, every token is back.

:func:`constant_token_axes` then says which axes of an image-independent tensor meet a token axis where it
is read (the tensors a token pass must gather per image: RoPE tables, relative-position biases).
"""

from __future__ import annotations

from typing import Iterable

from vitprune.graph.opgraph import OpGraph

Axes = dict[int, int]  # axis -> multiplicity

#: ops whose constant operands are a layer's own parameters: never token-indexed
LAYERS = ("linear", "conv", "conv_transpose", "embedding", "norm", "mha")


def align_right(axes: Axes, in_rank: int, out_rank: int) -> Axes:
    """Axes of a rank-``in_rank`` operand in the frame of a rank-``out_rank`` broadcast result."""
    return {a + out_rank - in_rank: m for a, m in axes.items()}


def merge(*parts: Axes) -> Axes:
    """The union of several operands' token axes (in one frame), the largest multiplicity per axis."""
    out: Axes = {}
    for p in parts:
        for a, m in p.items():
            out[a] = max(out.get(a, 0), m)
    return out


def reshape_axes(axes: Axes, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Axes | None:
    """Token axes through a reshape: each output axis spans an interval of the flattened prefix products;
    a token axis keeps its multiplicity, scaled by the axes merged with it. None when a token axis is split."""
    def bounds(shape):
        out, p = [], 1
        for s in shape:
            out.append((p, p * s))
            p *= s
        return out

    ib, ob = bounds(in_shape), bounds(out_shape)
    result: Axes = {}
    for a, m in axes.items():
        lo, hi = ib[a]
        if in_shape[a] == 1:
            continue
        covering = [i for i, (olo, ohi) in enumerate(ob) if olo <= lo and hi <= ohi and out_shape[i] != 1]
        if len(covering) != 1:
            return None  # the token axis is split over several output axes
        i = covering[0]
        result[i] = result.get(i, 0) + m * (out_shape[i] // in_shape[a])
    return result


def by_shapes(axes: Axes, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Axes | None:
    """Token axes through an op known only by its shapes, where they can be placed one way: the same axes
    when the ranks align right and every token axis keeps its size (an activation, an ``expand``, a split on
    another axis), or one axis inserted (``unsqueeze``, ``stack``) or removed (``squeeze``, ``unbind`` of
    another axis) with the rest in place. None when no placement or more than one fits."""
    if not axes:
        return {}
    ri, ro = len(in_shape), len(out_shape)
    candidates: list[Axes] = []
    if ro >= ri and all(out_shape[a + ro - ri] == in_shape[a] for a in axes):
        candidates.append(align_right(axes, ri, ro))
    if ro == ri + 1:
        for d in range(ro):
            if out_shape[:d] + out_shape[d + 1:] == tuple(in_shape):
                candidates.append({a + (a >= d): m for a, m in axes.items()})
    if ro == ri - 1:
        for d in range(ri):
            if d not in axes and tuple(in_shape[:d]) + tuple(in_shape[d + 1:]) == tuple(out_shape):
                candidates.append({a - (a > d): m for a, m in axes.items()})
    distinct = {tuple(sorted(c.items())) for c in candidates}
    return candidates[0] if len(distinct) == 1 else None


def _index(g: OpGraph, n: str, axes: Axes, in_shape: tuple[int, ...]) -> Axes | None:
    a = g.attrs(n)
    out_shape = g.shape(n)
    if a.get("opaque") or out_shape is None:
        return by_shapes(axes, in_shape, out_shape) if out_shape is not None else None
    if any(t in axes for t in a["tensor_axes"]):
        return None  # a gather by token position: which tokens it takes is not known here
    if a["tensor_axes"]:
        return by_shapes(axes, in_shape, out_shape)
    result: Axes = {}
    removed = sorted(k for k, v in a["axes"].items() if isinstance(v, int))
    for axis, m in axes.items():
        sel = a["axes"].get(axis)
        if isinstance(sel, int):
            continue  # one token taken: no token axis left
        if isinstance(sel, slice):
            start, stop, step = sel.indices(in_shape[axis])
            if step != 1 or sel.start is not None and sel.start < 0 or stop < in_shape[axis]:
                continue  # a fixed part (the prefix tokens, the last k tokens): not token-sized
        result[axis - sum(1 for r in removed if r < axis)] = m
    return result


def _split_item(axes: Axes, split: dict, item: int) -> Axes:
    """Token axes of item ``item`` of a split on a token axis, read as the slice it is: the last item runs
    to the end and keeps the token axis (``q.split([1, P])[1]``: the patch tokens, ``m = 1``), earlier items
    are fixed parts (the prefix tokens) with no token axis left."""
    last = item % len(split["sizes"]) == len(split["sizes"]) - 1
    return {a: m for a, m in axes.items() if a != split["dim"] or last}


def _rule(g: OpGraph, n: str, known: dict[str, Axes], ref: dict[str, tuple[int, ...]]) -> Axes | None:
    """Token axes of ``n``'s output from its operands' (``known``: operand -> axes, in its own frame)."""
    kind, out = g.kind(n), g.shape(n)
    ins = [i for i in g.inputs(n) if i is not None]
    shape = ref.get

    def first() -> tuple[str, Axes]:
        src = next((i for i in ins if i in known), next(iter(known)))
        return src, known[src]

    change = g.attrs(n) if kind == "other" else {}
    if out is None:  # a tuple (unbind, split, an attention module's (out, weights)): its items say
        src, axes = first()
        ref[n] = shape(src)
        if "removes_axis" in change:  # unbind: each item is the source without that axis
            d = change["removes_axis"]
            ref[n] = shape(src)[:d] + shape(src)[d + 1:]
            return None if d in axes else {a - (a > d): m for a, m in axes.items()}
        return dict(axes)
    if "inserts_axis" in change:  # stack, unsqueeze: the new axis is at d, whatever the sizes
        d = change["inserts_axis"]
        return merge(*({a + (a >= d): m for a, m in axes.items()} for axes in known.values()))
    if "removes_axis" in change:
        d = change["removes_axis"]
        src, axes = first()
        return None if d in axes else {a - (a > d): m for a, m in axes.items()}
    if kind in ("add", "mul", "norm", "softmax") or kind == "other" and all(
            shape(i) is not None and len(shape(i)) <= len(out) for i in known):
        parts = []
        for i, axes in known.items():
            parts.append(by_shapes(axes, shape(i), out) if kind == "other" else align_right(axes, len(shape(i)), len(out)))
        return None if any(p is None for p in parts) else merge(*parts)
    if kind == "linear":
        src, axes = first()
        rank = len(shape(src))
        if rank - 1 in axes or any(i in known for i in g.inputs(n)[1:] if i is not None):
            return None  # mixes tokens (a token-mixing MLP) or a weight computed from the tokens
        return align_right(axes, rank, len(out))
    if kind == "matmul":
        a, b = (g.inputs(n) + [None, None])[:2]
        result: Axes = {}
        if a in known:
            ra = len(shape(a))
            result.update({x + len(out) - ra: m for x, m in known[a].items() if x != ra - 1})
        if b in known:
            rb = len(shape(b))
            for x, m in known[b].items():
                if x != rb - 2:
                    result[len(out) - 1 if x == rb - 1 else x + len(out) - rb] = m
        return result
    if kind == "sdpa":
        q = g.inputs(n)[0]
        axes = known.get(q, {})
        return {x: m for x, m in axes.items() if x != len(shape(q)) - 1}
    if kind == "mha":
        src, axes = first()
        return {x: m for x, m in axes.items() if x != len(shape(src)) - 1}
    if kind == "cat":
        dim = g.attrs(n)["dim"]
        result = {}
        for i, axes in known.items():
            for x, m in align_right(axes, len(shape(i)), len(out)).items():
                result[x] = result.get(x, 0) + m if x == dim else max(result.get(x, 0), m)
        return result
    if kind == "index":
        src = g.inputs(n)[0]
        if src not in known:
            return None
        if g.shape(src) is None:  # an item of a tuple: placed by its shapes against the tuple's source
            split = g.attrs(src).get("split") if g.kind(src) == "other" else None
            item = g.attrs(n).get("axes", {}).get(0)
            if split is not None and isinstance(item, int) and split["dim"] in known[src]:
                return _split_item(known[src], split, item)
            return by_shapes(known[src], ref[src], out)
        return _index(g, n, known[src], shape(src))
    if kind in ("mean", "max"):
        src, axes = first()
        rank = len(shape(src))
        dims = {d % rank for d in g.attrs(n).get("dims", ()) if isinstance(d, int)} or set(range(rank))
        keep = len(out) == rank
        return {x - (0 if keep else sum(1 for d in dims if d < x)): m for x, m in axes.items() if x not in dims}
    if kind == "reshape":
        src, axes = first()
        return reshape_axes(axes, shape(src), out)
    if kind == "permute":
        src, axes = first()
        perm = g.attrs(n).get("perm")
        if perm is None:
            return None
        return {i: axes[p] for i, p in enumerate(perm) if p in axes}
    if kind == "token_op":
        src, axes = first()
        return by_shapes(axes, shape(src), out) if len(out) != 3 else {1: 1}
    if kind == "output":
        return {}
    src, axes = first()
    return by_shapes(axes, shape(src), out) if kind == "other" and len(known) == 1 else None


def propagate(g: OpGraph, seeds: Iterable[str], stop: Iterable[str] = ()) -> tuple[dict[str, Axes], dict[str, str]]:
    """Token axes of every tensor computed from the residual stream.

    Args:
        g: the op graph (shapes from one example input).
        seeds: residual-stream tensors ``[B, N, C]`` (token axis 1); the first one starts the propagation,
            the others re-anchor it (a stream tensor is token-indexed on axis 1 whatever the branch before).
        stop: nodes where every token is taken back (the readout, token restores): neither they nor anything
            computed from them gets token axes.

    Returns:
        ``(axes, unknown)``: node -> ``{axis: multiplicity}`` for nodes that hold token axes, and node ->
        the node whose op made its token axes unknown (that node's label tells the op).
    """
    seeds = list(seeds)
    seed_set = set(seeds)
    blocked = set(stop)
    for s in list(blocked):
        blocked |= g.descendants(s)
    axes: dict[str, Axes] = {}
    unknown: dict[str, str] = {}
    ref: dict[str, tuple[int, ...]] = {}
    begin = g.order(seeds[0]) if seeds else len(g.nodes)
    for n in g.nodes[begin:]:
        ref.setdefault(n, g.shape(n))
        if n in blocked:
            continue
        if n in seed_set:
            axes[n] = {1: 1}
            continue
        reads = [i for i in g.g.predecessors(n) if i in axes or i in unknown]
        if not reads or not g.is_tensor(n):
            continue  # x.shape / x.size(): a size, not a tensor of tokens
        bad = [i for i in reads if i in unknown]
        if bad:
            unknown[n] = unknown[bad[0]]
            continue
        known = {i: axes[i] for i in reads}
        result = _rule(g, n, known, ref)
        if result is None:
            unknown[n] = n
        elif result:
            axes[n] = result
    return axes, unknown


def constant_token_axes(g: OpGraph, n: str, c: str, axes: dict[str, Axes]) -> list[int] | None:
    """The axes of image-independent ``c`` (in its own frame) that meet a token axis where ``n`` reads it, or
    None when ``n`` does not read it against a token axis. A layer's parameters never do (:data:`LAYERS`).

    Broadcast ops meet aligned from the right (a ``[P, d]`` RoPE table times queries ``[B, H, P, d]``: axis 0);
    an SDPA mask meets the query's token axis with its rows and the key's with its columns; a constant matrix
    operand of a ``matmul`` meets the data operand's contracted axis."""
    kind = g.kind(n)
    shape = g.shape(c)
    if kind in LAYERS or shape is None or kind in ("index", "reshape", "permute", "output", "token_op"):
        return None
    found: set[int] = set()
    if kind == "sdpa":
        ins = g.inputs(n)
        if c in ins[:3] or len(shape) < 2:
            return None
        q, k = ins[0], ins[1]
        rows = len(g.shape(q)) - 2 in axes.get(q, {})
        cols = len(g.shape(k)) - 2 in axes.get(k, {})
        found = {a for a, hit in ((len(shape) - 2, rows), (len(shape) - 1, cols)) if hit and shape[a] != 1}
    elif kind == "matmul":
        a, b = (g.inputs(n) + [None, None])[:2]
        if c == b and a in axes and len(g.shape(a)) - 1 in axes[a] and len(shape) >= 2:
            found = {len(shape) - 2}
        elif c == a and b in axes and len(g.shape(b)) - 2 in axes[b] and len(shape) >= 1:
            found = {len(shape) - 1}
    else:
        for d in g.data_inputs(n):
            ds = g.shape(d)
            if d not in axes or ds is None:
                continue
            pad = len(ds) - len(shape)
            for x in axes[d]:
                a = x - pad
                if 0 <= a < len(shape) and shape[a] == ds[x] and shape[a] != 1:
                    found.add(a)
    return sorted(found) or None
