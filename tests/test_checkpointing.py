"""Block-level activation checkpointing (orca/checkpointing.py, ``train.grad_checkpointing``):
same numbers, same names, blocks really recomputed, and errors that say what is wrong."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.multiprocessing as mp

from orca.bench import build_config
from orca.bodies import create_body
from orca.checkpointing import checkpointed_blocks, describe, normalize, plan, set_checkpointing, summary
from orca.config import load_config
from orca.schema import ConfigError
from orca.train import run_stage3

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "swin_tiny_patch4_window7_224"
DEPTHS = [2, 2, 3, 1]
ENTRIES = [0, "1:1", "2:2"]  # stage 0 whole (timm's flag), first block of stage 1, first 2 of stage 2
RECOMPUTED = {"layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.2.blocks.0", "layers.2.blocks.1"}


def tiny_body(depths=DEPTHS, drop_path_rate=0.2, seed=0):
    torch.manual_seed(seed)
    return create_body(NAME, weights="none", img_size=32, num_classes=0, embed_dim=16, depths=depths,
                       num_heads=[1, 1, 2, 2], window_size=2, drop_path_rate=drop_path_rate)


def loss_and_grads(model, params_of, x, seed=1):
    """One training step's loss and gradients; the seed fixes drop-path masks (replayed by checkpointing)."""
    params_of.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(x).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in params_of.named_parameters() if p.grad is not None}


def assert_same(a, b, rtol=1e-5, atol=1e-7):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(lb, la, rtol=rtol, atol=atol)
    assert ga.keys() == gb.keys() and len(ga) > 20
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=rtol, atol=atol, msg=name)


def block_names(body):
    return [n for n, _ in body.named_modules() if n.count(".") == 3 and ".blocks." in n]


def test_block_checkpointing_gives_the_same_loss_gradients_and_names():
    """fp32, train mode with drop path 0.2: the recompute replays the RNG, so even the masks match."""
    plain, body = tiny_body(), tiny_body()
    names, keys = [n for n, _ in body.named_modules()], list(body.state_dict())
    assert set_checkpointing(body, ENTRIES) == {0: 2, 1: 1, 2: 2}
    assert checkpointed_blocks(body) == [2, 1, 2, 0]
    assert summary(body) == "stage 0: 2/2 blocks, stage 1: 1/2 blocks, stage 2: 2/3 blocks (5 of 8 blocks)"
    # no module added, renamed or wrapped: adapters, checkpoints and peft exports see the same names
    assert [n for n, _ in body.named_modules()] == names and list(body.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), body.state_dict().values()))
    x = torch.randn(3, 3, 32, 32)
    body.train(), plain.train()
    assert_same(loss_and_grads(plain, plain, x), loss_and_grads(body, body, x), rtol=0, atol=0)
    body.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(body(x), plain(x))


def test_checkpointed_blocks_run_their_forward_twice_per_step():
    body = tiny_body()
    set_checkpointing(body, ENTRIES)
    calls = {n: 0 for n in block_names(body)}
    for name, block in body.named_modules():
        if name in calls:  # a pre-hook: non-reentrant recompute may stop before a block's forward returns
            block.register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls[name] + 1))
    loss_and_grads(body, body, torch.randn(2, 3, 32, 32))
    assert calls == {n: 2 if n in RECOMPUTED else 1 for n in calls}
    calls.update({n: 0 for n in calls})
    with torch.no_grad():  # evaluation: nothing to recompute
        body(torch.randn(2, 3, 32, 32))
    assert set(calls.values()) == {1}


