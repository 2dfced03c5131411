"""One frozen body, K runs' trainable parts: the model of a packed sweep (``sweep.sh --pack K``).

A sweep over LoRA ranks and seeds trains K models that differ only in small tensors (embedder,
head, LoRA factors) around one frozen body. :class:`PackedModel` holds that body once and K
stacked copies of everything else, and runs all K runs' batches through it as one batch, stacked
run-major on the batch axis (run k owns rows ``k*B .. (k+1)*B - 1``). Every op of a Swin body
except the adapted Linears acts on each sample alone, so a run's rows see exactly what its own
model would compute; the per-run parts are applied segment-wise with batched matmuls:

- an adapted Linear computes ``x W^T + b`` for all rows in one GEMM and adds each run's
  ``s_k (x A_k^T) B_k^T`` with two ``bmm``s per segment of runs of similar rank
  (:func:`rank_segments`), each over stacked factors padded to the segment's largest rank. The
  padding is exact: a padded row of A and column of B start at zero, receive zero gradient (each
  is multiplied by the other's zero) and AdamW leaves a zero with zero gradient at zero, so a
  rank-2 run padded to 8 trains the same numbers as alone. Rank 0 (``head``, or a rank-map zero)
  is a run whose factors are all padding, outside every segment;
- the embedder's patchify conv is one grouped conv (one group per run), its LayerNorm and the
  head's 1x1 conv / Linear take stacked per-run weights;
- stochastic depth (DropPath) draws each run's per-sample mask from that run's own generator, in
  the order its own model would, so a packed run's random numbers are its own; the draws happen
  before the forward (:meth:`PackedModel.draw_drop_masks`), which takes them as an input, so the
  forward holds no random op and compiles whole (``train.compile``).

The K runs' models stay around as :class:`ORCAModel` objects that share the frozen tensors: a
checkpoint is a run's own model's, with its trained tensors read from the stacks
(``run_tensors``), and loads into it (then ``load_from_runs``), so a packed run's files are those
of a run trained alone.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath

from orca.adapters.lora import LoRALayer, lora_layers
from orca.embedders import ConvEmbedder2d
from orca.heads import ClassificationHead, DenseDecoderHead
from orca.model import ORCAModel


class PackError(ValueError):
    """Runs that cannot share one packed model (the sweep trains them alone instead)."""


@dataclass
class Slot:
    """One stacked parameter and, for each run, the tensor of its own model that it holds.

    ``names[k]`` is the run's state-dict name (None: the run has no such tensor, its part is
    padding), ``view(t, k)`` is run k's part of a stacked tensor ``t`` (or of its AdamW state) in
    the shape of the run's own tensor, and ``trained[k]`` whether run k trains it.
    """

    name: str
    param: nn.Parameter
    names: List[Optional[str]]
    view: Callable[[torch.Tensor, int], torch.Tensor]
    trained: List[bool]


def rank_segments(ranks: Sequence[int]) -> Tuple[Tuple[int, int, int], ...]:
    """The pack's runs (in pack order) cut into contiguous segments ``(first, end, rank)`` that one
    Linear computes at one padded rank each, segments of rank 0 left out (they add nothing).

    Why: padding every run to the pack's largest rank made a knee sweep's pack (ranks 1 to 64)
    do the rank-r work of rank 64 for every run, four times what its ranks need. A segment costs
    its runs x its rank, plus the largest rank once for its own kernels; the cuts minimise the
    total (dynamic programming over the cut points). Packs keep runs of similar rank next to each
    other (:func:`orca.packed.plan_packs`), so a knee sweep's pack of 24 runs (ranks 0-64 x 3 seeds)
    takes three segments (ranks 1-8 at 8, 16-32 at 32, 64) and under a third of the padded work.
    """
    k, top = len(ranks), max(ranks, default=0)
    cost, cut = [0] + [math.inf] * k, [0] * (k + 1)
    for end in range(1, k + 1):
        rank = 0
        for first in range(end - 1, -1, -1):
            rank = max(rank, ranks[first])
            total = cost[first] + ((end - first) * rank + top if rank else 0)
            if total < cost[end]:
                cost[end], cut[end] = total, first
    segments, end = [], k
    while end:
        segments.append((cut[end], end, max(ranks[cut[end]:end])))
        end = cut[end]
    return tuple(seg for seg in reversed(segments) if seg[2] > 0)


def _segments(flat: Sequence[int]) -> List[Tuple[int, int, int]]:
    """``(first, end, rank)`` triples back from the flat int list a custom op's schema can carry."""
    return [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]


