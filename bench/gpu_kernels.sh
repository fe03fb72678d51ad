#!/usr/bin/env bash
# One lent-GPU call for the sampler and the kernels: build; the CUDA-graph decoder's, the cross-attention
# kernels' and the token sampler's tests compiled on the GPU; the sampler bench at the Llama-3.2-11B-Vision
# shapes (random bf16 weights; ours with CUDA graphs and eagerly, against transformers, then a kernel profile of
# ours at n=16); the cross-attention bench at the 11B shapes; the token-sampling bench. Needs OUT. Each part has
# its own time limit, so that a part that hangs costs only its own results; the benches print each row as they
# go (kept in their logs). At most 7 files land in OUT (the device tool brings back 8).
# WITH_FLCE=1 also runs the fused linear cross-entropy tests and bench (needs liger-kernel carried as a wheel in
# .whl/, see bench/results/gpu-h200-2026-11-26.md).
export PYTHONUNBUFFERED=1
if [ "${WITH_FLCE:-0}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1 || { tail -20 /tmp/build.log; exit 1; }
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_decoder_graphs.py tests/test_kernel_cross_attention.py \
  tests/test_kernel_sampling.py > $OUT/pytest.log 2>&1
echo "pytest (graphs, cross-attention, sampling) rc $?: $(tail -1 $OUT/pytest.log)"
grep -E "^(FAILED|ERROR)|Error" $OUT/pytest.log | head -12
timeout 210 python3 bench/sampler.py --preset llama-3.2-11b --device cuda --prompts 4 --prompt-words 400 \
  --new-tokens 64 --ns 1,16 --profile 16 --out $OUT/sampler-gpu.json > $OUT/sampler.log 2>&1; rc=$?
echo "sampler rc $rc"
if [ $rc != 0 ]; then  # again without our Triton kernels (prefill and cross layers through SDPA)
  tail -5 $OUT/sampler.log
  FASTJUDGE_GPU_KERNELS=0 timeout 120 python3 bench/sampler.py --preset llama-3.2-11b --device cuda --prompts 4 \
    --prompt-words 400 --new-tokens 64 --ns 16 --out $OUT/sampler-gpu-nokernels.json > /tmp/sampler-nokernels.log 2>&1
  echo "sampler without kernels rc $?"; grep -v "Loading\|Writing\|^{\|Warning\|forward_call" /tmp/sampler-nokernels.log | tail -4
fi
timeout 110 python3 bench/cross_attention.py --device cuda --repeats 10 --out $OUT/cross-attention-gpu.json \
  > $OUT/cross.log 2>&1; echo "cross-attention rc $?"
timeout 40 python3 bench/sample_logits.py --device cuda --dtype bfloat16 --repeats 20 \
  --out $OUT/sample-logits-gpu.json > $OUT/sample-logits.log 2>&1; echo "sample_logits rc $?"
if [ "${WITH_FLCE:-0}" = 1 ]; then
  timeout 120 python3 bench/flce.py --device cuda --rows 4096,8192 --repeats 5 --skip torch-chunked \
    --out $OUT/flce-gpu.json > $OUT/flce.log 2>&1; echo "flce rc $?"
  grep -v "^{" $OUT/flce.log | tail -14
fi
grep -v "^{" $OUT/sample-logits.log | tail -8
grep -v "^{" $OUT/cross.log | grep -v "^{'" | tail -16
grep -v "Loading\|Writing\|^{\|Warning\|forward_call\|USDT\|profiler" $OUT/sampler.log | tail -24
