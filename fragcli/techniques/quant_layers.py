"""Quantized ``Linear`` / ``Conv2d`` layers: int8 or fp8 weights with one scale per output channel, upcast per layer.

Storage is plain tensors that safetensors saves: a buffer ``qweight`` (``torch.int8``, or ``torch.float8_e4m3fn``)
of the original weight's shape, a buffer ``scale`` (one value per output channel, in the pipeline's float dtype) and
the original float ``bias`` Parameter (the very same object, so a fragment does not store it again). The weight is
``qweight * scale[:, None, ...]``:

- int8: symmetric, ``scale = max|w_row| / 127``, ``q = round(w / scale)`` in [-127, 127]; per element
  ``|w - q * scale| <= scale / 2``.
- fp8: ``scale = max|w_row| / 448`` (e4m3fn's largest finite value), ``q = fp8(w / scale)``; e4m3 keeps 3 mantissa
  bits, so the error is at most 2^-4 of the value for normal values (>= 2^-6 after scaling), 2^-10 absolute below.

Forward (both formats, every device): dequantize to the input's dtype and call ``F.linear`` / ``F.conv2d`` with the
original layer's stride, padding, dilation and groups; the full-precision weight of one layer exists only during
that layer's call (on CPU, under ``no_grad``, in one reused per-thread buffer: ``compute_weight``). int8 Linear
layers may instead call ``torch._weight_int8pack_mm`` (what torchao's int8 weight-only uses): ``QuantLinear.kernel`` "auto" uses it where it was measured faster (CPU: bfloat16 inputs of at
most ``INT8PACK_MAX_ROWS`` rows, e.g. the time-embedding projections; it is 2-30x slower than dequantize + sgemm
for float32/float16 or many rows), "int8pack" forces it, "dequant" never uses it. On CUDA "auto" uses it for
float16/bfloat16 inputs of at most ``INT8PACK_MAX_ROWS`` rows (untested on a GPU); any error falls back to the
dequantize path for that layer.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from fragcli.errors import FragError

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FORMATS = ("int8", "fp8")
KERNELS = ("auto", "dequant", "int8pack")
CPU_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT8PACK_MAX_ROWS = 32  # measured on CPU (bf16, 1 thread): 9x faster at 2 rows, even at 32, 3x slower at 2048


def storage_dtype(fmt: str) -> torch.dtype:
    """The dtype ``qweight`` is stored in; FragError where this torch lacks it."""
    if fmt == "int8":
        return torch.int8
    if fmt == "fp8":
        dt = getattr(torch, "float8_e4m3fn", None)
        if dt is None:
            raise FragError(f"this torch ({torch.__version__}) has no float8_e4m3fn dtype for fp8 weights",
                            "use --quantize int8 or upgrade torch")
        return dt
    raise FragError(f"quantization format {fmt!r} is not one frag knows", "use int8 or fp8")


def _fp8_dtype() -> torch.dtype | None:
    return getattr(torch, "float8_e4m3fn", None)


def _per_row(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(-1, *([1] * (ndim - 1)))


def quantize_weight(w: torch.Tensor, fmt: str, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qweight, scale)`` of a weight (output channels first): per-output-channel symmetric scales.

    The scale is rounded to ``scale_dtype`` (default: the weight's dtype) first and the weight divided by the rounded
    scale, so the bounds hold for the scale that is stored."""
    qdtype = storage_dtype(fmt)
    scale_dtype = scale_dtype or w.dtype
    w32 = w.detach().float()
    dims = tuple(range(1, w.ndim))
    amax = w32.abs().amax(dim=dims) if dims else w32.abs()
    qmax = INT8_MAX if fmt == "int8" else FP8_MAX
    scale = (amax / qmax).clamp_min(torch.finfo(scale_dtype).tiny).to(scale_dtype)
    x = w32 / _per_row(scale.float(), w.ndim)
    if fmt == "int8":
        q = x.round().clamp(-INT8_MAX, INT8_MAX).to(qdtype)
    else:
        q = x.clamp(-FP8_MAX, FP8_MAX).to(qdtype)
    return q, scale


