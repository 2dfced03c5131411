"""Packed sweeps (``sweep.sh --pack K``): a packed run is the run alone, a diverging run fails alone,
and an interrupted pack resumes and then skips what is done.

Every run here is a tiny Swin from a weight file (a body shared by all seeds, as the fractal body
is) with stochastic depth on, so the packed runs must also reproduce each run's own DropPath draws.
The four runs alone are trained once for the module (``alone``) and are the reference of every test.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from orca import packed as packed_mod
from orca import sweep as sweep_mod
from orca.bodies import create_body, save_body
from orca.config import load_config
from orca.model import BodyCache, body_from_config
from orca.packed_model import PackedLinear
from orca.train import run_stage3

BODY = "swin_tiny_patch4_window7_224"
BODY_KWARGS = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 2}
# Four runs that differ in everything a pack lets differ: rank, seed, rank map (with zeros, so
# padded and absent factors), rank 0 (head only), LoRA+, clipping, weight decay, a frozen embedder.
INCLUDE = """\
    - {adapter.rank: 1, seed: 0}
    - {adapter.rank: 4, seed: 1, train.clip_grad: 0.05, adapter.loraplus_ratio: 4.0}
    - {adapter.method: head, seed: 2, adapter.train_embedder: false}
    - {adapter.rank: 2, seed: 3, train.weight_decay: 0.1, adapter.rank_map: [{layers.0: 0, layers.1.blocks.0.mlp.fc1: 5}]}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    body = create_body(BODY, weights="none", img_size=32, **BODY_KWARGS)
    save_body(body, BODY, BODY_KWARGS, str(root / "body.safetensors"))
    return root


def sweep_file(root: Path, include: str = INCLUDE, name: str = "sweep.yaml") -> Path:
    path = root / name
    path.write_text(textwrap.dedent(f"""\
        name: test
        task:
          name: darcy
          data_root: {root / 'data'}
          options: {{resolution: 41, subsample: 4, n_train: 8, n_val: 4, n_test: 4, workers: 1}}
        model:
          body: {BODY}
          weights: file
          weights_file: {root / 'body.safetensors'}
          img_size: 32
          body_kwargs: {json.dumps(BODY_KWARGS)}
        train: {{epochs: 2, warmup_epochs: 0.5, batch_size: 4, device: cpu, deterministic: true, log_every: 1}}
        adapter: {{method: lora, targets: all}}
        sweep:
          table: packed
          include:
        """) + textwrap.indent(textwrap.dedent(include), "    "))
    return path


def run_names(path: Path):
    return [run.name for run in sweep_mod.load_sweep(path)[1]]


def read(run_dir: Path):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((run_dir / "summary.json").read_text())


def assert_same_run(alone: Path, packed: Path, atol: float = 1e-5) -> None:
    """Same metric rows (keys and values), summary keys, and final checkpoint as the run alone."""
    rows_a, sum_a = read(alone)
    rows_p, sum_p = read(packed)
    assert [r.keys() for r in rows_a] == [r.keys() for r in rows_p]
    for ra, rp in zip(rows_a, rows_p):
        for key, value in ra.items():
            if key == "train/img_per_s" or not isinstance(value, float):
                assert key == "train/img_per_s" or rp[key] == value, (key, value, rp[key])
            else:
                assert rp[key] == pytest.approx(value, abs=atol, rel=1e-5), key
    assert set(sum_p) - set(sum_a) <= {"packed_runs"} and not set(sum_a) - set(sum_p)
    assert sum_p["test"] == pytest.approx(sum_a["test"], abs=atol) and sum_p["params"] == sum_a["params"]
    last_a = torch.load(alone / "ckpt" / "last.pt", weights_only=True)
    last_p = torch.load(packed / "ckpt" / "last.pt", weights_only=True)
    assert last_a.keys() == last_p.keys() and last_a["model"].keys() == last_p["model"].keys()
    for key, value in last_a["model"].items():  # the adapters, embedder and head trained the same
        torch.testing.assert_close(last_p["model"][key], value, atol=2e-4, rtol=1e-3, msg=key)
    assert last_p["optimizer"]["param_groups"] == last_a["optimizer"]["param_groups"]
    state_a, state_p = last_a["optimizer"]["state"], last_p["optimizer"]["state"]
    assert state_a.keys() == state_p.keys()
    for i in state_a:
        assert state_p[i]["step"] == state_a[i]["step"]
        torch.testing.assert_close(state_p[i]["exp_avg"], state_a[i]["exp_avg"], atol=1e-6, rtol=1e-3)
    assert last_p["scheduler"] == last_a["scheduler"] and last_p["state"].keys() == last_a["state"].keys()
    assert torch.equal(last_p["rng_cpu"], last_a["rng_cpu"])  # the same DropPath draws were consumed


