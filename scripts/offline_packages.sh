#!/usr/bin/env bash
# Pack the pinned packages a lent GPU machine lacks (POT, geomloss, bitsandbytes) into one small
# archive that travels with the working tree: .carry/site.tgz.
#
#   bash scripts/device_packages.sh            # here, once (needs PyPI)
#   # on the GPU machine, first thing in the command (carry: [".carry"]):
#   mkdir -p /tmp/site && tar xzf .carry/site.tgz -C /tmp/site && export PYTHONPATH=/tmp/site
#
# Why not the wheels themselves: the tree already holds the 49 MB fractal checkpoint and a call may
# carry 64 MiB in all, while POT's wheel is 33 MB (174 MB unpacked, nearly all of it the BSP-OT
# extension, which nothing here calls) and bitsandbytes' 43 MB (a library per CUDA version). The
# archive keeps POT without BSP-OT (a stub that raises if it is ever called) and bitsandbytes with
# its CPU library and the one for the image's CUDA (CUDA_TAG, default 130: torch 2.11+cu130), and
# POT's extension modules without their debug symbols.
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
"""Stand-in for POT's BSP-OT extension, left out of orca-rank's device archive for size."""


def _missing(*args, **kwargs):
    raise ImportError("POT's BSP-OT extension is not in this archive (scripts/device_packages.sh)")


bsp_solve_c = merge_bijections_c = _missing
EOF
# POT's Cython modules ship with debug symbols (emd_wrap: 4.3 MB, 0.3 MB stripped); stripped, the
# archive stays inside the 64 MiB a call may carry beside results/ (session 11: it had grown past).
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
# What a call would carry: the tracked tree plus this archive, against the device's 64 MiB (session 11's
# first call was refused at 63 MiB by this count, so warn with a margin).
# (a tracked file deleted here travels as nothing, so stat's complaint about it is not an error)
tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}' || true)
total=$(( tree + $(stat -c %s .carry/site.tgz) ))
echo "a call carries about $(( total / 1048576 )) MiB (tracked tree $(( tree / 1048576 )) MiB + archive) of 64 MiB"
if (( total > 60 * 1048576 )); then
  echo "warning: less than 4 MiB left under the 64 MiB a device call may carry; keep results/ lean" >&2
fi
