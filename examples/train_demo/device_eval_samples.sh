#!/usr/bin/env bash
# Draw the samples behind the README's demo-quality table on a GPU (MLX CUDA / Metal), fast:
# 64 passages from the shipped student at 1, 2, 4, 8, 16 steps and from the teacher at 1,024 steps.
# Scoring (generative perplexity, entropy) is cheap and runs anywhere: see fsdfm_mlx.evaluate.
#   bash examples/train_demo/device_eval_samples.sh STUDENT_DIR TEACHER_DIR OUT_DIR
set -uo pipefail
student=$1; teacher=$2; out=$3; n=${N:-64}
mkdir -p "$out"
gen() { python3 -m fsdfm_mlx.cli.main generate --seed 0 --num-samples "$n" --batch-size "$n" --json "$@"; }
for s in 1 2 4 8 16; do
  gen --model "$student" --steps $s --tokens-out "$out/student-$s.npy" > "$out/student-$s.json" || echo "student $s failed"
done
gen --model "$teacher" --steps 1024 --tokens-out "$out/teacher-1024.npy" > "$out/teacher-1024.json" || echo "teacher failed"
ls -la "$out"
