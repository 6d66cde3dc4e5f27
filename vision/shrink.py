"""Start a narrower YOLO11 from a trained one's weights instead of from random numbers.

Why: the detector issue asks whether a narrower network keeps the accuracy at less latency. Trained
from scratch, answering that costs the ~3 h that det-v1..v4 took on this 2-core machine; a narrow
network that inherits the trained one's filters and is then fine-tuned gets there in a fraction of
that, so the comparison can be made at all. It is structured pruning with a fixed rule: every layer
keeps the *first* channels of each of its channel groups. The rule is deliberately simple; what makes
it correct is that a channel kept on one side of a connection is the same channel on the other side:
a C2f/C3k2 `chunk`, a C2PSA `split`, a `Concat` and a residual add each carry index *sets*, not
counts, and attention keeps whole heads (a head's q, k and v stay together).

Only the YOLO11 blocks the project's architectures use are handled (Conv, C3k2 with Bottleneck or
C3k, SPPF, C2PSA, Upsample, Concat, Detect); anything else is refused by name, and every parameter of
the narrow network is checked to have been filled, so a silent half-copy cannot happen.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

Index = list[int]


class ShrinkError(ValueError):
    """The two networks cannot be mapped onto each other (an unknown block, a width that grew)."""


def _first(n: int) -> Index:
    return list(range(n))


def _groups(size: int, n_groups: int, keep: int) -> Index:
    """First `keep` channels of each of `n_groups` equal groups of a `size`-channel tensor."""
    g = size // n_groups
    return [j * g + i for j in range(n_groups) for i in range(keep)]


class _Copier:
    """Copies sliced tensors wide → narrow and remembers which narrow tensors were filled."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.filled: set[int] = set()
        # (wide BatchNorm, channels kept of it): what a check needs to silence the dropped channels
        self.kept: list[tuple[object, Index]] = []

    def _put(self, dst, src) -> None:
        if dst.shape != src.shape:
            raise ShrinkError(f"sliced {tuple(src.shape)} does not fit {tuple(dst.shape)}")
        with self.torch.no_grad():
            dst.copy_(src)
        self.filled.add(id(dst))

    def conv2d(self, wide, narrow, cin: Index, cout: Index) -> None:
        if max(cout) >= wide.out_channels or (wide.groups == 1 and max(cin) >= wide.in_channels):
            raise ShrinkError(f"a {wide.in_channels}->{wide.out_channels} convolution cannot fill a "
                              f"{narrow.in_channels}->{narrow.out_channels} one: the target must be narrower")
        w = wide.weight[cout]
        if wide.groups == 1:
            w = w[:, cin]
        elif wide.groups != wide.out_channels or cin != cout:
            raise ShrinkError("a grouped convolution can only be shrunk depthwise, with its input set")
        self._put(narrow.weight, w)
        if wide.bias is not None:
            self._put(narrow.bias, wide.bias[cout])

    def conv(self, wide, narrow, cin: Index, cout: Index) -> Index:
        """An ultralytics Conv (conv + BatchNorm + activation); returns the output's index set."""
        self.conv2d(wide.conv, narrow.conv, cin, cout)
        for name in ("weight", "bias", "running_mean", "running_var"):
            self._put(getattr(narrow.bn, name), getattr(wide.bn, name)[cout])
        self.filled.add(id(narrow.bn.num_batches_tracked))
        self.kept.append((wide.bn, cout))
        return _first(len(cout))

    def out(self, narrow_conv) -> Index:
        inner = getattr(narrow_conv, "conv", narrow_conv)
        return _first(inner.out_channels)


def _bottleneck(c: _Copier, w, n, cin: Index) -> Index:
    h = c.conv(w.cv1, n.cv1, cin, c.out(n.cv1))
    out = c.conv(w.cv2, n.cv2, h, c.out(n.cv2))
    if w.add and out != cin:
        raise ShrinkError("a residual bottleneck must keep its input's channels")
    return out


