"""Data-aware initialisation: truncated SVD in the metric of each layer's input activations.

For a layer W (out x in) with inputs X (in x tokens) and input covariance C = X X^T / tokens, the rank-k
W_k minimising ||(W - W_k) X||_F is U_k S_k V_k^T L^{-1}, where C = L L^T and U S V^T = svd(W L)
(the whitening trick of activation-aware SVD compression).  Plain truncated SVD minimises
||W - W_k||_F instead, which ignores which input directions the data actually uses.

Convolutions (nn.Conv2d / GBLRConv2d): the "inputs" of the kernel matrix W (out x in*kh*kw) are the
receptive fields, so X is the im2col of the layer's input (``F.unfold`` with the layer's geometry,
asymmetric padding included), one row per output position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gblrc.learn.data import call_model
from gblrc.nn.fit_data import whitened_svd
from gblrc.nn.layer import GBLRLinear
from gblrc.nn.replace import as_linear, get_module

__all__ = ["input_covariances", "BlockCovariances", "whiten_layer", "sequential_refit"]


def layer_rows(module, x: torch.Tensor) -> torch.Tensor:
    """The input ``x`` of ``module`` as rows (vectors x in_features, float64): the last axis for linear
    layers, the receptive fields (im2col) for convolutions."""
    from gblrc.nn.conv import GBLRConv2d, conv_pads

    x = x.detach()
    if isinstance(module, (nn.Conv2d, GBLRConv2d)):
        t, l, b, r = conv_pads(module)
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if (t, l) != (b, r):
            x, pad = F.pad(x, (l, r, t, b)), 0
        else:
            pad = (t, l)
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=pad, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).double()
    return x.reshape(-1, x.shape[-1]).double()


class _Covariances:
    """Forward hooks summing X^T X of each named layer's inputs; layers fed the same input tensor (an attention
    layer's query, key and value) share one sum."""

    def __init__(self, model, names):
        self.sums, self.firsts, self.counts, self.owner, self.shared = {}, {}, {}, {}, {}
        self.means: dict[str, torch.Tensor] = {}  # E[x] of each layer's inputs, once closed
        self.hooks = [get_module(model, n).register_forward_hook(self._rec(n)) for n in names]

    def _rec(self, name):
        from gblrc.nn.conv import GBLRConv2d

        def hook(_m, inp, _out):
            key = (id(inp[0]), isinstance(_m, (nn.Conv2d, GBLRConv2d)) and name)  # convolutions: rows of their own
            first = self.owner.setdefault(key, (inp[0], name))  # (the tensor kept alive: ids stay unique)
            if first[1] != name and first[1] in self.sums:  # the same input as an earlier layer's: its sum
                self.shared[name] = first[1]
                return
            x = layer_rows(_m, inp[0])
            self.sums[name] = self.sums.get(name, 0) + x.t() @ x
            self.firsts[name] = self.firsts.get(name, 0) + x.sum(0)
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]

        return hook

    def new_call(self) -> None:
        self.owner.clear()

    def close(self, store=lambda t: t) -> dict[str, torch.Tensor]:
        for h in self.hooks:
            h.remove()
        out = {n: store(self.sums[n] / self.counts[n]) for n in self.sums}
        self.means = {n: self.firsts[n] / self.counts[n] for n in self.firsts}
        self.means.update({n: self.means[s] for n, s in self.shared.items() if s in self.means})
        return {**out, **{n: out[s] for n, s in self.shared.items() if s in out and n not in out}}


@torch.no_grad()
def input_covariances(model, names, batches, device=None) -> dict[str, torch.Tensor]:
    """{name: C (in x in, float64)} averaged over the rows of the inputs of each named layer.  Layers fed
    the same input tensor (an attention layer's query, key and value) share one C (one tensor, summed once)."""
    acc = _Covariances(model, names)
    try:
        for x in batches:
            acc.new_call()
            call_model(model, x)
    finally:
        covs = acc.close()
    return covs


