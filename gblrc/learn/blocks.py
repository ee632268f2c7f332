"""A model's blocks and their inputs, computed once per block: the block-sequential pass of the
post-training stages (sensitivity, block refinement).

GPTQ, SVD-LLM and SliceGPT go through a network block by block: one block's inputs are cached, the block
is measured or compressed, and its outputs become the next block's inputs, so each block runs once per
batch and the whole pass costs O(L) block calls.  Running the model from its input up to every block
instead costs O(L^2).

:class:`BlockInputs` gives each block's (args, kwargs) on a list of batches.  Within a *chain* (consecutive
items of one ModuleList / Sequential, such as a transformer's layers) a block's inputs are the previous
item's outputs put in place of its "stream" argument (the hidden states), the other arguments (attention
mask, position embeddings ...) as the chain's first item got them on the same batch.  Whether a container
is a chain is checked, not assumed: one forward pass of the first batch records every item's inputs and
outputs, and the container is a chain only if each item ran once, in order, and its inputs are the
previous item's with exactly one argument replaced by that item's output.  Any other block (a layer
outside a container, a container whose items are called otherwise) has its inputs captured by a forward
pass that stops at it, as before.
"""

from __future__ import annotations

import ctypes
import gc
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from gblrc.learn.data import call_model, model_output

__all__ = [
    "find_blocks",
    "layer_blocks",
    "BlockInputs",
    "CacheOff",
    "Placement",
    "block_output",
    "release_memory",
    "large_allocations_mapped",
]


_LIBC: list = []


def release_memory() -> None:
    """Collect garbage and hand the C allocator's free pages back to the system (glibc's ``malloc_trim``;
    nothing elsewhere).  The block stages free large caches as they go; without this the freed pages of
    one stage stay in the process (fragmented between smaller live allocations) and count in its peak."""
    gc.collect()
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def large_allocations_mapped(threshold: int = 1 << 20) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more by its own mmap, returned to the
    system when freed (``mallopt(M_MMAP_THRESHOLD)``, which also stops glibc raising the threshold as large
    blocks are freed); True where it took effect (glibc).  The block stages allocate and free many caches
    and activations of a few MB: served from the heap they fragment it, and the process kept ~1 GB more
    than its live tensors on a width-768 BERT (docs/design.md §5).  Process-wide, so the command line sets
    it; API users can set ``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment instead."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


class _Half:
    """A cached float32 activation kept in float16 (half the memory); :meth:`Placement.fetch` restores it."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t


_HALF_MAX = 6.0e4  # float16 holds up to 65504: a tensor with larger (or non-finite) values stays float32


def _pack(obj):
    """Large float32 tensors of ``obj`` as :class:`_Half` (those whose values float16 holds)."""
    if torch.is_tensor(obj):
        if obj.dtype == torch.float32 and obj.numel() >= 4096 and bool(obj.abs().max() < _HALF_MAX):
            return _Half(obj.to(torch.float16))
        return obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_pack(o) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_pack(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _pack(v) for k, v in obj.items()}
    return obj


def _to(obj, device):
    """Tensors in ``obj`` (a tensor, tuple, list or dict of them, nested) moved to ``device`` (None: where they
    are), cached halves restored to float32."""
    if isinstance(obj, _Half):
        return obj.t.to(device=device, dtype=torch.float32)
    if torch.is_tensor(obj):
        return obj if device is None else obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(_to(o, device) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class Placement:
    """Where the block stages compute and where the model and the cached activations rest.

    Without offload (the default) the model is on its device and nothing moves.  With ``offload`` the model
    and the cached inputs stay on ``storage`` (the CPU) and each block goes to ``device`` only while it is
    measured, initialised or refined (:meth:`on_device`), with the batches it needs (:meth:`fetch`); its
    outputs come back to storage (:meth:`store`).  So the device holds one block, its dense twin and one
    block's batches, whatever the depth (issue 29: models that do not fit the device).  The moves go
    through :meth:`move`, which a test can watch.

    ``half_cache``: the cached hidden states (large float32 tensors whose values float16 holds) rest in
    float16 and are computed on in float32 again: half the memory of the caches, which are the largest
    state of post-training (64 batches, twice); a relative rounding of 5e-4, far under the errors the
    refinement corrects (docs/design.md §5)."""

    def __init__(self, device, storage=None, offload: bool = False, half_cache: bool = False):
        self.device = torch.device(device)
        self.storage = torch.device(storage) if storage is not None else self.device
        self.offload = bool(offload)
        self.half_cache = bool(half_cache)

    def with_half_cache(self) -> "Placement":
        """The same placement with its caches in float16."""
        return Placement(self.device, self.storage, self.offload, half_cache=True)

    def move(self, module: nn.Module, to_device: bool) -> None:
        """``module`` to the device (``to_device``) or back to storage."""
        module.to(self.device if to_device else self.storage)

    @contextmanager
    def on_device(self, *modules):
        """``modules`` on the device for the duration (with offload; else nothing moves)."""
        mods = [m for m in modules if m is not None]
        if self.offload:
            for m in mods:
                self.move(m, True)
        try:
            yield
        finally:
            if self.offload:
                for m in mods:
                    self.move(m, False)

    def fetch(self, obj):
        """The tensors of ``obj`` on the device (with offload), cached halves as float32 again."""
        return _to(obj, self.device if self.offload else None) if self.offload or self.half_cache else obj

    def store(self, obj):
        """The tensors of ``obj`` in storage (with offload), large float32 ones in float16 (``half_cache``)."""
        obj = _to(obj, self.storage) if self.offload else obj
        return _pack(obj) if self.half_cache else obj


_NOWHERE = Placement("cpu")  # no offload: nothing moves


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the block's inputs are captured."""