def _c3k(c: _Copier, w, n, cin: Index) -> Index:
    a = c.conv(w.cv1, n.cv1, cin, c.out(n.cv1))
    for wb, nb in zip(w.m, n.m):
        a = _bottleneck(c, wb, nb, a)
    b = c.conv(w.cv2, n.cv2, cin, c.out(n.cv2))
    wide_c = w.cv1.conv.out_channels
    cat = a + [wide_c + i for i in b]
    return c.conv(w.cv3, n.cv3, cat, c.out(n.cv3))


def _c3k2(c: _Copier, w, n, cin: Index) -> Index:
    """C2f/C3k2: cv1's output is chunked in two, every inner block's output is concatenated."""
    wc, nc = w.c, n.c
    c.conv(w.cv1, n.cv1, cin, _groups(2 * wc, 2, nc))
    pieces = 2 + len(w.m)
    y = _first(nc)
    for wb, nb in zip(w.m, n.m):
        kind = type(wb).__name__
        if kind == "Bottleneck":
            y = _bottleneck(c, wb, nb, y)
        elif kind == "C3k":
            y = _c3k(c, wb, nb, y)
        else:
            raise ShrinkError(f"C3k2 with {kind} blocks is not handled")
    return c.conv(w.cv2, n.cv2, _groups(pieces * wc, pieces, nc), c.out(n.cv2))


def _sppf(c: _Copier, w, n, cin: Index) -> Index:
    h = c.conv(w.cv1, n.cv1, cin, c.out(n.cv1))
    wide_h = w.cv1.conv.out_channels
    pieces = 1 + getattr(w, "n", 3)
    return c.conv(w.cv2, n.cv2, [j * wide_h + i for j in range(pieces) for i in h], c.out(n.cv2))


def _attention(c: _Copier, w, n, cin: Index) -> Index:
    """Keep whole heads: head h's q, k and v are one contiguous block of qkv's output."""
    if (w.head_dim, w.key_dim) != (n.head_dim, n.key_dim):
        raise ShrinkError("attention can be narrowed by dropping heads only (head and key sizes must match)")
    per_head = 2 * w.key_dim + w.head_dim
    c.conv(w.qkv, n.qkv, cin, _first(n.num_heads * per_head))
    v = _first(n.num_heads * n.head_dim)          # v's channels, head-major, as `pe` and the output see them
    c.conv(w.pe, n.pe, v, v)
    if v != cin:
        raise ShrinkError("attention's output must line up with its input's channels")
    return c.conv(w.proj, n.proj, v, c.out(n.proj))


def _c2psa(c: _Copier, w, n, cin: Index) -> Index:
    wc, nc = w.c, n.c
    c.conv(w.cv1, n.cv1, cin, _groups(2 * wc, 2, nc))
    x = _first(nc)
    for wb, nb in zip(w.m, n.m):
        x = _attention(c, wb.attn, nb.attn, x)
        h = c.conv(wb.ffn[0], nb.ffn[0], x, c.out(nb.ffn[0]))
        x = c.conv(wb.ffn[1], nb.ffn[1], h, c.out(nb.ffn[1]))
    return c.conv(w.cv2, n.cv2, _groups(2 * wc, 2, nc), c.out(n.cv2))


def _detect(c: _Copier, w, n, cins: Sequence[Index]) -> None:
    for i, cin in enumerate(cins):
        # box branch: Conv, Conv, Conv2d
        h = c.conv(w.cv2[i][0], n.cv2[i][0], cin, c.out(n.cv2[i][0]))
        h = c.conv(w.cv2[i][1], n.cv2[i][1], h, c.out(n.cv2[i][1]))
        c.conv2d(w.cv2[i][2], n.cv2[i][2], h, c.out(n.cv2[i][2]))
        # class branch (YOLO11): (DWConv, Conv), (DWConv, Conv), Conv2d
        h = cin
        for j in (0, 1):
            h = c.conv(w.cv3[i][j][0], n.cv3[i][j][0], h, h)
            h = c.conv(w.cv3[i][j][1], n.cv3[i][j][1], h, c.out(n.cv3[i][j][1]))
        c.conv2d(w.cv3[i][2], n.cv3[i][2], h, c.out(n.cv3[i][2]))


