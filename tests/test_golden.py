"""Numeric parity against golden fixtures made once from the original code (`scripts/make_golden_fixtures.py`).

These tests need no original implementation, so they run everywhere, on every transformers version of the test
matrix: every task's original-format checkpoint goes through the conversion CLI and must reproduce the original's
outputs at 1e-4 (eager and SDPA, in this process and in a fresh process that cannot import `beit3_hf`), captioning
must reproduce the original beam search's ids, and the tokenizer the original's ids.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from beit3_hf.conversion import checkpoint as convert
from beit3_hf.conversion.tasks import TASKS as TASK_TABLE
from beit3_hf.conversion.tokenizer import load_sentencepiece_tokenizer
from beit3_hf.model_card import PIPELINE_TAGS

from oracle_utils import GOLDEN, assert_parity, group, original_checkpoint, read_fixture, run_fresh_python

# The golden fixtures cover every task of the converter's table (a new row needs a fixture).
TASKS = tuple(TASK_TABLE)
REFERENCE = "golden fixtures"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor], dict[str, str]]]:
    """{task: (converted folder, fixture tensors, fixture metadata)}, each converted through the CLI with the
    golden tokenizer, so the folders also hold the processor, image processor and tokenizer."""
    root = tmp_path_factory.mktemp("golden")
    result = {}
    for task in TASKS:
        tensors, metadata = read_fixture(task)
        folder = root / task
        args = [
            "--checkpoint", str(original_checkpoint(tensors, root / f"{task}.pth")), "--task", task,
            "--output", str(folder), "--num-attention-heads", metadata["num_attention_heads"],
            "--sentencepiece", str(GOLDEN / "tokenizer.spm"),
        ]  # fmt: skip
        assert convert.main(args) == 0
        result[task] = (folder, tensors, metadata)
    return result


def test_model_cards_carry_hub_metadata_and_their_usage_snippets_run(converted, tmp_path):
    """Every converted folder has a `README.md` model card: strict metadata with the task's pipeline tag, and a usage
    snippet that runs as written (the folder name swapped for its path) in a process without `beit3_hf`."""
    snippets = []
    for task in TASKS:
        folder = converted[task][0]
        card = ModelCard.load(folder / "README.md", ignore_metadata_errors=False)
        assert card.data.library_name == "transformers" and card.data.license == "mit"
        assert card.data.pipeline_tag == PIPELINE_TAGS[task] and "beit3" in card.data.tags
        assert f"from the original checkpoint `{task}.pth`" in card.text
        (snippet,) = re.findall(r"```python\n(.*?)```", card.text, flags=re.DOTALL)
        assert snippet.count(f'"{task}"') == 2  # the model and the processor load the folder
        snippets.append(f"def run_{task.replace('-', '_')}():\n" + "".join(
            f"    {line}\n" for line in snippet.replace(f'"{task}"', repr(str(folder))).splitlines()
        ) + f"    print('ran {task}')\nrun_{task.replace('-', '_')}()\n")  # fmt: skip
    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "image.jpg")
    result = run_fresh_python("\n".join(snippets), tmp_path)
    assert all(f"ran {task}" in result.stdout for task in TASKS)
    assert "tensor([[" in result.stdout  # the retrieval snippet's probabilities, printed


PIPELINES = """
import sys
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

folders = dict(zip(("image-classification", "retrieval", "vqa", "nlvr2", "captioning"), sys.argv[1:]))
red, blue = Image.new("RGB", (50, 40), (200, 30, 30)), Image.new("RGB", (30, 60), (20, 40, 220))
close = lambda a, b: torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)

def direct(task, **inputs):
    model = AutoModel.from_pretrained(folders[task], trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folders[task], trust_remote_code=True)
    with torch.no_grad():
        return model, model(**processor(**inputs, return_tensors="pt"))

# image-classification: the top-k of the model's softmax.
top = pipeline("image-classification", model=folders["image-classification"], trust_remote_code=True)(red, top_k=3)
model, out = direct("image-classification", images=red)
expected = out.logits[0].softmax(-1).topk(3)
assert [r["label"] for r in top] == [model.config.id2label[i] for i in expected.indices.tolist()], top
close([r["score"] for r in top], expected.values.tolist())

