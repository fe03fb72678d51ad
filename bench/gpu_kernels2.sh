#!/usr/bin/env bash
# A short second lent-GPU call: the GPU tests of the fused loss, its default against Liger after the in-place
# scaling fix (N 4096), and the sampler bench with the preprocessing timed on both sides. Needs OUT, .whl/.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1 || { tail -20 $OUT/build.log; exit 1; }
timeout 75 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_flce.py \
  -k "gpu or read_and_write or agrees_with_liger" > $OUT/pytest.log 2>&1; echo "pytest rc $?"
grep -E "^(FAILED|ERROR|E  )|passed|failed" $OUT/pytest.log | head -12
timeout 40 python3 bench/flce.py --device cuda --rows 4096 --repeats 5 \
  --skip torch-chunked,ours-blockwise,ours-rows-130,ours-rows-520,ours-rows-4096 --out $OUT/flce-h200.json \
  > $OUT/flce.log 2>&1; echo "flce rc $?"
grep -v "^{" $OUT/flce.log | tail -6
timeout 110 python3 bench/sampler.py --preset llama-3.2-11b --device cuda --prompts 4 --prompt-words 400 \
  --new-tokens 64 --ns 1,16 --repeats 2 --out $OUT/sampler-h200.json > $OUT/sampler.log 2>&1; echo "sampler rc $?"
grep -v "Loading\|Writing\|^{\|Warning\|forward_call" $OUT/sampler.log | tail -4
