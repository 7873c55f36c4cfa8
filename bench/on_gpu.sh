#!/usr/bin/env bash
# One sitting on a lent CUDA machine: build the kernels for its GPU, run every test that needs
# CUDA, the CUDA benchmarks, and the README's training command on the GPU. Logs go to $OUT.
#   bash bench/on_gpu.sh [build|tests|bench|train|suite ...]  (default: the first four, in that order)
# Wheels the machine lacks (tokenizer files, corpus, crc32c) are installed from .whl/ when present: .whl/ is
# ignored by git, so name it in the device call's carry (with the suite's 900 tests, 155 fail without it).
set -uo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
steps=${*:-build tests bench train}
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"

for step in $steps; do
  echo "=== $step"; start=$SECONDS
  case $step in
    build)  # this GPU's arch only: the build is a check of the sources, not the shipped wheel.
      # The lent H100's image puts first on PATH an /opt/gcc g++ that links libstdc++ statically: gpt_ext
      # then held a second std::locale, and the first error message with a number in it segfaulted
      # (LDFLAGS=-lstdc++ did not undo it). The system g++ links it shared; readelf checks.
      ls gpt_ext*.so 2>/dev/null | grep -q . && { echo "using the carried $(ls gpt_ext*.so)"; continue; }
      [ -x /usr/bin/g++ ] && export CC=/usr/bin/gcc CXX=/usr/bin/g++
      TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") \
        MAX_JOBS=16 timeout 400 python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 \
        || { tail -30 "$OUT/build.log"; exit 1; }
      readelf -d gpt_ext*.so | grep -q 'NEEDED.*libstdc++' || { echo "gpt_ext links libstdc++ statically"; exit 1; }
      cp gpt_ext*.so "$OUT"/ ;;
    tests)  # every file with CUDA cases
      timeout 300 python3 -m pytest -q -p no:cacheprovider --timeout 120 tests/test_cuda_model.py \
        tests/test_attention.py tests/test_cross_entropy.py tests/test_sample_kernel.py tests/test_backend.py \
        tests/test_device.py tests/test_bf16.py 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    suite)  # the whole suite on the GPU host; -v lines land in the log as they finish, so a run cut
      # off by the call's limit still names its failures (grep FAILED)
      # (the H100 host's 16 cores: 7 min at -n 12; -n 8 ran past 500 s)
      OMP_NUM_THREADS=2 timeout 560 python3 -m pytest -v -p no:cacheprovider -p no:benchmark -n 12 --timeout 300 \
        tests/ >"$OUT/suite.log" 2>&1; grep -E "FAILED|ERROR" "$OUT/suite.log" | sort -u | head -20; tail -1 "$OUT/suite.log" ;;
    bench)
      GPT_PEAK_TFLOPS=${GPT_PEAK_TFLOPS:-989} timeout 300 python3 -m pytest -q -p no:cacheprovider \
        bench/bench_cuda.py --benchmark-only --benchmark-columns=median,min,max -s 2>&1 | tee "$OUT/bench.log" | tail -30 ;;
    train)  # the README's command, on the GPU (auto picks CUDA and bf16)
      timeout 300 python3 gpt.py train --out_dir /tmp/gpt-run --overwrite 2>&1 | tee "$OUT/train.log" | tail -25 ;;
  esac
  echo "=== $step: $((SECONDS - start)) s"
done
