"""Reader for dlib's binary serialisation of a DNN (``dlib::serialize(file) << net``), as used by
``dlib_face_recognition_resnet_model_v1.dat``.

Written from the format as dlib's sources define it (``dlib/serialize.h``, ``dlib/dnn/core.h``,
``dlib/dnn/layers.h``, ``dlib/dnn/tensor.h``); nothing of dlib is needed at run time.

Primitives:

- integers are "packed": one control byte (low nibble = number of payload bytes, bit 7 = negative for signed
  types), then that many little-endian magnitude bytes;
- ``float``/``double`` are a packed int64 mantissa and a packed int16 exponent, value = mantissa * 2**exponent
  (exponents 32000/32001/32002 stand for +inf/-inf/nan);
- ``bool`` is the ASCII byte ``'1'`` or ``'0'``; ``std::string`` is a packed length then the bytes;
- a tensor is its version, then num_samples, k, nr, nc, then its values in (n, k, nr, nc) order: raw
  little-endian float32 for version 2 (dlib >= 19.2), dlib floats for version 1;
- an ``alias_tensor`` (a view into a layer's flat parameter tensor) is version 1, then n, k, nr, nc.

Network layout: a loss layer (version 1, the loss's own fields, the sub-network) on top of a chain of
``add_layer`` (version 2: sub-network, layer details, three bools, three tensors), ``add_tag_layer`` and
``add_skip_layer`` (version 1, sub-network only) down to the ``add_layer`` that holds the input layer (version 2
or 3). Tags and skips carry no name in the file, so the reader reports them as ``"tag|skip"``; which is which is
part of the network's type, checked by the model that consumes the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["DlibFormatError", "DlibLayer", "DlibNet", "DlibReader", "decode_floats", "read_dlib_net"]


class DlibFormatError(ValueError):
    """The bytes are not a dlib DNN in the layout this reader knows."""


@dataclass
class DlibLayer:
    """One layer of the stack. ``kind`` is dlib's serialisation tag (``con_4``, ``affine_``, ...), ``attrs`` its
    scalar fields, ``params`` its named parameter arrays already cut out of the flat tensor and reshaped."""

    kind: str
    attrs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)


@dataclass
class DlibNet:
    """A parsed network: ``loss`` (its kind and fields), ``input`` (the input layer) and ``layers`` top-down
    (first = just below the loss, last = just above the input)."""

    loss: DlibLayer
    input: DlibLayer
    layers: list[DlibLayer]


_INF, _NINF, _NAN = 32000, 32001, 32002


def decode_floats(buf: bytes | memoryview, pos: int, count: int) -> tuple[np.ndarray, int]:
    """Decode ``count`` consecutive dlib floats starting at byte ``pos``; return (float32 array, end position).

    The record lengths depend on the bytes, so the record starts are found by following a precomputed
    "next record" table (one cheap step per float); mantissas and exponents are then decoded vectorised.
    """
    if count == 0:
        return np.zeros(0, np.float32), pos
    # A record is at most 1+8 (mantissa) + 1+2 (exponent) bytes.
    end_max = min(len(buf), pos + 12 * count)
    b = np.frombuffer(buf, np.uint8, count=end_max - pos, offset=pos).astype(np.int64)
    n = len(b)
    m_len = b & 0x0F
    e_ctrl = np.arange(n) + 1 + m_len
    e_ctrl_ok = e_ctrl < n
    e_len = np.where(e_ctrl_ok, b[np.minimum(e_ctrl, n - 1)] & 0x0F, 0)
    nxt = (e_ctrl + 1 + e_len).tolist()
    starts = np.empty(count, np.int64)
    p = 0
    for i in range(count):  # sequential by nature: a record's length is in its first byte
        starts[i] = p
        if p >= n:
            raise DlibFormatError(f"truncated float data at byte {pos + p} (float {i} of {count})")
        p = nxt[p]
    if p > n:
        raise DlibFormatError(f"truncated float data at byte {pos + n} (float {count - 1} of {count})")
    mant = _decode_ints(b, starts, max_bytes=8)
    exp = _decode_ints(b, e_ctrl[starts], max_bytes=2)
    out = np.ldexp(mant.astype(np.float64), np.clip(exp, -1100, 1100).astype(np.int32))
    out[exp == _INF] = np.inf
    out[exp == _NINF] = -np.inf
    out[exp == _NAN] = np.nan
    return out.astype(np.float32), pos + p


def _decode_ints(b: np.ndarray, ctrl: np.ndarray, max_bytes: int) -> np.ndarray:
    """Signed packed ints whose control bytes are at ``ctrl`` (indices into ``b``)."""
    head = b[ctrl]
    size = head & 0x0F
    if np.any(size > max_bytes) or np.any(size == 0):
        raise DlibFormatError(f"bad packed integer in float data (payload sizes {np.unique(size).tolist()})")
    val = np.zeros(len(ctrl), np.int64)
    for j in range(max_bytes):
        take = size > j
        idx = np.minimum(ctrl + 1 + j, len(b) - 1)
        val |= np.where(take, b[idx], 0) << (8 * j)
    return np.where(head & 0x80, -val, val)


class DlibReader:
    """Sequential reader of dlib primitives over a byte buffer."""

    def __init__(self, data: bytes):
        self.buf = memoryview(data)
        self.pos = 0

    def _byte(self) -> int:
        if self.pos >= len(self.buf):
            raise DlibFormatError(f"unexpected end of file at byte {self.pos}")
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def int(self, signed: bool = True) -> int:
        head = self._byte()
        size = head & 0x0F
        if size == 0 or size > 8:
            raise DlibFormatError(f"bad packed integer control byte 0x{head:02x} at byte {self.pos - 1}")
        raw = bytes(self.buf[self.pos:self.pos + size])
        if len(raw) != size:
            raise DlibFormatError(f"unexpected end of file at byte {self.pos}")
        self.pos += size
        v = int.from_bytes(raw, "little")
        return -v if (signed and head & 0x80) else v

    def uint(self) -> int:
        return self.int(signed=False)

    def float(self) -> float:
        mant, exp = self.int(), self.int()
        if exp == _INF:
            return float("inf")
        if exp == _NINF:
            return float("-inf")
        if exp == _NAN:
            return float("nan")
        return float(np.ldexp(float(mant), exp))

    def bool(self) -> bool:
        c = self._byte()
        if c not in (ord("0"), ord("1")):
            raise DlibFormatError(f"expected a bool ('0' or '1') at byte {self.pos - 1}, found 0x{c:02x}")
        return c == ord("1")

    def string(self) -> str:
        n = self.uint()
        if n > 1 << 20:
            raise DlibFormatError(f"implausible string length {n} at byte {self.pos}")
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s.decode("latin-1")

    def peek_string(self) -> str | None:
        """The string at the current position if one plausibly starts here (printable), else None."""
        save = self.pos
        try:
            s = self.string()
        except DlibFormatError:
            s = None
        self.pos = save
        if s and s.isascii() and s.replace("_", "a").isalnum():
            return s
        return None

    def version(self, expected: tuple[int, ...], what: str) -> int:
        at = self.pos
        v = self.int()
        if v not in expected:
            raise DlibFormatError(f"{what}: expected version {expected} at byte {at}, found {v}")
        return v

    def tensor(self) -> np.ndarray:
        """A ``resizable_tensor`` as a float32 array of shape (n, k, nr, nc).

        Version 2 (dlib >= 19.2) stores raw little-endian float32; version 1 stores dlib floats.
        """
        v = self.version((1, 2), "tensor")
        n, k, nr, nc = (self.int() for _ in range(4))
        count = n * k * nr * nc
        if min(n, nr, nc, k) < 0 or count > 1 << 31:
            raise DlibFormatError(f"implausible tensor shape n={n} k={k} nr={nr} nc={nc} at byte {self.pos}")
        if v == 2:
            if self.pos + 4 * count > len(self.buf):
                raise DlibFormatError(f"tensor of {count} floats runs past the end of the file at byte {self.pos}")
            vals = np.frombuffer(self.buf, "<f4", count=count, offset=self.pos).astype(np.float32)
            self.pos += 4 * count
        else:
            vals, self.pos = decode_floats(self.buf, self.pos, count)
        return vals.reshape(n, k, nr, nc)

    def alias(self) -> tuple[int, int, int, int]:
        """An ``alias_tensor``'s shape (n, k, nr, nc)."""
        self.version((1,), "alias_tensor")
        return tuple(self.int() for _ in range(4))