def _fp8_values(q: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """``(v, k)`` with ``v * k == q`` exactly, ``v`` in ``dtype``: e4m3fn bits moved into a float16 (or bfloat16)
    by integer ops, 3-7x faster on CPU than ``q.to(dtype)`` (measured, 1 thread). e4m3's exponent bias is 7;
    float16's is 15 (v = q * 2^-8) and bfloat16's 127 (v = q * 2^-120); e4m3 subnormals land on subnormals, so
    every value is exact (NaN codes are never stored: quantize_weight clamps)."""
    x = q.view(torch.int8).to(torch.int16)  # sign-extended: the sign bit fills bits 8-15
    if dtype == torch.bfloat16:
        return ((x << 4) & -30721).view(torch.bfloat16), 2.0**120  # keep bits 15 (sign) and 10..4
    h = ((x << 7) & -16385).view(torch.float16)  # keep bits 15 (sign) and 13..7
    return (h if dtype == torch.float16 else h.to(dtype)), 256.0


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The full-precision weight ``qweight * scale`` in ``dtype`` (the same ops for the module and the mask).

    fp8 on CPU goes through ``_fp8_values`` (bit-identical to ``qweight.to(dtype) * scale``: both products are the
    same real number rounded once, the power-of-two factor being exact)."""
    if qweight.dtype == _fp8_dtype() and qweight.device.type == "cpu" and dtype in CPU_FAST_DTYPES:
        v, k = _fp8_values(qweight, dtype)
        sk = scale.to(dtype) * k
        if bool(torch.isfinite(sk).all()):  # a scale above 2^8 would overflow bfloat16 times 2^120
            return v * _per_row(sk, qweight.ndim)
    return qweight.to(dtype) * _per_row(scale.to(dtype), qweight.ndim)


_LOCAL = threading.local()


def _workspace(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``n`` elements of this thread's reused buffer for ``dtype`` (grown to the largest layer, never shrunk)."""
    ws = getattr(_LOCAL, "ws", None)
    if ws is None:
        ws = _LOCAL.ws = {}
    # A buffer made under torch.inference_mode is an inference tensor: it cannot be written outside that mode
    # (nor a normal one inside it without cost), so each mode has its own.
    key = (dtype, torch.device(device), torch.is_inference_mode_enabled())
    buf = ws.get(key)
    if buf is None or buf.numel() < n:
        buf = ws[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n]


def release_workspace() -> None:
    """Free this thread's dequantization buffers (they hold about one layer's full-precision weight)."""
    _LOCAL.ws = {}


def compute_weight(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight one forward call computes with: on CPU under ``no_grad``, dequantized into this thread's reused
    buffer (valid until the next layer's call); elsewhere ``dequantize`` (a new tensor).

    Why: on CPU a fresh 50 MB tensor costs page faults that dominate the copy (SD 1.5's largest conv, 1 thread:
    ``q.to(float32) * scale`` 50 ms, the same values into a reused buffer 3.4 ms). The values are bit-identical to
    ``dequantize``'s. Not with autograd (the buffer is overwritten by the next layer), nor on CUDA (its caching
    allocator makes new tensors cheap)."""
    if qweight.device.type != "cpu" or torch.is_grad_enabled() or dtype not in CPU_FAST_DTYPES:
        return dequantize(qweight, scale, dtype)
    n, shape = qweight.numel(), qweight.shape
    if qweight.dtype != _fp8_dtype():  # int8
        out = _workspace(n, dtype, qweight.device).view(shape)
        out.copy_(qweight)
        return out.mul_(_per_row(scale.to(dtype), qweight.ndim))
    bf16 = dtype == torch.bfloat16
    sk = scale.to(dtype) * (2.0**120 if bf16 else 256.0)
    if bf16 and not bool(torch.isfinite(sk).all()):  # float16/32: a weight that large is not representable anyway
        return dequantize(qweight, scale, dtype)
    x = _workspace(n, torch.int16, qweight.device).view(shape)
    x.copy_(qweight.view(torch.int8))  # sign-extended; the bit moves of _fp8_values, in place
    x.bitwise_left_shift_(4 if bf16 else 7).bitwise_and_(-30721 if bf16 else -16385)
    v = x.view(torch.bfloat16 if bf16 else torch.float16)
    if dtype != v.dtype:
        v = _workspace(n, dtype, qweight.device).view(shape).copy_(v)
    return v.mul_(_per_row(sk, qweight.ndim))


def fake_quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize then dequantize ``w`` in its own dtype: what the quantized layer computes with."""
    q, s = quantize_weight(w, fmt)
    return dequantize(q, s, w.dtype)


def int8pack_available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


class _QuantBase(torch.nn.Module):
    """Shared storage: ``qweight`` and ``scale`` buffers, the original ``bias`` Parameter."""

    format: str
    weight_buffers = ("qweight",)  # counted as weights by fragcli.memory.param_count

    def _init_storage(self, shape, fmt: str, bias, device, dtype) -> None:
        self.format = fmt
        self.register_buffer("qweight", torch.empty(shape, dtype=storage_dtype(fmt), device=device))
        self.register_buffer("scale", torch.empty(shape[0], dtype=dtype, device=device))
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias  # the original Parameter: unchanged, so the fragment does not store it again

    def _set_from(self, weight: torch.Tensor) -> None:
        q, s = quantize_weight(weight, self.format, weight.dtype)
        self.qweight, self.scale = q, s

    def weight_dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, dtype or self.scale.dtype)

    def _bias(self, dtype):
        b = self.bias
        return b if b is None or b.dtype == dtype else b.to(dtype)

    def _apply(self, fn, recurse=True):
        """``.to(float16)`` / ``.half()`` cast every floating tensor, fp8 included: keep the storage dtype (fp8
        values are exact in float16, bfloat16 and float32, so casting back loses nothing)."""
        qdtype = self.qweight.dtype
        super()._apply(fn, recurse)
        if self.qweight.dtype != qdtype:
            self._buffers["qweight"] = self.qweight.to(qdtype)
        return self


class QuantLinear(_QuantBase):
    """A ``torch.nn.Linear`` whose weight is stored int8/fp8 with per-output-channel scales."""

    kernel = "auto"  # class-wide default; an instance attribute overrides it ("auto" | "dequant" | "int8pack")

    def __init__(self, in_features: int, out_features: int, fmt: str, bias=None, device=None,
                 dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._int8pack_failed = False
        self._init_storage((out_features, in_features), fmt, bias, device, dtype)

    @classmethod
    def from_linear(cls, lin: torch.nn.Linear, fmt: str, *, values: bool = True) -> QuantLinear:
        """The quantized layer for ``lin`` (``values=False``: empty storage of the right shapes, for ``rebuild``)."""
        w = lin.weight
        q = cls(lin.in_features, lin.out_features, fmt, lin.bias, w.device, w.dtype)
        if values:
            with torch.no_grad():
                q._set_from(w)
        return q

    def _use_int8pack(self, x: torch.Tensor, rows: int) -> bool:
        if self.format != "int8" or self._int8pack_failed or not int8pack_available():
            return False
        if self.kernel == "int8pack":
            return x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        if self.kernel != "auto" or rows > INT8PACK_MAX_ROWS:
            return False
        if x.device.type == "cpu":
            return x.dtype == torch.bfloat16
        if x.device.type == "cuda":  # untested on a GPU: guarded, falls back on any error
            return x.dtype in (torch.float16, torch.bfloat16)
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if self._use_int8pack(x, rows):
            try:
                y = torch._weight_int8pack_mm(x.reshape(rows, self.in_features).contiguous(), self.qweight,
                                              self.scale.to(x.dtype))
            except (RuntimeError, NotImplementedError):
                self._int8pack_failed = True  # this device/dtype/shape has no kernel: dequantize from now on
            else:
                y = y.reshape(*x.shape[:-1], self.out_features)
                b = self._bias(x.dtype)
                return y if b is None else y + b
        return F.linear(x, compute_weight(self.qweight, self.scale, x.dtype), self._bias(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}")


class QuantConv2d(_QuantBase):
    """A ``torch.nn.Conv2d`` (zero padding) whose weight is stored int8/fp8 with per-output-channel scales."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation, groups: int,
                 fmt: str, bias=None, device=None, dtype=torch.float32):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), padding
        self.dilation, self.groups = tuple(dilation), groups
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_storage(shape, fmt, bias, device, dtype)

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d, fmt: str, *, values: bool = True) -> QuantConv2d:
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported")
        w = conv.weight
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, fmt, conv.bias, w.device, w.dtype)
        if values:
            with torch.no_grad():
                q._set_from(w)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = compute_weight(self.qweight, self.scale, x.dtype)
        return F.conv2d(x, w, self._bias(x.dtype), self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, format={self.format}")


QUANT_TYPES = (QuantLinear, QuantConv2d)


def quantized(module: torch.nn.Module, fmt: str, *, values: bool = True) -> _QuantBase:
    """The quantized replacement of a plain ``Linear`` or ``Conv2d`` (hooks and training flag carried over)."""
    if type(module) is torch.nn.Linear:
        new = QuantLinear.from_linear(module, fmt, values=values)
    elif type(module) is torch.nn.Conv2d:
        new = QuantConv2d.from_conv(module, fmt, values=values)
    else:
        raise TypeError(f"{type(module).__name__} cannot be quantized")
    new.train(module.training)
    for attr in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        hooks = module.__dict__.get(attr)
        if hooks:  # the same dict objects, so the hooks' handles still remove them
            new.__dict__[attr] = hooks
    return new


def set_kernel(root: torch.nn.Module, kernel: str) -> int:
    """Set the int8 Linear kernel ("auto" | "dequant" | "int8pack") of every ``QuantLinear`` under ``root``."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}")
    n = 0
    for m in root.modules():
        if isinstance(m, QuantLinear):
            m.kernel = kernel
            n += 1
    return n