def find_blocks(model: nn.Module, layer_names) -> list[str]:
    """Block names for ``layer_names`` (compressed layers): for each layer the deepest ancestor that is an
    item of a ModuleList / Sequential (``encoder.layer.3``), else the layer itself; in module order."""
    containers = {n for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))}
    blocks: list[str] = []
    for name in layer_names:
        parts = name.split(".")
        block = name
        for j in range(len(parts) - 1, -1, -1):  # the innermost container above the layer
            if ".".join(parts[:j]) in containers:
                block = ".".join(parts[: j + 1])
                break
        if block not in blocks:
            blocks.append(block)
    return blocks


def layer_blocks(model: nn.Module, layer_names) -> dict[str, str]:
    """{layer name: its block (:func:`find_blocks`)}, blocks in module order, the layers of a block in the
    order of ``layer_names``."""
    names = list(layer_names)
    return {n: b for b in find_blocks(model, names) for n in names if n == b or n.startswith(b + ".")}


def block_output(out) -> torch.Tensor:
    """A block's main output: the tensor itself, the first item of a tuple, or a model output's main field."""
    return out if torch.is_tensor(out) else out[0] if isinstance(out, (tuple, list)) else model_output(out)


def _no_cache(v):
    """None for a key/value cache object (Hugging Face's Cache classes: mutated by every call, so a cached
    call would grow it and keep its graph), else ``v``."""
    return None if type(v).__name__.endswith("Cache") else v


def _detached(args, kwargs) -> tuple:
    return (
        tuple(a.detach() if torch.is_tensor(a) else a for a in args),
        {k: v.detach() if torch.is_tensor(v) else _no_cache(v) for k, v in kwargs.items()},
    )


