#!/usr/bin/env bash
# One lent-GPU call for the kernels: build; the fused linear cross-entropy tests compiled on the GPU (and the
# sampler/device-vote tests); bench/flce.py in bf16 at H 4096, V 128256; then the sampler bench at
# Llama-3.2-11B-Vision's shapes. Needs OUT; carries liger-kernel as a wheel in .whl/.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
start=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1 || { tail -20 $OUT/build.log; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
python3 -c "import torch, transformers, triton, liger_kernel; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" | tee $OUT/versions.txt
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee $OUT/nvidia-smi.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_flce.py tests/test_kernel_sampling.py \
  tests/test_device_vote.py > $OUT/pytest.log 2>&1; echo "pytest rc $?: $(tail -1 $OUT/pytest.log)"
grep -E "^(FAILED|ERROR)" $OUT/pytest.log | head -12
timeout 240 python3 bench/flce.py --device cuda --rows 1024,4096,8192 --repeats 5 --out $OUT/flce-h200.json \
  > $OUT/flce.log 2>&1; echo "flce rc $?"
timeout 150 python3 bench/sampler.py --preset llama-3.2-11b --device cuda --prompts 4 --prompt-words 400 \
  --new-tokens 64 --ns 1,4,16 --out $OUT/sampler-h200.json > $OUT/sampler.log 2>&1; echo "sampler rc $?"
grep -v "Loading\|Writing\|^{" $OUT/sampler.log | tail -8
grep -v "^{" $OUT/flce.log | tail -32