# zero-shot-image-classification: the retrieval model's softmax over the prompts.
labels = ["dog", "cat", "car"]
zero_shot = pipeline("zero-shot-image-classification", model=folders["retrieval"], trust_remote_code=True)
scores = {r["label"]: r["score"] for r in zero_shot(blue, candidate_labels=labels)}
_, out = direct("retrieval", images=blue, text=[f"This is a photo of {label}." for label in labels])
close([scores[label] for label in labels], out.logits_per_image[0].softmax(-1).tolist())

# visual-question-answering (custom pipeline of the folder): the top-k sigmoid scores over id2label.
vqa = pipeline("visual-question-answering", model=folders["vqa"], trust_remote_code=True)
answers = vqa(red, "what colour is it?", top_k=2)
assert vqa(red, question="what colour is it?", top_k=2) == answers
model, out = direct("vqa", images=red, text="what colour is it?")
expected = out.logits[0].sigmoid().topk(2)
assert [a["answer"] for a in answers] == [model.config.id2label[i] for i in expected.indices.tolist()], answers
close([a["score"] for a in answers], expected.values.tolist())

# visual-reasoning (custom pipeline of the folder): an NLVR2 image pair and a statement.
nlvr2 = pipeline("visual-reasoning", model=folders["nlvr2"], trust_remote_code=True)
verdict = nlvr2((red, blue), statement="one is red.")
assert nlvr2({"images": (red, blue), "statement": "one is red."}) == verdict
model, out = direct("nlvr2", images=[(red, blue)], text=["one is red."])
probabilities = out.logits[0].softmax(-1)
assert verdict["label"] == model.config.id2label[int(probabilities.argmax())], verdict
close(verdict["score"], probabilities.max().item())

# image-text-to-text with an empty prompt: the caption of `generate` (the original beam search of the folder's
# generation_config.json), and transformers' greedy search through generate_kwargs.
captioner = pipeline("image-text-to-text", model=folders["captioning"], trust_remote_code=True)
model = AutoModel.from_pretrained(folders["captioning"], trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folders["captioning"], trust_remote_code=True)
for generate_kwargs in ({}, {"original_beam_search": False, "num_beams": 1, "max_new_tokens": 6}):
    (caption,) = captioner(images=blue, text="", generate_kwargs=generate_kwargs)
    ids = model.generate(**processor(images=blue, text="", return_tensors="pt"), **generate_kwargs)
    assert caption["generated_text"] == processor.batch_decode(ids, skip_special_tokens=True)[0], caption
    assert caption["generated_text"].strip(), "an empty caption proves nothing"
print("pipelines equal the models")
"""


def test_pipelines_equal_the_models(converted, tmp_path):
    """transformers' image-classification, zero-shot-image-classification and image-text-to-text pipelines, and
    the folders' own visual-question-answering and visual-reasoning pipelines, in a process without `beit3_hf`."""
    tasks = ("image-classification", "retrieval", "vqa", "nlvr2", "captioning")
    folders = [str(converted[task][0]) for task in tasks]
    result = run_fresh_python(PIPELINES, tmp_path, args=tuple(folders))
    assert "pipelines equal the models" in result.stdout


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_converted_outputs_equal_the_golden_outputs(converted, task, attn_implementation):
    folder, tensors, _ = converted[task]
    model = convert.TASK_CLASSES[task].from_pretrained(folder, attn_implementation=attn_implementation).eval()
    outputs = group(tensors, "outputs")
    for variant, inputs in group(tensors, "inputs").items():
        with torch.no_grad():
            actual = model(**inputs)
        assert_parity(actual, outputs[variant], REFERENCE, f"{task}/{variant} {attn_implementation}")


