#!/usr/bin/env bash
# The bench's one GPU entry point: the standing measurement of the code as it is, in two lent-GPU calls.
#
#   OUT=DIR CALL=1 bash bench/gpu.sh     # device call 1 (run(command, timeout_s=450))
#   OUT=DIR CALL=2 bash bench/gpu.sh     # device call 2, on the same warm machine
#
# Each call fits 7 minutes: it stops starting parts once BUDGET seconds (default 400) have passed, cuts each part
# to what is left, and prints each part's time as it goes ("[part] rc R in S s, T s into the call"). Every bench
# rewrites its result file after each of its own steps, so a part cut short keeps what it measured. The most
# valuable parts come first.
#
# Call 1, what a user's first GPU run depends on:
#   build       the compiled core (pip install --no-build-isolation -e .), versions and the git revision;
#   e2e         the whole loop end to end at Llama-3.2-11B-Vision's widths, head counts and 128k vocabulary with
#               3 text layers, one cross-attention (bench/e2e.py --preset wide-11b-short): iterate (synth closed
#               and open, filter, train, eval with verdict probabilities), train under torchrun at world size 1
#               (FSDP2) with --train text and lora, judge, the checkpoint reloaded with transformers; each
#               stage's time and peak memory -> e2e.json;
#   sampler     the sampler at the 11B shapes (random bf16 weights), n 16: ours against transformers' generate
#               eager and on its fast path, the static cache with torch.compile (the compile a warm-up reported
#               apart, greedy equality checked) -> sampler.json.
# Call 2, the rates and the kernels:
#   build       (a no-op on the warm machine of call 1);
#   paper-scale every stage's rate at the 11B shapes, ours against the faster transformers setting
#               (bench/paper_scale.py): the rates file the cost model reads -> paper-scale.json (commit it as
#               bench/results/rates-<card>-<date>.json);
#   gpu-tests   the tests only a GPU runs: bf16 kernels against float64, tile presets, CUDA-graph decoding, host
#               synchronizations, the fused loss -> pytest.log;
#   cross-attn  the Mllama cross-attention kernels at the 11B shapes, every tile preset -> cross-attention.json;
#   flce        the fused linear cross-entropy at 4,096 and 8,192 rows against Liger's (where liger-kernel is
#               carried as a wheel in .whl/: docs/performance.md) -> flce.json;
#   fsdp        one FSDP2 fine-tuning step at world size 1 against the same step unsharded -> fsdp-step.json;
#   serve       the reward server's batching on the GPU, one round (bench/serve.py --device cuda), where fastapi
#               and uvicorn are carried as wheels in .whl/ (docs/performance.md names them) -> serve.json.
# PARTS=name,name (with CALL unset) runs the parts named, in the order above. Logs: OUT/bench.log (each bench's
# table, its JSON line last). At most 8 files come back from a call: bench.log, pytest.log and the results.
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to a folder for the logs and results}"
export OUT
case "${CALL:-}" in
  1) PARTS=build,e2e,sampler ;;
  2) PARTS=build,paper-scale,gpu-tests,cross-attn,flce,fsdp,serve ;;
  "") : "${PARTS:?set CALL=1 or CALL=2 (or PARTS)}" ;;
  *) echo "CALL: expected 1 or 2, got $CALL"; exit 2 ;;
esac
BUDGET=${BUDGET:-400}
START=$SECONDS
LOG=$OUT/bench.log
touch "$LOG"
PARTS=",$PARTS,"
want() { [[ $PARTS == *",$1,"* ]]; }

# part NAME LIMIT COMMAND...: runs COMMAND (its output to the log) under min(LIMIT, what is left of the call's
# budget); skipped when under 30 s are left; prints its time either way
part() {
  local name=$1 limit=$2; shift 2
  want "$name" || return 0
  local left=$((BUDGET - (SECONDS - START)))
  if ((left < 30)); then
    echo "[$name] skipped: ${left} s left of the call's ${BUDGET} s"; return 0
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit $limit s)" >> "$LOG"
  local t0=$SECONDS from=$(($(wc -l < "$LOG") + 1))
  timeout "$limit" bash -c '"$@"' _ "$@" >> "$LOG" 2>&1  # through bash: a part may be a function of this script
  local rc=$?
  echo "[$name] rc $rc in $((SECONDS - t0)) s (limit $limit s), $((SECONDS - START)) s into the call"
  tail -n "+$from" "$LOG" | grep -v "Warning\|warn\|Loading\|Writing\|^{\|forward_call\|USDT\|profiler" | tail -8
  return $rc
}

build() {
  if ls .whl/*.whl > /dev/null 2>&1; then  # packages the machine lacks (liger-kernel), carried as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || return 1
  fi
  python3 -m pip install -q --no-build-isolation --no-deps -e . || return 1
  # versions and revision (every result file carries them too)
  python3 -c 'import sys; sys.path.insert(0, "bench"); import json, _env; print(json.dumps(_env.environment()))'
}
gpu_tests() {
  python3 -m pytest -q -p no:cacheprovider tests/test_decoder_graphs.py tests/test_kernel_cross_attention.py \
    tests/test_kernel_decode_attention.py tests/test_kernel_flce.py -k "gpu or synchron or graph or tiles or bf16" \
    > "$OUT/pytest.log" 2>&1
  local rc=$?
  tail -1 "$OUT/pytest.log"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -8
  return $rc
}
ls .whl/*.whl > /dev/null 2>&1 && export PYTHONPATH=/tmp/site
export -f build gpu_tests
part build 150 build || { tail -20 "$LOG"; exit 1; }
grep '"git' "$LOG" | tail -1

part e2e 200 python3 bench/e2e.py --preset wide-11b-short --device cuda --out "$OUT/e2e.json"

part sampler 180 python3 bench/sampler.py --preset llama-3.2-11b --device cuda --prompts 4 --prompt-words 400 \
  --new-tokens 64 --ns 16 --repeats 2 --no-eager --out "$OUT/sampler.json"

part paper-scale 170 python3 bench/paper_scale.py --preset llama-3.2-11b --device cuda --repeats 1 \
  --out "$OUT/paper-scale.json"

part gpu-tests 100 gpu_tests

part cross-attn 80 python3 bench/cross_attention.py --device cuda --tiles 1 --no-flex --tile-presets all \
  --decode-tiles all --repeats 10 --out "$OUT/cross-attention.json"

want flce && ! python3 -c "import liger_kernel" 2> /dev/null && \
  echo "[flce] without Liger's side: no liger-kernel here (carry its wheel in .whl/)"
part flce 45 python3 bench/flce.py --device cuda --rows 4096,8192 --repeats 5 --skip torch-chunked \
  --out "$OUT/flce.json"

part fsdp 60 python3 -m torch.distributed.run --standalone --nproc-per-node 1 bench/fsdp_step.py --device cuda \
  --preset small --train text,all --out "$OUT/fsdp-step.json"
if want serve && ! python3 -c "import fastapi, uvicorn" 2> /dev/null; then
  echo "[serve] skipped: no fastapi or uvicorn here (carry their wheels in .whl/)"
else
  part serve 60 python3 bench/serve.py --device cuda --rounds 1 --requests 5 --out "$OUT/serve.json"
fi
echo "call done in $((SECONDS - START)) s"
