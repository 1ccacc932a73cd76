#!/usr/bin/env bash
# One-shot GPU benchmark: every throughput workload (224 and 384; image, text, image+text, training step; eager and
# torch.compile; ours and the original in the same process; bf16, batch 256, peak memory, MFU) and a Flickr30k-sized
# retrieval evaluation, as tables, in about 6 minutes on one H100 / H200. Installs nothing: it needs torch,
# transformers and this repository's requirements in the Python it runs ($PYTHON, default python3); the original
# (beit3-gml, torchscale) is timed when importable. Each step has its own time limit, so one slow compile cannot eat
# the others' time. Run from anywhere:  bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" || exit 1
"$PYTHON" -c "from beit3_hf.conversion import original; print('original implementation importable:', original.is_available())"
status=0
for size in 224 384; do
    timeout 150 "$PYTHON" benchmarks/throughput.py --image-sizes "$size" --batch-size 256 --compile --iters 10 || status=$?
done
timeout 90 "$PYTHON" benchmarks/retrieval_eval.py --num-images 1000 --image-size 384 --batch-size 256 || status=$?
exit "$status"
