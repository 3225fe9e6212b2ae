"""Fusion patterns: chains of Edge ops that one fused kernel computes.

A pattern is recognised at its last node (the anchor) by looking back along
the anchor's inputs. When it matches, the anchor's rule emits the fused
step, reading the chain's inputs; the chain's own steps then have no reader
and Lowerer.finish() drops them. Each matcher requires every inner node to be
used only inside the chain, so nothing else still needs an intermediate.

  * RMSNorm (ExecuTorch's and HF's): x * rsqrt(mean(x * x, -1, keepdim) + eps) * w, and with it the
    residual add that produces x (x = a + b), whose step the norm's step then replaces
  * RoPE (ExecuTorch's apply_rotary_emb): the interleaved pair rotation
    view(x, [..., D/2, 2]) -> slices -> x_r cos - x_i sin, x_r sin + x_i cos -> cat -> view
  * SiLU-gated product (SwiGLU): g * sigmoid(g) * u
  * an attention layer's RoPE of q and of k (one cos / sin) and the llama::update_cache writes of the
    rotated k and of v at one start_pos (ExecuTorch's Llama with its LLM transforms): recognised at the
    later update_cache, whose step then replaces both ropes' and the earlier update_cache's steps
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from executorch_wgpu.backend.q4gsw_pattern import constant_value, op_name

MUL, ADD, SUB = "aten.mul.Tensor", "aten.add.Tensor", "aten.sub.Tensor"
PERMUTE, UPDATE_CACHE = "aten.permute_copy.default", "llama.update_cache.default"
# Ops the graph lowering always turns into views: the result shares its input's buffer, in the same element
# order, and no step runs (ops.py gives exactly these its alias rule; a clone gets it only where its dim order
# is contiguous, so it is not listed).
VIEW_OPS = ("aten.view_copy.default", "aten.squeeze_copy.dims", "aten.squeeze_copy.dim", "aten.squeeze_copy.default",
            "aten.unsqueeze_copy.default", "aten.alias_copy.default")


def _args(node: Any) -> List[Any]:
    """A node's positional arguments (typed Any: fx types them as a union a matcher cannot index)."""
    return list(node.args)


def _is(node: Any, name: str) -> bool:
    return isinstance(node, Node) and op_name(node) == name


def _only_user(node: Node, user: Node) -> bool:
    return list(node.users) == [user]


def _operands(node: Node, test: Callable[[Any], bool]):
    """(the operand that passes test, the other one) of a binary node, either order; None when neither does."""
    a, b = _args(node)[0], _args(node)[1]
    if test(a):
        return a, b
    if test(b):
        return b, a
    return None


def _scalar_constant(ep: ExportedProgram, node: Any) -> Optional[float]:
    if isinstance(node, (int, float)):
        return float(node)
    if isinstance(node, Node):
        value = constant_value(ep, node)
        if value is not None and value.numel() == 1:
            return float(value.reshape(()).item())
    return None


@dataclass
class RmsNorm:
    x: Node
    weight: Optional[Node]
    eps: float
    chain: Tuple[Node, ...] = ()   # its nodes from x * x to the anchor: the ones that read x are the first two


@dataclass
class ResidualAdd:
    """x = a + b, the input of an RMSNorm: the norm's fused step can compute and write x itself."""

    add: Node
    a: Node
    b: Node


