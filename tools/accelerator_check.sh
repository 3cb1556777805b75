#!/usr/bin/env bash
# The first run on a fresh GPU machine, in at most 8 minutes with the install: a venv with the
# versions CI tests (tools/constraints-cuda12.txt), the environment, then each stage of
# `python -m tools.accelerator_check` in its own process under its own time limit. Every stage's
# JSON lands in $OUT as soon as it ends (a stage past its limit gets {"status": "timeout"}); the
# log, unbuffered, in $OUT/accelerator_check.log.
#
#   bash tools/accelerator_check.sh                                  # GPU: install, then all stages
#   bash tools/accelerator_check.sh --official-src ~/PixNerd         # + the official PyTorch step
#   bash tools/accelerator_check.sh --cpu                            # tiny models on CPU (the test)
#   PYTHON=venv/bin/python bash tools/accelerator_check.sh --cpu     # use this interpreter, no install
#
# Environment: OUT (default ./accelerator_check), VENV (default $OUT/venv), PYTHON (skip the
# install), TORCH_INDEX (where CUDA torch comes from; default PyTorch's CUDA 12.8 wheels, then
# PyPI's default build), BUDGET_S (the whole run, default 480), STAGE_SCALE (multiplies every
# stage's limit, default 1: a slow or shared CPU machine in --cpu mode).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S="${BUDGET_S:-480}"
OUT="${OUT:-accelerator_check}"
mkdir -p "$OUT"
exec > >(tee "$OUT/accelerator_check.log") 2>&1
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR="$OUT/jax_cache"

MODE=gpu
ARGS=()
for arg in "$@"; do
  if [ "$arg" = "--cpu" ]; then MODE=cpu; else ARGS+=("$arg"); fi
done
[ "$MODE" = cpu ] && ARGS+=("--tiny" "--rounds" "1" "--steps" "1")

if [ -z "${PYTHON:-}" ]; then
  VENV="${VENV:-$OUT/venv}"
  echo "== install into $VENV ($MODE)"
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q --upgrade pip || exit 1
  PIP=("$VENV/bin/pip" install -q -c tools/constraints-cuda12.txt)
  if [ "$MODE" = gpu ]; then
    "${PIP[@]}" torch --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}" \
      || "${PIP[@]}" torch || echo "== torch did not install: the official stage will be skipped"
    "${PIP[@]}" -e . "jax[cuda12]" || exit 1
  else
    "${PIP[@]}" -e ".[torch]" || exit 1
  fi
  PYTHON="$VENV/bin/python"
fi
echo "== installed in $(($(date +%s) - START)) s"

# Stage limits (s), in order; each also stops at the run's budget.
STAGES=(env:30 train:110 sampling:70 preset:70 official:110 parity:60)
K=0
for entry in "${STAGES[@]}"; do
  K=$((K + 1))
  stage="${entry%%:*}"
  limit=$(("${entry##*:}" * ${STAGE_SCALE:-1}))
  left=$((BUDGET_S - ($(date +%s) - START)))
  [ "$left" -lt "$limit" ] && limit="$left"
  if [ "$limit" -le 5 ]; then
    echo "== $stage: not run, the ${BUDGET_S} s budget is spent"
    printf '{"stage": "%s", "status": "not run", "reason": "budget of %s s spent"}\n' \
      "$stage" "$BUDGET_S" > "$OUT/${K}_${stage}.json"
    continue
  fi
  timeout --kill-after=10 "$limit" "$PYTHON" -u -m tools.accelerator_check --stage "$stage" \
    --out-dir "$OUT" "${ARGS[@]}"
  code=$?
  if [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
    echo "== $stage: timeout after $limit s"
    printf '{"stage": "%s", "status": "timeout", "limit_s": %s}\n' "$stage" "$limit" \
      > "$OUT/${K}_${stage}.json"
  fi
done
echo "== done in $(($(date +%s) - START)) s; JSON per stage in $OUT"
