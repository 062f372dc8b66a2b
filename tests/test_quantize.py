"""Weight quantization: the per-element bounds of int8 and fp8, layer outputs within their analytic bound, the
physical layers equal the mask, the int8pack kernel equals the dequantize path, the fragment round trip (int8 and
fp8 stay int8/fp8, the loaded model equals the extracted one), meta-safe rebuild, and the refusals."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fragcli import api
from fragcli.errors import FragError
from fragcli.fragment import load_fragment
from fragcli.manifest import read_manifest
from fragcli.models import load_model
from fragcli.patches import installed
from fragcli.techniques import REGISTRY, apply_technique
from fragcli.techniques import quant_layers as ql
from fragcli.techniques.quant_layers import (
    QuantConv2d,
    QuantLinear,
    compute_weight,
    dequantize,
    quantize_weight,
    set_kernel,
)
from fragcli.techniques.quantize import MASK_PATCH, QuantizeConfig, install_quant_mask, remove_quant_mask
from fragcli.techniques.stack import meta_copy, snapshot, state_diff, steps_from_entries
from tests.helpers import unet_inputs

PROMPT = "a red circle on a blue background"
TECH = REGISTRY.get("quantize")
FP8 = getattr(torch, "float8_e4m3fn", None)
needs_fp8 = pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")


def _weight(*shape, seed=0):
    """Rows of very different magnitudes (and one zero row): per-channel scales must follow each row."""
    torch.manual_seed(seed)
    w = torch.randn(*shape)
    rows = torch.logspace(-4, 1, shape[0]).reshape(-1, *([1] * (len(shape) - 1)))
    w = w * rows
    w[1] = 0
    return w


def _row(t, ndim):
    return t.reshape(-1, *([1] * (ndim - 1)))


@pytest.mark.parametrize("shape", [(16, 40), (12, 6, 3, 3)])
def test_int8_error_is_at_most_half_a_scale_step(shape):
    w = _weight(*shape)
    q, scale = quantize_weight(w, "int8")
    assert q.dtype == torch.int8 and scale.shape == (shape[0],) and scale.dtype == torch.float32
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    err = (dequantize(q, scale, torch.float32) - w).abs()
    bound = _row(scale, w.ndim) / 2
    assert bool((err <= bound * (1 + 1e-5)).all())  # exact up to float32 rounding of the product
    assert float((err / bound).amax()) > 0.9  # the bound is tight: a coarser quantizer would fail it
    assert torch.equal(q[1], torch.zeros_like(q[1]))  # the zero row stays zero


@needs_fp8
@pytest.mark.parametrize("shape", [(16, 40), (12, 6, 3, 3)])
def test_fp8_error_is_within_e4m3_rounding(shape):
    w = _weight(*shape, seed=1)
    q, scale = quantize_weight(w, "fp8")
    assert q.dtype == FP8 and float(q.float().abs().max()) == 448.0
    x = w / _row(scale, w.ndim)  # the scaled weight the fp8 value rounds
    err = (q.float() - x).abs()
    bound = torch.where(x.abs() >= 2**-6, x.abs() * 2**-4, torch.full_like(x, 2**-10))
    assert bool((err <= bound * (1 + 1e-6)).all())
    normal = x.abs() >= 2**-6
    assert float((err[normal] / x.abs()[normal]).max()) > 2**-5  # 3 mantissa bits, not more


@needs_fp8
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fp8_bit_moves_equal_the_native_conversion(dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # every e4m3fn code but NaN
    q = codes.view(FP8).reshape(-1, 2)
    scale = torch.rand(q.shape[0]) * 0.1 + 1e-3
    fast = dequantize(q, scale, dtype)
    native = q.to(dtype) * scale.to(dtype)[:, None]
    assert fast.dtype == dtype and torch.equal(fast, native)
    with torch.no_grad():  # the forward's reused buffer: the same values
        assert torch.equal(compute_weight(q, scale, dtype), native)


@pytest.mark.parametrize("fmt", ["int8", pytest.param("fp8", marks=needs_fp8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_reused_forward_buffer_holds_exactly_the_dequantized_weight(fmt, dtype):
    big, small = quantize_weight(_weight(12, 6, 3, 3).to(dtype), fmt), quantize_weight(_weight(5, 7).to(dtype), fmt)
    with torch.no_grad():
        a = compute_weight(*big, dtype)
        assert torch.equal(a, dequantize(*big, dtype))
        b = compute_weight(*small, dtype)  # the next layer reuses the buffer
        assert torch.equal(b, dequantize(*small, dtype)) and b.data_ptr() == a.data_ptr()
    c = compute_weight(*small, dtype)  # with autograd on: a tensor of its own
    assert torch.equal(c, dequantize(*small, dtype)) and c.data_ptr() != b.data_ptr()


def _linear(bias=True):
    torch.manual_seed(2)
    return torch.nn.Linear(48, 20, bias=bias)


def _convs():
    torch.manual_seed(3)
    return [torch.nn.Conv2d(8, 12, 3, padding=1), torch.nn.Conv2d(8, 6, 3, stride=2, padding=2, dilation=2, bias=False),
            torch.nn.Conv2d(8, 8, 1, groups=4), torch.nn.Conv2d(8, 4, 3, padding="same")]


def _bound(layer, x, scale, fmt):
    """|y - y_fp32| <= sum_k |x_k| * max|dw| per output channel (int8: scale/2; fp8: 2^-4 |w| or 2^-10 scale)."""
    w = layer.weight.detach()
    if fmt == "int8":
        dw = _row(scale, w.ndim).expand_as(w) / 2
    else:
        dw = torch.maximum(w.abs() * 2**-4, _row(scale, w.ndim).expand_as(w) * 2**-10)
    slack = 1e-5  # float32 accumulation of the two sums
    if isinstance(layer, torch.nn.Linear):
        return F.linear(x.abs(), dw) + slack * F.linear(x.abs(), w.abs()) + 1e-6
    args = (layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.conv2d(x.abs(), dw, None, *args) + slack * F.conv2d(x.abs(), w.abs(), None, *args) + 1e-6


FORMATS = ["int8", pytest.param("fp8", marks=needs_fp8)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_layers_equal_the_mask_and_stay_within_their_bound(fmt):
    torch.manual_seed(4)
    layers = [_linear(), _linear(bias=False), *_convs()]
    inputs = [torch.randn(3, 5, 48), torch.randn(3, 48)] + [torch.randn(2, 8, 9, 9)] * 4
    for layer, x in zip(layers, inputs, strict=True):
        root = torch.nn.ModuleDict({"layer": layer})
        masked, physical = copy.deepcopy(root), copy.deepcopy(root)
        install_quant_mask(masked, QuantizeConfig(format=fmt, skip=[]))
        apply_technique(physical, QuantizeConfig(format=fmt, skip=[]))
        q = physical["layer"]
        assert isinstance(q, (QuantLinear, QuantConv2d)) and q.qweight.dtype == ql.storage_dtype(fmt)
        set_kernel(physical, "dequant")
        with torch.no_grad():
            ref, sim, out = layer(x), masked["layer"](x), q(x)
        assert (out - sim).abs().max().item() <= 1e-5  # physical == mask (the same ops: in fact equal)
        err = (out - ref).abs()
        assert bool((err <= _bound(layer, x, q.scale, fmt)).all())
        assert err.max().item() > 0  # the weights really were quantized
        assert torch.equal(masked["layer"].weight, layer.weight)  # the mask leaves the weight as it was
        if layer.bias is not None:
            assert q.bias is physical["layer"].bias and torch.equal(q.bias, layer.bias)


def test_the_mask_is_named_reversible_and_restores_the_weight_on_errors():
    lin = _linear()
    root = torch.nn.ModuleDict({"lin": lin})
    x = torch.randn(4, 48)
    with torch.no_grad():
        ref = lin(x)
    patch = install_quant_mask(root, QuantizeConfig(skip=[]))
    assert install_quant_mask(root, QuantizeConfig(skip=[])) is patch and MASK_PATCH in installed(root)
    with pytest.raises(RuntimeError):
        lin(torch.randn(4, 7))  # a failing call: the original weight is back anyway
    assert lin.weight is root["lin"]._parameters["weight"] and "_frag_quant_original" not in lin.__dict__
    assert [n for n, _ in lin.named_parameters()] == ["weight", "bias"]
    with torch.no_grad():
        assert not torch.equal(lin(x), ref)
        assert remove_quant_mask(root)
        assert torch.equal(lin(x), ref)


def test_int8pack_kernel_equals_the_dequantize_path(monkeypatch):
    lin = _linear()
    q = QuantLinear.from_linear(lin, "int8")
    torch.manual_seed(5)
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        q.kernel = "dequant"
        dq = q(x)
        q.kernel = "int8pack"
        pk = q(x)
        assert (pk - dq).abs().max().item() <= 1e-5 * dq.abs().max().item()
        # bf16: both paths within the same distance of the float32 result (the kernel scales after the sum)
        xb = x[:1, :2].bfloat16()  # 2 rows: "auto" picks the kernel on CPU
        qb = QuantLinear.from_linear(copy.deepcopy(lin).bfloat16(), "int8")
        ref = F.linear(xb.float(), dequantize(qb.qweight, qb.scale, torch.float32), qb.bias.float())
        qb.kernel = "dequant"
        e_dq = (qb(xb).float() - ref).abs().max().item()
        calls = []
        real = torch._weight_int8pack_mm
        monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or real(*a))
        qb.kernel = "auto"
        e_pk = (qb(xb).float() - ref).abs().max().item()
        assert calls == [1] and e_pk <= 2 * e_dq + 1e-2 * ref.abs().max().item()
        qb(torch.randn(64, 48).bfloat16())  # many rows: auto dequantizes
        q.kernel = "auto"
        q(x)  # float32: auto dequantizes (the CPU kernel is 30x slower there)
        assert calls == [1]

        def broken(*a):
            raise RuntimeError("no kernel")

        monkeypatch.setattr(torch, "_weight_int8pack_mm", broken)
        q.kernel = "int8pack"
        assert torch.equal(q(x), dq) and q._int8pack_failed  # falls back to dequantize, and stays there


@needs_fp8
def test_casting_the_module_keeps_fp8_storage_exact():
    q = QuantConv2d.from_conv(_convs()[0], "fp8")
    stored = q.qweight.clone()
    q.half()
    assert q.qweight.dtype == FP8 and torch.equal(q.qweight.view(torch.uint8), stored.view(torch.uint8))
    assert q.scale.dtype == torch.float16 and q.bias.dtype == torch.float16
    assert q(torch.randn(1, 8, 5, 5).half()).dtype == torch.float16


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_tiny_unet_quantized_equals_its_mask_within_a_measured_bound(tiny, fmt):
    den = tiny.denoiser
    x = unet_inputs(den)
    cfg = QuantizeConfig(format=fmt)
    expected = TECH.summary(cfg, den)
    physical, masked = copy.deepcopy(den), copy.deepcopy(den)
    before = snapshot(physical)
    applied = TECH.apply(physical, cfg)
    changed, added, removed = state_diff(before, physical)
    names = applied.config.layers
    assert changed == [] and sorted(added) == sorted([f"{n}.qweight" for n in names] + [f"{n}.scale" for n in names])
    assert sorted(removed) == sorted(f"{n}.weight" for n in names)
    assert "conv_in" not in names and "conv_out" not in names and len(names) == 117  # 80 Linear + 37 Conv2d
    TECH.mask(masked, cfg)
    with torch.no_grad():
        ref, out, sim = den(*x).sample, physical(*x).sample, masked(*x).sample
    assert (out - sim).abs().max().item() <= 1e-5
    rel = ((out - ref).norm() / ref.norm()).item()
    # measured on tiny (random weights): int8 1.07e-2, fp8 7.2e-2
    assert 1e-4 < rel < (0.02 if fmt == "int8" else 0.1)
    s = expected
    assert s.unit == "quantized_layers" and s.units_total == 119 and s.units_removed == 117
    assert s.details["layers_by_type"] == {"Linear": 80, "Conv2d": 37} and s.details["skipped"] == ["conv_in", "conv_out"]
    nbytes = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())  # noqa: E731
    assert s.bytes_saved == nbytes(den) - nbytes(physical)


def test_rebuild_on_meta_makes_empty_int8_storage_and_no_float_weight(tiny):
    den = tiny.denoiser
    physical = copy.deepcopy(den)
    resolved = TECH.apply(physical, QuantizeConfig()).config
    meta = meta_copy(den)
    TECH.check(meta, resolved)
    TECH.rebuild(meta, resolved)
    layer = meta.get_submodule(resolved.layers[0])
    assert layer.qweight.is_meta and layer.qweight.dtype == torch.int8 and not hasattr(layer, "weight")
    want = {k: (tuple(t.shape), t.dtype) for k, t in physical.state_dict().items()}
    assert {k: (tuple(t.shape), t.dtype) for k, t in meta.state_dict().items()} == want


def test_low_rank_factors_are_quantized_as_the_plain_linears_they_hold():
    class Factored(torch.nn.Module):  # how low_rank replaces a Linear: two plain Linears
        def __init__(self):
            super().__init__()
            self.down, self.up = torch.nn.Linear(32, 4, bias=False), torch.nn.Linear(4, 16)

        def forward(self, x):
            return self.up(self.down(x))

    torch.manual_seed(6)
    root = torch.nn.Sequential(Factored(), torch.nn.Linear(16, 8))
    applied = apply_technique(root, QuantizeConfig(skip=[]))
    assert applied.config.layers == ["0.down", "0.up", "1"]
    assert isinstance(root[0].down, QuantLinear) and isinstance(root[0].up, QuantLinear)
    untouched = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 8))  # before low-rank factoring
    with pytest.raises(FragError, match="cannot simulate layer 0.down.*without --simulate"):
        TECH.mask(untouched, applied.config)


def test_bad_inputs_are_refused_naming_the_layer_and_the_fix(monkeypatch):
    assert TECH.plan(None, {}) is None and TECH.plan(None, {"quantize": "none"}) is None
    assert TECH.plan(None, {"quantize": "fp8"}).config == QuantizeConfig(format="fp8")
    with pytest.raises(FragError, match="'int4' is not a format.*int8, fp8 or none"):
        TECH.plan(None, {"quantize": "int4"})
    root = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ConvTranspose2d(4, 4, 3),
                               torch.nn.MultiheadAttention(8, 2), torch.nn.TransformerEncoderLayer(8, 2, 16))
    before = snapshot(root)
    with pytest.raises(FragError, match="layer 1 cannot be quantized: it is a ConvTranspose2d.*drop it") as e:
        apply_technique(root, QuantizeConfig(layers=["0", "1"]))
    assert e.value.fix and state_diff(before, root) == ([], [], [])  # checked first: nothing changed
    with pytest.raises(FragError, match="layer 2.out_proj cannot be quantized.*MultiheadAttention"):
        TECH.check(root, QuantizeConfig(layers=["2.out_proj"]))
    with pytest.raises(FragError, match="layer 3.linear1 cannot be quantized: it is inside a torch.nn.Transformer"):
        TECH.check(root, QuantizeConfig(layers=["3.linear1"]))  # a plain Linear its parent reads directly
    with pytest.raises(FragError, match="layer nope is not a Linear or Conv2d layer"):
        TECH.check(root, QuantizeConfig(layers=["nope"]))
    with pytest.raises(FragError, match="twice"):
        TECH.check(root, QuantizeConfig(layers=["0", "0"]))
    s = TECH.summary(QuantizeConfig(), root)  # implicit: the others are left in full precision and listed
    assert s.units_removed == 1 and set(s.details["unsupported"]) == {"1", "2.out_proj", "3.linear1", "3.linear2",
                                                                   "3.self_attn.out_proj"}
    shared = torch.nn.Linear(4, 4)
    with pytest.raises(FragError, match="layer 0 cannot be quantized: it is shared by several parents"):
        TECH.check(torch.nn.Sequential(shared, torch.nn.ReLU(), shared), QuantizeConfig(layers=["0"]))
    with pytest.raises(FragError, match="no Linear or Conv2d layer"):
        TECH.check(torch.nn.Sequential(torch.nn.ReLU()), QuantizeConfig())
    with pytest.raises(FragError, match="already quantized"):
        q = copy.deepcopy(root)
        apply_technique(q, QuantizeConfig(layers=["0"]))
        TECH.check(q, QuantizeConfig(layers=["0"]))
    monkeypatch.delattr(torch, "float8_e4m3fn", raising=False)
    with pytest.raises(FragError, match="this torch .* has no float8.*--quantize int8 or upgrade torch"):
        TECH.check(root, QuantizeConfig(format="fp8"))


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "profile"
    api.profile(PROMPT, model="tiny", seeds=[0, 1], steps=2, out=out, show_progress=False)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_quantized_fragment_round_trips_and_stays_quantized(profile_dir, tmp_path, fmt):
    from safetensors.torch import load_file

    out = tmp_path / "frag"
    api.extract(profile_dir, {"quantize": fmt}, out=out, show_progress=False)
    m = read_manifest(out)
    assert [t.name for t in m.techniques] == ["quantize"]
    entry = m.techniques[0]
    layers = entry.config["layers"]
    assert entry.config["format"] == fmt and len(layers) == 117 and entry.summary.units_removed == 117
    delta = load_file(out / "fragment.safetensors")
    qdtype = ql.storage_dtype(fmt)
    assert all(delta[f"unet.{n}.qweight"].dtype == qdtype for n in layers)
    assert not any(k.endswith(".bias") or k.endswith(".weight") for k in delta)  # biases stay the base model's
    assert sorted(m.weights.removed) == sorted(f"unet.{n}.weight" for n in layers)

    extracted = load_model("tiny")  # the model as frag extract changed it
    from fragcli.techniques.stack import apply_stack

    apply_stack(extracted.denoiser, steps_from_entries(m.techniques))
    loaded = load_model("tiny")
    load_fragment(loaded, out)
    den = loaded.denoiser
    x = unet_inputs(den)
    with torch.no_grad():
        assert torch.equal(den(*x).sample, extracted.denoiser(*x).sample)
    quant = [den.get_submodule(n) for n in layers]
    assert all(q.qweight.dtype == qdtype and q.scale.dtype == torch.float32 for q in quant)
    full = sum(q.qweight.numel() * 4 for q in quant)
    stored = sum(q.qweight.numel() + q.scale.numel() * 4 for q in quant)
    assert 0.25 <= stored / full < 0.26  # a quarter of the float32 bytes, plus the scales

    from fragcli.loading import open_fragment

    opened = open_fragment(out, device="cpu", dtype="fp32")  # tiny is a folder: streamed, no float weight read
    with torch.no_grad():
        assert torch.equal(opened.denoiser(*x).sample, extracted.denoiser(*x).sample)
    assert opened.denoiser.get_submodule(layers[0]).qweight.dtype == qdtype


def test_a_bad_quantize_option_writes_nothing(profile_dir, tmp_path):
    with pytest.raises(FragError, match="int4"):
        api.extract(profile_dir, {"quantize": "int4"}, out=tmp_path / "f", show_progress=False)
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_layers_still_count_their_weights(fmt):
    """A quantized layer's weight is a buffer, yet it is a weight: param_count (manifest, bench) must not drop it."""
    from fragcli.memory import param_count

    lin, conv = torch.nn.Linear(40, 16), torch.nn.Conv2d(6, 12, 3)
    for layer, quant in ((lin, QuantLinear.from_linear(lin, fmt)), (conv, QuantConv2d.from_conv(conv, fmt))):
        assert param_count(quant) == param_count(layer) == sum(p.numel() for p in layer.parameters())


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_reused_buffer_works_in_and_out_of_inference_mode(fmt):
    """The CPU workspace made under torch.inference_mode (a pipeline call) must not break a later no_grad call."""
    q, scale = quantize_weight(_weight(16, 40), fmt)
    expected = dequantize(q, scale, torch.float32)
    ql.release_workspace()
    with torch.inference_mode():
        assert torch.equal(compute_weight(q, scale, torch.float32), expected)
    with torch.no_grad():
        assert torch.equal(compute_weight(q, scale, torch.float32), expected)