def test_set_checkpointing_sets_exactly_the_listed_blocks_and_survives_deepcopy():
    body = tiny_body()
    set_checkpointing(body, [0, "2:2"])
    assert [layer.grad_checkpointing for layer in body.layers] == [True, False, False, False]
    assert "forward" in vars(body.layers[2]) and "forward" not in vars(body.layers[0])
    twin = copy.deepcopy(body)  # tests and adapter code deep-copy models
    assert checkpointed_blocks(twin) == [2, 0, 2, 0] and twin.layers[2].forward.__self__ is twin.layers[2]
    # a second call replaces the first; K = depth is timm's own whole-stage flag
    set_checkpointing(body, ["2:3", "1"])
    assert checkpointed_blocks(body) == [0, 2, 3, 0]
    assert [layer.grad_checkpointing for layer in body.layers] == [False, True, True, False]
    assert not any("forward" in vars(layer) for layer in body.layers)
    set_checkpointing(body, [])
    assert checkpointed_blocks(body) == [0, 0, 0, 0] and summary(body) == "off"
    assert set_checkpointing(body, None) is None  # None: leave the body as it is


def test_block_checkpointing_compiles_into_one_graph_with_the_same_gradients():
    body, plain = tiny_body(depths=[1, 1, 2, 1]), tiny_body(depths=[1, 1, 2, 1])
    set_checkpointing(body, ["2:1"])
    x = torch.randn(2, 3, 32, 32)
    explained = torch._dynamo.explain(body)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    try:
        compiled = torch.compile(body, backend="aot_eager")  # dynamo + AOT autograd, no C++ compiler needed
        assert_same(loss_and_grads(plain, plain, x), loss_and_grads(compiled, body, x))
    finally:
        torch._dynamo.reset()


