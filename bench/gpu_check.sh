#!/usr/bin/env bash
# The CUDA checks of one GPU session, as one command (bench/README.md, "On a GPU machine"):
# the CUDA tests (fixture A in float32 and float16, marching cubes on the GPU, the tiny model end to
# end), then the full-size benchmark against the baseline. Everything it writes goes to OUT_DIR.
#
#   bash bench/gpu_check.sh OUT_DIR [RUNS]
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [RUNS]}
runs=${2:-10}
mkdir -p "$out"
cd "$(dirname "$0")/.."

# Packages the GPU image lacks travel as wheels in .whl/ (see bench/README.md).
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)" \
  2>&1 | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
tests=${PIPESTATUS[0]}
python3 bench/pipeline.py --device cuda --runs "$runs" --json "$out/cuda.json" 2>&1 | tee "$out/bench_cuda.log"
bench=${PIPESTATUS[0]}
# the other rows issue 10 asks for; each is worth having even if another fails
python3 bench/pipeline.py --device cuda --runs "$runs" --no-baseline --resolution 256 --json "$out/cuda-r256.json" \
  2>&1 | tee "$out/bench_cuda_r256.log"
python3 bench/pipeline.py --device cuda --runs "$runs" --no-baseline --dtype bfloat16 --json "$out/cuda-bf16.json" \
  2>&1 | tee "$out/bench_cuda_bf16.log"
python3 bench/pipeline.py --device cuda --runs "$runs" --no-baseline --texture uv --faces 20000 \
  --json "$out/cuda-uv-20k.json" 2>&1 | tee "$out/bench_cuda_uv.log"
python3 bench/texture.py --device cuda --json "$out/texture-cuda.json" 2>&1 | tee "$out/bench_texture.log"
echo "tests exit $tests, benchmark exit $bench"
exit $(( tests || bench ))