def test_fresh_process_loads_every_folder_and_equals_the_golden_outputs(converted, tmp_path):
    """Every converted folder (model, processor, image processor, tokenizer) loads with `trust_remote_code=True`
    in an interpreter where `beit3_hf` cannot be imported, as the model's own class, and computes the same outputs."""
    jobs = {}
    for task, (folder, tensors, _) in converted.items():
        for variant, inputs in group(tensors, "inputs").items():
            inputs_file = tmp_path / f"{task}-{variant}-inputs.safetensors"
            save_file({name: value.contiguous() for name, value in inputs.items()}, inputs_file)
            jobs[f"{task}/{variant}"] = {"folder": str(folder), "inputs": str(inputs_file)}
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    result = run_fresh_python(
        """
        import json
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer

        report = {}
        for key, job in json.load(open("jobs.json")).items():
            model = AutoModel.from_pretrained(job["folder"], trust_remote_code=True).eval()
            with torch.no_grad():
                out = model(**load_file(job["inputs"]))
            save_file({k: v.contiguous() for k, v in out.items() if isinstance(v, torch.Tensor)},
                      key.replace("/", "-") + "-outputs.safetensors")
            processor = AutoProcessor.from_pretrained(job["folder"], trust_remote_code=True)
            image_processor = AutoImageProcessor.from_pretrained(job["folder"], trust_remote_code=True)
            tokenizer = AutoTokenizer.from_pretrained(job["folder"], trust_remote_code=True)
            report[key] = {"class": type(model).__name__, "module": type(model).__module__,
                           "processor": type(processor).__name__, "image_processor": type(image_processor).__name__,
                           "ids": tokenizer("A man riding a wave")["input_ids"]}
        print(json.dumps(report))
        """,
        tmp_path,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    expected_ids = load_sentencepiece_tokenizer(GOLDEN / "tokenizer.spm")("A man riding a wave")["input_ids"]
    for key, job_report in report.items():
        task, variant = key.split("/")
        assert job_report["class"] == convert.TASK_CLASSES[task].__name__
        assert job_report["module"].startswith("transformers_modules."), "must run the folder's copy of the code"
        assert job_report["processor"] == "Beit3Processor" and job_report["ids"] == expected_ids
        outputs = group(converted[task][1], "outputs")[variant]
        assert_parity(load_file(tmp_path / f"{task}-{variant}-outputs.safetensors"), outputs, REFERENCE, key)


@pytest.mark.parametrize("ending", ["long", "short"])
@pytest.mark.parametrize("num_beams", [1, 2, 3])
def test_generate_equals_the_original_beam_search(converted, tmp_path, ending, num_beams):
    _, tensors, metadata = converted["captioning"]
    bias = {"mlm_head.bias": tensors[f"beams/{ending}/weights/mlm_head.bias"]}
    folder = tmp_path / "captioning"
    args = [
        "--checkpoint", str(original_checkpoint(tensors, tmp_path / "captioning.pth", bias)), "--task", "captioning",
        "--output", str(folder), "--num-attention-heads", metadata["num_attention_heads"],
        "--mask-token-id", metadata["mask_token_id"],
    ]  # fmt: skip
    assert convert.main(args) == 0
    model = convert.TASK_CLASSES["captioning"].from_pretrained(folder).eval()
    recipe = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    assert {key: recipe.get(key) for key in ("num_beams", "length_penalty", "original_beam_search")} == {
        "num_beams": 3, "length_penalty": 0.6, "original_beam_search": True,
    }  # fmt: skip
    assert recipe["max_length"] == min(32, model.config.max_position_embeddings)
    assert not {"repetition_penalty", "min_length", "no_repeat_ngram_size", "do_sample"} & set(recipe)
    max_length, mask = int(metadata["max_length"]), int(metadata["mask_token_id"])
    # The folder's generation_config.json (num_beams=3, length_penalty=0.6), with the fixture's beams and length.
    generated = model.generate(tensors["beams/pixel_values"], num_beams=num_beams, max_length=max_length)
    expected = tensors[f"beams/{ending}/num_beams_{num_beams}"]
    # The original keeps the `<mask>` placeholder of the step that ended a caption in front of `</s>`; we return
    # `<s> tokens </s>` and padding.
    pad = model.config.pad_token_id
    for ours, theirs in zip(generated.tolist(), expected.tolist()):
        theirs = [token for token in theirs if token != mask]
        assert ours == theirs[: len(ours)] and set(theirs[len(ours) :]) <= {pad}
    lengths = (generated != pad).sum(1)
    if ending == "short":
        assert lengths.min() < max_length - 1, "the fixture must hold captions that end at </s>"
    else:
        assert lengths.max() == max_length - 1, "the fixture must hold captions cut at max_length"


def test_tokenizer_ids_equal_the_original(tmp_path):
    fixture = json.loads((GOLDEN / "tokenizer_ids.json").read_text(encoding="utf-8"))
    tokenizer = load_sentencepiece_tokenizer(GOLDEN / "tokenizer.spm")
    tokenizer.save_pretrained(tmp_path)
    kwargs = dict(padding="max_length", truncation=True, max_length=fixture["max_length"])
    for loaded in (tokenizer, AutoTokenizer.from_pretrained(tmp_path)):
        encoded = loaded(fixture["texts"], **kwargs)
        assert encoded["input_ids"] == fixture["input_ids"]
        assert encoded["attention_mask"] == fixture["attention_mask"]
        assert loaded.mask_token_id == fixture["mask_token_id"]
