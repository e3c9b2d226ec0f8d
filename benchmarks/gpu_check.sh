#!/bin/bash
# Every GPU check of dpokit in one run, for a machine lent with a GPU (issue 14's "On a GPU"):
#   1. the GPU's name, the versions;
#   2. tests/test_gpu.py (FlexAttention forward *and* backward against the CPU float64 padded
#      pass, batch invariance, GPU steps against CPU steps, bf16) and tests/test_attention_flex.py;
#   3. `dpokit bench --device cuda --dtype bfloat16` on the 0.5 B Llama shape against TRL.
# Results go to $OUT (gpu.txt, tests.log, bench.log, bench.json). Run it as the device tool's
# command with `carry: [".whl"]` after `bash benchmarks/gpu_wheels.sh` here:
#   bash benchmarks/gpu_check.sh            (about 6 minutes on an H200; limits below)
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=src TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, importlib.util as u; print('torch', torch.__version__,
'| transformers', transformers.__version__, '| trl', bool(u.find_spec('trl')),
'| flex', bool(u.find_spec('torch.nn.attention.flex_attention')))"
  python3 -c "import pyarrow, datasets; print('pyarrow', pyarrow.__version__, '| datasets', datasets.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfEs \
  tests/test_gpu.py tests/test_attention_flex.py 2>&1 | tee "$OUT/tests.log"
frameworks=dpokit,trl
python3 -c "import trl" 2>/dev/null || frameworks=dpokit
timeout 300 python3 -m dpokit bench --device cuda --dtype bfloat16 --models 0.5b \
  --settings default,no_ckpt_precompute --frameworks "$frameworks" --steps 8 --repeats 1 \
  --no-end-to-end --workdir /tmp/gpu-bench --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
