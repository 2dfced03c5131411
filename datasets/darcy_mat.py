"""FNO's Darcy-flow files (``piececonst_r421_N1024_smooth{1,2}.mat``, Li et al. 2021) read into the
arrays the ``darcy`` task uses, with a one-line error for every way such a file can be wrong.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from datasets.errors import DataFileError

FNO_TRAIN_FILE = "piececonst_r421_N1024_smooth1.mat"
FNO_TEST_FILE = "piececonst_r421_N1024_smooth2.mat"

PathLike = Union[str, os.PathLike]

MAT_FIX = ("get FNO's files (Li et al., 2021) under the data root or set task.options.train_file/test_file, "
           "or use task.options.source='generate' to build the same distribution locally")


def _mat_missing(path: Path) -> DataFileError:
    return DataFileError(
        f"Darcy .mat file not found; expected one of FNO's files ({FNO_TRAIN_FILE} for train/val, "
        f"{FNO_TEST_FILE} for test) holding fields 'coeff' and 'sol' of shape [N, 421, 421]", str(path), MAT_FIX)


def load_darcy_mat(
    path: PathLike, n: Optional[int] = None, resolution: int = 421, subsample: int = 5
) -> Tuple[np.ndarray, np.ndarray]:
    """Read ``coeff`` and ``sol`` from an FNO Darcy .mat (v5 or v7.3) into the cache format.

    MATLAB v7.3 files are HDF5 with every axis reversed (MATLAB is column-major), so they are read
    with h5py, strided on disk (only the needed 85x85 of each 421x421 is read) and transposed back.
    A v5 file is read whole before its fields are checked, so a truncated file is reported as
    truncated, not as one that lacks ``sol``.

    Args:
        path: the .mat file.
        n: number of leading samples to return (all when None).
        resolution: expected spatial size of the stored fields (421 for FNO's files).
        subsample: stride ``[::subsample, ::subsample]``.

    Returns:
        coeff, sol: float32 ``[n, s, s]``.

    Raises:
        DataFileError: the file is missing, not a MATLAB file, truncated, or holds other fields,
            shapes or fewer samples than asked for (naming the path).
    """
    import h5py
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise _mat_missing(path)
    sl = slice(None, None, subsample)
    fields = {}
    try:
        if h5py.is_hdf5(path):
            with h5py.File(path, "r") as f:
                names = [k for k in f.keys() if not k.startswith("#")]
                _check_fields(path, names)
                for key in ("coeff", "sol"):
                    shape = tuple(reversed(f[key].shape))
                    _check_shape(path, key, shape, resolution)
                    count = shape[0] if n is None else n
                    _check_count(path, shape[0], count)
                    fields[key] = np.asarray(f[key][sl, sl, :count]).transpose(2, 1, 0)
        else:
            data = scipy.io.loadmat(str(path), variable_names=["coeff", "sol"])
            _check_fields(path, [name for name, _, _ in scipy.io.whosmat(str(path))])
            for key in ("coeff", "sol"):
                _check_shape(path, key, data[key].shape, resolution)
                count = data[key].shape[0] if n is None else n
                _check_count(path, data[key].shape[0], count)
                fields[key] = data[key][:count, sl, sl]
    except DataFileError:
        raise
    except (OSError, ValueError, IndexError, EOFError, KeyError, TypeError) as err:  # what scipy/h5py raise on bad bytes
        raise DataFileError(f"cannot read the Darcy .mat file, it is truncated or not a MATLAB file "
                            f"({type(err).__name__}: {str(err)[:120]})", str(path), MAT_FIX) from err
    if fields["coeff"].shape != fields["sol"].shape:
        raise DataFileError(f"'coeff' {fields['coeff'].shape} and 'sol' {fields['sol'].shape} differ in shape",
                            str(path), MAT_FIX)
    return tuple(np.ascontiguousarray(fields[k], dtype=np.float32) for k in ("coeff", "sol"))


def _check_fields(path: Path, names) -> None:
    absent = [k for k in ("coeff", "sol") if k not in names]
    if absent:
        raise DataFileError(
            f"no field {' or '.join(map(repr, absent))}; its fields are {sorted(names)}", str(path),
            "an FNO Darcy file holds 'coeff' and 'sol' [N, 421, 421]",
        )


def _check_shape(path: Path, key: str, shape, resolution: int) -> None:
    if len(shape) != 3 or tuple(shape[1:]) != (resolution, resolution):
        raise DataFileError(
            f"field {key!r} has shape {tuple(shape)}, expected [N, {resolution}, {resolution}]", str(path),
            "set task.options.resolution to the file's grid size",
        )


def _check_count(path: Path, available: int, wanted: int) -> None:
    if wanted > available:
        raise DataFileError(f"the file holds {available} samples but {wanted} were requested", str(path),
                            "ask for fewer samples (task.options.n_train, n_val, n_test)")
