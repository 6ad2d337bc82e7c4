"""A reader of dlib's serialisation of its face ResNet (`dlib_face_recognition_resnet_model_v1.dat`).

NumPy only: no dlib, no pickle. dlib serialises a network recursively from the loss layer down: each wrapper
(`add_layer`, `add_tag_layer`, `add_skip_layer`) writes its version, then its subnetwork, then its own layer's
details (a version string and fields) and bookkeeping. So the file holds every wrapper's version from the
output down to the input, then the layers' details from the input back up (dlib/dnn/core.h, layers.h,
input.h, loss.h; tensors in dlib/cuda/tensor.h; primitives in dlib/serialize.h). The network's layout is
fixed (tools/python/src/face_recognition.cpp's anet_type); `LAYERS` lists it from the input up, and a file
whose layers are not those kinds, in that order and with these sizes, is refused naming the first mismatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fer_dist.errors import FerDistError

# anet_type's stages first to last (dlib's alevel4 .. alevel0): width, units, whether the first down-samples.
STAGES: tuple[tuple[int, int, bool], ...] = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True),
                                             (256, 1, True))
STEM_WIDTH = 32
DESCRIPTOR = 128
_FLOAT_SPECIAL = {32000: math.inf, 32001: -math.inf, 32002: math.nan}  # dlib's float_details exponents


class _Malformed(Exception):
    """A byte sequence that is not what dlib writes at this point."""


def _unit(prefix: str, down: bool) -> list[tuple[str, str]]:
    # dlib: relu<add_prev1<block<tag1<SUB>>>> or relu<add_prev2<avg_pool<skip1<tag2<block<tag1<SUB>>>>>>>,
    # block = affine<con<relu<affine<con<SUB>>>>>; listed from the input up.
    block = [("tag", ""), ("con", f"{prefix}.conv1"), ("affine", f"{prefix}.affine1"), ("relu", ""),
             ("con", f"{prefix}.conv2"), ("affine", f"{prefix}.affine2")]
    tail = [("tag", ""), ("skip", ""), ("avg_pool", "")] if down else []
    return [*block, *tail, ("add_prev", ""), ("relu", "")]


def _layers() -> list[tuple[str, str]]:
    layers = [("con", "stem.conv"), ("affine", "stem.affine"), ("relu", ""), ("max_pool", "")]
    for s, (_, units, down) in enumerate(STAGES):
        for u in range(units):
            layers += _unit(f"stages.{s}.{u}", down and u == 0)
    return [*layers, ("avg_pool", ""), ("fc", "fc")]


LAYERS = _layers()  # (kind, name of the PyTorch module its parameters go to, or "")


@dataclass
class DlibNet:
    """What the file holds that the port needs."""

    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # PyTorch state-dict names -> float32
    geometry: dict[str, tuple[int, ...]] = field(default_factory=dict)  # conv name -> strides, paddings
    mean_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)  # subtracted from 0..255 pixels (then / 256)
    input_size: int = 0


class _Stream:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Malformed(f"ends at byte {len(self.data)} (truncated?)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        # serialize.h pack_int: a control byte (size in the low 4 bits, 0x80 = negative), then little-endian
        control = self.take(1)[0]
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            raise _Malformed(f"byte {self.pos - 1}: {control:#04x} is not an integer's control byte")
        value = int.from_bytes(self.take(size), "little")
        return -value if control & 0x80 else value

    def string(self) -> str:
        size = self.int()
        if not 0 <= size <= 64:  # layer names and versions are short; a foreign file reads garbage here
            raise _Malformed(f"byte {self.pos}: string of {size} bytes where a layer name was expected")
        return self.take(size).decode("latin-1")

    def bool(self) -> bool:
        ch = self.take(1)
        if ch not in (b"0", b"1"):
            raise _Malformed(f"byte {self.pos - 1}: {ch!r} is not a bool")
        return ch == b"1"

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        return _FLOAT_SPECIAL.get(exponent) or math.ldexp(mantissa, exponent)

    def tensor(self) -> np.ndarray:
        self.expect_version(2, "tensor")
        dims = [self.int() for _ in range(4)]
        if min(dims) < 0 or math.prod(dims) > 1 << 26:
            raise _Malformed(f"byte {self.pos}: tensor dimensions {dims} are not plausible")
        return np.frombuffer(self.take(4 * math.prod(dims)), dtype="<f4").astype(np.float32)

    def alias(self) -> tuple[int, ...]:
        self.expect_version(1, "alias_tensor")
        return tuple(self.int() for _ in range(4))

    def expect_version(self, allowed: int | tuple[int, ...], what: str) -> int:
        at, version = self.pos, self.int()
        if version not in ((allowed,) if isinstance(allowed, int) else allowed):
            raise _Malformed(f"byte {at}: version {version} of {what}, expected {allowed}")
        return version

    def version_string(self, allowed: tuple[str, ...], what: str) -> str:
        at, name = self.pos, self.string()
        if name not in allowed:
            raise _Malformed(f"byte {at}: {name!r} where {what} ({' or '.join(allowed)}) was expected")
        return name


def _window(s: _Stream) -> tuple[int, ...]:
    return tuple(s.int() for _ in range(6))  # nr, nc, stride_y, stride_x, padding_y, padding_x


def _slices(params: np.ndarray, shapes: list[tuple[int, ...]], where: str) -> list[np.ndarray]:
    # A layer's parameters are one flat tensor; its alias tensors are consecutive views into it.
    sizes = [math.prod(shape) for shape in shapes]
    if sum(sizes) != params.size:
        raise _Malformed(f"{where}: {params.size} parameters for parts of shapes {shapes}")
    offsets = np.cumsum([0, *sizes])
    return [params[a:b].reshape(shape) for a, b, shape in zip(offsets, offsets[1:], shapes, strict=False)]


def _con(s: _Stream, name: str, net: DlibNet) -> None:
    version = s.version_string(("con_4", "con_5", "con_6"), "a convolution")
    params, filters = s.tensor(), s.int()
    nr, nc, sy, sx, py, px = _window(s)
    shapes = [s.alias(), s.alias()]
    for _ in range(4):
        s.float()  # learning-rate and weight-decay multipliers
    use_bias = s.bool() if version != "con_4" else True
    if version == "con_6" and s.bool():
        raise _Malformed(f"{name}: a convolution with a fused relu, which this network does not have")
    if shapes[0][0] != filters or shapes[0][2:] != (nr, nc):
        raise _Malformed(f"{name}: {filters} filters of {nr}x{nc} but weights of shape {shapes[0]}")
    weight, *bias = _slices(params, shapes[:1] + (shapes[1:] if use_bias else []), name)
    net.tensors[f"{name}.weight"] = weight  # dlib's filters are [out, in, rows, cols], as PyTorch's
    net.tensors[f"{name}.bias"] = bias[0].reshape(-1) if bias else np.zeros(filters, np.float32)
    net.geometry[name] = (sy, sx, py, px)


def _affine(s: _Stream, name: str, net: DlibNet) -> None:
    version = s.version_string(("affine_", "affine_2"), "an affine layer (a folded batch norm)")
    params, gamma, beta = s.tensor(), s.alias(), s.alias()
    s.int()  # mode: per channel (conv) or per element (fc); shapes tell
    disabled = s.bool() if version == "affine_2" else False
    scale, shift = _slices(params, [gamma, beta], name)
    net.tensors[f"{name}.weight"] = np.ones_like(scale).reshape(-1) if disabled else scale.reshape(-1)
    net.tensors[f"{name}.bias"] = np.zeros_like(shift).reshape(-1) if disabled else shift.reshape(-1)


def _fc(s: _Stream, name: str, net: DlibNet) -> None:
    version = s.version_string(("fc_2", "fc_3"), "a fully connected layer")
    outputs, inputs, params = s.int(), s.int(), s.tensor()
    weights, biases = s.alias(), s.alias()
    has_bias = s.int() == 0  # fc_bias_mode: FC_HAS_BIAS = 0, FC_NO_BIAS = 1
    for _ in range(4):
        s.float()
    if version == "fc_3":
        has_bias = s.bool() and has_bias
    parts = _slices(params, [weights, biases] if has_bias else [weights], name)
    if weights[:2] != (inputs, outputs):
        raise _Malformed(f"{name}: weights of shape {weights} for {inputs} inputs and {outputs} outputs")
    net.tensors[f"{name}.weight"] = np.ascontiguousarray(parts[0].reshape(inputs, outputs).T)  # x @ W in dlib
    if has_bias:
        raise _Malformed(f"{name}: a bias, where dlib's descriptor layer is fc_no_bias")


def _details(s: _Stream, kind: str, name: str, net: DlibNet) -> None:
    if kind == "con":
        _con(s, name, net)
    elif kind == "affine":
        _affine(s, name, net)
    elif kind == "fc":
        _fc(s, name, net)
    elif kind == "relu":
        if s.version_string(("relu_", "relu_2"), "a relu") == "relu_2" and s.bool():
            raise _Malformed("a disabled relu, which this network does not have")
    elif kind in ("max_pool", "avg_pool"):
        s.version_string((f"{kind}_2",), f"a {kind.replace('_', ' ')}")
        _window(s)
    elif kind == "add_prev":
        s.version_string(("add_prev_",), "a residual addition")


def _bookkeeping(s: _Stream, version: int, input_layer: bool) -> None:
    # add_layer's state after its details: setup / stale / disabled flags, then gradient and output caches
    # (empty in a cleaned network, read whatever their size), then the sample expansion factor (input, v3).
    for _ in range(3):
        s.bool()
    for _ in range(3 if version >= 2 else 2):
        s.tensor()
    if input_layer and version >= 3:
        s.int()


def _input(s: _Stream, net: DlibNet) -> None:
    s.version_string(("input_rgb_image_sized",), "the input layer")
    net.mean_rgb = (s.float(), s.float(), s.float())
    rows, cols = s.int(), s.int()
    if rows != cols:
        raise _Malformed(f"input layer of {rows}x{cols}, expected a square")
    net.input_size = rows


def _parse(s: _Stream) -> DlibNet:
    net = DlibNet()
    s.expect_version(1, "the loss layer")
    if s.version_string(("loss_metric_", "loss_metric_2"), "the metric loss") == "loss_metric_2":
        s.float(), s.float()  # margin, distance threshold: training only
    # Wrappers' versions from the output down: tags and skips 1, add_layer 1..2 (2..3 on the input).
    versions = []
    for i, (kind, _) in enumerate(reversed(LAYERS)):
        bottom = i == len(LAYERS) - 1
        allowed = 1 if kind in ("tag", "skip") else (2, 3) if bottom else (1, 2)
        versions.append(s.expect_version(allowed, f"layer {len(LAYERS) - 1 - i} ({kind})"))
    versions.reverse()
    _input(s, net)
    for i, (kind, name) in enumerate(LAYERS):
        if kind in ("tag", "skip"):
            continue
        try:
            _details(s, kind, name, net)
        except _Malformed as exc:
            raise _Malformed(f"layer {i} from the input ({kind}): {exc}") from None
        _bookkeeping(s, versions[i], input_layer=i == 0)
    if s.pos != len(s.data):
        raise _Malformed(f"{len(s.data) - s.pos} bytes left after the last layer")
    return net


def read_dlib_resnet(path: str | Path) -> DlibNet:
    """The parameters of dlib's face ResNet in `path` by PyTorch name; a one-line FerDistError if not one."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise FerDistError(f"{p}: cannot read dlib's face ResNet ({exc.strerror or exc})") from None
    try:
        return _parse(_Stream(data))
    except _Malformed as exc:
        raise FerDistError(f"{p}: not dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1"
                           f".dat): {exc}") from None