def shrink_into(wide, narrow) -> list[tuple[object, Index]]:
    """Fill `narrow` (a DetectionModel) with the channels of `wide` it has room for.

    Returns each of `wide`'s BatchNorms with the channels kept of it.
    """
    if len(wide.model) != len(narrow.model):
        raise ShrinkError(f"the networks differ in depth: {len(wide.model)} and {len(narrow.model)} layers")
    c = _Copier()
    outs: list[Index] = []
    blocks = {"Conv": lambda w, n, x: c.conv(w, n, x, c.out(n)), "C3k2": lambda w, n, x: _c3k2(c, w, n, x),
              "SPPF": lambda w, n, x: _sppf(c, w, n, x), "C2PSA": lambda w, n, x: _c2psa(c, w, n, x),
              "Upsample": lambda w, n, x: x}
    for w, n in zip(wide.model, narrow.model):
        kind = type(w).__name__
        if kind != type(n).__name__:
            raise ShrinkError(f"layer {w.i}: {kind} in the wide network, {type(n).__name__} in the narrow one")
        srcs = w.f if isinstance(w.f, list) else [w.f]
        ins = [outs[s] if s != -1 else (outs[-1] if outs else _first(3)) for s in srcs]
        if kind == "Concat":
            wide_sizes = [_wide_channels(wide, s, len(outs)) for s in srcs]
            offset, cat = 0, []
            for size, idx in zip(wide_sizes, ins):
                cat += [offset + i for i in idx]
                offset += size
            outs.append(cat)
        elif kind == "Detect":
            _detect(c, w, n, ins)
            outs.append([])
        elif kind in blocks:
            outs.append(blocks[kind](w, n, ins[0]))
        else:
            raise ShrinkError(f"layer {w.i}: {kind} blocks are not handled")
    missing = [name for name, t in list(narrow.named_parameters()) + list(narrow.named_buffers())
               if id(t) not in c.filled and not name.endswith("dfl.conv.weight") and "anchors" not in name
               and "strides" not in name]
    if missing:
        raise ShrinkError(f"{len(missing)} tensors of the narrow network were not filled, e.g. {missing[:3]}")
    return c.kept


def _wide_channels(model, src: int, here: int) -> int:
    """How many channels layer `src` (relative -1 = the previous one) of `model` puts out."""
    i = here - 1 if src == -1 else src
    m = model.model[i]
    for attr in ("cv2", "cv3", "conv"):
        inner = getattr(m, attr, None)
        if inner is not None and hasattr(inner, "conv"):
            return inner.conv.out_channels
        if inner is not None and hasattr(inner, "out_channels"):
            return inner.out_channels
    if type(m).__name__ in ("Upsample", "Concat"):
        # an upsample passes its source through; a concat sums its sources
        srcs = m.f if isinstance(m.f, list) else [m.f]
        return sum(_wide_channels(model, s, i) for s in srcs)
    raise ShrinkError(f"cannot tell how many channels layer {i} ({type(m).__name__}) puts out")


def shrink_weights(weights: Path, arch_yaml: Path, out: Path) -> dict:
    """Write an ultralytics checkpoint of `arch_yaml` filled from `weights`; returns a summary."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    ckpt = torch.load(str(weights), map_location="cpu", weights_only=False)
    wide = (ckpt.get("ema") or ckpt["model"]).float()
    narrow = DetectionModel(str(arch_yaml), nc=wide.yaml.get("nc", len(wide.names)), verbose=False)
    shrink_into(wide, narrow)
    narrow.names = dict(wide.names)
    narrow.args = dict(getattr(wide, "args", {}) or {})
    narrow.stride = wide.stride
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": narrow, "ema": None, "epoch": -1, "optimizer": None, "train_args": narrow.args,
                "date": None, "version": None, "kozan_shrunk_from": str(weights)}, str(out))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"from": str(weights), "arch": str(arch_yaml), "out": str(out),
            "params_wide": count(wide), "params_narrow": count(narrow)}
