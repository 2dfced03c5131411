"""Darcy flow: solver against known numbers, generator against FNO's statistics, cache, loaders, task.

Everything is seeded; the one slow test (8 samples solved at 421x421) takes a few seconds on 2 cores.
"""
import dataclasses
import inspect
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse.linalg
import torch

import datasets
from datasets import darcy, darcy_solver, multifrontal
from datasets.errors import DataFileError
from datasets.darcy import (
    DarcyOptions,
    RelativeL2,
    UnitGaussianNormalizer,
    check_darcy_arrays,
    generate_darcy,
    generator_params,
    load_darcy_mat,
)
from datasets.darcy_solver import CoefficientPrior, darcy_stats, generate_sample, solve_darcy

#: The project's reference statistics, committed as results/reference/darcy_stats.json (a copy of
#: shared/reference/): the test must run on any clean clone, CI included, never skip for a path.
REFERENCE = Path(__file__).resolve().parents[1] / "results/reference/darcy_stats.json"
STAT_KEYS = {  # our key -> darcy_stats.json key
    "max_u": "max_u",
    "mean_u": "mean_u",
    "l2_norm_u_flattened": "l2_norm_u_85x85_flattened",
    "fraction_of_pixels_with_a_high": "fraction_of_pixels_with_a_12",
}


# ---------------------------------------------------------------------------------- solver
def test_constant_coefficient_matches_poisson_maximum():
    # a = 1, f = 1 on a 101 grid: the centre cell sits at (0.5, 0.5), where the exact Poisson
    # solution is 0.0736713...; FD + splines must agree to 4 significant digits.
    u = solve_darcy(np.ones((101, 101)))
    assert float(f"{u.max():.4g}") == 0.07367
    assert np.unravel_index(u.argmax(), u.shape) == (50, 50)


def _spsolve_reference(a, forcing=None):
    """u by the same discretisation, solved by SuperLU's pivoted spsolve instead of our fronts."""
    K = a.shape[0]
    to_nodes, to_centres = darcy_solver.spline_matrices(K)
    f = np.ones((K, K)) if forcing is None else forcing
    f_nodes = to_nodes @ f @ to_nodes.T
    order, rank = multifrontal.elimination_order(K - 2)
    x = scipy.sparse.linalg.spsolve(multifrontal.assemble_operator(to_nodes @ a @ to_nodes.T),
                                    f_nodes[1:-1, 1:-1].ravel()[order])
    u = np.zeros((K, K))
    u[1:-1, 1:-1] = x[rank].reshape(K - 2, K - 2)
    return to_centres @ u @ to_centres.T


@pytest.mark.parametrize("K", [5, 6, 7, 12, 23, 40, 41])
def test_multifrontal_solve_equals_sparse_direct_solve(K):
    # Sizes that give leaf-only trees, odd/even halvings and uneven boxes; a = 12/3 like FNO, a 1e4
    # contrast whose splined coefficient is far from SPD, and a random forcing.
    rng = np.random.default_rng(K)
    for a_high, a_low, forcing in [(12.0, 3.0, None), (100.0, 0.01, rng.standard_normal((K, K)))]:
        a = darcy_solver.CoefficientPrior(a_high=a_high, a_low=a_low).sample(rng, K)
        ref = _spsolve_reference(a, forcing)
        u = solve_darcy(a, forcing)
        assert np.linalg.norm(u - ref) <= 1e-10 * np.linalg.norm(ref)


def test_solver_falls_back_to_pivoting_lu(monkeypatch):
    a = darcy_solver.CoefficientPrior().sample(np.random.default_rng(0), 23)
    ref = _spsolve_reference(a)

    def singular(*args):
        raise np.linalg.LinAlgError("Singular matrix")

    for broken in (singular, lambda diag, east, south, b: np.zeros_like(b)):  # raises / fails the residual check
        monkeypatch.setattr(multifrontal, "multifrontal_solve", broken)
        u = solve_darcy(a)
        assert np.linalg.norm(u - ref) <= 1e-10 * np.linalg.norm(ref)


