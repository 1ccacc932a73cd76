"""Visual tokenizers: BEiT v2 VQ-KD and the DALL-E dVAE encoder, their conversion and the restricted unpickler.

VQ-KD parity uses golden fixtures made by `scripts/make_vqkd_fixtures.py` from the original unilm `beit2` code (no unilm
code at test time). DALL-E parity uses the original `dall_e` package (PyPI `dall-e`, installed as a test oracle) with
random weights.
"""

from __future__ import annotations

import ast
import doctest
import io
import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

import beit3_hf.models.dall_e.configuration_dall_e
import beit3_hf.models.dall_e.modeling_dall_e
import beit3_hf.models.vqkd.configuration_vqkd
import beit3_hf.models.vqkd.modeling_vqkd
from beit3_hf.conversion import safe_pickle
from beit3_hf.conversion.safe_pickle import UnsafePickleError, read_pickled_module
from beit3_hf.conversion.tasks import ConversionError
from beit3_hf.conversion.visual_tokenizers import convert_dall_e, convert_vqkd, main
from beit3_hf.models.dall_e import DallEConfig, DallEEncoderModel
from beit3_hf.models.dall_e import register as register_dall_e
from beit3_hf.models.vqkd import VqkdConfig, VqkdModel
from beit3_hf.models.vqkd import register as register_vqkd

from oracle_utils import assert_parity, run_fresh_python

register_vqkd()
register_dall_e()

FIXTURES = Path(__file__).parent / "fixtures" / "vqkd"
FIXTURE_HEADS = json.loads((FIXTURES / "fixture.json").read_text())["num_attention_heads"]
REMOTE_CODE_MODULES = [
    beit3_hf.models.vqkd.configuration_vqkd,
    beit3_hf.models.vqkd.modeling_vqkd,
    beit3_hf.models.dall_e.configuration_dall_e,
    beit3_hf.models.dall_e.modeling_dall_e,
]
DOCTEST_MODULES = [*REMOTE_CODE_MODULES, safe_pickle]


def _tiny_vqkd_config() -> VqkdConfig:
    return VqkdConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        codebook_size=16,
        codebook_dim=8,
    )


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------------------------------------------------
# Remote code
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", DOCTEST_MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("module", REMOTE_CODE_MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_remote_code_imports_only_stdlib_torch_transformers_and_sibling(module):
    tree = ast.parse(Path(module.__file__).read_text())
    folder = Path(module.__file__).parent
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots = {node.module.split(".")[0]}
        elif isinstance(node, ast.ImportFrom):
            # Only `from .configuration_x import Y`: a flat sibling file, which save_pretrained copies.
            assert node.level == 1 and node.module and "." not in node.module
            assert (folder / f"{node.module}.py").is_file()
            continue
        else:
            continue
        assert roots <= set(sys.stdlib_module_names) | {"torch", "transformers", "__future__"}, roots
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            # custom_object_save treats any class named *Tokenizer* as a tokenizer (auto_map entry becomes a list).
            assert "Tokenizer" not in node.name


def test_save_pretrained_writes_code_and_auto_map(tmp_path):
    for model in (
        VqkdModel(_tiny_vqkd_config()),
        DallEEncoderModel(DallEConfig(hidden_size=16, num_blocks_per_group=1, vocab_size=64)),
    ):
        folder = tmp_path / type(model).__name__
        model.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        module = type(model).__module__.rsplit(".", 1)[-1]
        config_module = type(model.config).__module__.rsplit(".", 1)[-1]
        assert config["auto_map"] == {
            "AutoConfig": f"{config_module}.{type(model.config).__name__}",
            "AutoModel": f"{module}.{type(model).__name__}",
        }
        assert {f"{module}.py", f"{config_module}.py"} <= {path.name for path in folder.iterdir()}
        reloaded = AutoModel.from_pretrained(folder)
        assert type(reloaded) is type(model)


# ----------------------------------------------------------------------------------------------------------------------
# VQ-KD
# ----------------------------------------------------------------------------------------------------------------------


def _original_vqkd_state_dict() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "vqkd_tiny_original.safetensors")