def match_rms_norm(ep: ExportedProgram, anchor: Node) -> Optional[RmsNorm]:
    """anchor = mul(x * rsqrt(mean(x*x) + eps), w) or the unweighted x * rsqrt(...)."""
    if not _is(anchor, MUL):
        return None
    weight = None
    normed = anchor
    width = None
    found = _operands(anchor, lambda n: _is(n, MUL) and _only_user(n, anchor))
    if found is not None and isinstance(found[1], Node) and found[1].op == "placeholder":
        normed, weight = found[0], found[1]
        w = constant_value(ep, weight)
        if w is None or w.dim() != 1:
            return None
        width = w.shape[0]
    inner = _operands(normed, lambda n: _is(n, "aten.rsqrt.default") and _only_user(n, normed))
    if inner is None:
        return None
    rsqrt, x = inner
    added = _args(rsqrt)[0]
    if not (_is(added, ADD) and _only_user(added, rsqrt)):
        return None
    pair = _operands(added, lambda n: _is(n, "aten.mean.dim") and _only_user(n, added))
    if pair is None:
        return None
    mean, eps_node = pair
    eps = _scalar_constant(ep, eps_node)
    square = _args(mean)[0]
    if eps is None or not (_is(square, MUL) and _only_user(square, mean) and _args(square)[0] is x
                           and _args(square)[1] is x):
        return None
    dims = _args(mean)[1] if len(_args(mean)) > 1 else None
    if not dims or len(dims) != 1 or dims[0] not in (-1, x.meta["val"].dim() - 1):
        return None
    if width is not None and width != x.meta["val"].shape[-1]:
        return None
    chain = (square, normed, mean, added, rsqrt) + ((anchor,) if normed is not anchor else ())
    return RmsNorm(x, weight, eps, chain)


def match_residual_add(ep: ExportedProgram, norm: RmsNorm, anchor: Node) -> Optional[ResidualAdd]:
    """norm.x = add(a, b) of two same-shape float32 tensors (no broadcast, alpha 1), and every other reader
    of it comes after the anchor in the graph: then the anchor's step can be where x is computed. Not
    when the anchor is the unweighted inner part of a weighted norm: the weighted one's step does it."""
    users = list(anchor.users)
    if len(users) == 1 and match_rms_norm(ep, users[0]) is not None:
        return None
    add = norm.x
    if not _is(add, ADD) or add.kwargs.get("alpha", 1) != 1:
        return None
    a, b = _args(add)[0], _args(add)[1]
    vals = [n.meta.get("val") if isinstance(n, Node) else None for n in (a, b, add)]
    tensors = [v for v in vals if isinstance(v, torch.Tensor) and v.dtype == torch.float32]
    if len(tensors) != 3 or not (tensors[0].shape == tensors[1].shape == tensors[2].shape):
        return None
    order = {n: i for i, n in enumerate(anchor.graph.nodes)}
    if any(u not in norm.chain and order[u] < order[anchor] for u in add.users):
        return None
    return ResidualAdd(add, a, b)


@dataclass
class SiluMul:
    gate: Node
    up: Node


def match_silu_mul(anchor: Node) -> Optional[SiluMul]:
    """anchor = mul(g * sigmoid(g), u)."""
    if not _is(anchor, MUL):
        return None
    for silu, up in ((_args(anchor)[0], _args(anchor)[1]), (_args(anchor)[1], _args(anchor)[0])):
        if not (_is(silu, MUL) and _only_user(silu, anchor)):
            continue
        found = _operands(silu, lambda n: _is(n, "aten.sigmoid.default") and _only_user(n, silu))
        if found is not None and found[0].args[0] is found[1] and isinstance(up, Node):
            return SiluMul(found[1], up)
    return None


@dataclass
class Rope:
    x: Node        # [..., D] before the pair view
    cos: Node      # broadcastable to [..., D/2]
    sin: Node


def _squeezed_half(node: Any, which: int) -> Optional[Node]:
    """The pair view v when node = squeeze(slice(v, -1, which, which + 1), [-1])."""
    if not (_is(node, "aten.squeeze_copy.dims") or _is(node, "aten.squeeze_copy.dim")):
        return None
    sl = _args(node)[0]
    if not (_is(sl, "aten.slice_copy.Tensor") and len(_args(sl)) >= 4):
        return None
    v = _args(sl)[0]
    rank = v.meta["val"].dim()
    dim, start, end = _args(sl)[1], _args(sl)[2], _args(sl)[3]
    step = _args(sl)[4] if len(_args(sl)) > 4 else 1
    if dim not in (-1, rank - 1) or (start, end, step) != (which, which + 1, 1):
        return None
    return v


