#!/usr/bin/env bash
# For people who prefer their own loop to `gqa-convert batch`: convert one model at several G,
# verify each, and collect the --json reports into one JSON Lines file.
#   scripts/convert_loop.sh MODEL EVAL_TEXT [G ...]
set -euo pipefail
model=${1:?usage: $0 MODEL EVAL_TEXT [G ...]}
eval_text=${2:?usage: $0 MODEL EVAL_TEXT [G ...]}
shift 2
groups=("${@:-4 2 1}")
results=results.jsonl
: > "$results"
for g in ${groups[@]}; do
  out="$(basename "$model")-g$g"
  if ! gqa-convert "$model" --groups "$g" --out "$out" --force --quiet --json > convert.json; then
    echo "G=$g: conversion failed (exit $?)" >&2
    continue
  fi
  status=0
  gqa-convert verify "$out" --data "$eval_text" --quiet --json > verify.json || status=$?
  python3 - "$g" "$status" >> "$results" <<'PY'
import json, sys
c, v = json.load(open("convert.json")), json.load(open("verify.json"))
print(json.dumps({"groups": int(sys.argv[1]), "exit": int(sys.argv[2]), "output": c["output"],
                  "kv_saving": c["kv_cache"]["saving"], "ppl_ratio": v["ppl_ratio"]}))
PY
done
rm -f convert.json verify.json
cat "$results"