def _write_vqkd_pth(path: Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """The fixture as unilm saves it: a .pth with {"model": state_dict, ...}."""
    torch.save({"model": _original_vqkd_state_dict() if state_dict is None else state_dict, "epoch": 9}, path)
    return path


@pytest.fixture(scope="module")
def vqkd_folder(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("vqkd")
    checkpoint = _write_vqkd_pth(tmp / "vqkd_tiny.pth")
    output = tmp / "converted"
    args = ["--kind", "vqkd", "--checkpoint", str(checkpoint), "--output", str(output)]
    assert main([*args, "--num-attention-heads", str(FIXTURE_HEADS)]) == 0
    return output


def test_vqkd_matches_original_fixture(vqkd_folder):
    expected = load_file(FIXTURES / "vqkd_tiny_expected.safetensors")
    model = AutoModel.from_pretrained(vqkd_folder).eval()
    assert isinstance(model, VqkdModel)
    assert (model.config.image_size, model.config.patch_size, model.config.hidden_size) == (32, 8, 32)
    assert (model.config.codebook_size, model.config.codebook_dim, model.config.num_hidden_layers) == (16, 8, 2)
    with torch.no_grad():
        outputs = model(expected["pixel_values"], output_distances=True)
    ids = model.get_codebook_indices(expected["pixel_values"])
    assert ids.dtype == torch.long and ids.shape == (4, 16)
    assert torch.equal(ids, expected["codebook_indices"])
    assert torch.equal(outputs.codebook_indices, expected["codebook_indices"])
    assert expected["codebook_indices"].unique().numel() > 4  # the comparison means something
    actual = {
        "encoder_features": outputs.last_hidden_state,
        "projected_features": outputs.projected_features,
        "distances": outputs.distances.flatten(0, 1),  # (batch * num_patches, codebook_size), as the original
    }
    expected_features = {name: expected[name] for name in actual}
    assert_parity(actual, expected_features, "golden fixtures", "VQ-KD features and distances")
    codebook = model.quantizer.codebook
    torch.testing.assert_close(outputs.quantized_features, codebook[ids], atol=0, rtol=0)


def test_vqkd_inference_has_no_side_effects(monkeypatch):
    model = VqkdModel(_tiny_vqkd_config())

    def forbidden(*args, **kwargs):
        raise AssertionError("the tokenizer must not communicate across processes")

    monkeypatch.setattr(torch.distributed, "all_reduce", forbidden)
    pixel_values = torch.rand(3, 3, 32, 32)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    results = []
    for train in (True, False):
        model.train(train)
        results.append(model(pixel_values).codebook_indices)
        results.append(model.get_codebook_indices(pixel_values))
        after = model.state_dict()
        assert all(torch.equal(before[key], after[key]) for key in before), f"state changed (train={train})"
    assert all(torch.equal(results[0], other) for other in results[1:])
    assert len(list(model.buffers())) == 0


def test_vqkd_input_contract():
    model = VqkdModel(_tiny_vqkd_config()).eval()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(ValueError, match="32x32"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(TypeError, match="floating"):
        model(torch.randint(0, 2, (1, 3, 32, 32)))
    pixel_values = torch.rand(2, 3, 32, 32)
    as_tuple = model(pixel_values, return_dict=False)
    assert torch.equal(as_tuple[0], model.get_codebook_indices(pixel_values))


def test_vqkd_drops_only_listed_keys(tmp_path, capsys):
    state_dict = _original_vqkd_state_dict()
    # What the original tokenizer loader deletes itself (teacher, its input scaling, loss) is dropped and listed.
    state_dict["teacher_model.visual.proj"] = torch.randn(4, 4)
    state_dict["scaling_layer.shift"] = torch.randn(1, 3, 1, 1)
    checkpoint = _write_vqkd_pth(tmp_path / "vqkd.pth", state_dict)
    code, out, err = _cli(
        capsys, "--kind", "vqkd", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"),
        "--num-attention-heads", str(FIXTURE_HEADS),
    )  # fmt: skip
    assert code == 0, err
    assert "decoder" in out and "quantize.embedding.embed_avg" in out and "teacher" in out
    _, dropped = convert_vqkd(checkpoint, num_attention_heads=FIXTURE_HEADS)
    dropped_keys = {key for keys in dropped.values() for key in keys}
    original = _original_vqkd_state_dict()
    assert {key for key in original if key.startswith(("decoder.", "decode_task_layer."))} <= dropped_keys
    assert {"teacher_model.visual.proj", "scaling_layer.shift", "quantize.cluster_size"} <= dropped_keys


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda sd: sd.update({"encoder.blocks.0.gamma_1": torch.ones(32)}), r"encoder\.blocks\.0\.gamma_1"),
        (lambda sd: sd.update({"decoder.head.weight": torch.ones(2, 32)}), r"decoder\.head\.weight"),
        (lambda sd: sd.pop("encoder.blocks.1.mlp.fc2.bias"), r"Missing keys: encoder\.blocks\.1\.mlp\.fc2\.bias"),
        (lambda sd: sd.update({"encoder.cls_token": torch.zeros(1, 1, 32, dtype=torch.long)}), r"encoder\.cls_token"),
        (lambda sd: sd["quantize.embedding.weight"].__setitem__((0, 0), float("nan")), r"quantize\.embedding\.weight"),
        (lambda sd: sd.update({"encode_task_layer.2.weight": torch.ones(7, 32)}), r"encode_task_layer\.2\.weight"),
    ],
    ids=["unknown-key", "unknown-decoder-key", "missing-key", "integer-tensor", "nan", "wrong-shape"],
)
def test_vqkd_conversion_errors_name_the_keys(tmp_path, capsys, change, message):
    state_dict = _original_vqkd_state_dict()
    change(state_dict)
    checkpoint = _write_vqkd_pth(tmp_path / "bad.pth", state_dict)
    with pytest.raises(ConversionError, match=message):
        convert_vqkd(checkpoint, num_attention_heads=FIXTURE_HEADS)
    code, _, err = _cli(capsys, "--kind", "vqkd", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "o"))
    assert code == 2 and "error:" in err and not (tmp_path / "o").exists()


