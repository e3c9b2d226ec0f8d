#!/bin/bash
# Wheels for benchmarks/gpu_check.sh, fetched here (where PyPI is reachable) into .whl/ for a GPU
# machine that can fetch nothing (Python 3.12, x86-64; its image has torch, Triton, peft,
# tokenizers, accelerate, pytest, but not datasets or TRL, and an older transformers).
#   bash benchmarks/gpu_wheels.sh            # transformers, datasets, trl, dill, multiprocess: ~15 MB
#   PYARROW=1 bash benchmarks/gpu_wheels.sh  # + pyarrow (55 MB), if that machine's is below datasets'
#                                            #   pyarrow>=24; then drop transformers (64 MiB carry limit)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
wanted=(datasets==5.2.0 trl==1.16.0 dill==0.4.1 multiprocess==0.70.19)
if [ "${PYARROW:-0}" = 1 ]; then wanted+=(pyarrow==26.0.1); else wanted+=(transformers==5.24.0); fi
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${wanted[@]}"
du -ch .whl/*.whl | tail -1