def test_spline_matrices_equal_cubic_splines_along_each_axis():
    # M @ F @ M.T is MATLAB's interp2(..., 'spline'): a not-a-knot CubicSpline along each axis.
    from scipy.interpolate import CubicSpline

    K = 17
    centres, nodes = (np.arange(K) + 0.5) / K, np.linspace(0.0, 1.0, K)
    F = np.random.default_rng(1).standard_normal((K, K))
    to_nodes, to_centres = darcy_solver.spline_matrices(K)
    for M, x_from, x_to in ((to_nodes, centres, nodes), (to_centres, nodes, centres)):
        rows = CubicSpline(x_from, F, axis=0, bc_type="not-a-knot")(x_to)
        both = CubicSpline(x_from, rows, axis=1, bc_type="not-a-knot")(x_to)
        np.testing.assert_allclose(M @ F @ M.T, both, rtol=0, atol=1e-12 * np.abs(both).max())


def test_nested_dissection_is_a_permutation_with_the_root_separator_last():
    n = 23
    order = multifrontal.nested_dissection(n)
    np.testing.assert_array_equal(np.sort(order), np.arange(n * n))
    np.testing.assert_array_equal(order[-n:], (n // 2) * n + np.arange(n))  # the middle row splits the square first


def test_generator_matches_fno_statistics_at_421(tmp_path):
    ref = json.loads(REFERENCE.read_text())
    coeff, sol = generate_darcy(8, tmp_path, seed=0, workers=2, progress=False)
    assert coeff.shape == sol.shape == (8, 85, 85) and sol.dtype == np.float32
    assert set(np.unique(coeff)) == {3.0, 12.0}
    assert (sol >= 0).all()
    stats = darcy_stats(coeff, sol, a_high=12.0)
    for key, ref_key in STAT_KEYS.items():
        lo, p05, _, p95, hi = ref[ref_key]
        values = stats["per_sample"][key]
        # The reference [min, max] are the extremes of 40 samples, so each new sample falls outside
        # with probability ~2/41; 3+ of 8 outside would happen < 1% of the time for a matching
        # generator. (Seed 0 has 2 of 8 outside for mean_u: 0.00472 and 0.00721.)
        inside = ((values >= lo) & (values <= hi)).sum()
        assert inside >= 6, f"{key}: only {inside}/8 in [{lo}, {hi}]: {values}"
        assert p05 <= np.median(values) <= p95, f"{key}: median {np.median(values)} outside [{p05}, {p95}]"
    assert abs(stats["overall_std_u"] - ref["other_facts"]["overall_std_u"]) < 0.0006


def test_sample_is_identical_alone_in_batch_and_across_workers(tmp_path):
    kw = dict(resolution=61, subsample=5, seed=3, progress=False)
    one_c, one_s = generate_darcy(4, tmp_path / "w1", workers=1, **kw)
    two_c, two_s = generate_darcy(4, tmp_path / "w2", workers=2, **kw)
    np.testing.assert_array_equal(one_c, two_c)
    np.testing.assert_array_equal(one_s, two_s)
    for i in (0, 3):
        c, s = generate_sample(i, seed=3, resolution=61, subsample=5)
        np.testing.assert_array_equal(c, two_c[i])
        np.testing.assert_array_equal(s, two_s[i])
    other_stream, _ = generate_sample(0, seed=3, stream="test", resolution=61, subsample=5)
    assert not np.array_equal(other_stream, two_c[0])


# ---------------------------------------------------------------------------------- cache
def test_cache_reuses_grows_and_keys_on_parameters(tmp_path, monkeypatch):
    kw = dict(resolution=41, subsample=5, seed=1, workers=1, progress=False)
    c3, s3 = generate_darcy(3, tmp_path, **kw)
    folder = darcy.cache_path(tmp_path, generator_params(1, 41, 5))
    assert json.loads((folder / "params.json").read_text()) == generator_params(1, 41, 5)
    assert not list(folder.glob(".*tmp"))  # atomic writes leave no temp files

    calls = []
    real_solve = darcy_solver.solve_darcy

    def counting_solve(a):
        calls.append(1)
        return real_solve(a)

    def failing_solve(a):
        raise RuntimeError("solver called")

    monkeypatch.setattr(darcy_solver, "solve_darcy", failing_solve)
    c2, _ = generate_darcy(2, tmp_path, **kw)  # served from the cache: no solve
    np.testing.assert_array_equal(c2, c3[:2])
    with pytest.raises(RuntimeError, match="solver called"):
        generate_darcy(3, tmp_path, **kw, prior=CoefficientPrior(a_low=4.0))  # another parameter set: regenerates

    monkeypatch.setattr(darcy_solver, "solve_darcy", counting_solve)
    c5, s5 = generate_darcy(5, tmp_path, **kw)
    assert len(calls) == 2  # only indices 3 and 4 were missing
    np.testing.assert_array_equal(c5[:3], c3)
    np.testing.assert_array_equal(s5[:3], s3)
    with np.load(folder / "train.npz") as z:
        assert z["coeff"].shape == (5, 9, 9) and z["coeff"].dtype == np.float32


# ---------------------------------------------------------------------------------- .mat files
def _full_res(n, resolution=21):
    pairs = [generate_sample(i, seed=0, resolution=resolution, subsample=1) for i in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _save_v73(path, **fields):
    # MATLAB v7.3: HDF5 behind a 512-byte header, arrays stored with their axes reversed.
    with h5py.File(path, "w", userblock_size=512) as f:
        for k, v in fields.items():
            f.create_dataset(k, data=np.asarray(v).transpose(2, 1, 0))
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, created by a test".ljust(128))


@pytest.mark.parametrize("version", ["v5", "v7.3"])
def test_mat_round_trip_equals_cache_format(tmp_path, version):
    coeff, sol = _full_res(4)
    path = tmp_path / f"darcy_{version}.mat"
    if version == "v5":
        scipy.io.savemat(path, {"coeff": coeff, "sol": sol})
    else:
        _save_v73(path, coeff=coeff, sol=sol)
    lc, ls = load_darcy_mat(path, n=3, resolution=21, subsample=5)
    gc, gs = generate_darcy(3, tmp_path / "cache", seed=0, resolution=21, subsample=5, workers=1, progress=False)
    assert lc.shape == gc.shape == (3, 5, 5) and lc.dtype == gc.dtype == np.float32
    np.testing.assert_array_equal(lc, gc)
    np.testing.assert_array_equal(ls, gs)
    assert lc.flags.c_contiguous


def test_mat_errors_are_clear(tmp_path):
    with pytest.raises(DataFileError, match=r"not found; .*'coeff' and 'sol'.*smooth1\.mat, .*source='generate'"):
        load_darcy_mat(tmp_path / "piececonst_r421_N1024_smooth1.mat")
    u = np.zeros((2, 21, 21))
    scipy.io.savemat(tmp_path / "v5.mat", {"a": u, "sol": u})
    with pytest.raises(ValueError, match=r"no field 'coeff'; its fields are \['a', 'sol'\]"):
        load_darcy_mat(tmp_path / "v5.mat", resolution=21)
    _save_v73(tmp_path / "v73.mat", coeff=u, u=u)
    with pytest.raises(ValueError, match=r"no field 'sol'; its fields are \['coeff', 'u'\]"):
        load_darcy_mat(tmp_path / "v73.mat", resolution=21)
    scipy.io.savemat(tmp_path / "shape.mat", {"coeff": u, "sol": u})
    with pytest.raises(ValueError, match=r"'coeff' has shape \(2, 21, 21\), expected \[N, 421, 421\]"):
        load_darcy_mat(tmp_path / "shape.mat")
    with pytest.raises(ValueError, match="holds 2 samples but 5 were requested"):
        load_darcy_mat(tmp_path / "shape.mat", n=5, resolution=21)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "truncated_v73"])
def test_unreadable_mat_names_the_file_not_a_missing_field(tmp_path, damage):
    u = np.zeros((2, 21, 21))
    path = tmp_path / "x.mat"
    if damage == "garbage":
        path.write_bytes(b"not a MATLAB file " * 40)
    else:
        (scipy.io.savemat(path, {"coeff": u, "sol": u}) if damage == "truncated"
         else _save_v73(path, coeff=u, sol=u))
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) * 3 // 4])  # 'sol' is cut short
    before = path.read_bytes()
    with pytest.raises(DataFileError) as err:
        load_darcy_mat(path, resolution=21)
    message = str(err.value)
    assert message.startswith("cannot read the Darcy .mat file, it is truncated or not a MATLAB file (")
    assert f", {path}, " in message and "no field" not in message
    assert path.read_bytes() == before