@pytest.fixture(scope="module")
def alone(workdir):
    path = sweep_file(workdir)
    assert sweep_mod.run_sweep(path, [f"sweep.output_dir={workdir / 'alone'}"], gpus=0) == []
    return workdir / "alone" / "packed"


def test_packed_runs_equal_runs_alone(workdir, alone, capsys):
    path = sweep_file(workdir)
    out = workdir / "pack4" / "packed"
    assert sweep_mod.run_sweep(path, [f"sweep.output_dir={workdir / 'pack4'}"], gpus=0, pack=4) == []
    assert "[sweep] pack of 4" in capsys.readouterr().out
    names = run_names(path)
    assert sorted(p.name for p in out.iterdir()) == sorted(names) and len(names) == 4
    for name in names:
        assert_same_run(alone / name, out / name)
    summary = json.loads((out / names[3] / "summary.json").read_text())
    assert summary["packed_runs"] == 4 and summary["params"]["adapters"] > 0


@pytest.mark.parametrize("case", ["aot_eager", "cudagraphs", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_pack_equals_runs_alone(workdir, alone, case, monkeypatch):
    """``train.compile=true``: each pack's training forward is one graph, compiled once per pack (a
    smaller last pack compiles its own), the stochastic-depth masks enter it as an input, and every
    run still equals the run alone (eager). ``aot_eager`` traces the graph and its backward with
    eager kernels (seconds); ``cudagraphs`` is ``train.compile_backend=cudagraphs`` as configured
    (on a CPU it records no graph and replays the traced graph's eager kernels, so this checks the
    wiring and the trace); ``inductor``, the default backend, generates C++ kernels (minutes cold
    on a 2-core CPU, hence slow) whose reordered reductions the tolerance absorbs."""
    import torch._dynamo.utils

    compile_ = torch.compile
    backends = []

    def compile_as_configured(fn, mode=None, backend="inductor"):
        backends.append(backend)  # the configured backend; inductor becomes aot_eager but in its own (slow) case
        return compile_(fn, mode=mode, backend="aot_eager" if backend == "inductor" and case == "aot_eager" else backend)

    monkeypatch.setattr(torch, "compile", compile_as_configured)
    counters = torch._dynamo.utils.counters
    counters.clear()
    path = sweep_file(workdir)
    out = workdir / f"compiled_{case}"
    overrides = [f"sweep.output_dir={out}", "train.compile=true"]
    if case == "cudagraphs":
        overrides.append("train.compile_backend=cudagraphs")
    # 8 training samples at batch 4: full batches only, all through the compiled step; packs of 3
    # and 1, so two packs of two sizes compile
    assert sweep_mod.run_sweep(path, overrides, gpus=0, pack=3) == []
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], dict(counters)
    assert backends == ["cudagraphs" if case == "cudagraphs" else "inductor"] * 2
    if case == "cudagraphs":  # the backend ran: it declined to record graphs of CPU tensors
        assert counters["inductor"]["cudagraph_skips"] >= 2, dict(counters)
    for name in run_names(path):
        assert_same_run(alone / name, out / "packed" / name)
    assert json.loads((out / "packed" / run_names(path)[0] / "summary.json").read_text())["packed_runs"] in (1, 3)


@pytest.mark.parametrize("n", [4, 8], ids=["few_tokens", "many_tokens"])  # the two input-gradient forms
def test_padding_is_exact_zero_and_gets_no_gradient(n):
    """Padded factors contribute nothing and get exactly zero gradient, so AdamW keeps them zero; the
    hand-written backward gives the gradients of the composed ops."""
    base = torch.nn.Linear(6, 5).requires_grad_(False)  # the shared body is frozen
    layer = PackedLinear(base, ranks=[1, 3], scalings=[2.0, 0.5])
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
        layer.lora_A[0, 1:] = 0  # run 0 has rank 1: rows 1-2 of A and columns 1-2 of B are padding
        layer.lora_B[0, :, 1:] = 0
    x = torch.randn(2 * n, 6, requires_grad=True)
    out = layer(x)
    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    expected0 = base(x[:n]) + 2.0 * x[:n] @ a[0, :1].t() @ b[0, :, :1].t()
    expected1 = base(x[n:]) + 0.5 * x[n:] @ a[1].t() @ b[1].t()
    expected = torch.cat([expected0, expected1])
    torch.testing.assert_close(out, expected)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x)
    out = layer(x)
    out.square().sum().backward()
    ref_x, ref_a, ref_b = torch.autograd.grad(expected.square().sum(), [x, a, b])
    torch.testing.assert_close(grad_x, ref_x)
    torch.testing.assert_close(layer.lora_A.grad, ref_a)
    torch.testing.assert_close(layer.lora_B.grad, ref_b)
    assert layer.lora_A.grad[0, 1:].abs().max() == 0 and layer.lora_B.grad[0, :, 1:].abs().max() == 0
    assert layer.lora_A.grad[1].abs().min() > 0 and layer.lora_A.grad[0, 0].abs().min() > 0


