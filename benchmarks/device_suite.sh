#!/usr/bin/env bash
# Performance suite for the lent GPU machine (MLX CUDA backend + PyTorch CUDA), ~6 minutes.
#
#   bash /path/to/repo/benchmarks/device_suite.sh /path/to/repo /path/to/out
#
# $1: the repository (for the benchmark scripts); $2: folder for the JSON files (created).
# On the lent machine only 8 files come back from $OUT: write $2 elsewhere and tar it into $OUT.
# Needs: our package installed (python3 -m fsdfm_mlx.cli.main), MLX with CUDA, mlx-lm, PyTorch CUDA.
# Each part is guarded: a failure is logged to $2/<part>.err and the next part still runs.
# Writes: env.json, a_profile_1p3b_b1.json, b_profile_1p3b_b8.json, b_matmul_peak.json,
#         c_memory_bf16.json, c_memory_bf16_whole.json, c_memory_q4.json, d_sampler.json, d_sampler_bf16.json,
#         e_mlx_vs_torch_cuda.json,
#         summary.json (the headline numbers pulled from the others).
set -u
REPO="$(cd "${1:?usage: device_suite.sh REPO OUT}" && pwd)"
OUT="${2:?usage: device_suite.sh REPO OUT}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
CLI=("$PY" -m fsdfm_mlx.cli.main)
START=$(date +%s)

part() {  # part NAME TIMEOUT_S CMD... : stdout -> $OUT/NAME.json, stderr -> $OUT/NAME.err
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s)" >&2
  if timeout "$limit" "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"; then
    echo "   ok in $(( $(date +%s) - t0 ))s" >&2
  else
    echo "   $name failed (rc=$?, $(( $(date +%s) - t0 ))s): see $OUT/$name.err" >&2
    tail -n 3 "$OUT/$name.err" >&2 || true
  fi
}

"$PY" - >"$OUT/env.json" 2>"$OUT/env.err" <<'EOF' || echo "env failed" >&2
import json, platform, subprocess
import fsdfm_mlx, mlx.core as mx
info = {"python": platform.python_version(), "mlx": mx.__version__,
        "mlx_device": str(mx.default_device()), "fsdfm_mlx": fsdfm_mlx.__version__}
try:
    import mlx_lm; info["mlx_lm"] = mlx_lm.__version__
except Exception as e:
    info["mlx_lm"] = f"missing ({e})"
try:
    import torch; info["torch"] = torch.__version__
    info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
except Exception as e:
    info["torch"] = f"missing ({e})"
try:
    info["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
except Exception:
    pass
print(json.dumps(info, indent=2))
EOF

# (a) 1.3B, B=1, L=1024, bf16: steps 1..32 with the DFM-1024 and AR baselines
part a_profile_1p3b_b1 150 "${CLI[@]}" profile --preset 1.3b --steps 1,2,4,8,16,32 --length 1024 \
  --batch-size 1 --dtype bfloat16 --repeats 3 --baseline-budget 30 --json

# (b) B=8, 8 steps (matmul utilisation), plus the bf16 8192^3 matmul peak in MLX
part b_profile_1p3b_b8 100 "${CLI[@]}" profile --preset 1.3b --steps 8 --length 1024 \
  --batch-size 8 --dtype bfloat16 --repeats 3 --baseline-budget 20 --json
part b_matmul_peak 30 "$PY" -c '
import json, fsdfm_mlx
from fsdfm_mlx.profile import matmul_tflops
print(json.dumps({"kind": "matmul_bf16", "n": 8192, "tflops": matmul_tflops(8192, "bfloat16")}))'

# (c) peak memory, 1.3B B=1 L=1024 8 steps: bf16 (the default: blocks queued 2 at a time; and
#     whole forwards) and 4-bit (group 64; the default: 1 block at a time)
part c_memory_bf16 50 "${CLI[@]}" profile --preset 1.3b --steps 8 --length 1024 --batch-size 1 \
  --dtype bfloat16 --repeats 3 --no-baselines --json
part c_memory_bf16_whole 50 "${CLI[@]}" profile --preset 1.3b --steps 8 --length 1024 \
  --batch-size 1 --dtype bfloat16 --repeats 3 --no-baselines --blocks-per-eval 0 --json
part c_memory_q4 50 "${CLI[@]}" profile --preset 1.3b --steps 8 --length 1024 --batch-size 1 \
  --dtype bfloat16 -q --q-bits 4 --q-group-size 64 --repeats 3 --no-baselines --json

# (d) the sampler step alone at V=50,257, L=1,024
part d_sampler 60 "$PY" "$REPO/benchmarks/bench_sampler.py" --device gpu --length 1024 --vocab 50257
part d_sampler_bf16 60 "$PY" "$REPO/benchmarks/bench_sampler.py" --device gpu --length 1024 \
  --vocab 50257 --dtype bfloat16

# (e) MLX against PyTorch eager and torch.compile on the same GPU: 1.3B, L=1024, 8 steps, bf16
part e_mlx_vs_torch_cuda 160 "$PY" "$REPO/benchmarks/bench_mlx_vs_torch.py" --preset 1.3b \
  --length 1024 --steps 8 --dtype bfloat16 --device cuda --repeats 3

"$PY" - "$OUT" >"$OUT/summary.json" 2>"$OUT/summary.err" <<'EOF' || echo "summary failed" >&2
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / f"{name}.json").read_text())
    except Exception as e:
        return {"error": f"{name}: {e}"}