def test_array_checks_name_split_and_count():
    c = np.ones((4, 5, 5), np.float32)
    s = np.ones((4, 5, 5), np.float32)
    s[1, 0, 0] = np.nan
    s[3, 2, 2] = np.inf
    with pytest.raises(ValueError, match=r"darcy val split: 2 of 4 samples contain NaN or inf \(first at index 1\)"):
        check_darcy_arrays(c, s, "val")
    with pytest.raises(ValueError, match=r"darcy train split: coeff \(4, 5, 5\) and sol \(4, 5, 6\)"):
        check_darcy_arrays(c, np.ones((4, 5, 6)), "train")


def _write_fno_pair(root, n_train_file=5, n_test_file=3, nan_in_test=False):
    coeff, sol = _full_res(n_train_file + n_test_file)
    scipy.io.savemat(root / "s1.mat", {"coeff": coeff[:n_train_file], "sol": sol[:n_train_file]})
    test_sol = sol[n_train_file:].copy()
    if nan_in_test:
        test_sol[1, 5, 10] = np.nan  # on the [::5] grid
    _save_v73(root / "s2.mat", coeff=coeff[n_train_file:], sol=test_sol)
    return coeff, sol


def test_mat_task_splits_and_errors(tmp_path):
    coeff, _ = _write_fno_pair(tmp_path)
    opts = dict(source="mat", train_file="s1.mat", test_file="s2.mat", resolution=21, n_train=3, n_val=2, n_test=2)
    task = datasets.build_task("darcy", DarcyOptions(**opts), str(tmp_path))
    assert task.info["sizes"] == {"train": 3, "val": 2, "test": 2}
    a_norm = UnitGaussianNormalizer((5, 5)).fit(coeff[:3, ::5, ::5])
    expected_val_x = a_norm.encode(torch.as_tensor(coeff[3:5, ::5, ::5]))
    torch.testing.assert_close(task.val.x[:, 0], expected_val_x)  # val = smooth1[3:5], normalised with train stats
    with pytest.raises(ValueError, match=r"holds 5 samples but n_train \+ n_val = 3 \+ 3 = 6.*lower n_val \(<= 2\)"):
        datasets.build_task("darcy", DarcyOptions(**{**opts, "n_val": 3}), str(tmp_path))
    _write_fno_pair(tmp_path, nan_in_test=True)
    with pytest.raises(ValueError, match=r"darcy test split: 1 of 2 samples contain NaN or inf"):
        datasets.build_task("darcy", DarcyOptions(**opts), str(tmp_path))


