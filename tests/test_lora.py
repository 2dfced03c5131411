"""LoRA core: config validation, rank maps, the wrapper (init, merge, gradients), parameter counts,
LoRA+ groups, and agreement with HF peft (forward and on-disk format), plus adapter save / load.

Every behavioural check runs over one case table; tolerances live in the table, not in the tests.
"""
from __future__ import annotations

import copy
import json
import re

import pytest
import timm
import torch
from torch import nn

from orca.adapters import ADAPTERS, AdapterConfig, build_method, lora_layers
from orca.adapters.io import export_merged, export_peft, load_adapter, save_adapter
from orca.adapters.lora import resolve_ranks
from tests.conftest import NF4_CPU_REASON, Stand


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# toy models
# ----------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        return self.lin2(self.norm(torch.relu(self.lin1(torch.relu(self.lin0(x))))))


def tiny_swin(embed_dim: int = 32) -> nn.Module:
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=embed_dim,
                             depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), img_size=64, window_size=4,
                             num_classes=0)


def build(kind: str, embed_dim: int = 32):
    """A seeded model and an input batch."""
    torch.manual_seed(0)
    if kind == "mlp":
        model = Stand(nn.Linear(6, 16), MLP(), nn.Linear(8, 3))
        x = torch.randn(5, 6)
    else:
        model = Stand(nn.Conv2d(3, 3, 1), tiny_swin(embed_dim), nn.Linear(8 * embed_dim, 5))
        x = torch.randn(2, 3, 64, 64)
    return model.eval(), x