def match_rope(anchor: Node) -> Optional[Rope]:
    """anchor = cat([unsqueeze(x_r cos - x_i sin, -1), unsqueeze(x_r sin + x_i cos, -1)], -1)."""
    if not _is(anchor, "aten.cat.default"):
        return None
    parts = _args(anchor)[0]
    dim = _args(anchor)[1] if len(_args(anchor)) > 1 else 0
    rank = anchor.meta["val"].dim()
    if len(parts) != 2 or dim not in (-1, rank - 1):
        return None
    halves = []
    for p in parts:
        if not (_is(p, "aten.unsqueeze_copy.default") and _only_user(p, anchor)):
            return None
        halves.append(_args(p)[0])
    real, imag = halves
    if not (_is(real, SUB) and _is(imag, ADD)):
        return None
    products = [_args(real)[0], _args(real)[1], _args(imag)[0], _args(imag)[1]]
    if not all(_is(m, MUL) for m in products):
        return None
    (rc, is_), (rs, ic) = (_args(real)[0].args, _args(real)[1].args), (_args(imag)[0].args, _args(imag)[1].args)
    # real = x_r*cos - x_i*sin; imag = x_r*sin + x_i*cos (ExecuTorch's rope.py order)
    x_r, cos = rc
    x_i, sin = is_
    if rs[0] is not x_r or rs[1] is not sin or ic[0] is not x_i or ic[1] is not cos:
        return None
    v_r, v_i = _squeezed_half(x_r, 0), _squeezed_half(x_i, 1)
    if v_r is None or v_r is not v_i or not _is(v_r, "aten.view_copy.default"):
        return None
    x = _args(v_r)[0]
    if not isinstance(x, Node):
        return None
    xv, cv = x.meta["val"], cos.meta["val"]
    if not (isinstance(xv, torch.Tensor) and isinstance(cv, torch.Tensor)):
        return None
    return Rope(x, cos, sin)


def _dims(node: Node) -> List[int]:
    dims = list(_args(node)[1])
    return [d + len(dims) if d < 0 else d for d in dims]


def undone_permute(node: Any) -> Optional[Node]:
    """x when node = permute(permute(x, p), p') and p' undoes p (ExecuTorch's LLM transforms write such pairs
    around their custom ops): the lowering makes node a view of x, and the inner permute's copy goes unread
    unless something else reads the inner permute."""
    if not _is(node, PERMUTE):
        return None
    inner = _args(node)[0]
    if not _is(inner, PERMUTE):
        return None
    dims, inner_dims = _dims(node), _dims(inner)
    if [inner_dims[d] for d in dims] != list(range(len(dims))):
        return None
    source = _args(inner)[0]
    return source if isinstance(source, Node) else None


def _view_source(node: Any, reader: Node) -> Optional[Node]:
    """The node whose buffer `node` is, seen from `reader`, through views and undone permute pairs -- each node
    on the way (the source included) read by the next one only, so nothing else reads the source's value."""
    while isinstance(node, Node) and _only_user(node, reader):
        if op_name(node) in VIEW_OPS:
            reader, node = node, _args(node)[0]
            continue
        source = undone_permute(node)
        if source is None:
            return node
        inner = _args(node)[0]
        if not _only_user(inner, node):
            return None
        reader, node = inner, source
    return None


def _unread_before(node: Node, anchor: Node, order: Dict[Node, int]) -> bool:
    """No step that reads node's value runs before the anchor's: every reader of node before the anchor in the
    graph is a view of it (no step) whose own readers pass this test, or a permute that only permutes undoing
    it read (so its copy goes unread, and they are views of node)."""
    for u in node.users:
        if order[u] > order[anchor]:
            continue
        if op_name(u) in VIEW_OPS and _args(u)[0] is node:
            if not _unread_before(u, anchor, order):
                return False
        elif _is(u, PERMUTE) and u.users and all(undone_permute(w) is node for w in u.users):
            if not all(_unread_before(w, anchor, order) for w in u.users):
                return False
        else:
            return False
    return True