@torch.library.custom_op("orca::packed_lora_linear", mutates_args=())
def packed_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a: torch.Tensor,
                       b: torch.Tensor, segments: List[int]) -> torch.Tensor:
    """K runs' ``x_k W^T + bias + (x_k A_k^T) B_k^T`` (B already scaled): one GEMM for the frozen
    weight, then two ``bmm``s per rank segment (:func:`rank_segments`, flattened) added in place.

    x [K, n, d_in], a [K, r, d_in], b [K, d_out, r]. The backward (:func:`packed_lora_linear_backward`)
    is :class:`orca.adapters.lora.FusedLoRALinear`'s, batched over each segment's runs, so a packed run
    computes what the same run alone computes, by the same formulas.

    Why a custom op rather than autograd of the composed ops: autograd would write the rank-r update
    as a new N x d_out tensor (here it is added into the base GEMM's output) and build the input
    gradient from two full-size products. Why opaque to ``torch.compile``: traced, the segment loops
    put some 700 graph nodes per segment and Linear into the compiled training step (a knee pack's
    48 Linears x 3 segments: most of the graph), and compilation time grows with them; these are
    cuBLAS calls either way, so inductor has nothing to fuse in them, and it still fuses everything
    around (casts, norms, window shuffles).
    """
    out = F.linear(x, weight, bias)
    for first, end, r in _segments(segments):
        xa = torch.bmm(x[first:end], a[first:end, :r].transpose(1, 2))
        out[first:end].baddbmm_(xa, b[first:end, :, :r].transpose(1, 2))
    return out