def test_output_folder_refused_before_reading_checkpoint(tmp_path, capsys):
    missing_checkpoint = str(tmp_path / "does-not-exist.pth")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, _, err = _cli(capsys, "--kind", "vqkd", "--checkpoint", missing_checkpoint, "--output", str(a_file))
    assert code == 2 and "existing file" in err and "does-not-exist" not in err
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    for kind in ("vqkd", "dall-e"):
        code, _, err = _cli(capsys, "--kind", kind, "--checkpoint", missing_checkpoint, "--output", str(full))
        assert code == 2 and "not empty" in err and "--overwrite" in err
    assert [path.name for path in full.iterdir()] == ["keep.txt"]
    # A failed conversion with --overwrite leaves the folder as it was.
    code, _, err = _cli(
        capsys, "--kind", "vqkd", "--checkpoint", missing_checkpoint, "--output", str(full), "--overwrite"
    )
    assert code == 2 and "does-not-exist" in err and [path.name for path in full.iterdir()] == ["keep.txt"]
    # --overwrite replaces the whole folder, as beit3-convert does: no stale file of an earlier conversion survives.
    checkpoint = _write_vqkd_pth(tmp_path / "vqkd.pth")
    code, _, err = _cli(
        capsys, "--kind", "vqkd", "--checkpoint", str(checkpoint), "--output", str(full), "--overwrite",
        "--num-attention-heads", str(FIXTURE_HEADS),
    )  # fmt: skip
    assert code == 0, err
    assert not (full / "keep.txt").exists() and (full / "model.safetensors").exists()
    assert not list(tmp_path.glob(".full.partial-*")), "the staging folder must not be left behind"