class BlockCovariances:
    """The layers' input covariances on ``batches`` in the ``dense`` model, computed one block at a time when
    a layer of the block is first asked for (``covs[name]``), only that block's held: the block-sequential
    stages ask for them in block order, so each pass computes each block's once and the whole set never
    exists at once (it is the largest state of post-training: 1.4 GB per block of a 7 B model, docs/design.md
    §5).  A block of a chain is run alone on its cached inputs (:class:`gblrc.learn.blocks.BlockInputs`; on
    the device of ``placement``, the covariances kept in its storage); the layers outside a chain are taken
    together by forward passes of the model.  ``dense`` must stay dense while the covariances are read."""

    def __init__(self, dense, names, batches, placement=None):
        from gblrc.learn.blocks import BlockInputs, Placement, layer_blocks

        self.dense, self.batches = dense, batches
        self.place = placement or Placement("cpu")
        self.block_of = layer_blocks(dense, names)
        self._ins = BlockInputs(dense, batches, self.place)
        self._rest = None  # the covariances of the layers outside a chain (computed once, kept: few)
        self._block, self._held, self._means = None, {}, {}
        self.computed: list[str] = []  # the blocks computed, in order

    def __contains__(self, name) -> bool:
        return name in self.block_of

    def __iter__(self):
        return iter(self.block_of)

    def __len__(self) -> int:
        return len(self.block_of)

    def __getitem__(self, name: str) -> torch.Tensor:
        block = self.block_of[name]
        if not self._ins.chained(block):
            if self._rest is None:
                rest = [n for n, b in self.block_of.items() if not self._ins.chained(b)]
                self._rest = input_covariances(self.dense, rest, self.batches)
            return self._rest[name]
        if block != self._block:
            self._block, self._held = None, {}  # (the last block's freed before the next is computed)
            (self._held, self._means), self._block = self._compute(block), block
            self.computed.append(block)
        return self._held[name]

    def mean(self, name: str) -> torch.Tensor | None:
        """E[x] of the inputs of ``name`` (float64, where the covariances are kept), for a layer inside a chain
        (its block's covariances computed as :meth:`__getitem__` does); None for a layer outside a chain."""
        if not self._ins.chained(self.block_of[name]):
            return None
        self[name]
        return self._means[name]

    @torch.no_grad()
    def _compute(self, block: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        from gblrc.learn.blocks import CacheOff

        p, mod = self.place, self.dense.get_submodule(block)
        inside = [n for n, b in self.block_of.items() if b == block]
        with CacheOff(self.dense):
            cached = self._ins.inputs(block)
            acc = _Covariances(self.dense, inside)
            try:
                with p.on_device(mod):
                    for a, kw in cached:
                        acc.new_call()
                        mod(*p.fetch(a), **p.fetch(kw))
            finally:
                covs = acc.close(p.store)
        return covs, {n: p.store(m) for n, m in acc.means.items()}

    def all(self) -> dict[str, torch.Tensor]:
        """Every layer's covariance, as a dict (all held)."""
        return {n: self[n] for n in self.block_of}


@torch.no_grad()
def whiten_layer(layer: GBLRLinear, W: torch.Tensor, C: torch.Tensor, damp: float = 1e-2) -> bool:
    """Refit the full-width components of ``layer`` to ``W`` in the metric of ``C``; False if not applicable."""
    wc, _, wr, _ = layer.hard_intervals()
    live = ((wc > 0) & (wr > 0)).nonzero().flatten()
    n_in, n_out, r = layer.in_features, layer.out_features, layer.rank_per_component
    if live.numel() == 0 or not bool(((wc[live] == n_in) & (wr[live] == n_out)).all()):
        return False
    if not bool((live == torch.arange(live.numel())).all()):
        return False
    Uf, Vf = whitened_svd(W, C.to(W.device), live.numel() * r, damp)  # (out, k), (k, in)
    k = Uf.shape[1]
    m = k // r
    dt = layer.U.dtype
    layer.U.zero_()
    layer.V.zero_()
    layer.U[:m].copy_(Uf[:, : m * r].t().reshape(m, r, n_out).transpose(1, 2).to(dt))
    layer.V[:m].copy_(Vf[: m * r].reshape(m, r, n_in).to(dt))
    return True


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the input it waits for has been seen."""


def _capture_in_block(model, block: str, name: str, inputs) -> torch.Tensor | None:
    """The input (rows x in) of the layer ``name`` inside ``block``, the block run on its cached
    (args, kwargs) ``inputs`` up to that layer."""
    got = []

    def hook(_m, inp):
        got.append(layer_rows(_m, inp[0]))
        raise _Stop

    h = get_module(model, name).register_forward_pre_hook(hook)
    try:
        model.get_submodule(block)(*inputs[0], **inputs[1])
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0] if got else None


@torch.no_grad()
def call_groups(model, names, batch) -> list[list[str]]:
    """``names`` in the order the layers first run on ``batch``, grouped by shared input tensor
    (e.g. the query, key and value projections of one attention layer)."""
    seen, alive, hooks = {}, [], []
    for n in names:

        def hook(_m, inp, n=n):
            if n not in seen:
                seen[n] = id(inp[0])
                alive.append(inp[0])  # kept alive so that no later tensor reuses its id

        hooks.append(get_module(model, n).register_forward_pre_hook(hook))
    try:
        call_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for n, key in seen.items():
        if groups and key == last:
            groups[-1].append(n)
        else:
            groups.append([n])
        last = key
    return groups + [[n] for n in names if n not in seen]


def call_order(model, names, batch) -> list[str]:
    """``names`` sorted by when each layer first runs in a forward pass of ``batch``."""
    return [n for g in call_groups(model, names, batch) for n in g]


@torch.no_grad()
def sequential_refit(
    student, teacher, layers: dict, dense_w: dict, batches, damp: float = 1e-2, placement=None
) -> list[str]:
    """Refit each layer, in call order, to reproduce the teacher's layer output from the *student's* input.

    For layer W with teacher inputs X_t and student inputs X_s (the earlier layers already compressed),
    the best unconstrained map is A = W C_ts C_ss^-1 (C_ss = X_s X_s^T, C_ts = X_t X_s^T; damped towards
    W), and the best low-rank one is A truncated in the metric of C_ss (:func:`whiten_layer`), so errors
    of earlier layers are corrected instead of compounded.  Layers that share an input are refitted
    together.  Each block's inputs are computed once (:class:`gblrc.learn.blocks.BlockInputs`); with an
    offloading ``placement`` each block (and its teacher twin) is on the device only while it is refitted.
    Returns the names of the layers it could not refit.
    """
    from gblrc.learn.blocks import BlockInputs, CacheOff, Placement, layer_blocks

    p = placement or Placement("cpu")

    skipped = []
    block_of = layer_blocks(student, layers)
    s_in, t_in = BlockInputs(student, batches, p), BlockInputs(teacher, batches, p)  # each block's inputs once
    with CacheOff(student, teacher):
        for group in call_groups(student, list(layers), batches[0]):
            block = block_of[group[0]]
            pairs = list(zip(s_in.inputs(block), t_in.inputs(block)))
            with p.on_device(student.get_submodule(block), teacher.get_submodule(block)):
                skipped += _refit_group(student, teacher, block, group, layers, dense_w, pairs, damp, p)
    return skipped


def _refit_group(student, teacher, block, group, layers, dense_w, pairs, damp, p) -> list[str]:
    """Refit the layers of ``group`` (one shared input) inside ``block`` on the cached (student, teacher)
    block inputs ``pairs``; the names it could not refit."""
    Css = Cts = None
    n, ms, mt = 0, 0, 0
    for s_args, t_args in pairs:
        xs = _capture_in_block(student, block, group[0], p.fetch(s_args))
        xt = _capture_in_block(teacher, block, group[0], p.fetch(t_args))
        if xs is None or xt is None or xs.shape != xt.shape:
            return list(group)
        Css = xs.t() @ xs + (0 if Css is None else Css)
        Cts = xt.t() @ xs + (0 if Cts is None else Cts)
        ms, mt = ms + xs.sum(0), mt + xt.sum(0)
        n += xs.shape[0]
    if Css is None:
        return list(group)
    Css, Cts, ms, mt = Css / n, Cts / n, ms / n, mt / n
    eye = torch.eye(Css.shape[0], dtype=Css.dtype, device=Css.device)
    reg = Css + damp * Css.diagonal().mean().clamp_min(1e-12) * eye
    skipped = []
    for name in group:
        W = p.fetch(dense_w[name]).double().to(Css.device)
        if layers[name].family != "gblr":  # a block-sparse layer: its block refitted on the columns it reads
            _refit_tile(layers[name], W, as_linear(get_module(teacher, name)).bias, Css, Cts, ms, mt)
            continue
        # ridge regression towards W: A = W + W (C_ts - C_ss) reg^-1 (= W C_ts C_ss^-1 undamped; = W
        # when the student's inputs are the teacher's), reg symmetric
        A = W + torch.linalg.solve(reg, (W @ (Cts - Css)).t()).t()
        if not whiten_layer(layers[name], A, Css, damp):
            skipped.append(name)
    return skipped


@torch.no_grad()
def _refit_tile(layer: GBLRLinear, W, dense_bias, Css, Cts, ms, mt) -> None:
    """A block-sparse layer's one block (and its bias) refitted by least squares so that, from the student's
    inputs on the block's columns, its output on the block's rows is the dense layer's (``W``, ``dense_bias``)
    on the teacher's inputs (second moments ``Css``, ``Cts`` = E[x_t x_s^T], means ``ms``, ``mt``)."""
    from gblrc.nn.fit_data import refit_kept

    rows, cols = layer.tile_spans()
    kept = torch.arange(cols.start, cols.stop, device=Css.device)
    b = None if layer.bias is None else dense_bias
    Wk, bk = refit_kept(W[rows], None if b is None else b[rows], Css, ms, kept, 1e-4, cross=Cts, target_mean=mt)
    layer.set_tile(Wk)
    if bk is not None:
        layer.bias[rows] = bk.to(layer.bias)
