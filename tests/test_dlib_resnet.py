"""dlib_resnet: the `.dat` reader, parity with dlib itself, the freezing policy, export, ONNX, eval, predict.

Files in dlib's format are also written here by a small serialiser of the test's own (`write_dat`), so the
reader's refusals are tested without the package; parity needs the package's file and dlib (dlib-bin).
"""

from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from layouts import make_ck48
from test_models import raises_one_line
from typer.testing import CliRunner

from fer_dist.cli import app
from fer_dist.data.manifest import read_manifest
from fer_dist.data.pack import pack
from fer_dist.data.sources.synthetic import render_face
from fer_dist.errors import FerDistError
from fer_dist.models import ModelSpec, apply_trainable, build_model, export_model, load_exported
from fer_dist.models.dlib_format import LAYERS
from fer_dist.models.dlib_resnet import DLIB_MEAN_255, DlibResNet, find_dat_file, read_dat_state
from fer_dist.models.export import preprocessing_of

SHARED = Path(__file__).resolve().parents[2] / "shared"
CK48 = SHARED / "data" / "ckplus48"


def package_dat() -> Path | None:
    try:
        return find_dat_file()
    except FerDistError:
        return None


DAT = package_dat()
needs_dat = pytest.mark.skipif(DAT is None, reason="face_recognition_models not installed (fer-dist[face])")


# ---- a serialiser of dlib's format, the reader's counterpart (dlib/serialize.h, dlib/dnn/*.h) -------------

def _int(v: int) -> bytes:
    body = abs(v).to_bytes(max(1, (abs(v).bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if v < 0 else 0)]) + body


def _str(s: str) -> bytes:
    return _int(len(s)) + s.encode()


def _float(x: float) -> bytes:
    return _int(round(x * 2**20)) + _int(-20)


def _tensor(a: np.ndarray) -> bytes:
    return _int(2) + b"".join(_int(d) for d in (a.size, 1, 1, 1)) + a.astype("<f4").tobytes()


def _alias(*shape: int) -> bytes:
    return _int(1) + b"".join(_int(d) for d in (*shape, *(1,) * (4 - len(shape))))


EMPTY = _int(2) + _int(0) * 4


