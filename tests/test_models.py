"""Backbones, head, freezing policy, weight loading and export/import (fer_dist.models)."""

from __future__ import annotations

import functools
import json
import shutil
import struct
from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from fer_dist.classes import CLASSES
from fer_dist.errors import FerDistError
from fer_dist.models import (
    BACKBONES,
    ModelSpec,
    apply_trainable,
    build_model,
    count_parameters,
    export_model,
    load_exported,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
MOBILENET_V2_FILE = SHARED / "torch_home" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
ALL_BACKBONES = ["vggface", "small_cnn", "resnet18", "resnet34", "resnet50", "mobilenet_v2",
                 "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"]
# The VGG-Face conversion's conv layers: (name, in, out), all 3x3.
VGG_CONVS = [("conv1_1", 3, 64), ("conv1_2", 64, 64), ("conv2_1", 64, 128), ("conv2_2", 128, 128),
             ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256),
             ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512),
             ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512)]


def small(backbone: str, **kw) -> ModelSpec:
    """A from-scratch spec at a CPU-friendly size (64 px; small_cnn at its own 48)."""
    kw.setdefault("input_size", None if backbone == "small_cnn" else 64)
    return ModelSpec(backbone=backbone, pretrained=False, trainable="all", **kw)


@functools.cache
def shared_model(backbone: str):
    """One model per backbone for tests that only set and read requires_grad (apply_trainable resets it)."""
    return build_model(small(backbone))


def batch(model, n: int = 2) -> torch.Tensor:
    s = model.input_spec
    return torch.randn(n, s.channels, s.size, s.size, generator=torch.Generator().manual_seed(0))


def raises_one_line(fn, *needles: str) -> str:
    with pytest.raises(FerDistError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def no_download(monkeypatch) -> None:
    def refuse(url, *args, **kwargs):
        raise OSError(f"network disabled in tests: {url}")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


# ---- building, forward, backward ----------------------------------------------------------------------

@pytest.mark.parametrize("backbone,k", [(b, 7) for b in ALL_BACKBONES] + [("small_cnn", 5), ("resnet18", 5)])
def test_every_backbone_runs_forward_and_backward(backbone, k):
    model = build_model(small(backbone, num_classes=k)).train()
    logits = model(batch(model))
    assert logits.shape == (2, k)
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in model.head.parameters())
    assert next(iter(model.backbone.parameters())).grad is not None


def test_unknown_backbone_lists_the_known_ones():
    msg = raises_one_line(lambda: ModelSpec(backbone="vgg19"), "model.backbone", "vgg19")
    assert all(name in msg for name in ALL_BACKBONES)
    assert set(BACKBONES) == {*ALL_BACKBONES, "dlib_resnet"}  # dlib_resnet (>= 103 px): test_dlib_resnet.py


