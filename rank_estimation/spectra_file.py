"""The on-disk form of stage 3's Delta W spectra, shared by the writer (``orca.delta_w``) and the
reader (``scripts/hypothesis.py``), without importing torch.

Why gzip: the singular values of every body Linear are ~140 kB of decimal digits per full
fine-tuning run, and run directories are committed, so they weigh on every clone (and on every
copy of the tree sent to a GPU machine). Compressed they take 40%; the content is the same JSON
(``zcat delta_w.json.gz``). Older run directories hold a plain ``delta_w.json``, which the reader
still takes.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Dict, Optional

from orca.errors import reading

DELTA_W_FILE = "delta_w.json.gz"
LEGACY_DELTA_W_FILE = "delta_w.json"  # uncompressed, written by older versions


def encode_spectra(text: str) -> bytes:
    """``text`` (the JSON document) gzipped with a zero timestamp, so equal spectra give equal bytes."""
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def find_spectra(run_dir: Path) -> Optional[Path]:
    """The run's spectra file, compressed or legacy, or None when it has neither."""
    for name in (DELTA_W_FILE, LEGACY_DELTA_W_FILE):
        path = Path(run_dir) / name
        if path.is_file():
            return path
    return None


def read_spectra(path: Path) -> Dict[str, Any]:
    """The JSON document of a ``delta_w.json.gz`` or a legacy ``delta_w.json``.

    Raises:
        FileReadError: the file is neither valid gzip-compressed JSON nor valid JSON, naming the file.
    """
    path = Path(path)
    raw = path.read_bytes()
    with reading(path, "a Delta W spectra file", "rerun the stage-3 run that wrote it, or move the file aside"):
        text = gzip.decompress(raw).decode("utf-8") if path.suffix == ".gz" else raw.decode("utf-8")
        return json.loads(text)