def randomize_b(model, std: float = 0.3):
    """Non-identity adapters, so that merged != base and the tests cannot pass vacuously."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)


MLP_T = [r"lin\d"]
# (id, model, config kwargs, merge_atol relative to the output's max, or None: not exact)
CASES = [
    ("mlp-lora", "mlp", dict(rank=4, targets=MLP_T), 1e-5),
    ("mlp-gauss-rslora", "mlp", dict(rank=3, alpha=4.0, rslora=True, init_a="gaussian", targets=MLP_T),
     1e-5),
    ("mlp-dropout", "mlp", dict(rank=2, dropout=0.2, targets=MLP_T), 1e-5),
    ("swin-attn", "swin", dict(rank=4, targets="attn"), 1e-5),
    ("swin-rankmap", "swin", dict(rank=2, targets="all",
                                  rank_map={r"layers\.2\..*": 8, "layers.0.blocks.0.mlp.fc1": 0}),
     1e-5),
    ("swin-dylora", "swin", dict(method="dylora", rank=6, dylora_r_min=2, targets="all"), 1e-5),
    ("swin-delta", "swin", dict(method="delta_lora", rank=4, targets="attn"), 1e-5),
    # merging into NF4 re-rounds W0 + s B A to the 4-bit grid: checked on the weights against the
    # NF4 error bound in test_adapters_variants.py, not on outputs here
    ("mlp-qlora", "mlp", dict(method="qlora", rank=4, targets=MLP_T, qlora_compute_dtype="float32"),
     None),
]
IDS = [c[0] for c in CASES]


def prepared(kind, kwargs):
    """Model, input, the unadapted output, method, counts. For QLoRA the unadapted reference is the
    NF4-quantised body without adapters (the fp32 comparison is in test_adapters_variants.py)."""
    model, x = build(kind)
    reference = model
    if kwargs.get("method") == "qlora":
        from orca.adapters.qlora import DTYPES, quantize_linears

        if NF4_CPU_REASON is not None:
            pytest.skip(f"no NF4 on this CPU: {NF4_CPU_REASON}")

        reference = copy.deepcopy(model)
        quantize_linears(reference.body, DTYPES[kwargs.get("qlora_compute_dtype", "bfloat16")])
    base_out = reference(x)
    method = build_method(AdapterConfig(**kwargs))
    counts = method.prepare(model)
    return model, x, base_out, method, counts


# ----------------------------------------------------------------------------------------------
# registry and config
# ----------------------------------------------------------------------------------------------
def test_registry_holds_every_method():
    assert ADAPTERS.names() == ["adalora", "delta_lora", "dylora", "full", "head", "lora", "qlora"]
    for name in ADAPTERS:
        assert ADAPTERS.get(name).name == name


BAD_CONFIGS = [
    (dict(rank=0), "rank=0"),
    (dict(rank=-2), "rank=-2"),
    (dict(method="lora_plus"), "did you mean"),
    (dict(init_a="xavier"), "init_a='xavier'"),
    (dict(targets="mlp"), "targets='mlp'"),
    (dict(targets=["attn(("]), "not a valid regex"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(rank=4, dylora_r_min=5), "dylora_r_min=5 > dylora_r_max=4"),
    (dict(dylora_r_min=3, dylora_r_max=2), "dylora_r_min=3 > dylora_r_max=2"),
    (dict(rank=4, dylora_eval_rank=6), "dylora_eval_rank=6"),
    (dict(rank_map={"lin0": -1}), "'lin0' is -1"),
    (dict(rank_map={"lin0": 1.5}), "'lin0' is 1.5"),
    (dict(qlora_compute_dtype="int8"), "qlora_compute_dtype='int8'"),
    (dict(loraplus_ratio=-1.0), "loraplus_ratio=-1.0"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AdapterConfig(**kwargs)


def test_config_conversions():
    assert AdapterConfig(loraplus_ratio=True).loraplus_ratio == 16.0  # not 1.0 (bool is an int)
    assert AdapterConfig(loraplus_ratio=False).loraplus_ratio is None
    assert AdapterConfig(rank=4, dylora_r_max=None).r_max == 4
    with pytest.raises(ValueError, match="unknown config key 'adapter.rnak'; did you mean 'rank'"):
        AdapterConfig.from_dict({"rnak": 4})
    cfg = AdapterConfig(method="dylora", targets=["a", "b"])
    assert AdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ----------------------------------------------------------------------------------------------
# rank maps and targets
# ----------------------------------------------------------------------------------------------
def test_rank_map_precedence_and_json(tmp_path):
    body = tiny_swin()
    path = tmp_path / "ranks.json"
    path.write_text(json.dumps({"gap": [0.1, 0.2], "rank_map": {
        r"layers\.\d+\.blocks\.\d+\.attn\.qkv": 3,     # regex
        "layers.2.blocks.1": 5,                        # a block: its targeted Linears
        "layers.2.blocks.1.attn.proj": 0,              # exact Linear wins over the block
        "layers.1.downsample.reduction": 7,            # exact, outside the targets
    }}))
    ranks = resolve_ranks(body, AdapterConfig(targets="attn").target_patterns(), 2,
                          AdapterConfig(rank_map=str(path)).load_rank_map())
    assert ranks["layers.0.blocks.0.attn.qkv"] == 3
    assert ranks["layers.0.blocks.0.attn.proj"] == 2       # untouched target keeps `rank`
    assert ranks["layers.2.blocks.1.attn.qkv"] == 5        # block beats regex
    assert ranks["layers.2.blocks.1.attn.proj"] == 0
    assert ranks["layers.1.downsample.reduction"] == 7
    assert "layers.0.blocks.0.mlp.fc1" not in ranks
    assert len(ranks) == 5 * 2 + 1


RANK_ERRORS = [
    (dict(targets="attn", rank_map={"layers.9.blocks.0.attn.qkv": 4}), "'layers.9.blocks.0.attn.qkv'"),
    (dict(targets=[r"lin\d", "nope"]), "'nope' matches no nn.Linear"),
    (dict(targets="attn", rank_map={r"layers\.0\..*": 2, r".*qkv": 3}), "different ranks"),
    (dict(targets="attn", rank_map={"layers.0.blocks.0.mlp": 3}), "contains no targeted Linear"),
]


@pytest.mark.parametrize("kwargs,message", RANK_ERRORS, ids=[m for _, m in RANK_ERRORS])
def test_rank_map_errors_name_the_key(kwargs, message):
    body = MLP() if kwargs["targets"] != "attn" else tiny_swin()
    cfg = AdapterConfig(**kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_ranks(body, cfg.target_patterns(), cfg.rank, cfg.load_rank_map())


def test_rank_too_large_names_module():
    model, _ = build("mlp")
    method = build_method(AdapterConfig(rank=9, targets=MLP_T))  # lin2 is 32 -> 8
    with pytest.raises(ValueError, match=r"rank 9 for 'lin2' exceeds min\(d_in, d_out\) = min\(32, 8\)"):
        method.prepare(model)


def test_clip_rank_lowers_only_the_ranks_above_full_rank():
    model, _ = build("mlp")
    method = build_method(AdapterConfig(rank=12, targets=MLP_T, clip_rank=True))
    params = method.prepare(model)
    # lin0 16 -> 32 and lin1 32 -> 32 keep 12; lin2 32 -> 8 is capped at its full rank 8.
    assert method.ranks == {"lin0": 12, "lin1": 12, "lin2": 8}
    layer = method.layers["lin2"]
    assert tuple(layer.lora_A.shape) == (8, 32) and layer.scaling == pytest.approx(16.0 / 8)
    assert params["adapters"] == 12 * (16 + 32) + 12 * (32 + 32) + 8 * (32 + 8)
    with pytest.raises(ValueError, match="clip_rank=1: must be true or false"):
        AdapterConfig(clip_rank=1)


# ----------------------------------------------------------------------------------------------
# the wrapper, over the case table
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_id,kind,kwargs,merge_atol", CASES, ids=IDS)
def test_init_output_equals_base(case_id, kind, kwargs, merge_atol):
    model, x, base_out, _, _ = prepared(kind, kwargs)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, base_out, atol=1e-6, rtol=0)  # B = 0: exactly the base


@pytest.mark.parametrize("case_id,kind,kwargs,merge_atol", CASES, ids=IDS)
def test_merge_unmerge(case_id, kind, kwargs, merge_atol):
    if merge_atol is None:
        pytest.skip("merge is lossy for this base; see the case table")
    model, x, base_out, _, _ = prepared(kind, kwargs)
    randomize_b(model)
    weights = {n: l.weight_access.get(l.base_layer).clone() for n, l in lora_layers(model).items()}
    with torch.no_grad():
        unmerged = model(x)
        for layer in lora_layers(model).values():
            layer.merge(safe_merge=True)
        merged = model(x)
    scale = unmerged.abs().max().item()
    assert (unmerged - base_out).abs().max().item() > 1e-2 * scale  # the adapters do something
    assert (merged - unmerged).abs().max().item() <= merge_atol * scale
    with pytest.warns(UserWarning, match="Already merged"):
        next(iter(lora_layers(model).values())).merge()
    for layer in lora_layers(model).values():
        layer.unmerge()
    with pytest.warns(UserWarning, match="Already unmerged"):
        next(iter(lora_layers(model).values())).unmerge()
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.weight_access.get(layer.base_layer), weights[name],
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("case_id,kind,kwargs,merge_atol", CASES, ids=IDS)
def test_gradients_reach_only_trainable_parts(case_id, kind, kwargs, merge_atol):
    model, x, _, method, counts = prepared(kind, kwargs)
    randomize_b(model)  # with B = 0, A would get no gradient at all
    model.train()
    model(x).square().mean().backward()
    allowed = re.compile(r"(embedder\..*|head\..*|.*\.lora_[AB])")
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert allowed.fullmatch(name), f"{name} should be frozen"
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    expected = sum(l.lora_A.numel() + l.lora_B.numel() for l in lora_layers(model).values())
    assert counts["adapters"] == expected
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


FUSED_CASES = [  # (id, input shape, bias, W trainable, dtype, atol); tokens N vs d_out = 9 cover both grad_x paths
    ("3d-bias", (2, 5, 12), True, False, torch.float64, 1e-12),  # N = 10 >= 9: W + s B A
    ("2d-nobias-wgrad", (7, 12), False, True, torch.float64, 1e-12),  # N = 7 < 9: two terms
    ("fp32", (3, 4, 12), True, True, torch.float32, 1e-5),
]


@pytest.mark.parametrize("concat,join", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["addmm", "concat", "addmm-joined", "concat-joined"])
@pytest.mark.parametrize("case_id,shape,bias,w_grad,dtype,atol", FUSED_CASES, ids=[c[0] for c in FUSED_CASES])
def test_fused_forward_and_backward_match_autograd(case_id, shape, bias, w_grad, dtype, atol, concat, join):
    from orca.adapters.lora_forward import fused_lora_linear

    gen = torch.Generator().manual_seed(0)
    make = lambda *s, grad=True: torch.randn(*s, generator=gen, dtype=dtype).requires_grad_(grad)
    x, w, a, b = make(*shape), make(9, 12, grad=w_grad), make(3, 12), make(9, 3)
    bvec = make(9) if bias else None
    inputs = [t for t in (x, w, bvec, a, b) if t is not None and t.requires_grad]
    ours = fused_lora_linear(x, w, bvec, a, b, 0.7, concat=concat, join_backward=join)
    ref = nn.functional.linear(x, w, bvec) + 0.7 * nn.functional.linear(nn.functional.linear(x, a), b)
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
    g = torch.randn(ref.shape, generator=gen, dtype=dtype)
    for got, want in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
    if not w_grad:
        assert not w.requires_grad  # and so the weight-gradient GEMM is skipped


@pytest.mark.parametrize("accessor,compiling", [("ComposedDenseWeight", False), ("ConcatDenseWeight", False),
                                                ("InplaceDenseWeight", True), ("DenseWeight", True),
                                                ("JoinedDenseWeight", False), ("JoinedDenseWeight", True),
                                                ("FusedGradDenseWeight", False), ("FusedGradDenseWeight", True)])
def test_benchmarked_accessors_match_the_default(monkeypatch, accessor, compiling):
    """ComposedDenseWeight (plain autograd ops, the bench's lora_composed), ConcatDenseWeight (always one
    GEMM over [x, x A^T], lora_concat), InplaceDenseWeight (always the in-place rank-r update,
    lora_inplace), JoinedDenseWeight (one backward GEMM over g, lora_joined), FusedGradDenseWeight (A's and
    B's gradients from one pass over g, lora_fused) and the default as it runs
    under torch.compile (one GEMM) give the eager default's
    output and gradients on every adapted layer of a model, and each takes the form it says."""
    from orca.adapters import base_weights
    from orca.adapters.base_weights import DenseWeight
    from orca.adapters.lora import LoRALinear
    from orca.adapters.lora_forward import FusedLoRALinear

    fused, x, _, _, _ = prepared("mlp", dict(rank=4, targets=MLP_T))
    randomize_b(fused)
    composed = copy.deepcopy(fused)
    layers = [m for m in composed.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.weight_access is DenseWeight for m in layers)
    for m in layers:
        m.weight_access = getattr(base_weights, accessor)
    out_f = fused(x)
    apply, calls = FusedLoRALinear.apply, []

    def checked(*args):
        calls.append(args[6:])  # the concat, join_backward and fuse_grads flags
        if accessor == "ComposedDenseWeight":
            raise AssertionError("the composed accessor ran the fused Function")
        return apply(*args)

    monkeypatch.setattr("orca.adapters.lora_forward.FusedLoRALinear.apply", checked)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    out_c = composed(x)
    concat = {"ComposedDenseWeight": None, "ConcatDenseWeight": True, "InplaceDenseWeight": False,
              "DenseWeight": True, "JoinedDenseWeight": compiling,
              "FusedGradDenseWeight": compiling}[accessor]  # the default: one GEMM while compiling
    join, fuse = accessor == "JoinedDenseWeight", accessor == "FusedGradDenseWeight"
    assert calls == ([] if concat is None else [(concat, join, fuse)] * len(layers))
    torch.testing.assert_close(out_c, out_f, atol=1e-6, rtol=0)
    out_f.square().sum().backward()
    out_c.square().sum().backward()
    grads = lambda model: {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    gf, gc = grads(fused), grads(composed)
    assert gf.keys() == gc.keys() and any("lora_A" in n for n in gf)
    for n in gf:
        torch.testing.assert_close(gc[n], gf[n], atol=1e-5, rtol=1e-5, msg=n)


def test_autocast_path_matches_reference():
    """Under (CPU) bf16 autocast the wrapper casts once and agrees with F.linear's autocast."""
    model, x, _, _, _ = prepared("mlp", dict(rank=4, targets=MLP_T))
    randomize_b(model)
    layer = model.body.lin1
    h = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(h)
        ref = nn.functional.linear(h, layer.base_layer.weight, layer.base_layer.bias) + layer.scaling * \
            nn.functional.linear(nn.functional.linear(h, layer.lora_A), layer.lora_B)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=0.05, rtol=0.02)