@pytest.mark.parametrize("backbone,size,channels,mean,std", [
    ("vggface", 224, 3, (0.5066, 0.4108, 0.3670), (1 / 255,) * 3),
    ("resnet18", 224, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("mobilenet_v2", 224, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("small_cnn", 48, 1, (0.5,), (0.5,)),
])
def test_input_spec_comes_with_the_backbone(backbone, size, channels, mean, std):
    spec = build_model(ModelSpec(backbone=backbone, pretrained=False)).input_spec
    assert (spec.size, spec.channels) == (size, channels)
    assert spec.mean == pytest.approx(mean, abs=1e-4) and spec.std == pytest.approx(std)


def test_input_size_override_and_channel_check():
    model = build_model(ModelSpec(backbone="mobilenet_v2", pretrained=False, input_size=48))
    assert model.input_spec.size == 48 and model.input_spec.channels == 3
    assert model.eval()(torch.zeros(1, 3, 48, 48)).shape == (1, 7)
    raises_one_line(lambda: model(torch.zeros(1, 1, 48, 48)), "model:", "[N, 3, H, W]")


def test_uint8_faces_are_normalised_with_the_input_spec():
    """The loaders deliver uint8 pixels: the model normalises them as a float caller would have."""
    from fer_dist.data.augment import normalise

    model = build_model(ModelSpec(backbone="mobilenet_v2", pretrained=False, input_size=32)).eval()
    faces = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    floats = (faces.float() / 255 - torch.tensor(model.input_spec.mean).view(1, 3, 1, 1)) \
        / torch.tensor(model.input_spec.std).view(1, 3, 1, 1)
    assert torch.allclose(normalise(faces, model.input_spec), floats, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(model(faces), model(floats), atol=1e-5)


def test_small_cnn_is_small_and_trains_whole_from_scratch():
    model = build_model(ModelSpec(backbone="small_cnn"))
    total, trainable = count_parameters(model)
    assert model.spec.backbone == "small_cnn" and 300_000 <= total <= 1_000_000
    # From scratch: the default last_block would freeze random layers, so all of it trains.
    assert trainable == total and model.trainable == "all"
    apply_trainable(model, "head")
    assert count_parameters(model) == (total, sum(p.numel() for p in model.head.parameters()))


# ---- freezing policy ----------------------------------------------------------------------------------

def _features(*indices: int) -> tuple[str, ...]:
    return tuple(f"backbone.features.{i}." for i in indices)


@pytest.mark.parametrize("backbone,policy,trained", [
    ("resnet18", "all", ("backbone.", "head.")),
    ("resnet18", "head", ("head.",)),
    ("resnet18", "last_block", ("backbone.layer4.", "head.")),
    ("resnet18", "last_n_blocks:2", ("backbone.layer3.", "backbone.layer4.", "head.")),
    ("vggface", "last_block", ("backbone.conv5_", "head.")),
    ("vggface", "last_n_blocks:2", ("backbone.conv4_", "backbone.conv5_", "head.")),
    ("small_cnn", "last_block", ("backbone.features.3.", "head.")),
    ("mobilenet_v2", "last_block", _features(14, 15, 16, 17, 18) + ("head.",)),
    ("mobilenet_v3_large", "last_block", _features(13, 14, 15, 16) + ("head.",)),
    ("efficientnet_b0", "last_block", _features(7, 8) + ("head.",)),
    ("convnext_tiny", "last_block", _features(6, 7) + ("backbone.classifier.0.", "head.")),
])
def test_policy_sets_exactly_the_expected_parameters(backbone, policy, trained):
    model = shared_model(backbone)
    apply_trainable(model, policy)
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith(trained), name
    assert model.trainable == policy


# What no block holds: trained only under `all`.
@pytest.mark.parametrize("backbone,stem", [
    ("vggface", ()), ("small_cnn", ()), ("resnet18", ("conv1.", "bn1.")), ("resnet50", ("conv1.", "bn1.")),
    ("mobilenet_v2", ("features.0.",)), ("mobilenet_v3_large", ("features.0.",)),
    ("efficientnet_b0", ("features.0.",)), ("convnext_tiny", ("features.0.",)),
])
def test_blocks_are_disjoint_and_cover_all_but_the_stem(backbone, stem):
    model = shared_model(backbone)
    seen: set[int] = set()
    for block in model.blocks():
        ids = {id(p) for m in block for p in m.parameters()}
        assert ids and not ids & seen
        seen |= ids
    outside = [n for n, p in model.backbone.named_parameters() if id(p) not in seen]
    assert all(n.startswith(stem) for n in outside) and bool(outside) == bool(stem)
    apply_trainable(model, f"last_n_blocks:{len(model.blocks())}")
    assert sorted(n for n, p in model.backbone.named_parameters() if not p.requires_grad) == sorted(outside)


@pytest.mark.parametrize("backbone,policy", [("resnet18", "last_block"), ("small_cnn", "last_n_blocks:2"),
                                             ("vggface", "last_block"), ("mobilenet_v2", "head")])
def test_frozen_parameters_get_no_grad_and_never_move(backbone, policy):
    model = build_model(small(backbone))
    apply_trainable(model, policy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Every parameter goes to the optimizer: frozen ones must be skipped because they have no grad.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    F.cross_entropy(model(batch(model)), torch.tensor([0, 1])).backward()
    opt.step()
    moved = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and torch.equal(p, before[name]), name
        else:
            assert p.grad is not None, name
            if p.grad.abs().sum() > 0:
                assert not torch.equal(p, before[name]), name
                moved += 1
    assert moved >= 4


def test_frozen_batchnorm_keeps_its_running_stats():
    model = build_model(small("resnet18"))
    apply_trainable(model, "last_block")
    model.eval().train()  # train() after eval() must still leave frozen BN in eval
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    stats = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in bns.items()}
    model(batch(model))
    for name, m in bns.items():
        frozen = not name.startswith("backbone.layer4.")
        assert m.training != frozen, name
        unchanged = torch.equal(m.running_mean, stats[name][0]) and torch.equal(m.running_var, stats[name][1])
        assert unchanged == frozen, name
    assert model.head.training
    apply_trainable(model, "all")
    assert all(m.training for m in bns.values())


@pytest.mark.parametrize("policy", ["", "some", "last", "last_n_blocks", "last_n_blocks:", "last_n_blocks:0",
                                    "last_n_blocks:x", "last_n_blocks:-1", "last_n_blocks:5", "ALL"])
def test_bad_policies_name_model_trainable(policy):
    model = shared_model("small_cnn")  # 4 blocks: 5 is too many
    raises_one_line(lambda: apply_trainable(model, policy), "model.trainable", repr(policy))
    if policy != "last_n_blocks:5":
        raises_one_line(lambda: ModelSpec(trainable=policy), "model.trainable")


# ---- ModelSpec ----------------------------------------------------------------------------------------

def test_model_spec_round_trips_and_refuses_bad_values():
    spec = ModelSpec(backbone="resnet18", num_classes=5, pretrained=False, trainable="last_n_blocks:2",
                     input_size=64, hidden=64, dropout=0.5)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    raises_one_line(lambda: ModelSpec.from_dict({"backbon": "x"}), "model.backbon", "unknown key")
    raises_one_line(lambda: ModelSpec.from_dict({"num_classes": "7"}), "model.num_classes")
    raises_one_line(lambda: ModelSpec.from_dict({"num_classes": True}), "model.num_classes")
    assert ModelSpec.from_dict({"backbone": "small_cnn", "dropout": 0}).dropout == 0
    raises_one_line(lambda: ModelSpec(num_classes=1), "model.num_classes")
    raises_one_line(lambda: ModelSpec(dropout=1.0), "model.dropout")
    raises_one_line(lambda: ModelSpec(backbone="resnet18", input_size=16), "model.input_size")
    raises_one_line(lambda: ModelSpec(backbone="vggface"), "model.weights", "pretrained: false")


# ---- VGG-Face weights file ----------------------------------------------------------------------------

def vgg_state() -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, c_in, c_out in VGG_CONVS:
        state[f"{name}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * 0.01
        state[f"{name}.bias"] = torch.randn(c_out, generator=g) * 0.01
    # fc6-fc8 at their real names but small (the real fc6 alone is 4096 x 25088): the head replaces them.
    for name, shape in (("fc6", (16, 32)), ("fc7", (16, 16)), ("fc8", (2622, 16))):
        state[f"{name}.weight"] = torch.zeros(shape)
        state[f"{name}.bias"] = torch.zeros(shape[0])
    return state


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vggface") / "vgg_face_dag.pth"
    torch.save(vgg_state(), path)
    return path


def vgg_spec(weights: Path, **kw) -> ModelSpec:
    return ModelSpec(backbone="vggface", weights=str(weights), input_size=64, **kw)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_vggface_loads_the_conversion_layout(vgg_file, tmp_path, suffix):
    path = vgg_file
    if suffix == ".safetensors":
        path = tmp_path / "vgg_face.safetensors"
        safetensors.torch.save_file(dict(vgg_state()), str(path))
    model = build_model(vgg_spec(path))
    state = vgg_state()
    assert torch.equal(model.backbone.conv5_3.weight, state["conv5_3.weight"])
    assert torch.equal(model.backbone.conv1_1.bias, state["conv1_1.bias"])
    assert model.trainable == "last_block"  # the paper's default: conv5 block + the new FC layers
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in model.named_parameters() if n.startswith(("backbone.conv5_", "head."))}
    assert model.head[0].in_features == 512 * 7 * 7 and model.head[0].out_features == 128
    assert model.head[2].p == 0.6
    assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 7)


def test_vggface_wrong_conv_shape_is_one_line(tmp_path):
    state = vgg_state()
    state["conv5_3.weight"] = torch.zeros(512, 512, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    raises_one_line(lambda: build_model(vgg_spec(path)), str(path), "conv5_3.weight", "(512, 512, 3, 3)")


class NotATensor:
    pass


@pytest.mark.parametrize("content,needles", [
    ({"conv1_1.weight": torch.zeros(64, 3, 3, 3)}, ("missing key 'conv1_1.bias'",)),
    ({"conv6_1.weight": torch.zeros(1)}, ("unexpected key 'conv6_1.weight'",)),
    ({"conv1_1.weight": 3}, ("not a state dict",)),
    ({"conv1_1.weight": NotATensor()}, ("not a readable weights file",)),
    (b"\x00garbage", ("not a readable weights file",)),
    (None, ("weights file not found",)),
])
def test_bad_vggface_files_are_one_line(tmp_path, content, needles):
    path = tmp_path / "vgg.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    raises_one_line(lambda: build_model(vgg_spec(path)), str(path), *needles)


def test_local_weights_file_for_another_backbone_applies_the_policy(tmp_path):
    source = build_model(small("small_cnn"))
    path = tmp_path / "small.pth"
    torch.save(source.backbone.state_dict(), path)
    model = build_model(ModelSpec(backbone="small_cnn", weights=str(path)))
    assert torch.equal(model.backbone.features[0][0][0].weight, source.backbone.features[0][0][0].weight)
    assert model.trainable == "last_block"
    assert not model.backbone.features[2][0][0].weight.requires_grad


# ---- torchvision's ImageNet weights -------------------------------------------------------------------

@pytest.mark.shared
@pytest.mark.skipif(not MOBILENET_V2_FILE.is_file(), reason="../shared/torch_home is absent")
def test_mobilenet_v2_imagenet_weights_load_from_torch_home(monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(SHARED / "torch_home"))
    no_download(monkeypatch)
    model = build_model(ModelSpec(backbone="mobilenet_v2", input_size=48))
    reference = torch.load(MOBILENET_V2_FILE, map_location="cpu", weights_only=True)
    assert torch.equal(model.backbone.features[0][0].weight, reference["features.0.0.weight"])
    assert torch.equal(model.backbone.features[18][1].running_var, reference["features.18.1.running_var"])
    assert model.trainable == "last_block" and not model.backbone.features[13].conv[0][0].weight.requires_grad
    assert model.eval()(torch.zeros(2, 3, 48, 48)).shape == (2, 7)


@pytest.mark.parametrize("damaged", [False, True])
def test_missing_imagenet_weights_say_where_to_put_them(monkeypatch, tmp_path, damaged):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    no_download(monkeypatch)
    checkpoints = tmp_path / "hub" / "checkpoints"
    if damaged:
        checkpoints.mkdir(parents=True)
        (checkpoints / "resnet18-f37072fd.pth").write_bytes(b"not a checkpoint")
    needles = ("replace it",) if damaged else (str(checkpoints), "not found")
    raises_one_line(lambda: build_model(ModelSpec(backbone="resnet18")),
                    "resnet18-f37072fd.pth", "model.pretrained: false", *needles)


# ---- export / import ----------------------------------------------------------------------------------

def trained_a_little(spec: ModelSpec):
    model = build_model(spec).train()
    with torch.no_grad():
        for _ in range(2):  # move the BatchNorm statistics away from their initial values
            model(batch(model, 4))
    return model.eval()


def test_export_then_import_gives_identical_outputs(tmp_path):
    model = trained_a_little(ModelSpec(backbone="small_cnn", trainable="last_n_blocks:2"))
    out = export_model(model, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp dir left behind
    loaded = load_exported(out)
    x = batch(model, 3)
    assert not loaded.training and torch.equal(loaded(x), model(x))
    meta = json.loads((out / "model.json").read_text())
    assert meta["format"] == "fer-dist-model/1" and meta["created_by"].startswith("fer-dist ")
    assert ModelSpec.from_dict(meta["model"]) == model.spec == loaded.spec
    assert meta["input_spec"] == {"size": 48, "channels": 1, "mean": [0.5], "std": [0.5]}
    assert loaded.input_spec == model.input_spec and loaded.classes == CLASSES == tuple(meta["classes"])
    assert meta["trainable"] == loaded.trainable == "all"
    raw = (out / "model.safetensors").read_bytes()  # safetensors: u64 header length, then a JSON header
    header = json.loads(raw[8: 8 + struct.unpack("<Q", raw[:8])[0]])
    assert "head.3.weight" in header
    export_model(loaded, out)  # replacing an existing export is allowed
    assert torch.equal(load_exported(out)(x), model(x))


def test_export_of_pretrained_vggface_needs_no_original_weights(tmp_path, vgg_file):
    weights = tmp_path / "vgg.pth"
    shutil.copy(vgg_file, weights)
    model = build_model(vgg_spec(weights, num_classes=5)).eval()
    raises_one_line(lambda: export_model(model, tmp_path / "a"), "5 classes", "classes=")
    names = ["a", "b", "c", "d", "e"]
    export_model(model, tmp_path / "export", classes=names)
    weights.unlink()
    loaded = load_exported(tmp_path / "export")
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))
    assert loaded.classes == tuple(names) and loaded.spec.weights == str(weights)
    assert loaded.trainable == "last_block" and not loaded.backbone.conv4_3.weight.requires_grad


def test_export_refuses_to_overwrite_a_foreign_directory(tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    raises_one_line(lambda: export_model(shared_model("small_cnn"), foreign), str(foreign), "not overwriting")
    assert (foreign / "todo.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["notes"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return export_model(build_model(small("small_cnn")), tmp_path_factory.mktemp("exp") / "model")


def _edit_json(d: Path, **changes) -> None:
    meta = json.loads((d / "model.json").read_text())
    for key, value in changes.items():
        if key == "model":
            meta["model"].update(value)
        else:
            meta[key] = value
    meta["weights"].pop("sha256")
    (d / "model.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage,file,needles", [
    (lambda d: shutil.rmtree(d), "model.json", ("not found",)),
    (lambda d: (d / "model.json").write_text("{"), "model.json", ("not valid JSON",)),
    (lambda d: _edit_json(d, format="other/1"), "model.json", ("'other/1'",)),
    (lambda d: _edit_json(d, model={"colour": 1}), "model.json", ("model.colour",)),
    (lambda d: _edit_json(d, trainable="most"), "model.json", ("model.trainable",)),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors", ("not found",)),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x10" * 64), "model.safetensors", ("sha256",)),
    (lambda d: (_edit_json(d), (d / "model.safetensors").write_bytes(b"\x10" * 64)), "model.safetensors",
     ("not a readable weights file",)),
    (lambda d: _edit_json(d, model={"backbone": "mobilenet_v2", "input_size": 48}), "model.safetensors",
     ("unexpected key",)),
])
def test_bad_exports_are_one_line(tmp_path, exported, damage, file, needles):
    d = tmp_path / "model"
    shutil.copytree(exported, d)
    damage(d)
    raises_one_line(lambda: load_exported(d), str(d / file), *needles)
