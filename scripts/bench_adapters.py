"""The LoRA-family benchmark of the adapters issue: full fine-tuning, our LoRA, HF peft LoRA and our
QLoRA on Swin-B at batch 64 and 256, one GPU, one run.

    python scripts/bench_adapters.py              # writes results/bench/train_adapters.{json,md}
    python scripts/bench_adapters.py --compile    # extra arguments go to bench_train.py

It is ``scripts/bench_train.py`` restricted to those four configurations: one timing loop, one
method of measuring (interleaved blocks, warm-up excluded, median of repeats), so the two
benchmarks can never disagree about how a number was taken.
"""
from __future__ import annotations

import sys
from pathlib import Path


from bench_train import main
from orca.errors import exit_on_error

if __name__ == "__main__":
    extra = sys.argv[1:]
    defaults = [] if "--methods" in extra else ["--methods", "full", "lora", "peft", "qlora"]
    tag = [] if "--tag" in extra else ["--tag", "_adapters" + ("_compile" if "--compile" in extra else "")]
    sys.exit(exit_on_error(main, defaults + tag + extra))