def test_safe_merge_names_broken_adapter():
    model, _, _, _, _ = prepared("mlp", dict(rank=2, targets=MLP_T))
    with torch.no_grad():
        model.body.lin1.lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="The adapter 'lin1' seems to be broken"):
        model.body.lin1.merge(safe_merge=True)
    assert not model.body.lin1.merged
    assert torch.isfinite(model.body.lin1.base_layer.weight).all()


def test_no_dropout_module_when_p_is_zero():
    model, _, _, _, _ = prepared("swin", dict(rank=2, targets="all"))
    layers = lora_layers(model).values()
    assert all(layer.lora_dropout is None for layer in layers)
    model2, _, _, _, _ = prepared("swin", dict(rank=2, targets="all", dropout=0.1))
    assert all(isinstance(l.lora_dropout, nn.Dropout) for l in lora_layers(model2).values())


def test_bias_untouched_and_prepare_once():
    model, _, _, method, _ = prepared("mlp", dict(rank=2, targets=MLP_T))
    randomize_b(model)
    bias = model.body.lin0.base_layer.bias.detach().clone()
    model.body.lin0.merge()
    assert torch.equal(model.body.lin0.base_layer.bias, bias)
    with pytest.raises(RuntimeError, match="already prepared"):
        method.prepare(model)