def _same(a, b) -> bool:
    """The same argument value: one tensor (or equal tensors), equal tuples / lists, or the same object."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (
            torch.is_tensor(a)
            and torch.is_tensor(b)
            and (a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _stream_slot(prev: tuple, nxt: tuple, out: torch.Tensor):
    """The one argument slot (position int or keyword str) of ``nxt`` that holds ``out`` where ``prev``
    held something else, with every other slot the same as in ``prev``; None when there is no such slot."""
    (pa, pk), (na, nk) = prev, nxt
    if len(pa) != len(na) or set(pk) != set(nk):
        return None
    slots = [(i, pa[i], na[i]) for i in range(len(pa))] + [(k, pk[k], nk[k]) for k in pk]
    stream = [s for s, _, v in slots if torch.is_tensor(v) and (v is out or _same(v, out))]
    if len(stream) != 1:
        return None
    rest_same = all(_same(p, v) for s, p, v in slots if s != stream[0])
    return stream[0] if rest_same else None


def _put(inputs: tuple, slot, value) -> tuple:
    args, kwargs = inputs
    if isinstance(slot, int):
        return (args[:slot] + (value,) + args[slot + 1 :], kwargs)
    return (args, {**kwargs, slot: value})


class CacheOff:
    """``config.use_cache = False`` on Hugging Face models for the duration (the blocks are called alone)."""

    def __init__(self, *models):
        self.cfgs = [c for m in models if (c := getattr(m, "config", None)) is not None and hasattr(c, "use_cache")]

    def __enter__(self):
        self.was = [c.use_cache for c in self.cfgs]
        for c in self.cfgs:
            c.use_cache = False

    def __exit__(self, *exc):
        for c, w in zip(self.cfgs, self.was):
            c.use_cache = w


@torch.no_grad()
def _capture(model: nn.Module, block: str, xs) -> list[tuple]:
    """``block``'s (args, kwargs) on each batch, each forward stopped at the block."""
    got = []

    def hook(_m, args, kwargs):
        got.append(_detached(args, kwargs))
        raise _Stop

    h = model.get_submodule(block).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for x in xs:
            try:
                call_model(model, x)
            except _Stop:
                pass
    finally:
        h.remove()
    return got


@torch.no_grad()
def _chain_slots(model: nn.Module, container: str, x) -> list | None:
    """For each item k >= 1 of ``container``, the slot through which item k-1's output reaches it (one
    forward of batch ``x``); None when the container is not a chain (see the module doc)."""
    items = list(model.get_submodule(container).children())
    if len(items) < 2:
        return None
    calls: list[int] = []
    seen: dict = {}  # item index -> (inputs, output): only the last item's are kept
    slots: list = [None]
    bad = []

    def pre(k):
        def hook(_m, args, kwargs):
            calls.append(k)
            inp = _detached(args, kwargs)
            if k > 0:
                prev = seen.pop(k - 1, None)
                slot = None if prev is None else _stream_slot(prev[0], inp, prev[1])
                if slot is None:
                    bad.append(k)
                slots.append(slot)
            seen[k] = [inp, None]

        return hook

    def post(k):
        def hook(_m, _args, out):
            if k in seen:
                seen[k][1] = block_output(out).detach()

        return hook

    hs = []
    for k, m in enumerate(items):
        hs.append(m.register_forward_pre_hook(pre(k), with_kwargs=True))
        hs.append(m.register_forward_hook(post(k)))
    try:
        call_model(model, x)
    finally:
        for h in hs:
            h.remove()
    if bad or calls != list(range(len(items))):
        return None
    return slots


@dataclass
class _At:
    """Where a :class:`BlockInputs` is: the block asked for last, its place in its chain ((container, index,
    slots) or None), its cached inputs (None once released), its outputs (None until computed) and, once
    released, what the next item needs of the inputs (the skeleton: the inputs short of the stream)."""

    block: str
    where: tuple | None
    inputs: list | None
    outputs: list | None = None
    skeleton: list | None = None