@packed_lora_linear.register_fake
def _(x, weight, bias, a, b, segments):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("orca::packed_lora_linear_backward", mutates_args=())
def packed_lora_linear_backward(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor,
                                b: torch.Tensor, segments: List[int], need_x: bool, need_a: bool,
                                need_b: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dA, dL/dB) of :func:`packed_lora_linear` from its output gradient g; an empty
    tensor for each one not needed. The frozen W and bias get no gradient; the factors' rows and
    columns outside a run's segment rank get exactly zero. x A^T is recomputed (one rank-r
    ``bmm`` per segment) rather than kept from the forward."""
    segs = _segments(segments)
    k, n = x.shape[:2]
    many_tokens = n >= weight.shape[0] and bool(segs)
    grad_x = x.new_empty(0)
    if need_x and many_tokens:  # g (W + B A): the effective weight is small next to the N x d_in pass it saves
        effective = weight.expand(k, -1, -1).clone()
        for first, end, r in segs:
            effective[first:end].baddbmm_(b[first:end, :, :r], a[first:end, :r])
        grad_x = torch.bmm(g, effective)
    elif need_x:
        grad_x = torch.matmul(g, weight)
    grad_a = torch.zeros_like(a) if need_a else a.new_empty(0)
    grad_b = torch.zeros_like(b) if need_b else b.new_empty(0)
    for first, end, r in segs:
        g_seg = g[first:end]
        if need_a or (need_x and not many_tokens):
            gb = torch.bmm(g_seg, b[first:end, :, :r])  # dL/d(x A^T): [segment, n, r]
            if need_x and not many_tokens:
                grad_x[first:end].baddbmm_(gb, a[first:end, :r])
            if need_a:
                grad_a[first:end, :r] = torch.bmm(gb.transpose(1, 2), x[first:end])
        if need_b:
            xa = torch.bmm(x[first:end], a[first:end, :r].transpose(1, 2))
            grad_b[first:end, :, :r] = torch.bmm(g_seg.transpose(1, 2), xa)
    return grad_x, grad_a, grad_b


@packed_lora_linear_backward.register_fake
def _(g, x, weight, a, b, segments, need_x, need_a, need_b):
    return (x.new_empty(x.shape if need_x else (0,)), a.new_empty(a.shape if need_a else (0,)),
            b.new_empty(b.shape if need_b else (0,)))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, a, b, segments = inputs
    ctx.save_for_backward(x, weight, a, b)
    ctx.segments = segments


def _backward(ctx, g):
    x, weight, a, b = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    if need_w or need_bias:
        raise RuntimeError("a packed Linear's base weight is frozen (shared by the pack's runs)")
    grad_x, grad_a, grad_b = packed_lora_linear_backward(g, x, weight, a, b, ctx.segments, need_x, need_a, need_b)
    return (grad_x if need_x else None), None, None, (grad_a if need_a else None), (grad_b if need_b else None), None


packed_lora_linear.register_autograd(_backward, setup_context=_setup_context)


class PackedLinear(nn.Module):
    """A frozen Linear plus K runs' LoRA updates, segment-wise: rows of run k get ``s_k B_k A_k``."""

    def __init__(self, base: nn.Linear, ranks: Sequence[int], scalings: Sequence[float]):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        k, r = len(ranks), max(ranks)
        dtype = self.weight.dtype
        self.ranks = list(ranks)
        self.segments = rank_segments(ranks)
        self.flat_segments = [v for segment in self.segments for v in segment]
        self.lora_A = nn.Parameter(torch.zeros(k, r, self.in_features, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(k, self.out_features, r, dtype=dtype))
        self.register_buffer("scaling", torch.tensor(list(scalings), dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.lora_A.shape[0]
        weight, bias, a = self.weight, self.bias, self.lora_A
        b = self.lora_B * self.scaling.view(k, 1, 1).to(self.lora_B.dtype)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # every operand cast once, as F.linear would: autocast then stays out
            dtype = torch.get_autocast_dtype(device)
            x, weight, a, b = x.to(dtype), weight.to(dtype), a.to(dtype), b.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        else:
            x = x.to(weight.dtype)
        out = packed_lora_linear(x.reshape(k, -1, self.in_features), weight, bias, a, b, self.flat_segments)
        return out.view(*x.shape[:-1], self.out_features)


class StepMasks:
    """This step's stochastic-depth masks, ``[drop modules, K*B]``, shared by the pack's
    :class:`PackedDropPath` modules (set by :meth:`PackedModel.forward`, read by each module)."""

    def __init__(self):
        self.masks: Optional[torch.Tensor] = None


class PackedDropPath(nn.Module):
    """Stochastic depth whose per-sample keep mask comes from :meth:`PackedModel.draw_drop_masks`.

    Why the masks are drawn before the forward rather than in it: run k alone draws ``bernoulli_``
    over its own B samples from its own generator, so a pack makes K draws from K generators per
    module; a compiled forward (``train.compile``) cannot draw from a run's generator (dynamo does
    not trace generators, and inductor's random numbers are its own), so the draws happen outside
    it and the forward takes them as one tensor input.
    """

    def __init__(self, drop: DropPath, step: StepMasks, index: int):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop.drop_prob, drop.scale_by_keep
        self.step, self.index = step, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        mask = self.step.masks[self.index]  # 0 or 1/keep per row, float32: x's dtype rounds 1/keep as alone
        return x * mask.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class PackedEmbedder(nn.Module):
    """K :class:`ConvEmbedder2d` at once: resize once, patchify as a conv with one group per run."""

    def __init__(self, template: ConvEmbedder2d, k: int):
        super().__init__()
        self.in_channels, self.img_size, self.patch_size = template.in_channels, template.img_size, template.patch_size
        w = template.proj.weight
        self.eps = template.norm.eps
        self.proj_weight = nn.Parameter(torch.zeros(k, *w.shape, dtype=w.dtype))
        self.proj_bias = nn.Parameter(torch.zeros(k, w.shape[0], dtype=w.dtype))
        self.norm_weight = nn.Parameter(torch.zeros(k, w.shape[0], dtype=w.dtype))
        self.norm_bias = nn.Parameter(torch.zeros(k, w.shape[0], dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        k, d = self.proj_bias.shape
        b, c = x.shape[0] // k, x.shape[1]
        grouped = x.view(k, b, c, *x.shape[2:]).transpose(0, 1).reshape(b, k * c, *x.shape[2:])
        y = F.conv2d(grouped, self.proj_weight.reshape(k * d, *self.proj_weight.shape[2:]),
                     self.proj_bias.reshape(k * d), stride=self.patch_size, groups=k)
        y = y.view(b, k, d, *y.shape[2:]).permute(1, 0, 3, 4, 2)  # [K, B, h, w, D]
        y = F.layer_norm(y, (d,), eps=self.eps)
        y = y * self.norm_weight.view(k, 1, 1, 1, d) + self.norm_bias.view(k, 1, 1, 1, d)
        return y.reshape(k * b, *y.shape[2:])


class PackedDenseHead(nn.Module):
    """K :class:`DenseDecoderHead`: each run's 1x1 conv as a batched matmul, the rest shared."""

    def __init__(self, template: DenseDecoderHead, k: int):
        super().__init__()
        w = template.conv.weight  # [S, C, 1, 1]
        self.weight = nn.Parameter(torch.zeros(k, w.shape[0], w.shape[1], dtype=w.dtype))
        self.bias = nn.Parameter(torch.zeros(k, w.shape[0], dtype=w.dtype))
        self.shuffle, self.pool = copy.deepcopy(template.shuffle), copy.deepcopy(template.pool)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[0]
        n, h, w, c = feats.shape
        y = torch.baddbmm(self.bias.unsqueeze(1), feats.reshape(k, -1, c), self.weight.transpose(1, 2))
        y = y.view(n, h, w, -1).permute(0, 3, 1, 2)
        return self.pool(self.shuffle(y).mean(dim=1, keepdim=True)).squeeze(1)


class PackedClassificationHead(nn.Module):
    """K :class:`ClassificationHead`: mean-pool once, each run's Linear as a batched matmul."""

    def __init__(self, template: ClassificationHead, k: int):
        super().__init__()
        w = template.fc.weight
        self.weight = nn.Parameter(torch.zeros(k, *w.shape, dtype=w.dtype))
        self.bias = nn.Parameter(torch.zeros(k, w.shape[0], dtype=w.dtype))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[0]
        pooled = feats.mean(dim=(1, 2))
        out = torch.baddbmm(self.bias.unsqueeze(1), pooled.view(k, -1, pooled.shape[-1]), self.weight.transpose(1, 2))
        return out.reshape(pooled.shape[0], -1)


def _alone_name(packed_body_name: str, lora: bool) -> str:
    """The body name in a run's own model: an adapted Linear keeps its weights in ``base_layer``."""
    if not lora:
        return packed_body_name
    module, _, tensor = packed_body_name.rpartition(".")
    return f"{module}.base_layer.{tensor}"


class PackedModel(nn.Module):
    """The shared body with K runs' embedders, heads and LoRA factors (see the module docstring).

    Args:
        models: the K runs' own models, built and prepared as each run alone would be (their
            trainable tensors are the initial values; their frozen tensors are replaced by the
            shared body's, so the body is held once).
    """

    def __init__(self, models: Sequence[ORCAModel]):
        super().__init__()
        k = len(models)
        first = models[0]
        if not isinstance(first.embedder, ConvEmbedder2d):
            raise PackError(f"embedder {type(first.embedder).__name__} has no packed form")
        self.k = k
        self.generators: List[torch.Generator] = []  # run k's stochastic-depth stream, set per pack
        self._step = StepMasks()
        self.embedder = PackedEmbedder(first.embedder, k)
        if isinstance(first.head, DenseDecoderHead):
            self.head = PackedDenseHead(first.head, k)
        elif isinstance(first.head, ClassificationHead):
            self.head = PackedClassificationHead(first.head, k)
        else:
            raise PackError(f"head {type(first.head).__name__} has no packed form")
        dropout = [n for n, m in first.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
        if dropout:
            raise PackError(f"dropout at {dropout[0]} (its masks would come from the shared random stream)")
        self.body = copy.deepcopy(first.body)
        for name, module in list(self.body.named_modules()):
            if isinstance(module, LoRALayer):
                _replace(self.body, name, module.base_layer)
        for p in self.body.parameters():
            p.requires_grad_(False)
        layers = [lora_layers(m.body) for m in models]
        adapted = sorted({n for run in layers for n in run})
        self.lora_names = adapted
        for name in adapted:
            ranks = [run[name].r if name in run else 0 for run in layers]
            scalings = [run[name].scaling if name in run else 0.0 for run in layers]
            _replace(self.body, name, PackedLinear(self.body.get_submodule(name), ranks, scalings))
        self.drops: List[PackedDropPath] = []  # in the order the forward calls them (timm's Swin: module order)
        for name, module in list(self.body.named_modules()):
            if isinstance(module, DropPath):
                drop = PackedDropPath(module, self._step, len(self.drops)) if module.drop_prob > 0 else nn.Identity()
                _replace(self.body, name, drop)
                if module.drop_prob > 0:
                    self.drops.append(drop)
        self._check_same_body(models, layers)
        self.slots = self._make_slots(models, layers)
        self.load_from_runs(models)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, drop_masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The K runs' outputs for their stacked batches; in training, ``drop_masks`` are this step's
        stochastic-depth masks from :meth:`draw_drop_masks` (None when the body has none)."""
        if self.training and self.drops:
            if drop_masks is None:
                raise ValueError("a packed training forward takes its stochastic-depth masks (draw_drop_masks)")
            self._step.masks = drop_masks
        return self.head(self.body.forward_features(self.embedder(x)))

    @torch.no_grad()
    def draw_drop_masks(self, batch: int, device: torch.device) -> Optional[torch.Tensor]:
        """This training step's stochastic-depth masks ``[drop modules, K * batch]``: run k's rows of
        module j are ``batch`` draws from ``generators[k]``, module after module, as its own model
        draws them (timm's ``drop_path``: ``bernoulli_(keep)``, then divided by keep), so a packed run
        consumes its own random stream exactly as alone. None when the body has no stochastic depth."""
        if not self.drops:
            return None
        masks = torch.empty(len(self.drops), self.k, batch, device=device)
        for i, gen in enumerate(self.generators):
            for j, drop in enumerate(self.drops):
                masks[j, i].bernoulli_(1 - drop.drop_prob, generator=gen)
        for j, drop in enumerate(self.drops):
            keep = 1 - drop.drop_prob
            if keep > 0.0 and drop.scale_by_keep:
                masks[j].div_(keep)
        return masks.view(len(self.drops), -1)

    # ------------------------------------------------------------------ runs <-> stacks
    def _make_slots(self, models: Sequence[ORCAModel], layers: List[Dict[str, LoRALayer]]) -> List[Slot]:
        k = self.k
        states = [dict(m.named_parameters()) for m in models]

        def slot(name: str, param: nn.Parameter, own: str, view) -> Slot:
            names = [own if own in s else None for s in states]
            return Slot(name, param, names, view, [n is not None and states[i][n].requires_grad
                                                    for i, n in enumerate(names)])

        e, h = self.embedder, self.head
        slots = [slot("embedder.proj_weight", e.proj_weight, "embedder.proj.weight", lambda t, i: t[i]),
                 slot("embedder.proj_bias", e.proj_bias, "embedder.proj.bias", lambda t, i: t[i]),
                 slot("embedder.norm_weight", e.norm_weight, "embedder.norm.weight", lambda t, i: t[i]),
                 slot("embedder.norm_bias", e.norm_bias, "embedder.norm.bias", lambda t, i: t[i])]
        if isinstance(h, PackedDenseHead):
            slots.append(slot("head.weight", h.weight, "head.conv.weight", lambda t, i: t[i][:, :, None, None]))
            slots.append(slot("head.bias", h.bias, "head.conv.bias", lambda t, i: t[i]))
        else:
            slots.append(slot("head.weight", h.weight, "head.fc.weight", lambda t, i: t[i]))
            slots.append(slot("head.bias", h.bias, "head.fc.bias", lambda t, i: t[i]))
        for name in self.lora_names:
            packed = self.body.get_submodule(name)
            ranks = packed.ranks
            slots.append(slot(f"body.{name}.lora_A", packed.lora_A, f"body.{name}.lora_A",
                              lambda t, i, r=ranks: t[i, :r[i]]))
            slots.append(slot(f"body.{name}.lora_B", packed.lora_B, f"body.{name}.lora_B",
                              lambda t, i, r=ranks: t[i, :, :r[i]]))
        own = {n for s in slots for n in s.names if n}
        for i, state in enumerate(states):
            extra = [n for n, p in state.items() if p.requires_grad and n not in own]
            if extra:
                raise PackError(f"run {i} trains {extra[0]}, which a packed model does not hold "
                                f"(e.g. adapter.train_norms)")
        return slots

    @torch.no_grad()
    def load_from_runs(self, models: Sequence[ORCAModel], only: Optional[int] = None) -> None:
        """Copy each run's own embedder, head and LoRA tensors (run ``only``'s alone, if given) into
        the stacks; the padding stays zero."""
        params = [dict(m.named_parameters()) if only is None or i == only else {} for i, m in enumerate(models)]
        for s in self.slots:
            if only is None:
                s.param.zero_()
            for i, name in enumerate(s.names):
                if name is not None and (only is None or i == only):
                    s.view(s.param, i).copy_(params[i][name])

    def run_tensors(self, i: int) -> Dict[str, torch.Tensor]:
        """Run i's own embedder, head and LoRA tensors by state-dict name, as views of the stacks
        (a checkpoint copies them; the run's own model keeps its initial values meanwhile)."""
        return {s.names[i]: s.view(s.param, i).detach() for s in self.slots if s.names[i] is not None}

    def _check_same_body(self, models: Sequence[ORCAModel], layers: List[Dict[str, LoRALayer]]) -> None:
        shared = self.body.state_dict()
        checked = set()  # runs of one seed share one body's tensors (BodyCache): compare those once
        for i, m in enumerate(models):
            own_state = m.body.state_dict()
            for name, t in shared.items():
                if ".lora_" in name:
                    continue
                module = name.rpartition(".")[0]
                own = own_state.get(_alone_name(name, module in layers[i]))
                if own is not None and (own.data_ptr(), name) in checked:
                    continue
                if own is None or own.shape != t.shape or not torch.equal(own, t):
                    raise PackError(f"run {i}'s frozen body differs from run 0's at {name} "
                                    f"(a random body, model.weights=none, differs per seed)")
                checked.add((own.data_ptr(), name))

    def share_frozen(self, models: Sequence[ORCAModel]) -> None:
        """Point every run's frozen body tensors at the shared body's, so the body is held once
        (call it after moving this model to its device; the runs' models follow with ``.to``)."""
        shared_params = dict(self.body.named_parameters())
        shared_buffers = dict(self.body.named_buffers())
        for i, m in enumerate(models):
            for module_name, module in m.body.named_modules():
                packed_module = module_name.replace(".base_layer", "") if ".base_layer" in module_name else module_name
                for pname, p in list(module._parameters.items()):
                    key = f"{packed_module}.{pname}" if packed_module else pname
                    if p is not None and not p.requires_grad and key in shared_params:
                        module._parameters[pname] = shared_params[key]
                for bname, b in list(module._buffers.items()):
                    key = f"{packed_module}.{bname}" if packed_module else bname
                    if b is not None and key in shared_buffers:
                        module._buffers[bname] = shared_buffers[key]


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
