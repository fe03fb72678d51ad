#!/usr/bin/env bash
# Everything that needs the lent GPU machine, in one call: build, the tests there (its own transformers; the
# Triton sampler on the GPU), a CUDA bf16 iterate micro-run per family, and the feature-cache and sampler
# benchmarks at Llama-3.2-11B-Vision's shapes (random bf16 weights), the fused linear cross-entropy bench.
# Needs FASTJUDGE_SHARED (a copy of shared/ carried along) and OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1 || { tail -20 $OUT/build.log; exit 1; }
python3 -c "import torch, transformers, triton, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'peft', peft.__version__, torch.cuda.get_device_name(0))" | tee $OUT/versions.txt
python3 -m pytest -q -p no:cacheprovider 2>&1 | tee $OUT/pytest.log | tail -6
for family in mllama qwen2_vl qwen2_5_vl; do
  python3 -c "from fastjudge import tiny; tiny.build_checkpoint('$family', '/tmp/tiny-$family')" > /dev/null 2>&1
  python3 -m fastjudge.cli toy-data --out /tmp/world-$family --count 64 > /dev/null
  python3 -m fastjudge.cli iterate --out /tmp/run-$family --model /tmp/tiny-$family --device cuda \
    --prompts /tmp/world-$family/world/prompts.jsonl --bench-data /tmp/world-$family/benchmark/benchmark.jsonl \
    --iterations 1 --prompts-per-iteration 64 --answer-tokens 16 --judge-tokens 16 --min-gain -1 \
    > $OUT/iterate-$family.log 2>&1 && echo "iterate $family cuda: ok $(tail -1 $OUT/iterate-$family.log)" \
    || { echo "iterate $family cuda: FAILED"; tail -20 $OUT/iterate-$family.log; }
done
python3 bench/feature_cache.py --preset llama-3.2-11b --device cuda --items 16 --k 4 --prompt-words 200 \
  --new-tokens 16 --batch-rows 64 --out $OUT/feature-cache-h200.json 2>&1 | grep -v "Loading\|Writing" | tail -8
python3 bench/sampler.py --preset llama-3.2-11b --device cuda --prompts 4 --prompt-words 400 --new-tokens 64 \
  --ns 1,4,16 --out $OUT/sampler-h200.json 2>&1 | grep -v "Loading\|Writing" | tail -6
python3 bench/flce.py --device cuda --rows 1024,4096,8192 --out $OUT/flce-gpu.json 2>&1 | tail -40