# ---------------------------------------------------------------------------------- normalizer, loss
def test_normalizer_round_trip_and_unbiased_std():
    torch.manual_seed(0)
    x = torch.randn(10, 4, 4) * 3 + 1
    x[:, 0, 0] = 2.0  # a constant pixel: std 0, eps keeps it finite
    norm = UnitGaussianNormalizer((4, 4)).fit(x)
    torch.testing.assert_close(norm.std, torch.std(x, dim=0), rtol=0, atol=0)
    torch.testing.assert_close(norm.std[1, 1], torch.sqrt(((x[:, 1, 1] - x[:, 1, 1].mean()) ** 2).sum() / 9))
    z = norm.encode(x)
    assert torch.isfinite(z).all() and z[:, 0, 0].abs().max() == 0
    torch.testing.assert_close(z[:, 1, 1].std(), 1.0 / (1 + 1e-5 / norm.std[1, 1]))
    torch.testing.assert_close(norm.decode(z), x)
    loaded = UnitGaussianNormalizer((4, 4))
    loaded.load_state_dict(norm.state_dict())
    torch.testing.assert_close(loaded.inverse()(z), x)


def test_relative_l2_hand_computed():
    y = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # norms 5 and 2
    pred = torch.tensor([[3.0, 1.0], [1.0, 2.0]])  # errors [0, -3] -> 3/5 ; [1, 0] -> 1/2
    torch.testing.assert_close(RelativeL2("none")(pred, y), torch.tensor([0.6, 0.5]))
    torch.testing.assert_close(RelativeL2("sum")(pred, y), torch.tensor(1.1))
    torch.testing.assert_close(RelativeL2()(pred, y), torch.tensor(0.55))
    torch.testing.assert_close(RelativeL2("sum", decode=lambda p: 2 * p)(pred / 2, y), torch.tensor(1.1))
    with pytest.raises(ValueError, match=r"reduction must be one of \('sum', 'mean', 'none'\), got 'max'"):
        RelativeL2("max")