# ----------------------------------------------------------------------------------------- layer details
def _cut(flat: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out, off = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        if off + size > flat.size:
            raise DlibFormatError(f"parameter {name} {shape} runs past the layer's {flat.size} parameters")
        out[name] = flat[off:off + size].reshape(shape).copy()
        off += size
    return out


def _lr_multipliers(r: DlibReader) -> dict:
    names = ("learning_rate_multiplier", "weight_decay_multiplier", "bias_learning_rate_multiplier",
             "bias_weight_decay_multiplier")
    return {k: r.float() for k in names}


def _read_con4(r: DlibReader) -> DlibLayer:
    flat = r.tensor().reshape(-1)
    attrs = {"num_filters": r.int(), "nr": r.int(), "nc": r.int(), "stride_y": r.int(), "stride_x": r.int(),
             "padding_y": r.int(), "padding_x": r.int()}
    w, b = r.alias(), r.alias()
    attrs.update(_lr_multipliers(r))
    return DlibLayer("con_4", attrs, _cut(flat, {"weight": w, "bias": (b[1],)}))


def _read_affine(r: DlibReader) -> DlibLayer:
    flat = r.tensor().reshape(-1)
    g, b = r.alias(), r.alias()
    mode = r.int()
    ch = int(np.prod(g))
    return DlibLayer("affine_", {"mode": "conv" if mode == 0 else "fc"},  # dlib: CONV_MODE=0, FC_MODE=1
                     _cut(flat, {"gamma": (ch,), "beta": (int(np.prod(b)),)}))


def _read_pool(kind: str):
    def read(r: DlibReader) -> DlibLayer:
        attrs = {"nr": r.int(), "nc": r.int(), "stride_y": r.int(), "stride_x": r.int(),
                 "padding_y": r.int(), "padding_x": r.int()}
        return DlibLayer(kind, attrs)
    return read


def _read_fc2(r: DlibReader) -> DlibLayer:
    attrs = {"num_outputs": r.uint(), "num_inputs": r.uint()}
    flat = r.tensor().reshape(-1)
    w, b = r.alias(), r.alias()
    attrs["bias_mode"] = "no_bias" if r.int() == 1 else "bias"
    attrs.update(_lr_multipliers(r))
    shapes = {"weight": (w[0], w[1] * w[2] * w[3])}  # (num_inputs, num_outputs): out = x @ W
    if attrs["bias_mode"] == "bias":
        shapes["bias"] = (int(np.prod(b)),)
    return DlibLayer("fc_2", attrs, _cut(flat, shapes))


def _read_input_rgb_sized(r: DlibReader) -> DlibLayer:
    attrs = {"avg_red": r.float(), "avg_green": r.float(), "avg_blue": r.float(), "nr": r.uint(), "nc": r.uint()}
    return DlibLayer("input_rgb_image_sized", attrs)


def _read_loss_metric2(r: DlibReader) -> DlibLayer:
    return DlibLayer("loss_metric_2", {"margin": r.float(), "distance_threshold": r.float()})


_READERS = {
    "con_4": _read_con4,
    "affine_": _read_affine,
    "relu_": lambda r: DlibLayer("relu_"),
    "add_prev_": lambda r: DlibLayer("add_prev_"),
    "max_pool_2": _read_pool("max_pool_2"),
    "avg_pool_2": _read_pool("avg_pool_2"),
    "fc_2": _read_fc2,
}


def _read_details(r: DlibReader, table: dict) -> DlibLayer:
    at = r.pos
    kind = r.string()
    if kind not in table:
        raise DlibFormatError(f"layer type {kind!r} at byte {at} is not supported (supported: {sorted(table)})")
    return table[kind](r)


def read_dlib_net(path: str | Path) -> DlibNet:
    """Parse a serialised dlib DNN file into its loss, input and layer list (top-down)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DlibFormatError(f"cannot read dlib network {path}: {e}") from e
    r = DlibReader(data)
    try:
        r.version((1,), "loss layer")
        loss = _read_details(r, {"loss_metric_2": _read_loss_metric2})
        # The chain of nested layers, top-down, until the add_layer whose sub-network is the input layer.
        chain: list[int] = []
        while True:
            v = r.version((1, 2, 3), "layer")
            name = r.peek_string() if v in (2, 3) else None
            if name is not None and name.startswith("input"):
                break
            if v == 3:
                raise DlibFormatError(f"add_layer version 3 at byte {r.pos} is not above an input layer")
            chain.append(v)
        inp = _read_details(r, {"input_rgb_image_sized": _read_input_rgb_sized})
        layers = [_read_bottom(r, v)]  # v: the bottom add_layer's version
        for v in reversed(chain):  # unwind: each add_layer's details follow its sub-network
            if v == 1:
                layers.append(DlibLayer("tag|skip"))
            else:
                layers.append(_read_add_layer_tail(r))
    except DlibFormatError as e:
        raise DlibFormatError(f"{path}: {e}") from None
    if r.pos != len(data):
        raise DlibFormatError(f"{path}: {len(data) - r.pos} unread bytes after the network (at byte {r.pos})")
    return DlibNet(loss=loss, input=inp, layers=layers[::-1])


def _read_bottom(r: DlibReader, version: int) -> DlibLayer:
    """The rest of the add_layer that sits on the input layer (version 2 or 3)."""
    layer = _read_details(r, _READERS)
    for _ in range(3):
        r.bool()
    for _ in range(3):  # x_grad, cached_output, grad_final: state, not weights
        r.tensor()
    if version == 3:
        r.uint()  # sample expansion factor
    return layer


def _read_add_layer_tail(r: DlibReader) -> DlibLayer:
    layer = _read_details(r, _READERS)
    for _ in range(3):
        r.bool()
    for _ in range(3):  # x_grad, cached_output, params_grad
        r.tensor()
    return layer