def test_vqkd_checkpoint_is_read_without_code(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pth"
    torch.save({"model": _Evil(marker)}, checkpoint)
    with pytest.raises(ConversionError, match="weights_only"):
        convert_vqkd(checkpoint)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------------
# DALL-E dVAE encoder
# ----------------------------------------------------------------------------------------------------------------------


def _original_dall_e_encoder(seed: int = 0):
    from dall_e.encoder import Encoder

    torch.manual_seed(seed)
    # The smallest sizes the original's validators accept (n_hid >= 64, vocab >= 512).
    encoder = Encoder(n_hid=64, n_blk_per_group=2, vocab_size=512)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if name.endswith(".b"):
                param.normal_(0.0, 0.1)  # the original initialises biases to zero
    return encoder.eval()


@pytest.fixture(scope="module")
def dall_e_files(tmp_path_factory) -> dict[str, Path]:
    encoder = _original_dall_e_encoder()
    tmp = tmp_path_factory.mktemp("dall_e")
    files = {"zip": tmp / "encoder.pkl", "legacy": tmp / "encoder_legacy.pkl"}
    torch.save(encoder, files["zip"])
    torch.save(encoder, files["legacy"], _use_new_zipfile_serialization=False)
    return files


@pytest.mark.oracle("dall_e")
@pytest.mark.parametrize("file_format", ["zip", "legacy"])
def test_dall_e_matches_original(dall_e_files, tmp_path, file_format):
    from dall_e.utils import map_pixels

    encoder = _original_dall_e_encoder()
    output = tmp_path / "converted"
    assert main(["--kind", "dall-e", "--checkpoint", str(dall_e_files[file_format]), "--output", str(output)]) == 0
    model = AutoModel.from_pretrained(output).eval()
    assert isinstance(model, DallEEncoderModel)
    config = model.config
    assert (config.hidden_size, config.num_groups, config.num_blocks_per_group, config.vocab_size) == (64, 4, 2, 512)
    assert config.post_gain == 1 / 64
    pixel_values = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = encoder(map_pixels(pixel_values))
        outputs = model(pixel_values)
    assert outputs.logits.shape == reference.shape == (3, 512, 4, 4)
    assert_parity(outputs.logits, reference, "original", f"dVAE logits ({file_format} format)")
    assert reference.abs().max().item() > 0.1  # the comparison means something
    expected_ids = reference.argmax(dim=1).flatten(1)
    assert torch.equal(outputs.codebook_indices, expected_ids)
    assert torch.equal(model.get_codebook_indices(pixel_values), expected_ids)


@pytest.mark.oracle("dall_e")
def test_dall_e_reads_sizes_from_tensors(tmp_path):
    from dall_e.encoder import Encoder

    encoder = Encoder(n_hid=68, n_blk_per_group=1, vocab_size=520, input_channels=1)
    torch.save(encoder, tmp_path / "encoder.pkl")
    config = convert_dall_e(tmp_path / "encoder.pkl").config
    assert (config.hidden_size, config.num_blocks_per_group, config.vocab_size, config.num_channels) == (68, 1, 520, 1)
    assert config.post_gain == 1 / 16


def test_dall_e_refuses_other_modules(tmp_path):
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "other.pkl")
    with pytest.raises(ConversionError, match=r"torch\.nn\.modules\.container\.Sequential"):
        convert_dall_e(tmp_path / "other.pkl")


# ----------------------------------------------------------------------------------------------------------------------
# The restricted unpickler
# ----------------------------------------------------------------------------------------------------------------------


