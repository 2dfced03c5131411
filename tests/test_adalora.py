"""AdaLoRA through peft: a tiny stage-3 run trains, allocates every step, regularises, counts right."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")

from orca.adapters import AdapterConfig, build_method, count_parameters  # noqa: E402
from orca.adapters.adalora import ADAPTER_NAME, AdaLoRAMethod, orthogonality, schedule  # noqa: E402
from orca.config import load_config  # noqa: E402
from orca.train import run_stage3  # noqa: E402
from tests.test_adapters_variants import build  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_stage3_run_allocates_every_step_and_counts_only_lora(tiny_overrides, monkeypatch):
    # 24 training samples / batch 8 = 3 steps per epoch, 2 epochs.
    calls, regs = [], []
    from peft.tuners.adalora import AdaLoraModel

    real_update = AdaLoraModel.update_and_allocate
    grads_seen = []

    def spy(self, global_step):
        grads_seen.append(all(p.grad is not None for n, p in self.model.named_parameters()
                              if n.endswith(f"lora_E.{ADAPTER_NAME}")))
        calls.append(global_step)
        return real_update(self, global_step)

    real_reg = AdaLoRAMethod.regularization

    def reg_spy(self, model):
        out = real_reg(self, model)
        regs.append(float(out.detach()))
        return out

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", spy)
    monkeypatch.setattr(AdaLoRAMethod, "regularization", reg_spy)
    cfg = load_config(None, tiny_overrides + ["adapter.method=adalora", "adapter.rank=2",
                                              "adapter.adalora_total_step=6", "train.lr=3e-3"])
    run = run_stage3(cfg)
    summary = json.loads((run.path / "summary.json").read_text())
    assert calls == list(range(6))  # once per optimizer step, with the loop's 0-based step
    assert all(grads_seen)  # peft saw this step's gradients although the loop had zeroed them
    assert len(regs) == 6 and all(r > 0 and r == r and r < float("inf") for r in regs)
    params = summary["params"]
    # attn targets of the tiny Swin: 4 blocks x (qkv + proj); init rank ceil(1.5 * 2) = 3.
    # qkv: d 16/32/64/128 (Swin doubles the width per stage) -> 3 * (d + 3d + 1); proj: 3 * (d + d + 1).
    dims = [16, 32, 64, 128]
    expected = sum(3 * (d + 3 * d + 1) + 3 * (d + d + 1) for d in dims)
    assert params["adapters"] == expected
    assert params["other"] == 0  # no body weight trains
    assert summary["test"][summary["metric"]] == summary["test"][summary["metric"]]  # finite
    ckpt = torch.load(run.path / "ckpt" / "last.pt", weights_only=True)
    budget = ckpt["method"]["final_budget"]
    # After the final phase the live rank units equal the target: rank 2 x 8 modules.
    assert budget["rank_units"] == budget["target_rank_units"] == 16
    assert ckpt["method"]["rank_pattern"] is not None
    # The summary carries the same budget, so analyses need no checkpoint (they stay out of git).
    assert summary["adapter_report"]["final_budget"] == budget


def test_regularization_matches_peft_formula():
    model, x = build("mlp")
    method = build_method(AdapterConfig(method="adalora", rank=2, targets=["lin0", "lin1"],
                                        adalora_total_step=10, adalora_orth_reg_weight=0.3))
    method.prepare(model)
    body = model.body
    # peft initialises A, B ~ N(0, 0.02^2): ||A A^T - I||_F ~ sqrt(r) = sqrt(3) each.
    by_hand = []
    for layer in (body.lin0, body.lin1):
        a, b = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
        by_hand += [torch.linalg.norm(a @ a.T - torch.eye(3)), torch.linalg.norm(b.T @ b - torch.eye(3))]
    expected = 0.3 * torch.stack(by_hand).mean()
    reg = method.regularization(model)
    assert torch.allclose(reg, expected)
    assert 0 < float(reg.detach()) < 0.3 * 1.8
    reg.backward()
    assert body.lin0.lora_A[ADAPTER_NAME].grad is not None
    assert orthogonality(torch.nn.Linear(3, 3)) is None


def test_only_lora_params_train_and_are_counted_as_adapters():
    model, _ = build("mlp")
    method = build_method(AdapterConfig(method="adalora", rank=2, adalora_init_rank=4,
                                        targets=["lin0"], adalora_total_step=5))
    counts = method.prepare(model)
    trainable = [n for n, p in model.body.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(f"lin0.{k}.{ADAPTER_NAME}" for k in ("lora_A", "lora_B", "lora_E"))
    assert counts["adapters"] == 4 * (16 + 32 + 1) and counts["other"] == 0
    assert counts["body"] == sum(p.numel() for n, p in model.body.named_parameters()
                                 if "lora_" not in n and "ranknum" not in n)
    assert count_parameters(model) == counts


def test_schedule_keeps_a_budgeting_phase_and_errors_are_clear():
    assert schedule(100, 0.1, 0.2) == {"tinit": 10, "tfinal": 20, "total_step": 100}
    s = schedule(2, 0.5, 0.4)
    assert s["tinit"] < s["total_step"] - s["tfinal"]
    with pytest.raises(ValueError, match="total_step"):
        schedule(0, 0.1, 0.2)
    with pytest.raises(ValueError, match="rank_map"):
        build_method(AdapterConfig(method="adalora", rank_map={"lin0": 2}))
    with pytest.raises(ValueError, match="adalora_init_rank"):
        AdapterConfig(method="adalora", rank=4, adalora_init_rank=2)
    with pytest.raises(ValueError, match="adalora_tinit"):
        AdapterConfig(method="adalora", adalora_tinit=0.6, adalora_tfinal=0.5)
    model, _ = build("mlp")
    method = build_method(AdapterConfig(method="adalora", rank=2, targets=["lin0"]))
    method.prepare(model)
    with pytest.raises(RuntimeError, match="adalora_total_step"):
        method.on_step_start(model, 0)
    method.set_total_steps(8)
    method.on_step_start(model, 0)
    assert method.peft_config.total_step == 8


def _train(model, method, x, steps, start=0, opt=None):
    opt = opt or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(start, start + steps):
        method.on_step_start(model, step)
        loss = model(x).pow(2).mean() + method.regularization(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_step_end(model, step)
    return opt


def test_checkpoint_state_resumes_exactly():
    # 10 steps, tinit 1, tfinal 2: sensitivities accumulate over steps 0-7, so a checkpoint at step 4
    # must carry them (peft clears them at step 8, when the final pattern is fixed).
    cfg = AdapterConfig(method="adalora", rank=2, adalora_init_rank=4, targets=["lin0", "lin1"],
                        adalora_total_step=10, adalora_tinit=0.1, adalora_tfinal=0.2)

    def ema(m):
        return {k: v.clone() for k, v in m.peft_model.rankallocator.exp_avg_ipt.items()}

    model, x = build("mlp")
    method = build_method(cfg)
    method.prepare(model)
    _train(model, method, x, 4)
    state = method.state_for_checkpoint()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, method, x, 2, start=4)
    mid = ema(method)
    _train(model, method, x, 4, start=6)

    again, _ = build("mlp")
    resumed = build_method(cfg)
    resumed.prepare(again)
    again.load_state_dict(weights)
    resumed.load_state(state)
    _train(again, resumed, x, 2, start=4)  # SGD without momentum: no optimizer state to carry
    mid_resumed = ema(resumed)
    _train(again, resumed, x, 4, start=6)
    assert sorted(mid) == sorted(mid_resumed) and all(torch.equal(mid[k], mid_resumed[k]) for k in mid)
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n
    final = method.final_budget()
    assert final["rank_units"] == final["target_rank_units"] == 4  # 2 modules x target rank 2
    assert sorted(final["ranks"]) == ["lin0", "lin1"]
    with pytest.raises(ValueError, match="AdaLoRA state"):
        resumed.load_state({"total_step": 10})
