"""model.warmup_from: every adapter run starts from one head-only warm-up's embedder and head, frozen."""
import pytest
import torch

from orca.config import load_config
from orca.errors import OrcaError
from orca.train import initial_model, run_stage3
from orca.warmup import find_warmup_run


def _parts(state, prefixes=("embedder.", "head.")):
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def test_adapter_run_loads_the_matching_warmup_and_keeps_it_frozen(tiny_overrides, tmp_path):
    warm = tmp_path / "warmups"
    for seed in (0, 1):  # a warm-up sweep: one run per seed; the adapter run must pick its own seed's
        run_stage3(load_config(None, tiny_overrides + ["adapter.method=head", f"seed={seed}",
                                                        f"run_dir={warm / f'head_s{seed}'}"]))
    warm_state = torch.load(warm / "head_s1" / "ckpt" / "best.pt", weights_only=True)["model"]
    other = torch.load(warm / "head_s0" / "ckpt" / "best.pt", weights_only=True)["model"]
    assert any(not torch.equal(v, other[k]) for k, v in _parts(warm_state).items())
    cfg = load_config(None, tiny_overrides + [
        "adapter.method=lora", "adapter.rank=2", "seed=1", f"model.warmup_from={warm}",
        "adapter.train_embedder=false", "adapter.train_head=false", f"run_dir={tmp_path / 'lora'}"])
    _, start = initial_model(cfg)  # where every run starts, alone or packed
    for k, v in _parts(warm_state).items():
        assert torch.equal(start.state_dict()[k], v), k
    run_stage3(cfg)
    after = torch.load(tmp_path / "lora" / "ckpt" / "best.pt", weights_only=True)["model"]
    for k, v in _parts(warm_state).items():
        assert torch.equal(after[k], v), k  # loaded from seed 1's warm-up, and never trained
    lora = {k: v for k, v in after.items() if "lora_B" in k or k.endswith(".B")}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())  # the adapters did train


def test_a_missing_warmup_is_a_one_line_error(tiny_overrides, tmp_path):
    (tmp_path / "empty").mkdir()
    task = {"name": "darcy", "options": {"n_train": 24}}
    with pytest.raises(OrcaError, match=r"no finished head-only warm-up runs of task 'darcy' with these options and "
                                        r"seed 3 under .*empty, model\.warmup_from, run the warm-up sweep first"):
        find_warmup_run(str(tmp_path / "empty"), task, 3)
    with pytest.raises(OrcaError, match="no such directory"):
        find_warmup_run(str(tmp_path / "nowhere"), task, 3)
