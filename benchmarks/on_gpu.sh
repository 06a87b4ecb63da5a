#!/usr/bin/env bash
# The GPU checks behind the README's "On a GPU" figures, in one short script (minutes):
#   bash benchmarks/on_gpu.sh OUTDIR
# 1. the device tests (tests/test_device.py) and 20 Reptile outer steps compared between CPU and GPU;
# 2. benchmarks/bench_device.py on the GPU: seconds per outer step, attacker episode, evaluation
#    episode and federated round, loop and batched, and each paper preset's expected time;
# 3. the first rounds of omniglot-exp1a-paper on real Omniglot: its paper-scale pre-training rounds,
#    a shortened attacker (the paper's episodes, fewer of them) and benign rounds, each timed by the run's log.
# Every stage has its own time limit, so one that fails leaves the others' figures.
set -uo pipefail
out=${1:?usage: on_gpu.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 FEDMETA_CACHE=${FEDMETA_CACHE:-/tmp/fedmeta-cache}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, fedmeta; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } >"$out/env.txt" 2>&1

timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_device.py >"$out/tests.txt" 2>&1
timeout 60 python3 - >"$out/cpu-vs-gpu.txt" 2>&1 <<'PY'
# 20 Reptile outer steps of the Omniglot paper preset from one initialisation and the same
# episodes, on the CPU and on the GPU: the parameters must agree to float round-off.
import torch
from fedmeta.config import load_config
from fedmeta.data.omniglot import load_omniglot
from fedmeta.meta.learner import build_learner
from fedmeta.rng import stream
cfg = load_config("omniglot-pretrain-paper")
pool = load_omniglot().pool(torch.arange(100), rotations=False)
learner = build_learner(cfg, (28, 28, 1))
init = learner.model.init(stream(0, "init"))
episodes = [learner.sample(pool, stream(0, f"episodes-{i}")) for i in range(20)]
def train(device):
    params = {k: v.to(device) for k, v in init.items()}
    state, images = learner.init_state(params), pool.images.to(device)
    for i, e in enumerate(episodes):
        params, state, _ = learner.train_step(params, state, e, images, stream(0, f"step-{i}"), 0.0)
    return params
cpu = train(torch.device("cpu"))
scale = max(v.abs().max().item() for v in cpu.values())
for tf32 in (True, False):  # PyTorch's default lets cuDNN convolutions use TF32 (10-bit mantissa)
    torch.backends.cudnn.allow_tf32 = tf32
    gpu = train(torch.device("cuda"))
    diff = max((cpu[k] - gpu[k].cpu()).abs().max().item() for k in cpu)
    print(f"cudnn.allow_tf32={tf32}: max |cpu - gpu| after 20 outer steps {diff:.3e} (largest parameter {scale:.3e})")
PY
timeout 200 python3 benchmarks/bench_device.py --device cuda ${BENCH_PARTS:+--parts $BENCH_PARTS} --json "$out/gpu.json" >"$out/bench.log" 2>&1

# Paper parameters; only the lengths are cut: 2 pre-training rounds (of the paper's E = 1000),
# 100 attacker episodes of the paper's 50 epochs (of 50,000), 1 benign round (of 50).
timeout 200 python3 -m fedmeta.cli run omniglot-exp1a-paper --out /tmp/exp1a-paper-first-rounds --set runtime.device=cuda \
  --set pretrain.rounds=2 --set attacks.boosted.episodes=100 --set federation.rounds=1 >"$out/exp1a-paper.log" 2>&1
cp /tmp/exp1a-paper-first-rounds/summary.json "$out/exp1a-paper-summary.json" 2>/dev/null
tr '\r' '\n' <"$out/exp1a-paper.log" | grep -v '^\s*$' | grep -v '/step\]' >"$out/exp1a-paper-lines.txt"
tail -n 3 "$out"/*.txt "$out/bench.log"
