#!/usr/bin/env bash
# One lent-GPU call for the open measured targets (issue 4: the sampler's 10x at n=16; issue 6: cross-attention
# forward + backward 2x at one valid tile, decoding 8x at n=16). Build; the tests that only a GPU runs (CUDA-graph
# decoder, decode kernels, the training kernels' bf16 and tile-preset tests); cross_attention_decode at the 11B
# shapes, synchronized and in a CUDA graph, by key splits and decode tiles; the training kernels with every tile
# preset at T 512 and 2048, one valid tile; the self-attention decode kernel against SDPA; the sampler bench at the
# 11B shapes at n=16, with the decoding step's SDPA limited to each backend and with the self-attention kernel, and
# the host synchronizations of one call counted by code line. Each part has its own time limit (530 s in all, plus
# the build; 5 to 6 minutes expected): run it with the device's 600 s. Each bench writes its log to OUT as it goes
# (rows as they are measured, the result's JSON line last), so a part cut short keeps what it measured; 5 files.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1 || { tail -20 /tmp/build.log; exit 1; }
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_decoder_graphs.py tests/test_kernel_cross_attention.py \
  tests/test_kernel_decode_attention.py -k "decode or synchron or gpu or tiles" > $OUT/pytest.log 2>&1
echo "pytest rc $?: $(tail -1 $OUT/pytest.log)"
grep -E "^(FAILED|ERROR)|Error" $OUT/pytest.log | head -8
timeout 70 python3 bench/cross_attention.py --device cuda --decode-only --decode-splits 2,4,8 --decode-tiles all \
  --repeats 20 > $OUT/cross-decode.log 2>&1; echo "cross-attention decode rc $?"
grep "^decode\|by key splits\|by decode tiles\|CUDA graph" $OUT/cross-decode.log
timeout 150 python3 bench/cross_attention.py --device cuda --ns "" --tiles 1 --no-flex --tile-presets all \
  --repeats 10 > $OUT/cross-train.log 2>&1; echo "cross-attention train rc $?"
grep -v "^{" $OUT/cross-train.log | tail -14
timeout 40 python3 bench/decode_attention.py --device cuda > $OUT/decode-attention.log 2>&1
echo "decode attention rc $?"; grep -v "^{" $OUT/decode-attention.log | tail -6
timeout 160 python3 bench/sampler.py --preset llama-3.2-11b --device cuda --prompts 4 --prompt-words 400 \
  --new-tokens 64 --ns 16 --repeats 2 --no-eager --self-attention cudnn,efficient,kernel --sync-check \
  > $OUT/sampler.log 2>&1; echo "sampler rc $?"
grep -v "Loading\|Writing\|^{\|Warning\|forward_call\|USDT\|profiler\|warn" $OUT/sampler.log | tail -20
