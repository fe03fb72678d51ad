#!/usr/bin/env bash
# A short lent-GPU call for decoding only (after bench/gpu_kernels.sh): build; the CUDA-graph decoder's and the
# decode kernels' tests compiled; cross_attention_decode at the 11B shapes by key splits; the self-attention
# decode kernel against SDPA; the sampler bench at the 11B shapes at n=16 only, with the decoding step's SDPA
# limited to each backend and with the self-attention kernel, and the host synchronizations of one call counted
# by code line. Needs OUT.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1 || { tail -20 /tmp/build.log; exit 1; }
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_decoder_graphs.py tests/test_kernel_cross_attention.py \
  tests/test_kernel_decode_attention.py -k "graphs or decode or decoder or synchron or kernel" > $OUT/pytest.log 2>&1
echo "pytest rc $?: $(tail -1 $OUT/pytest.log)"
grep -E "^(FAILED|ERROR)|Error" $OUT/pytest.log | head -8
timeout 40 python3 bench/cross_attention.py --device cuda --decode-only --decode-splits 2,4,8,16,32 --repeats 20 \
  --out $OUT/cross-attention-decode-gpu.json > $OUT/cross.log 2>&1; echo "cross-attention rc $?"
timeout 40 python3 bench/decode_attention.py --device cuda --out $OUT/decode-attention-gpu.json > $OUT/decode-attention.log \
  2>&1; echo "decode attention rc $?"
timeout 150 python3 bench/sampler.py --preset llama-3.2-11b --device cuda --prompts 4 --prompt-words 400 \
  --new-tokens 64 --ns 16 --repeats 1 --no-eager --self-attention cudnn,efficient,kernel --sync-check \
  --out $OUT/sampler-decode-gpu.json > $OUT/sampler.log 2>&1; echo "sampler rc $?"
grep "^decode\|by key splits" $OUT/cross.log
grep -v "^{" $OUT/decode-attention.log | tail -6
grep -v "Loading\|Writing\|^{\|Warning\|forward_call\|USDT\|profiler\|warn" $OUT/sampler.log | tail -20
