"""`make demo`: fine-tune a small BEiT-3 for image-text retrieval from scratch on the built-in dataset, on a CPU.

1. Writes the built-in synthetic dataset (coloured shapes with compositional captions) as a Karpathy split file and
   images, and trains a sentencepiece tokenizer on its training captions, as `beit3.spm` was made.
2. Runs `examples/retrieval/run_retrieval.py` (Trainer, the loaders a user runs on Flickr30k / COCO): evaluates,
   trains, saves a Hub-ready folder (weights, config, code files, processor, model card), evaluates again; the
   metrics land in the folder's `all_results.json`.
3. Reloads that folder with `AutoModel.from_pretrained(..., trust_remote_code=True)` in a fresh Python process in which
   `beit3_hf` cannot be imported, and checks it retrieves as well there (recall with the package's tie rule, computed
   here from the similarities that process wrote).
4. Prints a summary and writes `runs/demo/results.json` (TR@1/5/10 and IR@1/5/10 before and after training).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from beit3_hf.evaluation.retrieval import retrieval_ranks, retrieval_recall
from beit3_hf.testing.synthetic_data import write_synthetic_dataset

# A small BEiT-3: patch 32 on 64x64 images puts one patch on each cell of the dataset's 2x2 grid.
MODEL_OVERRIDES = (
    "hidden_size=128,num_hidden_layers=4,num_attention_heads=4,intermediate_size=512,"
    "image_size=64,patch_size=32,max_position_embeddings=32"
)
METRICS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")

_RELOAD = textwrap.dedent(
    """
    import json, sys

    class HideBeit3Hf:  # the saved folder must be enough: make `import beit3_hf` fail in this process
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "beit3_hf":
                raise ImportError(name)

    sys.meta_path.insert(0, HideBeit3Hf())

    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    folder, karpathy_json, image_root, similarity_file = sys.argv[1:5]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    test = [image for image in json.load(open(karpathy_json))["images"] if image["split"] == "test"]
    images = [Image.open(f"{image_root}/{image['filepath']}/{image['filename']}").convert("RGB") for image in test]
    captions = [sentence["raw"] for image in test for sentence in image["sentences"]]
    owner = torch.tensor([i for i, image in enumerate(test) for _ in image["sentences"]])
    with torch.no_grad():
        out = model(**processor(images=images, text=captions))
    torch.save({"similarity": out.logits_per_image, "text_to_image": owner}, similarity_file)
    result = {
        "class": type(model).__name__,
        "module": type(model).__module__.split(".")[0],
        "filenames": [image["filename"] for image in test],
        "captions": captions,
    }
    print(json.dumps(result))
    """
)


def train_caption_tokenizer(karpathy_json: Path, output: Path, vocab_size: int = 150) -> Path:
    """A sentencepiece model of the training captions (`beit3.spm` is a sentencepiece model too)."""
    import sentencepiece

    images = json.loads(karpathy_json.read_text())["images"]
    captions = [s["raw"] for image in images if image["split"] == "train" for s in image["sentences"]]
    output.parent.mkdir(parents=True, exist_ok=True)
    corpus = output.with_suffix(".txt")
    corpus.write_text("\n".join(captions))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(output.with_suffix("")),
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # the captions have fewer words than that: stop at whole words
        character_coverage=1.0,
        minloglevel=2,
    )
    return output.with_suffix(".model")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/demo", type=Path)
    parser.add_argument(
        "--script", default=Path(__file__).resolve().parents[1] / "retrieval" / "run_retrieval.py", type=Path
    )
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--num-train", type=int, default=2000, help="training images (5 captions each)")
    args = parser.parse_args(argv)
    if not args.script.is_file():
        parser.error(f"{args.script} not found: run the demo from the repository root.")
    start = time.time()
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)

    print("[1/4] writing the built-in dataset and training its tokenizer", flush=True)
    data = write_synthetic_dataset(
        out / "data",
        num_train=args.num_train,
        num_val=0,
        num_test=100,
        classification_train_per_class=0,
        classification_val_per_class=0,
    )
    spm = train_caption_tokenizer(data.karpathy_json, out / "tokenizer" / "captions.spm")
    print(f"      {data.karpathy_json} (+ images/), tokenizer {spm}", flush=True)

    print("[2/4] training BEiT-3 from scratch with Trainer (examples/retrieval/run_retrieval.py)", flush=True)
    model_dir = out / "beit3-demo-retrieval"
    train_args = [
        *("--config_name", "beit3-base-patch16-224", "--config_overrides", MODEL_OVERRIDES),
        *("--sentencepiece_model", str(spm), "--max_text_length", "24"),
        *("--karpathy_json", str(data.karpathy_json), "--image_root", str(data.image_root)),
        *("--output_dir", str(model_dir), "--overwrite_output_dir", "True", "--save_strategy", "no"),
        *("--do_train", "--do_eval", "--eval_split", "test", "--eval_before_training", "True"),
        *("--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "128"),
        *("--learning_rate", "1e-3", "--weight_decay", "0.05", "--lr_scheduler_type", "cosine"),
        *("--warmup_steps", "100", "--max_steps", str(args.max_steps), "--logging_steps", "100"),
        # The captions name left / right and grid cells: flips and strong crops would make them wrong.
        *("--hflip", "False", "--min_crop_scale", "1.0", "--seed", "0"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    status = subprocess.run([sys.executable, str(args.script), *train_args], env=env, check=False).returncode
    if status != 0:
        print(f"error: {args.script} failed with exit code {status}", file=sys.stderr)
        return status
    results = json.loads((model_dir / "all_results.json").read_text())  # written by Trainer.save_metrics

    print("[3/4] reloading the saved folder in a fresh Python without beit3_hf", flush=True)
    similarity_file = out / "reloaded_similarity.pt"
    reload = subprocess.run(
        [sys.executable, "-c", _RELOAD, *map(str, (model_dir, data.karpathy_json, data.image_root, similarity_file))],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if reload.returncode != 0:
        print(reload.stderr[-3000:], file=sys.stderr)
        return reload.returncode
    reloaded = json.loads(reload.stdout.strip().splitlines()[-1])
    scores = torch.load(similarity_file)
    # The package's recall: a tie with a wrong candidate counts against the correct one (no argmax luck).
    reloaded.update(retrieval_recall(scores["similarity"], scores["text_to_image"], ks=(1,)))
    image_ranks = retrieval_ranks(scores["similarity"], scores["text_to_image"])[1]
    best_image = scores["similarity"].argmax(dim=0)
    examples = [
        (reloaded["captions"][t], reloaded["filenames"][int(best_image[t])], int(image_ranks[t]) == 0,
         reloaded["filenames"][int(scores["text_to_image"][t])])
        for t in (0, 7, 13)
    ]  # fmt: skip

    summary = {
        "before": {name: results[f"before_{name}"] for name in METRICS},
        "after": {name: results[f"eval_{name}"] for name in METRICS},
        "train_loss": results["train_loss"],
        "reloaded": {"class": reloaded["class"], "tr_r1": reloaded["tr_r1"], "ir_r1": reloaded["ir_r1"]},
        "model_dir": str(model_dir),
        "seconds": round(time.time() - start),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))

    print("[4/4] summary")
    print("      metric   before  after")
    for name in METRICS:
        print(f"      {name:7s}  {summary['before'][name]:6.3f}  {summary['after'][name]:5.3f}")
    print(
        f"      fresh-process AutoModel -> {reloaded['class']} (code from {reloaded['module']}): "
        f"TR@1 {reloaded['tr_r1']:.3f}, IR@1 {reloaded['ir_r1']:.3f}"
    )
    for caption, found, correct, truth in examples:
        print(f"      {caption!r} -> {found} ({'correct' if correct else 'expected ' + truth})")
    print(f"      saved {model_dir} and {out / 'results.json'} in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