# ----------------------------------------------------------------------------------------------
# parameter accounting
# ----------------------------------------------------------------------------------------------
# trainable LoRA parameters per unit rank on Swin-B (dims 128/256/512/1024, depths 2/2/18/2):
# attn: (4d + 2d) per block = 6 * 12,032 = 72,192 (seed Table 2); blocks: 16 d per block = 192,512;
# all adds the downsample reductions (4d -> 2d at d = 128, 256, 512): 768 + 1,536 + 3,072 = 5,376.
SWIN_B_COUNTS = [("attn", 1, 72_192), ("attn", 8, 72_192 * 8), ("blocks", 8, 192_512 * 8),
                 ("all", 4, (192_512 + 5_376) * 4)]


@pytest.mark.parametrize("targets,rank,expected", SWIN_B_COUNTS)
def test_swin_b_trainable_count(targets, rank, expected):
    with torch.device("meta"):
        body = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=0)
        model = Stand(nn.Identity(), body, nn.Identity())
    counts = build_method(AdapterConfig(rank=rank, targets=targets)).prepare(model)
    assert counts["adapters"] == expected
    assert counts["trainable"] == expected and counts["other"] == 0
    assert counts["body"] == 86_743_224  # timm's Swin-B without classifier
    assert counts["body_fraction"] == pytest.approx(expected / 86_743_224)


