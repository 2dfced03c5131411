#!/usr/bin/env bash
# Pack the pinned packages a GPU machine without PyPI access may lack (POT, geomloss, bitsandbytes)
# into one small archive, .carry/site.tgz, to copy along with the checkout. For a machine whose
# Python already has torch and timm.
#
#   bash scripts/offline_packages.sh           # here, once (needs PyPI)
#   # on the GPU machine, before anything else:
#   mkdir -p /tmp/site && tar xzf .carry/site.tgz -C /tmp/site && export PYTHONPATH=/tmp/site
#
# The archive is kept small, since it is copied beside a checkout that already holds the 49 MB
# fractal checkpoint: POT's wheel is 33 MB (174 MB unpacked, nearly all of it the BSP-OT extension,
# which nothing here calls) and bitsandbytes' 43 MB (a library per CUDA version). The archive keeps
# POT without BSP-OT (a stub that raises if it is ever called) and with its extension modules
# stripped of debug symbols, and bitsandbytes with its CPU library and the one for the target's CUDA
# (CUDA_TAG, default 130: torch 2.11+cu130). Targets: Python 3.12, x86_64 manylinux.
# MAX_MIB=N warns when the tracked files plus the archive exceed N MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=${CUDA_TAG:-130}
pins=$(grep -E '^(POT|geomloss|bitsandbytes)==' requirements.txt)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$work/wheels" $pins
mkdir "$work/site"
for w in "$work"/wheels/*.whl; do python3 -m zipfile -e "$w" "$work/site"; done
rm "$work"/site/ot/bsp/bsp_wrap.*.so
cat >"$work/site/ot/bsp/bsp_wrap.py" <<'EOF'
"""Stand-in for POT's BSP-OT extension, left out of orca-rank's offline archive for size."""


def _missing(*args, **kwargs):
    raise ImportError("POT's BSP-OT extension is not in this archive (scripts/offline_packages.sh)")


bsp_solve_c = merge_bijections_c = _missing
EOF
# POT's Cython modules ship with debug symbols (emd_wrap: 4.3 MB, 0.3 MB stripped).
if command -v strip >/dev/null; then
  find "$work/site/ot" -name '*.so' -exec strip --strip-unneeded {} +
else
  echo "warning: no strip (binutils) here; the archive keeps POT's debug symbols" >&2
fi
find "$work/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name libbitsandbytes_cpu.so \
  ! -name "libbitsandbytes_cuda$cuda.so" -delete
mkdir -p .carry
tar czf .carry/site.tgz -C "$work/site" .
echo "$(du -h .carry/site.tgz | cut -f1) .carry/site.tgz: $(echo $pins | tr '\n' ' ')(CUDA $cuda)"
# The tracked files plus this archive: what is copied. A tracked file deleted in the working tree
# is copied as nothing, so stat's complaint about it is not an error.
tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}' || true)
total=$(( tree + $(stat -c %s .carry/site.tgz) ))
echo "tree and archive: about $(( total / 1048576 )) MiB (tracked tree $(( tree / 1048576 )) MiB + archive)"
if [ -n "${MAX_MIB:-}" ] && (( total > MAX_MIB * 1048576 )); then
  echo "warning: the tree and archive exceed MAX_MIB=$MAX_MIB MiB" >&2
fi