def test_rank_segments_cut_the_padded_work():
    """A knee pack (ranks 0-64 x 3 seeds, in rank order) is computed in three segments doing 480
    rank-units instead of 24 x 64 = 1536; rank-0 runs sit in no segment."""
    from orca.packed_model import rank_segments

    knee = [r for r in (0, 1, 2, 4, 8, 16, 32, 64) for _ in range(3)]
    segments = rank_segments(knee)
    assert segments == ((3, 15, 8), (15, 21, 32), (21, 24, 64))
    assert sum((end - first) * r for first, end, r in segments) == 480
    assert rank_segments([8] * 5) == ((0, 5, 8),) and rank_segments([0, 0]) == ()
    assert rank_segments([3, 1, 0, 6, 5]) == ((0, 2, 3), (3, 5, 6))


def test_compiled_pack_trains_the_eager_packs_data(workdir, monkeypatch):
    """10 samples at batch 4 make two full batches and one of 2 per epoch. A compiled pack still
    trains all three: its compiled step sees full batches only (one graph, no recompilation) and the
    batches of 2 take the eager forward, so its runs equal the eager pack's runs."""
    import torch._dynamo.utils

    compile_ = torch.compile
    seen = []

    def recording(fn, mode=None, backend="inductor"):
        compiled = compile_(fn, mode=mode, backend="aot_eager")
        return lambda x, y, masks: seen.append(len(x)) or compiled(x, y, masks)

    monkeypatch.setattr(torch, "compile", recording)
    counters = torch._dynamo.utils.counters
    counters.clear()
    include = "- {adapter.rank: 1, seed: 0}\n- {adapter.rank: 3, seed: 1}\n"
    path = sweep_file(workdir, include, name="partial.yaml")
    common = ["task.options.n_train=10", "task.options.n_val=2"]
    for out, flags in (("partial_eager", []), ("partial_compiled", ["train.compile=true"])):
        assert sweep_mod.run_sweep(path, [f"sweep.output_dir={workdir / out}", *common, *flags], gpus=0, pack=2) == []
    assert seen == [2 * 4] * 4 and counters["stats"]["unique_graphs"] == 1  # 2 epochs x 2 full batches of 2 runs
    for name in run_names(path):
        eager, compiled = workdir / "partial_eager" / "packed" / name, workdir / "partial_compiled" / "packed" / name
        assert [r["step"] for r in read(compiled)[0] if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
        assert_same_run(eager, compiled)


def test_packed_step_graphs_hold_nothing_cuda_graphs_refuse(workdir, monkeypatch):
    """What ``train.compile_backend=cudagraphs`` records, checked where no GPU is: the pack's traced
    forward and backward graphs hold no op that CUDA graphs refuse (torch's own test, which the
    backend applies before recording: ops tagged unsafe, data-dependent shapes)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    found = {}

    def check(name):
        def compiler(gm, example_inputs):
            found[name] = (get_first_incompatible_cudagraph_node(gm),
                           sum(n.target in (torch.ops.orca.packed_lora_linear.default,
                                            torch.ops.orca.packed_lora_linear_backward.default) for n in gm.graph.nodes))
            return make_boxed_func(gm.forward)
        return compiler

    checking, compile_ = aot_autograd(fw_compiler=check("forward"), bw_compiler=check("backward")), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **configured: compile_(fn, backend=checking))
    path = sweep_file(workdir, "- {adapter.rank: 1, seed: 0}\n- {adapter.rank: 3, seed: 1}\n", name="graphs.yaml")
    assert sweep_mod.run_sweep(path, [f"sweep.output_dir={workdir / 'graphs'}", "train.compile=true",
                                      "train.compile_backend=cudagraphs"], gpus=0, pack=2) == []
    assert found["forward"][0] is None and found["backward"][0] is None
    assert found["forward"][1] == found["backward"][1] == 19  # the pack's: 4 blocks x 4 Linears, 3 patch merges


def test_compiled_packed_linear_is_one_op_each_way():
    """Compiled, an adapted Linear of a pack is one opaque op in the forward graph and one in the
    backward graph, whatever its segments: the segment loops (cuBLAS calls) stay out of the graph
    that inductor lowers, so the training step's graph does not grow with the segments."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = [n.target for n in gm.graph.nodes if n.op == "call_function"]
            return make_boxed_func(gm.forward)
        return compiler

    base = torch.nn.Linear(6, 5).requires_grad_(False)
    layer = PackedLinear(base, ranks=[3, 1, 0, 6, 5], scalings=[2.0, 1.0, 0.0, 0.5, 4.0])
    assert len(layer.segments) == 2
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(5 * 8, 6, requires_grad=True)
    step = torch.compile(lambda x: layer(x).square().sum(), backend=aot_autograd(fw_compiler=keep("fw"),
                                                                                 bw_compiler=keep("bw")))
    step(x).backward()
    ops = torch.ops.orca
    assert graphs["fw"].count(ops.packed_lora_linear.default) == 1
    assert graphs["bw"].count(ops.packed_lora_linear_backward.default) == 1
    matmuls = {torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default, torch.ops.aten.mm.default}
    assert not matmuls & set(graphs["fw"] + graphs["bw"])
    assert layer.lora_A.grad[2].count_nonzero() == 0 and layer.lora_A.grad[0, :3].abs().min() > 0


@pytest.mark.parametrize("n", [4, 8], ids=["few_tokens", "many_tokens"])
def test_segmented_linear_is_each_run_alone(n):
    """Runs of ranks 3, 1, 0, 6, 5 (two segments and a rank-0 run between them): each run's rows
    and its factors' gradients are those of its own Linear at its own rank, every padded entry of
    the stacks gets exactly zero gradient, and the input gradient is the composed ops'."""
    torch.manual_seed(0)
    ranks, scalings = [3, 1, 0, 6, 5], [2.0, 1.0, 0.0, 0.5, 4.0]
    base = torch.nn.Linear(6, 5).requires_grad_(False)
    layer = PackedLinear(base, ranks=ranks, scalings=scalings)
    assert layer.segments == ((0, 2, 3), (3, 5, 6))
    own = [(torch.randn(r, 6, requires_grad=True), torch.randn(5, r, requires_grad=True)) for r in ranks]
    with torch.no_grad():
        for k, (a, b) in enumerate(own):
            layer.lora_A[k, :ranks[k]] = a
            layer.lora_B[k, :, :ranks[k]] = b
    x = torch.randn(len(ranks) * n, 6, requires_grad=True)
    g = torch.randn(len(ranks) * n, 5)
    out = layer(x)
    (grad_x,) = torch.autograd.grad(out, x, g, retain_graph=True)
    out.backward(g)
    alone_x = x.detach().clone().requires_grad_()
    rows = alone_x.chunk(len(ranks))
    expected = torch.cat([base(xk) + s * xk @ a.t() @ b.t() for xk, s, (a, b) in zip(rows, scalings, own)])
    expected.backward(g)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad_x, alone_x.grad)
    for k, (a, b) in enumerate(own):
        r = ranks[k]
        if r:
            torch.testing.assert_close(layer.lora_A.grad[k, :r], a.grad)
            torch.testing.assert_close(layer.lora_B.grad[k, :, :r], b.grad)
        assert not layer.lora_A.grad[k, r:].count_nonzero() and not layer.lora_B.grad[k, :, r:].count_nonzero()