s = {}
a = load("a_profile_1p3b_b1")
if "results" in a:
    s["a_b1"] = [{k: r.get(k) for k in ("steps", "latency_s", "tokens_per_s", "model_ms_per_step",
                  "sampler_ms_per_step", "speedup_vs_ar", "speedup_vs_dfm")} for r in a["results"]]
    s["a_baselines"] = {k: {kk: v.get(kk) for kk in ("latency_s", "tokens_per_s",
                        "extrapolated_from_steps", "extrapolated_from_tokens", "error")}
                        for k, v in (a.get("baselines") or {}).items()}
b, peak = load("b_profile_1p3b_b8"), load("b_matmul_peak")
if "results" in b:
    r = b["results"][0]
    s["b_b8_8steps"] = {k: r.get(k) for k in ("latency_s", "tokens_per_s", "model_ms_per_step",
                        "model_tflops", "speedup_vs_ar", "speedup_vs_dfm")}
    if "tflops" in peak:
        s["b_b8_8steps"]["matmul_peak_tflops"] = peak["tflops"]
        s["b_b8_8steps"]["model_forward_utilisation"] = r["model_tflops"] / peak["tflops"]
for name in ("c_memory_bf16", "c_memory_bf16_whole", "c_memory_q4"):
    c = load(name)
    if "results" in c:
        s[name] = {"lookahead": c["config"].get("lookahead"),
                   "blocks_per_eval": c["config"].get("blocks_per_eval"),
                   "peak_memory_gb": c["results"][0]["peak_memory_bytes"] / 1e9,
                   "weights_gb": c["config"]["weights_bytes"] / 1e9,
                   "latency_s": c["results"][0]["latency_s"]}
d = load("d_sampler")
s["d_sampler_ms_per_step"] = d.get("sampler_ms_per_step", d)
d = load("d_sampler_bf16")
s["d_sampler_bf16_ms_per_step"] = d.get("sampler_ms_per_step", d)
e = load("e_mlx_vs_torch_cuda")
s["e_mlx_vs_torch"] = {k: e.get(k) for k in ("parity", "speedup_mlx_vs_torch_eager",
                       "speedup_mlx_vs_torch_compile", "error")}
if isinstance(e.get("torch_compile"), dict) and "error" in e["torch_compile"]:
    s["e_mlx_vs_torch"]["torch_compile_error"] = e["torch_compile"]["error"]
print(json.dumps(s, indent=2))
EOF
echo "device suite done in $(( $(date +%s) - START ))s; results in $OUT" >&2