def _details(kind: str, name: str, state: dict[str, np.ndarray]) -> bytes:
    if kind == "con":
        w, b = state[f"{name}.weight"], state[f"{name}.bias"]
        down = name == "stem.conv" or (name.endswith(".0.conv1") and not name.startswith("stages.0."))
        stride, pad = (2, 0) if down else (1, w.shape[2] // 2)
        return (_str("con_6") + _tensor(np.concatenate([w.ravel(), b])) + _int(w.shape[0])
                + b"".join(_int(v) for v in (*w.shape[2:], stride, stride, pad, pad)) + _alias(*w.shape)
                + _alias(1, w.shape[0]) + _float(1) * 4 + b"10")
    if kind == "affine":
        g, b = state[f"{name}.weight"], state[f"{name}.bias"]
        return _str("affine_2") + _tensor(np.concatenate([g, b])) + _alias(1, g.size) * 2 + _int(0) + b"0"
    if kind == "fc":
        w = state["descriptor_weight"]  # [128, 256]; dlib stores x @ W with W [256, 128]
        return (_str("fc_3") + _int(w.shape[0]) + _int(w.shape[1]) + _tensor(w.T.ravel()) + _alias(*w.T.shape)
                + _alias(1, w.shape[0]) + _int(1) + _float(1) * 4 + b"0")
    if kind == "relu":
        return _str("relu_2") + b"0"
    if kind in ("max_pool", "avg_pool"):
        size, stride = {"max_pool": (3, 2), "avg_pool": (2, 2)}[kind] if name != "everything" else (0, 1)
        return _str(f"{kind}_2") + b"".join(_int(v) for v in (size, size, stride, stride, 0, 0))
    return _str("add_prev_") if kind == "add_prev" else b""


def write_dat(path: Path, state: dict[str, torch.Tensor], layers=LAYERS) -> Path:
    """`state` (DlibResNet's) in dlib's format: wrappers' versions top-down, then details bottom-up."""
    np_state = {k: v.numpy().astype(np.float32) for k, v in state.items()}
    out = _int(1) + _str("loss_metric_2") + _float(0.04) + _float(0.6)
    out += b"".join(_int(1 if k in ("tag", "skip") else 3 if i == 0 else 2)
                    for i, (k, _) in reversed(list(enumerate(layers))))
    out += _str("input_rgb_image_sized") + b"".join(_float(m) for m in DLIB_MEAN_255) + _int(150) * 2
    for i, (kind, name) in enumerate(layers):
        if kind in ("tag", "skip"):
            continue
        pool_all = kind == "avg_pool" and i == len(layers) - 2
        out += _details(kind, "everything" if pool_all else name, np_state)
        out += b"000" + EMPTY * 3 + (_int(1) if i == 0 else b"")
    path.write_bytes(out)
    return path


@pytest.fixture(scope="module")
def random_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = DlibResNet()
    for name, p in net.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.uniform_(p, -0.1, 0.1)
        elif p.dim() == 1:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    net.descriptor_weight.normal_()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# ---- the reader -------------------------------------------------------------------------------------------

def test_a_written_file_reads_back_exactly(tmp_path, random_state):
    state = read_dat_state(write_dat(tmp_path / "net.dat", random_state))
    assert state.keys() == random_state.keys()
    for key, value in random_state.items():
        assert torch.equal(state[key], value), key


@needs_dat
def test_the_packaged_file_has_dlibs_network():
    state = read_dat_state(DAT)
    assert sum(v.numel() for v in state.values()) == 5_614_592  # conv, affine and the 256x128 descriptor
    net = DlibResNet()
    net.load_state_dict(state)


@pytest.mark.parametrize("damage,needles", [
    (lambda b: b[: len(b) // 2], ["truncated"]),
    (lambda b: b"\x89PNG\r\n\x1a\n" + bytes(range(200)), ["not dlib's face-recognition ResNet"]),
    (lambda b: b + b"\x00\x00", ["2 bytes left"]),
    (lambda b: b"", ["truncated"]),
])
def test_damaged_or_foreign_files_are_one_line(tmp_path, random_state, damage, needles):
    path = tmp_path / "bad.dat"
    path.write_bytes(damage(write_dat(tmp_path / "good.dat", random_state).read_bytes()))
    raises_one_line(lambda: read_dat_state(path), str(path), *needles)


def test_wrong_layer_count_and_shape_are_one_line(tmp_path, random_state):
    unit = LAYERS.index(("con", "stages.0.1.conv1")) - 1  # drop stage 0's second residual unit: 8 layers
    fewer = write_dat(tmp_path / "fewer.dat", random_state, LAYERS[:unit] + LAYERS[unit + 8:])
    raises_one_line(lambda: read_dat_state(fewer), str(fewer), "layer")
    key = "stages.2.1.conv2.weight"
    narrow = dict(random_state, **{key: random_state[key][:, :64]})
    path = write_dat(tmp_path / "narrow.dat", narrow)
    spec = ModelSpec(backbone="dlib_resnet", weights=str(path))
    raises_one_line(lambda: build_model(spec), str(path), "stages.2.1.conv2.weight", "(128, 64, 3, 3)")


def test_missing_package_says_what_to_install(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    raises_one_line(lambda: build_model(ModelSpec(backbone="dlib_resnet")), "fer-dist[face]", "model.weights")
    build_model(ModelSpec(backbone="dlib_resnet", pretrained=False))  # no file needed


def test_model_weights_takes_a_path(tmp_path, random_state):
    path = write_dat(tmp_path / "net.dat", random_state)
    model = build_model(ModelSpec(backbone="dlib_resnet", weights=str(path)))
    assert torch.equal(model.backbone.stages[3][1].conv1.weight, random_state["stages.3.1.conv1.weight"])


def test_inputs_below_the_networks_minimum_are_refused():
    raises_one_line(lambda: ModelSpec(backbone="dlib_resnet", input_size=96), "model.input_size", "103")


# ---- parity with dlib -------------------------------------------------------------------------------------

def _chip(grey: np.ndarray) -> np.ndarray:
    """A 150x150 RGB chip, as the aligned-image overload of compute_face_descriptor requires."""
    grey = cv2.resize(grey, (150, 150), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def _cosines(chips: list[np.ndarray]) -> np.ndarray:
    dlib = pytest.importorskip("dlib", reason="dlib-bin is not installed: no reference to compare with")
    reference = dlib.face_recognition_model_v1(str(DAT))
    expected = np.stack([np.array(reference.compute_face_descriptor(c)) for c in chips])
    model = build_model(ModelSpec(backbone="dlib_resnet", trainable="all")).eval()
    faces = torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2)
    with torch.no_grad():
        got = model.backbone.descriptor((faces.float() - torch.tensor(DLIB_MEAN_255).view(1, 3, 1, 1)) / 256)
    got = got.double().numpy()
    return (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)


@needs_dat
def test_descriptor_matches_dlib_on_synthetic_faces():
    faces = [render_face(0, s, e, f, f / 4, size=150) for s in range(3) for e in (0, 3) for f in (0, 4)]
    cos = _cosines([_chip(face) for face in faces])
    assert cos.min() >= 0.9999, cos


@needs_dat
@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.skipif(not CK48.is_dir(), reason=f"{CK48} is absent")
def test_descriptor_matches_dlib_on_ckplus48_faces():
    files = sorted(CK48.glob("*/*.png"))[::25]  # ~40 faces of every class and subject range
    cos = _cosines([_chip(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)) for f in files])
    assert len(files) >= 30 and cos.min() >= 0.9999, cos


# ---- fine-tuning ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy,stages", [("last_block", [4]), ("last_n_blocks:2", [3, 4]),
                                           ("last_n_blocks:5", [0, 1, 2, 3, 4]), ("head", [])])
def test_policies_train_the_last_stages_and_never_the_descriptor(policy, stages):
    model = build_model(ModelSpec(backbone="dlib_resnet", pretrained=False))
    apply_trainable(model, policy)
    for i, stage in enumerate(model.backbone.stages):
        assert all(p.requires_grad == (i in stages) for p in stage.parameters()), (policy, i)
    assert not any(p.requires_grad for p in model.backbone.stem.parameters())
    assert "backbone.descriptor_weight" not in dict(model.named_parameters())
    apply_trainable(model, "all")
    assert all(p.requires_grad for p in model.parameters())
    assert model.head[0].in_features == 256 and model.head[0].out_features == 128
    assert model.head[2].p == 0.6
    raises_one_line(lambda: apply_trainable(model, "last_n_blocks:6"), "has 5")


def test_frozen_stages_get_no_gradient():
    model = build_model(ModelSpec(backbone="dlib_resnet", pretrained=False, input_size=112))
    apply_trainable(model, "last_block")
    model.train()(torch.randint(0, 255, (2, 3, 112, 112), dtype=torch.uint8)).sum().backward()
    assert model.backbone.stages[0][0].conv1.weight.grad is None
    assert model.backbone.stages[4][0].conv1.weight.grad is not None


# ---- export, ONNX, eval, predict --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dlib-export")
    pack("ckplus", [make_ck48(root / "src")], root / "shards", split=(0.0, 0.0, 1.0), workers=1,
         progress=False)
    torch.manual_seed(0)
    model = build_model(ModelSpec(backbone="dlib_resnet", pretrained=False, input_size=112)).eval()
    export_model(model, root / "model", preprocessing=preprocessing_of(read_manifest(root / "shards")))
    return root


def test_export_round_trips(exported):
    model = load_exported(exported / "model")
    assert model.spec.backbone == "dlib_resnet" and model.input_spec.size == 112
    faces = torch.randint(0, 255, (2, 3, 112, 112), dtype=torch.uint8)
    again = load_exported(exported / "model")
    assert torch.equal(model(faces), again(faces))


@pytest.mark.slow
def test_onnx_eval_and_predict_work_with_it(exported, tmp_path):
    runner = CliRunner()

    def ok(*args) -> str:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, (result.output, result.exception)
        return result.output

    shards = f"{exported / 'shards'}:test"
    assert "max |logit difference|" in ok("export", exported / "model", "--onnx", tmp_path / "m.onnx",
                                          "--shards", shards)
    ok("eval", exported / "model", "--shards", shards, "--out", tmp_path / "eval")
    assert (tmp_path / "eval" / "eval.json").is_file()
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "face.png"), render_face(0, 0, 3, 4, 1.0, size=96))
    ok("predict", exported / "model", images, "--out", tmp_path / "p.csv")
    row = (tmp_path / "p.csv").read_text().splitlines()[1].split(",")
    assert math.isclose(sum(float(v) for v in row[4:]), 1.0, abs_tol=1e-4)