def test_diverging_run_fails_alone(workdir, alone):
    include = INCLUDE.splitlines()[0] + "\n    - {adapter.rank: 2, seed: 5, train.lr: 1.0e+30}\n"
    path = sweep_file(workdir, include, "nan.yaml")
    failed = sweep_mod.run_sweep(path, [f"sweep.output_dir={workdir / 'nan'}"], gpus=0, pack=2)
    out = workdir / "nan" / "packed"
    diverging = run_names(path)[1]
    assert [run.name for run, _ in failed] == [diverging]
    bad = out / diverging
    assert "FloatingPointError: non-finite training loss" in (bad / "sweep_error.log").read_text()
    bad_summary = json.loads((bad / "summary.json").read_text())  # not finished: a rerun tries it again
    assert bad_summary["status"] == "failed" and "non-finite training loss" in bad_summary["reason"]
    assert_same_run(alone / "lora_r1_s0", out / "lora_r1_s0")  # its pack-mate never noticed


def test_interrupted_pack_resumes_then_skips(workdir, alone, monkeypatch):
    path = sweep_file(workdir)
    overrides = [f"sweep.output_dir={workdir / 'resume'}"]
    out = workdir / "resume" / "packed"
    train_pack = packed_mod.train_pack

    def killed_after_step_3(cfgs, on_step=None, **kwargs):  # epoch 1 checkpointed, epoch 2 half done
        def kill(step):
            if step == 3:
                raise RuntimeError("killed")
        return train_pack(cfgs, on_step=kill, **kwargs)

    monkeypatch.setattr(packed_mod, "train_pack", killed_after_step_3)
    failed = sweep_mod.run_sweep(path, overrides, gpus=0, pack=4)
    assert len(failed) == 4 and all("killed" in Path(log).read_text() for _, log in failed)
    assert [json.loads(p.read_text())["status"] for p in out.glob("*/summary.json")] == ["failed"] * 4
    assert len(list(out.glob("*/ckpt/last.pt"))) == 4

    # a packed run's checkpoint is a run's checkpoint: the first run resumes alone from it
    first = run_names(path)[0]
    run_stage3(load_config(str(out / first / "config.yaml")))
    monkeypatch.setattr(packed_mod, "train_pack", train_pack)
    assert sweep_mod.run_sweep(path, overrides, gpus=0, pack=4) == []  # the other three, packed
    for name in run_names(path):  # resumed from epoch 1: the same run as uninterrupted, alone
        assert_same_run(alone / name, out / name)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}

    def must_not_run(cfgs, **kwargs):
        raise AssertionError("a finished run was packed again")

    monkeypatch.setattr(packed_mod, "train_pack", must_not_run)
    assert sweep_mod.run_sweep(path, overrides, gpus=0, pack=4) == []
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == mtimes