@pytest.mark.parametrize("method,train_norms,expected_other", [
    ("full", False, "all"), ("head", False, 0), ("head", True, "norms"), ("lora", True, "norms")])
def test_full_and_head_accounting(method, train_norms, expected_other):
    model, _ = build("swin")
    n_body = sum(p.numel() for p in model.body.parameters())
    n_norms = sum(p.numel() for m in model.body.modules() if isinstance(m, nn.LayerNorm)
                  for p in m.parameters())
    counts = build_method(AdapterConfig(method=method, train_norms=train_norms)).prepare(model)
    assert counts["other"] == {"all": n_body, "norms": n_norms, 0: 0}[expected_other]
    assert counts["embedder"] == 12 and counts["head"] == 256 * 5 + 5
    assert counts["body"] == n_body


# ----------------------------------------------------------------------------------------------
# LoRA+ and weight decay groups
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [None, 16.0, 4.0])
def test_param_groups_carry_loraplus_ratio(ratio):
    model, _, _, method, _ = prepared("swin", dict(rank=2, targets="attn", loraplus_ratio=ratio,
                                                   train_norms=True))
    groups = method.param_groups(model, lr=1e-3, weight_decay=0.05)
    keys = [(g["lr"], g["weight_decay"]) for g in groups]
    assert len(keys) == len(set(keys))  # exactly one group per distinct (lr, wd)
    by_param = {id(p): g for g in groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(by_param) == len(trainable) == sum(len(g["params"]) for g in groups)
    for name, p in trainable:
        g = by_param[id(p)]
        want_lr = 1e-3 * (ratio if ratio and name.endswith("lora_B") else 1.0)
        assert g["lr"] == pytest.approx(want_lr), name
        assert g["weight_decay"] == (0.0 if p.ndim == 1 else 0.05), name
    assert len(groups) == (3 if ratio else 2)


def test_param_groups_exempt_timm_no_weight_decay():
    model, _ = build("swin")
    method = build_method(AdapterConfig(method="full"))
    method.prepare(model)
    groups = method.param_groups(model, lr=1.0, weight_decay=0.1)
    table = model.body.layers[0].blocks[0].attn.relative_position_bias_table  # 2-D, yet exempt
    assert [g["weight_decay"] for g in groups if any(p is table for p in g["params"])] == [0.0]


# ----------------------------------------------------------------------------------------------
# agreement with HF peft
# ----------------------------------------------------------------------------------------------
PEFT_CASES = [
    ("uniform", dict(rank=4, alpha=8.0, targets="all")),
    ("rslora-rankmap", dict(rank=2, alpha=3.0, rslora=True, targets="all",
                            rank_map={r"layers\.2\..*qkv": 6, "layers.0.blocks.0.attn.proj": 0})),
]


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.mark.parametrize("case_id,kwargs", PEFT_CASES, ids=[c[0] for c in PEFT_CASES])
def test_forward_matches_peft(peft, case_id, kwargs):
    model, x = build("swin")
    reference = copy.deepcopy(model.body)
    method = build_method(AdapterConfig(**kwargs))
    method.prepare(model)
    randomize_b(model)
    ours = lora_layers(model.body)
    ranks = {n: l.r for n, l in ours.items()}
    cfg = peft.LoraConfig(r=kwargs["rank"], lora_alpha=kwargs["alpha"], target_modules=sorted(ranks),
                          use_rslora=kwargs.get("rslora", False),
                          rank_pattern={re.escape(n): r for n, r in ranks.items()})
    theirs = peft.get_peft_model(reference, cfg).eval()
    with torch.no_grad():
        for name, layer in ours.items():
            module = theirs.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(layer.lora_A)
            module.lora_B["default"].weight.copy_(layer.lora_B)
            assert module.scaling["default"] == pytest.approx(layer.scaling)
        torch.testing.assert_close(model.body(x), theirs(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case_id,kwargs", PEFT_CASES + [("dylora-b3", dict(
    method="dylora", rank=5, alpha=6.0, targets="attn"))], ids=[c[0] for c in PEFT_CASES] + ["dylora-b3"])