class _Evil:
    """Unpickling this runs a shell command that creates `marker` (with a normal unpickler)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_evil(kind: str, path: Path, marker: Path) -> None:
    if kind == "plain-pickle":
        path.write_bytes(pickle.dumps(_Evil(marker)))
    elif kind == "torch-zip":
        torch.save(_Evil(marker), path)
    else:
        torch.save(_Evil(marker), path, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize("kind", ["plain-pickle", "torch-zip", "torch-legacy"])
def test_malicious_pickles_are_refused_without_running(tmp_path, capsys, kind):
    # The payload is live: a normal load runs it.
    _write_evil(kind, tmp_path / "live.pkl", tmp_path / "live-marker")
    if kind == "plain-pickle":
        pickle.loads((tmp_path / "live.pkl").read_bytes())
    else:
        torch.load(tmp_path / "live.pkl", weights_only=False)
    assert (tmp_path / "live-marker").exists()

    marker = tmp_path / "marker"
    path = tmp_path / "encoder.pkl"
    _write_evil(kind, path, marker)
    with pytest.raises(UnsafePickleError, match=r"recorded (posix|os|nt)\.system"):
        read_pickled_module(path)
    code, _, err = _cli(capsys, "--kind", "dall-e", "--checkpoint", str(path), "--output", str(tmp_path / "out"))
    assert code == 2 and "Refused" in err and "system" in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.oracle("dall_e")
def test_hidden_payloads_never_run(tmp_path):
    marker = tmp_path / "marker"
    encoder = _original_dall_e_encoder()
    # A payload in a plain attribute is recorded, never called, and not part of the weights.
    encoder.payload = _Evil(marker)
    torch.save(encoder, tmp_path / "attribute.pkl")
    module = read_pickled_module(tmp_path / "attribute.pkl")
    assert "payload" not in module.attributes and not marker.exists()
    convert_dall_e(tmp_path / "attribute.pkl")
    assert not marker.exists()
    # A payload where a parameter should be is refused, naming it.
    encoder = _original_dall_e_encoder()
    encoder.blocks.input._parameters["w"] = _Evil(marker)
    torch.save(encoder, tmp_path / "parameter.pkl")
    with pytest.raises(UnsafePickleError, match=r"blocks\.input\.w is a <recorded (posix|os|nt)\.system>"):
        read_pickled_module(tmp_path / "parameter.pkl")
    assert not marker.exists()


def test_restricted_unpickler_hands_out_no_real_globals():
    unpickler = safe_pickle.RestrictedUnpickler(io.BytesIO(b""))
    names = [("os", "system"), ("builtins", "eval"), ("__builtin__", "exec"), ("dall_e.encoder", "Encoder")]
    for module, name in names:
        stand_in = unpickler.find_class(module, name)
        assert isinstance(stand_in, type) and issubclass(stand_in, safe_pickle.RecordedObject)
        assert stand_in("touch x")._pickle_args == ("touch x",)
    assert unpickler.find_class("torch", "FloatStorage").dtype == torch.float32
    rebuild = unpickler.find_class("torch._utils", "_rebuild_tensor_v2")
    assert rebuild.function is safe_pickle._rebuild_tensor_v2
    # The BUILD opcode cannot set attributes of the helpers handed to the pickle.
    for helper in (rebuild, unpickler.find_class("torch", "HalfStorage")):
        with pytest.raises(UnsafePickleError, match="refused"):
            helper.__setstate__((None, {"function": print, "dtype": None}))


def test_restricted_unpickler_refuses_cycles_and_non_modules(tmp_path):
    cyclic = torch.nn.Sequential(torch.nn.Linear(2, 2))
    cyclic._modules["again"] = cyclic
    torch.save(cyclic, tmp_path / "cyclic.pkl")
    with pytest.raises(UnsafePickleError, match="cycle"):
        read_pickled_module(tmp_path / "cyclic.pkl")
    torch.save({"w": torch.ones(2)}, tmp_path / "state_dict.pkl")
    with pytest.raises(UnsafePickleError, match="not a pickled nn.Module"):
        read_pickled_module(tmp_path / "state_dict.pkl")
    (tmp_path / "garbage.pkl").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UnsafePickleError, match="cannot be read safely"):
        read_pickled_module(tmp_path / "garbage.pkl")


# ----------------------------------------------------------------------------------------------------------------------
# Fresh process: AutoModel(trust_remote_code=True) without beit3_hf
# ----------------------------------------------------------------------------------------------------------------------


def test_fresh_process_auto_model(vqkd_folder, tmp_path):
    # VQ-KD: the folder converted from the golden fixture. dVAE: a random model saved as the converter saves it
    # (conversion parity against the original is tested above).
    dall_e_folder = tmp_path / "dall_e"
    torch.manual_seed(0)
    DallEEncoderModel(DallEConfig(hidden_size=16, num_blocks_per_group=1, vocab_size=64)).save_pretrained(
        dall_e_folder
    )
    vqkd_inputs = load_file(FIXTURES / "vqkd_tiny_expected.safetensors")["pixel_values"]
    dall_e_inputs = torch.rand(2, 3, 32, 32)
    save_file({"vqkd": vqkd_inputs, "dall_e": dall_e_inputs}, tmp_path / "inputs.safetensors")
    run_fresh_python(
        """
        import sys
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModel

        inputs = load_file("inputs.safetensors")
        outputs = {}
        for name, folder in (("vqkd", sys.argv[1]), ("dall_e", sys.argv[2])):
            model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            outputs[f"{name}.class"] = torch.tensor([ord(c) for c in type(model).__name__])
            outputs[f"{name}.ids"] = model.get_codebook_indices(inputs[name])
            model.save_pretrained(f"resaved_{name}")
            again = AutoModel.from_pretrained(f"resaved_{name}", trust_remote_code=True).eval()
            assert torch.equal(again.get_codebook_indices(inputs[name]), outputs[f"{name}.ids"])
        save_file(outputs, "outputs.safetensors")
        """,
        tmp_path,
        args=(str(vqkd_folder), str(dall_e_folder)),
    )
    outputs = load_file(tmp_path / "outputs.safetensors")
    name = lambda key: "".join(chr(c) for c in outputs[key].tolist())  # noqa: E731
    assert (name("vqkd.class"), name("dall_e.class")) == ("VqkdModel", "DallEEncoderModel")
    expected = load_file(FIXTURES / "vqkd_tiny_expected.safetensors")["codebook_indices"]
    assert torch.equal(outputs["vqkd.ids"], expected)
    in_process = AutoModel.from_pretrained(dall_e_folder).eval()
    assert torch.equal(outputs["dall_e.ids"], in_process.get_codebook_indices(dall_e_inputs))