def test_plan_packs_groups_compatible_runs(workdir):
    include = """\
        - {adapter.rank: [64, 1, 8], seed: [0, 1]}
        - {adapter.method: head, seed: 0}
        - {adapter.method: full, seed: 0}
        - {adapter.rank: 2, seed: 0, train.batch_size: 2}
        - {adapter.rank: 2, seed: 0, adapter.dropout: 0.1}
    """
    _, runs = sweep_mod.load_sweep(sweep_file(workdir, include, "plan.yaml"))
    cfgs = [run.cfg for run in runs]
    packs, alone = packed_mod.plan_packs(cfgs, 4)
    names = [[runs[i].name for i in pack] for pack in packs]
    # one group of 7 by rank (0, 1, 1, 8 | 8, 64, 64); the batch-2 run on its own; full and dropout alone
    assert names == [["head_s0", "lora_r1_s0", "lora_r1_s1", "lora_r8_s0"], ["lora_r8_s1", "lora_r64_s0", "lora_r64_s1"],
                     ["lora_r2_batch_size-2_s0"]]
    assert {runs[i].name: reason.split(" ")[0] for i, reason in alone} == {
        "full_s0": "adapter.method=full", "lora_r2_dropout-0.1_s0": "adapter.dropout"}
    # a random body differs per seed: such runs never share a pack
    random_body = [run.cfg for run in runs[:2]]
    for cfg in random_body:
        cfg.model.weights = "none"
    assert packed_mod.plan_packs(random_body, 4)[0] == [[0], [1]]
    with pytest.raises(ValueError, match="pack size must be >= 1"):
        packed_mod.plan_packs(cfgs, 0)


