#!/usr/bin/env bash
# The bench's one GPU entry point: the standing measurement of the code as it is, in one lent-GPU call.
#
#   bash bench/gpu.sh            # needs OUT (a folder for logs and result files)
#
# Parts, each with its own time limit (parts 1 to 6 about 8 minutes, part 7 about 2 more: in a 15-minute lease run
# PARTS=1,2,3,4,5,6 and PARTS=7 as two calls; a cold Triton cache makes the tests the slowest part):
#   1. build (the compiled core) and print versions and the git revision the results will carry;
#   2. the tests that only a GPU runs: bf16 kernels against float64, tile presets, CUDA-graph decoding, host
#      synchronizations, the fused loss on the GPU;
#   3. the sampler at Llama-3.2-11B-Vision's shapes (random bf16 weights), n 16: ours against transformers'
#      generate, and ours with the decoding step's SDPA limited to cuDNN and with the self-attention kernel;
#   4. the Mllama cross-attention kernels at the 11B shapes: forward + backward at T 512 and 2048 with one valid
#      tile for every tile preset, and decoding at n 1 and 16 for every decode tile preset;
#   5. the fused linear cross-entropy at 4,096 and 8,192 rows (V 128,256, H 4,096, bf16) against Liger's, when
#      liger-kernel is carried as a wheel in .whl/ where the machine has none: see docs/performance.md;
#   6. one FSDP2 fine-tuning step at world size 1 (the fused loss and the cross-attention kernel in the sharded
#      layers) against the same step unsharded, with --train text and all (bench/fsdp_step.py,
#      docs/distributed.md);
#   7. every stage's rate at Llama-3.2-11B-Vision's shapes, ours against transformers (bench/paper_scale.py): the
#      rates file the cost model (`fastjudge cost`) reads, as OUT/paper-scale.json (commit it as
#      bench/results/rates-<card>-<date>.json);
#   8. the sampler of part 3 against transformers' fast path too, its static cache with torch.compile (the
#      compile a warm-up, greedy equality checked), about 5 minutes: a call of its own (PARTS=8);
#   9. the whole loop end to end at Llama-3.2-11B-Vision's widths and vocabulary with 3 text layers
#      (bench/e2e.py --preset wide-11b-short): iterate, train under torchrun (text, lora), judge, the checkpoint
#      reloaded; each stage's time and peak memory, as OUT/e2e.json (PARTS=9, with 8 in the second call).
# PARTS (default 1,2,3,4,5,6,7) picks parts: a lease can run them in two calls (part 1 always runs). Each bench
# appends its rows to OUT/bench.log as it goes, the result's JSON line last, and writes its JSON file under OUT;
# a part cut short keeps what it measured. 8 files at most come back: pytest.log, bench.log and six results.
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to a folder for the logs and results}"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1 || { tail -20 /tmp/build.log; exit 1; }
# versions and revision to the call's output (every result file carries them too)
python3 -c 'import sys; sys.path.insert(0, "bench"); import json, _env; print(json.dumps(_env.environment()))'
PARTS=",${PARTS:-1,2,3,4,5,6,7},"
part() { [[ $PARTS == *",$1,"* ]]; }
LOG=$OUT/bench.log

part 2 && { timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_decoder_graphs.py tests/test_kernel_cross_attention.py \
  tests/test_kernel_decode_attention.py tests/test_kernel_flce.py \
  -k "gpu or synchron or graph or tiles or bf16" > $OUT/pytest.log 2>&1
echo "GPU tests rc $?: $(tail -1 $OUT/pytest.log)"
grep -E "^(FAILED|ERROR)" $OUT/pytest.log | head -8; }

part 3 && { echo "== sampler" >> $LOG; timeout 150 python3 bench/sampler.py --preset llama-3.2-11b --device cuda --prompts 4 --prompt-words 400 \
  --new-tokens 64 --ns 16 --repeats 2 --no-eager --self-attention cudnn,kernel --no-static \
  --out $OUT/sampler.json >> $LOG 2>&1; echo "sampler rc $?"
grep -v "Loading\|Writing\|^{\|Warning\|forward_call\|USDT\|profiler\|warn" $LOG | tail -12; }

part 4 && { echo "== cross-attention" >> $LOG; timeout 110 python3 bench/cross_attention.py --device cuda --tiles 1 --no-flex --tile-presets all \
  --decode-tiles all --repeats 10 --out $OUT/cross-attention.json >> $LOG 2>&1
echo "cross-attention rc $?"; grep -v "^{" $LOG | tail -24; }

if ! part 5; then
  :
elif python3 -c "import liger_kernel" 2> /dev/null; then
  echo "== fused loss" >> $LOG
  timeout 60 python3 bench/flce.py --device cuda --rows 4096,8192 --repeats 5 --skip torch-chunked \
    --out $OUT/flce.json >> $LOG 2>&1; echo "fused loss rc $?"; grep -v "^{" $LOG | tail -12
else
  echo "fused loss: skipped (no liger-kernel; carry its wheel in .whl/)"
fi

part 6 && { echo "== fsdp step" >> $LOG
timeout 90 python3 -m torch.distributed.run --nproc-per-node 1 bench/fsdp_step.py --device cuda --preset small \
  --train text,all --out $OUT/fsdp-step.json >> $LOG 2>&1; echo "fsdp step rc $?"
grep -v "Warning\|warn\|Loading\|Writing\|^{" $LOG | tail -6; }

part 7 && { echo "== paper scale" >> $LOG
timeout 150 python3 bench/paper_scale.py --preset llama-3.2-11b --device cuda --out $OUT/paper-scale.json \
  >> $LOG 2>&1; echo "paper scale rc $?"
grep -v "Warning\|warn\|Loading\|Writing\|^{" $LOG | tail -8; }

part 8 && { echo "== sampler against transformers' static cache + torch.compile" >> $LOG
  timeout 300 python3 bench/sampler.py --preset llama-3.2-11b --device cuda --prompts 4 --prompt-words 400 \
  --new-tokens 64 --ns 16 --repeats 2 --no-eager --out $OUT/sampler-static.json >> $LOG 2>&1; echo "sampler-static rc $?"
grep "n=16\|static" $LOG | tail -4; }

part 9 && { echo "== end to end" >> $LOG
  timeout 420 python3 bench/e2e.py --preset wide-11b-short --device cuda --work /tmp/e2e --out $OUT/e2e.json \
  >> $LOG 2>&1; echo "e2e rc $?"
grep -v "Warning\|warn\|Loading\|Writing\|^{" $LOG | tail -12; }