def test_peft_export_loads_in_peft(peft, tmp_path, case_id, kwargs):
    model, x = build("swin")
    fresh = copy.deepcopy(model.body)
    method = build_method(AdapterConfig(**kwargs))
    method.prepare(model)
    randomize_b(model)
    if kwargs.get("method") == "dylora":
        method.set_rank(model, 3)
    export_peft(model.body, tmp_path, method.cfg)
    with torch.no_grad():
        base = fresh(x)
        ours = model.body(x)
        loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
        assert (ours - base).abs().max() > 1e-2  # the adapter changes the function
        torch.testing.assert_close(loaded(x), ours, atol=1e-5, rtol=0)


def test_peft_export_refuses_delta_lora(tmp_path):
    model, _, _, method, _ = prepared("mlp", dict(method="delta_lora", rank=2, targets=MLP_T))
    with pytest.raises(ValueError, match="Delta-LoRA modifies the base weights"):
        export_peft(model.body, tmp_path, method.cfg)


# ----------------------------------------------------------------------------------------------
# save / load / merged export
# ----------------------------------------------------------------------------------------------
IO_CASES = [
    ("lora-model", dict(rank=4, targets="all", rank_map={r"layers\.3\..*": 0}), "model"),
    ("dylora-body", dict(method="dylora", rank=4, targets="attn"), "body"),
    ("delta-model", dict(method="delta_lora", rank=2, targets="attn", delta_lora_start=0), "model"),
]