def test_runs_that_cannot_share_a_body_train_alone(workdir):
    """A PackError names why; the sweep then trains such runs as without --pack."""
    _, runs = sweep_mod.load_sweep(sweep_file(workdir, INCLUDE.splitlines()[0] + "\n", "drop.yaml"),
                                   ["model.body_kwargs.drop_rate=0.1"])
    with pytest.raises(packed_mod.PackError, match="dropout at body.*drop"):
        packed_mod.train_pack([run.cfg for run in runs])


def test_body_cache_gives_the_body_and_rng_state_of_a_fresh_build(workdir):
    """A pack builds each seed's body once: a later run of that seed gets a copy and the RNG state
    that building it again would have left (so its embedder, head and LoRA init are its own)."""
    cfg = sweep_mod.load_sweep(sweep_file(workdir))[1][0].cfg
    bodies = BodyCache()
    handed_out = []
    for seed in (0, 1, 0, 1):
        torch.manual_seed(seed)
        fresh = body_from_config(cfg.model)
        fresh_after = torch.rand(4)
        torch.manual_seed(seed)
        body = bodies(cfg.model)
        assert torch.equal(torch.rand(4), fresh_after)
        assert body.state_dict().keys() == fresh.state_dict().keys()
        assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in body.state_dict().items())
        assert all(body is not other for other in handed_out)
        with torch.no_grad():  # what a run does to its body does not reach the next run's
            next(body.parameters()).add_(1.0)
        handed_out.append(body)
    assert len(bodies._built) == 2


def test_body_cache_shares_tensors_when_asked(workdir):
    """A pack's cache hands out module copies over one set of tensors per seed (the runs' frozen
    bodies become one shared body anyway), still with the RNG state of a fresh build."""
    cfg = sweep_mod.load_sweep(sweep_file(workdir))[1][0].cfg
    bodies = BodyCache(share_tensors=True)
    torch.manual_seed(0)
    first = bodies(cfg.model)
    after = torch.rand(4)
    torch.manual_seed(0)
    second = bodies(cfg.model)
    assert torch.equal(torch.rand(4), after) and first is not second
    pairs = list(zip(first.state_dict().values(), second.state_dict().values()))
    assert pairs and all(a.data_ptr() == b.data_ptr() for a, b in pairs)
    torch.manual_seed(1)
    other_seed = bodies(cfg.model)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first.parameters(), other_seed.parameters()))
