"""delta_w.json.gz: stage 3 keeps the spectra of the full fine-tuning update Delta W = W_ft - W_0, so
scripts/hypothesis.py analysis (c) needs no checkpoint (checkpoints are not committed)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from orca.errors import FileReadError
from orca.config import load_config
from orca.runs import RunDir
from orca.delta_w import body_linear_weights, effective_weights
from orca.train import initial_model, run_stage3
from orca.spectra import (
    DELTA_W_FILE, LEGACY_DELTA_W_FILE, encode_spectra, find_spectra, read_spectra,
    delta_w_ranks,
    delta_w_spectra,
    effective_rank_energy,
    energy_rank_from_spectrum,
    spectrum_ranks,
    stable_rank,
    stable_rank_from_spectrum,
)

ENERGIES = (0.5, 0.8, 0.9, 0.99, 1.0)
pytestmark = pytest.mark.usefixtures("one_thread")


def _low_rank(rng, shape, rank, scale=1.0):
    return scale * rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))


def _check_against_rebuilt_w0(run_path, tuned, spectra, energies=ENERGIES):
    """The stored spectra give delta_w_ranks(W_0 rebuilt from config.yaml, tuned) at every threshold."""
    _, model = initial_model(load_config(str(run_path / "config.yaml")))
    base = {f"{n}.weight": w for n, w in body_linear_weights(model).items()}
    names = list(spectra)
    assert sorted(f"{n}.weight" for n in names) == sorted(base)
    for energy in energies:
        ref = delta_w_ranks(base, tuned, names, energy=energy)
        for n in names:
            got = spectrum_ranks(spectra[n]["s"], energy)
            assert got["energy_rank"] == ref[n]["energy_rank"], (n, energy)
            assert got["stable_rank"] == pytest.approx(ref[n]["stable_rank"], rel=1e-6, abs=0), n
            assert got["fro"] == pytest.approx(ref[n]["fro"], rel=1e-6, abs=0), n
            assert got["max_rank"] == ref[n]["max_rank"], n
    for n in names:
        w0 = base[f"{n}.weight"]
        assert spectra[n]["shape"] == list(w0.shape) and len(spectra[n]["s"]) == min(w0.shape)
        assert spectra[n]["w0_fro"] == pytest.approx(float(w0.double().norm()), rel=1e-6, abs=0)
    return base


# ----------------------------------------------------------------------------- (d) spectrum == matrix
@pytest.mark.parametrize("shape, rank", [((30, 20), 1), ((20, 30), 3), ((64, 8), 5), ((16, 16), 16)])
def test_spectrum_ranks_equal_matrix_ranks(shape, rank):
    rng = np.random.default_rng(rank)
    w0 = rng.standard_normal(shape)
    d = _low_rank(rng, shape, rank, 1e-2)
    spec = delta_w_spectra({"a.weight": w0}, {"a.weight": w0 + d})["a"]
    assert spec["shape"] == list(shape) and len(spec["s"]) == min(shape)
    assert spec["w0_fro"] == pytest.approx(np.linalg.norm(w0), rel=1e-6)
    s_exact = np.linalg.svd(d, compute_uv=False)
    for energy in ENERGIES:
        matrix = effective_rank_energy(d, energy)
        assert matrix <= rank
        assert energy_rank_from_spectrum(s_exact, energy) == matrix  # one implementation: exact
        assert spectrum_ranks(spec["s"], energy)["energy_rank"] == matrix  # stored, rounded spectrum
    assert stable_rank_from_spectrum(s_exact) == stable_rank(d)
    assert spectrum_ranks(spec["s"])["stable_rank"] == pytest.approx(stable_rank(d), rel=1e-6, abs=0)
    assert spectrum_ranks(spec["s"])["fro"] == pytest.approx(np.linalg.norm(d), rel=1e-6)
    # Order of the stored values does not matter; a zero update has ranks 0.
    assert spectrum_ranks(spec["s"][::-1], 0.9) == spectrum_ranks(spec["s"], 0.9)
    assert spectrum_ranks([0.0, 0.0]) == {"energy_rank": 0, "stable_rank": 0.0, "fro": 0.0, "max_rank": 2}


def test_spectrum_errors():
    with pytest.raises(ValueError, match="1-D"):
        spectrum_ranks([[1.0, 2.0]])
    with pytest.raises(ValueError, match=">= 0"):
        spectrum_ranks([1.0, -1.0])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        energy_rank_from_spectrum([1.0], 0.0)
    with pytest.raises(ValueError, match="missing"):
        delta_w_spectra({"a.weight": np.ones((2, 2))}, {}, ["a"])


# ----------------------------------------------------------------------------- (a), (b) stage 3
def test_full_run_writes_delta_w_equal_to_checkpoint_vs_rebuilt_w0(tiny_overrides, capsys):
    run = run_stage3(load_config(None, tiny_overrides))
    path = run.path / DELTA_W_FILE
    assert path.is_file() and (run.path / "summary.json").is_file()
    assert "[stage3] delta_w.json.gz: Delta W spectra of 19 body Linears" in capsys.readouterr().out
    d = read_spectra(path)
    assert d["method"] == "full" and d["resumed"] is False and "initial_model" in d["W_0"]
    assert d["W_ft"].startswith("ckpt/best.pt")
    spectra = d["layers"]
    # Every Linear of the body's stages: 4 blocks x (qkv, proj, fc1, fc2) + 3 downsample reductions.
    assert len(spectra) == 19 and sum(n.endswith("downsample.reduction") for n in spectra) == 3
    best = RunDir(run.path).load_checkpoint("best")["model"]
    tuned = {f"{n}.weight": best[f"{n}.weight"] for n in spectra}
    base = _check_against_rebuilt_w0(run.path, tuned, spectra)
    # W_0 is the true start: fine-tuning moved each weight by a small fraction of itself (a wrong
    # W_0, another random init, gives ~1.4).
    rel = [spectrum_ranks(v["s"])["fro"] / v["w0_fro"] for v in spectra.values()]
    assert d["median_rel_update"] == pytest.approx(float(np.median(rel)), rel=1e-6)
    assert 0 < d["median_rel_update"] < 0.3
    # ... and the checkpoint did move every Linear (so the ranks above are not all 0).
    assert all(not torch.equal(base[k], tuned[k]) for k in tuned)


def test_delta_lora_run_counts_w_plus_sba(tiny_overrides):
    """Delta-LoRA moves W and trains B A: its Delta W is W + s B A - W_0 of the best checkpoint."""
    from orca.adapters import build_method

    cfg = load_config(None, tiny_overrides + ["train.epochs=1", "adapter.method=delta_lora", "adapter.rank=2",
                                              "adapter.delta_lora_start=0"])
    run = run_stage3(cfg)
    d = read_spectra(run.path / DELTA_W_FILE)
    assert d["method"] == "delta_lora" and "W + s B A" in d["W_ft"] and len(d["layers"]) == 19
    _, model = initial_model(cfg)
    build_method(cfg.adapter).prepare(model)
    model.load_state_dict(RunDir(run.path).load_checkpoint("best")["model"])
    tuned = {f"{n}.weight": w for n, w in effective_weights(model, list(d["layers"])).items()}
    _check_against_rebuilt_w0(run.path, tuned, d["layers"], energies=(0.9,))
    assert d["median_rel_update"] < 0.3


def test_lora_run_writes_no_delta_w(tiny_overrides):
    run = run_stage3(load_config(None, tiny_overrides + ["train.epochs=1", "adapter.method=lora", "adapter.rank=4"]))
    assert (run.path / "summary.json").is_file() and not (run.path / DELTA_W_FILE).exists()


def test_a_failing_delta_w_keeps_the_run(tiny_overrides, monkeypatch, capsys):
    import orca.train

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(orca.train, "write_delta_w", broken)
    run = run_stage3(load_config(None, tiny_overrides + ["train.epochs=1"]))
    assert json.loads((run.path / "summary.json").read_text())["test"]["rel_l2"] > 0
    assert not (run.path / DELTA_W_FILE).exists()
    assert "delta_w.json.gz was NOT written (RuntimeError: disk full)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the file itself
def test_spectra_file_round_trip_legacy_and_bad_input(tmp_path):
    """Gzipped JSON with a zero timestamp (equal spectra, equal bytes), a legacy plain delta_w.json
    still read, the compressed file preferred when both exist, and a broken file named in the error."""
    doc = {"method": "full", "layers": {"body.layers.0.blocks.0.attn.qkv": {"s": [1.5, 0.25], "w0_fro": 2.0}}}
    text = json.dumps(doc)
    assert encode_spectra(text) == encode_spectra(text)
    assert len(encode_spectra(text * 50)) < len(text * 50) / 10  # it does compress
    assert find_spectra(tmp_path) is None
    (tmp_path / LEGACY_DELTA_W_FILE).write_text(text)
    assert find_spectra(tmp_path) == tmp_path / LEGACY_DELTA_W_FILE and read_spectra(find_spectra(tmp_path)) == doc
    (tmp_path / DELTA_W_FILE).write_bytes(encode_spectra(text))
    assert find_spectra(tmp_path) == tmp_path / DELTA_W_FILE and read_spectra(find_spectra(tmp_path)) == doc
    bad = tmp_path / "bad" / DELTA_W_FILE
    bad.parent.mkdir()
    bad.write_bytes(encode_spectra(text)[:-8])  # truncated: no gzip trailer
    with pytest.raises(FileReadError, match=r"cannot read a Delta W spectra file \(EOFError: .*\), .*bad/delta_w\.json\.gz, "):
        read_spectra(bad)
    bad.write_text(text)  # plain JSON under the .gz name
    with pytest.raises(FileReadError, match=r"cannot read a Delta W spectra file \(BadGzipFile: .*\), .*bad/delta_w\.json\.gz, "):
        read_spectra(bad)