def _ddp_worker(rank: int, world: int, store: str, x: torch.Tensor, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        body = tiny_body(drop_path_rate=0.0)
        body.patch_embed.requires_grad_(False)  # frozen weights inside DDP, as LoRA's body
        set_checkpointing(body, ENTRIES)
        ddp = torch.nn.parallel.DistributedDataParallel(body, find_unused_parameters=False,
                                                        gradient_as_bucket_view=True)
        half = x.shape[0] // world
        for _ in range(2):  # twice: DDP's hooks must be re-armed after a checkpointed backward
            result = loss_and_grads(ddp, body, x[rank * half:(rank + 1) * half])
        if rank == 0:
            torch.save(result[1], out)
    finally:
        torch.distributed.destroy_process_group()


def test_block_checkpointing_under_ddp_matches_one_process(tmp_path):
    """Two gloo processes, each half the batch, DDP averaging: the gradients of one plain process."""
    x = torch.randn(4, 3, 32, 32)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), x, str(tmp_path / "grads.pt")), nprocs=2, join=True)
    plain = tiny_body(drop_path_rate=0.0)
    plain.patch_embed.requires_grad_(False)
    _, want = loss_and_grads(plain, plain, x)
    got = torch.load(tmp_path / "grads.pt")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_stage3_with_block_checkpointing_gives_the_same_run(tiny_overrides, tmp_path, capsys):
    body = "model.body_kwargs={embed_dim: 16, depths: [1, 1, 2, 1], num_heads: [1, 1, 2, 2], window_size: 2}"
    base = tiny_overrides + ["train.epochs=1", "adapter.method=lora", "adapter.rank=4", body]
    plain = run_stage3(load_config(None, base + [f"run_dir={tmp_path / 'plain'}"]))
    gc = run_stage3(load_config(None, base + [f"run_dir={tmp_path / 'gc'}", 'train.grad_checkpointing=[0, "2:1"]']))
    out = capsys.readouterr().out
    assert "activation checkpointing: stage 0: 1/1 blocks, stage 2: 1/2 blocks (2 of 5 blocks)" in out
    a, b = (json.loads((r.path / "summary.json").read_text()) for r in (plain, gc))
    assert b["test"]["rel_l2"] == pytest.approx(a["test"]["rel_l2"], rel=1e-6, abs=0)
    rows = [[json.loads(x)["train/loss"] for x in (r.path / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"] for r in (plain, gc)]
    assert len(rows[0]) == 3 and rows[1] == pytest.approx(rows[0], rel=1e-6)
    # the stored config keeps the quoted entry and loads back
    assert load_config(str(gc.path / "config.yaml")).train.grad_checkpointing == [0, "2:1"]


def test_bench_build_config_takes_the_same_entries():
    kwargs = dict(model_name=NAME, device=torch.device("cpu"), rank=2, num_classes=5,
                  body_kwargs={"img_size": 32, "embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 2, 2),
                               "window_size": 2})
    plain = build_config("lora", **kwargs)
    gc = build_config("lora", grad_ckpt_stages=(0, "2:1"), **kwargs)
    assert plain["checkpointing"] == "off"
    assert gc["checkpointing"] == "stage 0: 1/1 blocks, stage 2: 1/2 blocks (2 of 5 blocks)"
    assert list(gc["model"].state_dict()) == list(plain["model"].state_dict())  # LoRA adapters included
    assert any(".lora_A" in k or "lora" in k.lower() for k in gc["model"].state_dict())
    with pytest.raises(ConfigError, match=r"--grad-checkpointing: entry '2:3': stage 2 has 2 blocks"):
        build_config("full", grad_ckpt_stages=("2:3",), **kwargs)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("value, message", [
    ('["2-6"]', r"entry '2-6' is malformed"),
    ('["two:6"]', r"entry 'two:6' is malformed"),
    ('[-1]', r"entry -1 is negative"),
    ('["2:0"]', r"entry '2:0' asks for K = 0 blocks of stage 2: K must be >= 1"),
    ('[0, 0]', r"stage 0 is listed twice \(0 and 0\)"),
    ('[2, "2:6"]', r"stage 2 is listed twice \(2 and '2:6'\)"),
    ('["1:1", "1:2"]', r"stage 1 is listed twice \('1:1' and '1:2'\)"),
    ('[0, 1, 2:6]', r"entry 126 is no Swin stage: YAML reads an unquoted 2:6 as the base-60 number 126, "
                    r"quote it: \"2:6\""),
])
def test_config_refuses_bad_entries(tiny_overrides, value, message):
    head = "train.grad_checkpointing=.* must be a list of distinct 0-based stage indices"  # the message it always gave
    with pytest.raises(ConfigError, match=head):
        load_config(None, tiny_overrides + [f"train.grad_checkpointing={value}"])
    with pytest.raises(ConfigError, match=message):
        load_config(None, tiny_overrides + [f"train.grad_checkpointing={value}"])


def test_config_accepts_and_normalises_entries(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ['train.grad_checkpointing=[0, "1", " 2 : 6 "]'])
    assert cfg.train.grad_checkpointing == [0, 1, "2:6"] and describe(cfg.train.grad_checkpointing) == "0 1 2:6"
    assert normalize(None) is None


FACTS = r"the body has 4 stages \(0\.\.3\) of depths \[2, 2, 3, 1\]"


@pytest.mark.parametrize("entries, message", [
    ([0, 4], r"train.grad_checkpointing=\[0, 4\]: stage 4 does not exist; " + FACTS + r" \(entry 4\)"),
    (["5:1"], r"stage 5 does not exist; " + FACTS + r" \(entry '5:1'\)"),
    (["2:4"], r"entry '2:4': stage 2 has 3 blocks, so K must be in 1\.\.3; " + FACTS),
    (["3:2"], r"entry '3:2': stage 3 has 1 block, so K must be in 1\.\.1; " + FACTS),
    (["1:0"], r"entry '1:0' asks for K = 0 blocks of stage 1: K must be >= 1; " + FACTS),
    (["2;1"], r"entry '2;1' is malformed; " + FACTS),
    ([1, "1:1"], r"stage 1 is listed twice \(1 and '1:1'\); " + FACTS),
])
def test_body_refuses_bad_entries_naming_the_entry_and_the_body(entries, message):
    body = tiny_body()
    with pytest.raises(ConfigError, match=message):
        set_checkpointing(body, entries)
    assert checkpointed_blocks(body) == [0, 0, 0, 0]  # nothing half-applied
    with pytest.raises(ConfigError, match=message):
        plan(body, entries)
