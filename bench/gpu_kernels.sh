#!/usr/bin/env bash
# One lent-GPU call for the kernels: build; the kernel tests compiled on the GPU (fused linear cross-entropy,
# cross-attention, token sampling, the device vote); the cross-attention bench at Llama-3.2-11B-Vision's shapes;
# bench/flce.py in bf16 at H 4096, V 128256; the sampler bench at the 11B shapes. Needs OUT; carries
# liger-kernel as a wheel in .whl/ (see bench/results/gpu-h200-2026-11-26.md).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1 || { tail -20 $OUT/build.log; exit 1; }
python3 -c "import torch, transformers, triton, liger_kernel; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" | tee $OUT/versions.txt
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_cross_attention.py tests/test_kernel_flce.py \
  tests/test_kernel_sampling.py tests/test_device_vote.py > $OUT/pytest.log 2>&1; echo "pytest rc $?: $(tail -1 $OUT/pytest.log)"
grep -E "^(FAILED|ERROR)" $OUT/pytest.log | head -12
timeout 120 python3 bench/cross_attention.py --device cuda --out $OUT/cross-attention-gpu.json > $OUT/cross.log 2>&1
echo "cross-attention rc $?"
timeout 120 python3 bench/flce.py --device cuda --rows 4096,8192 --repeats 5 --skip torch-chunked \
  --out $OUT/flce-gpu.json > $OUT/flce.log 2>&1; echo "flce rc $?"
timeout 150 python3 bench/sampler.py --preset llama-3.2-11b --device cuda --prompts 4 --prompt-words 400 \
  --new-tokens 64 --ns 1,16 --out $OUT/sampler-gpu.json > $OUT/sampler.log 2>&1; echo "sampler rc $?"
grep -v "Loading\|Writing\|^{\|Warning\|forward_call" $OUT/sampler.log | tail -4
grep -v "^{" $OUT/flce.log | tail -14
grep -v "^{" $OUT/cross.log | tail -16