@pytest.mark.parametrize("case_id,kwargs,what", IO_CASES, ids=[c[0] for c in IO_CASES])
def test_save_load_round_trip(tmp_path, case_id, kwargs, what):
    model, x = build("swin")
    method = build_method(AdapterConfig(**kwargs))
    method.prepare(model)
    randomize_b(model)
    with torch.no_grad():
        for p in list(model.embedder.parameters()) + list(model.head.parameters()):
            p.add_(0.1)
        if method.cfg.method == "delta_lora":  # a changed W must travel with the adapter
            model.body.layers[0].blocks[0].attn.qkv.base_layer.weight.add_(0.05)
    save_adapter(model if what == "model" else model.body, tmp_path, method)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert meta["ranks"] == {n: l.r for n, l in lora_layers(model.body).items()}
    fresh, _ = build("swin")
    load_adapter(fresh if what == "model" else fresh.body, tmp_path)
    with torch.no_grad():
        want = model(x) if what == "model" else model.body(model.embedder(x))
        got = fresh(x) if what == "model" else fresh.body(model.embedder(x))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_load_into_other_shapes_names_module(tmp_path):
    model, _, _, method, _ = prepared("swin", dict(rank=4, targets="attn"))
    save_adapter(model.body, tmp_path, method)
    wider = tiny_swin(embed_dim=48)
    with pytest.raises(ValueError, match=r"module 'layers\.0\.blocks\.0\.attn\.(qkv|proj)': saved "
                                         r"lora_[AB] has shape \(\d+, \d+\), the model's has"):
        load_adapter(wider, tmp_path)
    other_rank, _, _, other, _ = prepared("swin", dict(rank=2, targets="attn"))
    with pytest.raises(ValueError, match=r"module 'layers\.0\.blocks\.0\.attn\.qkv': saved rank 4, "
                                         r"model rank 2"):
        load_adapter(other_rank.body, tmp_path, method=other)


def test_export_merged_loads_into_plain_timm(tmp_path):
    from safetensors.torch import load_file

    model, x, _, method, _ = prepared("swin", dict(rank=4, targets="all"))
    randomize_b(model)
    export_merged(model.body, tmp_path / "merged.safetensors")
    plain = tiny_swin()
    plain.load_state_dict(load_file(str(tmp_path / "merged.safetensors")), strict=True)
    with torch.no_grad():
        h = model.embedder(x)
        torch.testing.assert_close(plain.eval()(h), model.body(h), atol=1e-5, rtol=0)
