#!/bin/bash
# The GPU runs the open issues ask for, in stages, on the lent machine
# (../shared/device.md says how it gets MLX; this runs after its two copies):
#
#   bash bench/lent_gpu.sh m06 serve8 serve32 ...
#
# Stages: m06 m8 vl3b (random models of the 0.6B, 8B and Qwen2.5-VL-3B shapes,
# made once per machine), steps, serve8, serve32, serve8b, turns, turns8b,
# share8b, cpu, vision (needs .whlC: mlx-vlm's wheels). Each writes its JSON
# under $OUT when the device tool gives one. Each stage has its own time limit,
# so that one that hangs still leaves the call time for the next.
source .whlB/setup.sh || exit 1
T=.pytest_cache/d/mlxd/smollm2-tokenizer
OUT=${OUT:-/tmp}
mk() { [ -d /tmp/$1 ] || python3 -m bench.random_model "$2" $T /tmp/$1 --dtype bfloat16 "${@:3}" >/dev/null; }
SERVING="python3 -m bench.serving --prompt-tokens 100 --arrivals stagger --gap-ms 5 --peers --no-httpx"
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    m06) mk m06 qwen3-0.6b --bits 4 ;;
    m8) mk m8 llama-8b --bits 4 ;;
    vl3b) mk vl3b qwen2.5-vl-3b ;;
    steps) timeout 500 python3 -u -m bench.steps /tmp/m06 --streams 32 --tokens 128 --join 1 --repeat 2 2>&1 | tail -25 ;;
    serve8) timeout 330 $SERVING --model /tmp/m06 --streams 8 --tokens 128 --repeat 2 --json $OUT/serve8.json 2>&1 | tail -30 ;;
    serve32) timeout 330 $SERVING --model /tmp/m06 --streams 32 --tokens 128 --repeat 2 --json $OUT/serve32.json 2>&1 | tail -30 ;;
    serve8b) timeout 400 $SERVING --model /tmp/m8 --streams 32 --tokens 128 --repeat 1 --json $OUT/serve8b.json 2>&1 | tail -30 ;;
    turns) timeout 400 python3 -m bench.turns --model /tmp/m06 --system-tokens 13000 --turns 2 --repeat 1 --long-tokens 7000 --json $OUT/turns.json 2>&1 | tail -40 ;;
    turns8b) timeout 450 python3 -m bench.turns --model /tmp/m8 --system-tokens 13000 --turns 2 --repeat 1 --long-tokens 7000 --json $OUT/turns8b.json 2>&1 | tail -40 ;;
    share8b) timeout 560 python3 -m bench.share --model /tmp/m8 --budget 24GiB --json $OUT/share8b.json 2>&1 | tail -40 ;;
    cpu) timeout 200 python3 -m bench.cpu --model /tmp/m06 --requests 200 2>&1 | tail -20 ;;
    vision)
      python3 -m pip install -q --no-index --no-deps --target "$HOME/mlxsite" .whlC/*.whl || exit 1
      timeout 500 python3 -m bench.vision --model /tmp/vl3b --streams 8 --repeat 3 --json $OUT/vision.json 2>&1 | tail -20 ;;
    *) echo "no stage $stage" ;;
  esac
done
echo "=== end $(date +%T)"