# ---------------------------------------------------------------------------------- task
def test_generated_task_contract_and_disjoint_splits(tmp_path):
    assert "darcy" in datasets.TASKS.names()
    opts = DarcyOptions(resolution=21, n_train=4, n_val=2, n_test=3, workers=1, seed=5)
    task = datasets.build_task("darcy", opts, str(tmp_path))
    assert (task.kind, task.out_shape, task.in_channels, task.metric_name) == ("dense", (5, 5), 3, "rel_l2")
    assert task.info["sizes"] == {"train": 4, "val": 2, "test": 3} and task.info["seed"] == 5
    x, y = task.train[0]
    assert x.shape == (3, 5, 5) and y.shape == (5, 5) and x.dtype == y.dtype == torch.float32
    torch.testing.assert_close(x[1, 2], torch.linspace(0, 1, 5))  # x varies along columns
    torch.testing.assert_close(x[2, :, 2], torch.linspace(0, 1, 5))  # y along rows

    # train = pool[:4], val = pool[4:6] of the train stream; test from the test stream, all distinct
    cached = dict(cache_root=tmp_path / "darcy", seed=5, resolution=21, workers=1, progress=False)
    pool_c, pool_s = generate_darcy(6, **cached)
    test_c, _ = generate_darcy(3, stream="test", **cached)
    torch.testing.assert_close(task.train.y, torch.as_tensor(pool_s[:4]))
    torch.testing.assert_close(task.val.y, torch.as_tensor(pool_s[4:]))
    assert len({c.tobytes() for c in np.concatenate([pool_c, test_c])}) == 9

    # loss/metric work on decoded u: the encoded target scores exactly 0; TaskData.decode inverts it.
    ys = task.test.y
    encoded = task.decode.normalizer.encode(ys)
    torch.testing.assert_close(task.decode(encoded), ys)
    assert task.loss(encoded, ys).abs() < 1e-5 and task.loss(encoded, ys).ndim == 0
    assert task.metric(task.decode(encoded) * 1.1, ys).shape == (3,)
    torch.testing.assert_close(task.metric(ys * 1.1, ys), torch.full((3,), 0.1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(source="hdf"), r"DarcyOptions.source='hdf' is invalid: allowed values are 'generate' and 'mat'"),
        (dict(n_train=1), r"n_train=1 is invalid: must be an int >= 2"),
        (dict(workers=0), r"workers=0 is invalid"),
        (dict(subsample=0), r"subsample=0 is invalid: must be an int in \[1, resolution=421\)"),
        (dict(a_low=-3.0), r"a_low=-3.0 is invalid: must be a finite number > 0"),
        (dict(seed=-1), r"seed=-1 is invalid"),
    ],
)
def test_options_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DarcyOptions(**kwargs)


# ------------------------------------------------------------------------------------------------
# the generator's parameters, written once
# ------------------------------------------------------------------------------------------------
def test_the_coefficient_law_is_defined_once_and_keeps_the_cache_keys():
    """FNO's values live in CoefficientPrior alone: the task's options default to it, the functions take
    it whole, and the cache folders (a hash of the parameters) are the ones generated before."""
    assert dataclasses.astuple(CoefficientPrior()) == (12.0, 3.0, 2.0, 3.0)
    assert DarcyOptions().prior == CoefficientPrior()
    assert DarcyOptions(a_low=4.0).prior == CoefficientPrior(a_low=4.0)
    for fn in (darcy.generator_params, darcy.generate_darcy, generate_sample):
        names = set(inspect.signature(fn).parameters)
        assert "prior" in names and not names & {"a_high", "a_low", "alpha", "tau"}, fn.__name__
    assert darcy.cache_path("/x", generator_params()).name == "r421to85_seed0_2645be217a0a55db"
    assert darcy.cache_path("/x", generator_params(1, 41, 5, CoefficientPrior(a_low=4.0))).name == \
        "r41to9_seed1_49c574640d351f7e"
    c4, _ = generate_sample(0, resolution=41, subsample=1, prior=CoefficientPrior(a_low=4.0))
    c3, _ = generate_sample(0, resolution=41, subsample=1)
    assert set(np.unique(c4)) == {4.0, 12.0} and np.array_equal(c3 == 3.0, c4 == 4.0)  # same field, other value