def _touched_between(node: Node, start: Node, end: Node, order: Dict[Node, int]) -> bool:
    """Whether a node strictly between start and end in the graph reads node's value, directly or through
    others (the search stops at end: what comes later depends on nothing earlier)."""
    seen, todo = set(), list(node.users)
    while todo:
        u = todo.pop()
        if u in seen or order[u] >= order[end]:
            continue
        seen.add(u)
        if order[u] > order[start]:
            return True
        todo.extend(u.users)
    return False


@dataclass
class RopeCache:
    """One attention layer's q = rope(q_x), and update_cache(rope(k_x), k_cache, start) and update_cache(v,
    v_cache, start): one fused step, at the later update_cache, computes all of it."""

    q: Rope               # q's rope (q.x: [B, S, Hq, D])
    q_rope: Node          # its anchor (the cat), whose value the fused step writes
    k: Rope               # k's rope, with the same cos and sin nodes
    k_rope: Node
    k_update: Node        # update_cache(view of k_rope, k_cache, start)
    v_update: Node        # update_cache(v, v_cache, start)
    v: Node
    first: Node           # the earlier of the two updates (the other is the anchor)


def match_rope_cache(anchor: Node) -> Optional[RopeCache]:
    """anchor = the later of update_cache(rope(k), k_cache, start) and update_cache(v, v_cache, start), with
    start one node, each cache a distinct buffer of the program (a placeholder), the rotated k read by its
    update alone (through views), and a rope of q by the same cos and sin nodes before the anchor. The fused
    step runs at the anchor, so what it moves there must not be observed in between: nothing reads the rotated
    q before the anchor (but views), and nothing between the earlier update and the anchor reads that update's
    cache. q's rope is the nearest one before the anchor that qualifies. Shapes and layouts are the lowering's
    to check."""
    if not _is(anchor, UPDATE_CACHE) or len(_args(anchor)) < 3:
        return None
    start = _args(anchor)[2]
    if not isinstance(start, Node):
        return None
    order = {n: i for i, n in enumerate(anchor.graph.nodes)}
    # The updates at this start, in graph order, pair up as (0, 1), (2, 3), ...: each is in one pair at most,
    # and the earlier of a pair is never an anchor itself (its step is the one this pair's step replaces).
    updates = sorted((u for u in start.users if _is(u, UPDATE_CACHE) and len(_args(u)) >= 3 and _args(u)[2] is start),
                     key=order.__getitem__)
    at = updates.index(anchor)
    if at % 2 == 0:
        return None
    first = updates[at - 1]
    caches = [_args(u)[1] for u in (anchor, first)]
    if not all(isinstance(c, Node) and c.op == "placeholder" for c in caches) or caches[0] is caches[1]:
        return None
    if _touched_between(caches[1], first, anchor, order):
        return None
    for k_update, v_update in ((anchor, first), (first, anchor)):
        found = _match_layer(k_update, v_update, first, anchor, order)
        if found is not None:
            return found
    return None


def _match_layer(k_update: Node, v_update: Node, first: Node, anchor: Node,
                 order: Dict[Node, int]) -> Optional[RopeCache]:
    k_rope = _view_source(_args(k_update)[0], k_update)
    k = match_rope(k_rope) if k_rope is not None else None
    v = _args(v_update)[0]
    if k_rope is None or k is None or not isinstance(v, Node):
        return None
    for q_rope in reversed([n for n in anchor.graph.nodes if order[n] < order[anchor]]):
        if q_rope is k_rope or not _is(q_rope, "aten.cat.default"):
            continue
        q = match_rope(q_rope)
        if q is None or q.cos is not k.cos or q.sin is not k.sin:
            continue
        if _unread_before(q_rope, anchor, order):
            return RopeCache(q, q_rope, k, k_rope, k_update, v_update, v, first)
    return None