class BlockInputs:
    """Each block's inputs on ``xs`` (a list of batches), for blocks asked for in call order.

    ``inputs(block)`` returns [(args, kwargs)] per batch (valid until the next call: the list is updated in
    place as the inputs move on): propagated from the previously asked block of
    the same chain through the items between (their *current* weights: a block refined or compressed
    before the next is asked for passes on its new outputs), else captured by a forward pass stopped at
    the block.  ``outputs(block)`` is the block's output on them (computed once and reused for the
    next block's inputs while the block is unchanged; ``changed()`` says it was not).  ``how[block]`` records
    "propagated" or "captured".
    """

    def __init__(self, model: nn.Module, xs, placement: Placement | None = None):
        self.model, self.xs = model, list(xs)
        self.place = placement or _NOWHERE
        self.how: dict[str, str] = {}
        self._chains: dict[str, list | None] = {}
        self._at: _At | None = None  # the block asked for last

    def _chain(self, container: str):
        if container not in self._chains:
            mod = self.model.get_submodule(container)
            ok = isinstance(mod, (nn.ModuleList, nn.Sequential)) and bool(self.xs)
            self._chains[container] = _chain_slots(self.model, container, self.xs[0]) if ok else None
        return self._chains[container]

    def _where(self, block: str):
        container, _, idx = block.rpartition(".")
        if not container or not idx.isdigit():
            return None
        slots = self._chain(container)
        return (container, int(idx), slots) if slots is not None and int(idx) < len(slots) else None

    def chained(self, block: str) -> bool:
        """Whether ``block`` is an item of a chain (its inputs can be propagated from the item before)."""
        return self._where(block) is not None

    def _one(self, mod: nn.Module, inp) -> torch.Tensor:
        """``mod``'s main output on one cached (args, kwargs), computed on the device, kept in storage."""
        p = self.place
        args, kwargs = inp
        return p.store(block_output(mod(*p.fetch(args), **p.fetch(kwargs))).detach())

    @torch.no_grad()
    def inputs(self, block: str) -> list[tuple]:
        at = self._at
        if at is not None and at.block == block and at.inputs is not None:  # a block's inputs do not depend
            return at.inputs  # on the block itself: asked again, the same
        where = self._where(block)
        if (
            where is not None
            and at is not None
            and at.where is not None
            and at.where[0] == where[0]
            and (at.where[1] < where[1])
        ):
            container, j, slots = where
            items = list(self.model.get_submodule(container).children())
            k, cur, out = at.where[1], at.inputs, at.outputs
            if cur is None:  # released: the next item's inputs, short of the stream, are kept
                cur, out, k = [_put(sk, slots[k + 1], o) for sk, o in zip(at.skeleton, out)], None, k + 1
            self._at = None  # (cur is updated in place, a batch at a time: one batch's outputs extra at once)
            for k in range(k, j):
                if out is not None:
                    cur, out = [_put(inp, slots[k + 1], o) for inp, o in zip(cur, out)], None
                    continue
                with self.place.on_device(items[k]):
                    for i, inp in enumerate(cur):
                        cur[i] = _put(inp, slots[k + 1], self._one(items[k], inp))
            self.how[block] = "propagated"
        else:
            cur = [self.place.store(c) for c in _capture(self.model, block, self.xs)]
            self.how[block] = "captured"
        self._at = _At(block, where, cur)
        return cur

    @torch.no_grad()
    def outputs(self, block: str, release: bool = False) -> list[torch.Tensor]:
        """The block's outputs on the inputs ``inputs(block)`` gave last (computed once while unchanged).
        ``release``: the inputs are not needed again: only what the next item of the chain needs of them
        is kept (their stream tensors, the largest part, are freed as each batch's output comes)."""
        at = self._at
        if at is None or at.block != block or (at.inputs is None and at.outputs is None):
            self.inputs(block)
            at = self._at
        mod, where, ins = self.model.get_submodule(block), at.where, at.inputs
        slot = where[2][where[1] + 1] if where is not None and where[1] + 1 < len(where[2]) else None
        if release and slot is not None and ins is not None:
            self._at = None
            out, skeleton = [], []
            with self.place.on_device(mod if at.outputs is None else None):
                for i, inp in enumerate(ins):
                    if at.outputs is None:
                        out.append(self._one(mod, inp))
                    skeleton.append(_put(inp, slot, None))
                    ins[i] = None
            self._at = _At(block, where, None, at.outputs if at.outputs is not None else out, skeleton)
        elif at.outputs is None:
            at.outputs = self._run(mod, ins)
        return self._at.outputs

    def run_on(self, mod: nn.Module, inputs) -> list[torch.Tensor]:
        """``mod``'s outputs on ``inputs`` (computed on the device; kept in storage)."""
        return self._run(mod, inputs)

    @torch.no_grad()
    def _run(self, mod: nn.Module, inputs) -> list[torch.Tensor]:
        """``mod``'s outputs on ``inputs`` (on the device; kept in storage)."""
        with self.place.on_device(mod):
            return [self._one(mod, inp) for inp in inputs]

    def changed(self) -> None:
        """The last block's weights changed: its outputs are computed again for the next block."""
        if self._at is not None and self._at.inputs is not None:
            self._at.outputs = self._at.skeleton = None
