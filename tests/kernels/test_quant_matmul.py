"""quant_matmul on the CPU: packing layout, exactness of the reference against QuantLinear, gradients, and torch's
CPU int4 kernel (the ``compiled`` backend, given ``pack_for_cpu``) against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blocktrain.kernels import quant_matmul, use_backend
from blocktrain.kernels.quant_matmul import pack_codes, pack_for_cpu, quant_matmul_reference, unpack_codes
from blocktrain.trainer.compression.packing import PackedLinear, pack_quant_linear
from blocktrain.trainer.compression.quant import QuantLinear, QuantSpec, minmax_qparams


@pytest.mark.parametrize("bits,width", [(2, 40), (4, 72), (4, 13), (8, 24)])
def test_pack_round_trip_and_bit_layout(bits, width):
    codes = torch.randint(0, 2**bits, (5, width), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-width * bits // 32))
    assert torch.equal(unpack_codes(packed, bits, width), codes.to(torch.int32))
    word = int(packed[2, 0]) % 2**32  # code j of a row sits at bits b·j of its first word
    assert [(word >> (bits * j)) & (2**bits - 1) for j in range(min(width, 32 // bits))] == codes[2, :32 // bits].tolist()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_layout_is_compressed_tensors_pack_quantized(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    signed = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (6, 64), generator=torch.Generator().manual_seed(1))
    theirs = helpers.pack_to_int32(signed.to(torch.int8), bits)
    assert torch.equal(pack_codes(signed + 2 ** (bits - 1), bits), theirs)


@pytest.mark.parametrize("bits,symmetric,group", [(4, False, None), (4, True, 32), (2, False, 32), (2, True, None),
                                                  (8, False, 64)])
def test_equals_quant_linear_bit_for_bit(bits, symmetric, group):
    gen = torch.Generator().manual_seed(0)
    w, bias = torch.randn(48, 128, generator=gen), torch.randn(48, generator=gen)
    spec = QuantSpec(bits, symmetric, group)
    layer = QuantLinear.from_weight(w, *minmax_qparams(w, spec), spec, bias)
    x = torch.randn(3, 5, 128, generator=gen)
    got = quant_matmul(x, *pack_quant_linear(layer), bits, bias)
    assert torch.equal(got, layer(x))


@pytest.mark.parametrize("bits,symmetric", [(4, False), (2, True), (8, False)])
def test_ragged_groups_equal_quant_linear_bit_for_bit(bits, symmetric):
    """Groups of 32 over 80 inputs (32, 32, 16): the packed layer computes exactly the QuantLinear's function, and
    torch's CPU int4 kernel (equal groups only) is not offered."""
    gen = torch.Generator().manual_seed(1)
    w, bias = torch.randn(32, 80, generator=gen), torch.randn(32, generator=gen)
    spec = QuantSpec(bits, symmetric, 32, ragged=True)
    layer = QuantLinear.from_weight(w, *minmax_qparams(w, spec), spec, bias)
    packed, scale, zero = pack_quant_linear(layer)
    assert scale.shape == (32, 3)
    x = torch.randn(3, 80, generator=gen)
    assert torch.equal(quant_matmul(x, packed, scale, zero, bits, bias, group_size=32), layer(x))
    assert torch.equal(PackedLinear(layer)(x), layer(x)) and PackedLinear(layer).cpu_packed() is None
    assert pack_for_cpu(packed, scale, zero, bits, 80, 32) is None
    with pytest.raises(ValueError, match="3 groups do not divide the input width 80"):
        quant_matmul(x, packed, scale, zero, bits, bias)
    x = x.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: quant_matmul(x, packed, scale.double(), zero.double(), bits,
                                                           group_size=32), (x,), fast_mode=True)


def test_gradients_of_x_and_bias_match_the_dense_layer():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(20, 64, generator=gen)
    spec = QuantSpec(4, False, 32)
    packed, scale, zero = pack_quant_linear(QuantLinear.from_weight(w, *minmax_qparams(w, spec), spec))
    scale, zero = scale.double(), zero.double()
    x = torch.randn(7, 64, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(20, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: quant_matmul(x, packed, scale, zero, 4, b), (x, bias), fast_mode=True)
    y = quant_matmul(x, packed, scale, zero, 4, bias)
    dense = F.linear(x, scale.repeat_interleave(32, 1) * (unpack_codes(packed, 4, 64) - zero.repeat_interleave(32, 1)),
                     bias)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, bias), g), torch.autograd.grad(dense, (x, bias), g)):
        torch.testing.assert_close(got, want)


def test_compiles_as_one_op():
    packed = pack_codes(torch.randint(0, 16, (8, 32)), 4)
    scale, zero, x = torch.rand(8, 1) + 0.1, torch.full((8, 1), 8.0), torch.randn(3, 32)
    compiled = torch.compile(lambda x: quant_matmul(x, packed, scale, zero, 4), backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), quant_matmul(x, packed, scale, zero, 4))


def test_bad_inputs_fail_clearly():
    packed = pack_codes(torch.randint(0, 16, (8, 32)), 4)
    scale = torch.ones(8, 1)
    with pytest.raises(ValueError, match="bits must be one of"):
        quant_matmul(torch.randn(2, 32), packed, scale, scale, 3)
    with pytest.raises(ValueError, match="packed must be int32"):
        quant_matmul(torch.randn(2, 64), packed, scale, scale, 4)
    with pytest.raises(ValueError, match="do not divide"):
        quant_matmul(torch.randn(2, 32), packed, torch.ones(8, 3), torch.ones(8, 3), 4)
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.full((2, 8), 4), 2)


def _int4_weight(out: int, width: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    packed = pack_codes(torch.randint(0, 16, (out, width), generator=gen), 4)
    scale = (torch.rand(out, width // group, generator=gen) + 0.5) / width**0.5
    return packed, scale, torch.randint(0, 16, (out, width // group), generator=gen).float()


@pytest.mark.parametrize("lead,width,out,group", [((1,), 64, 32, 32), ((16,), 256, 48, 64), ((2, 5), 128, 16, 128),
                                                  ((3,), 256, 64, 256)])
def test_cpu_int4_kernel_matches_the_reference_in_bf16(lead, width, out, group):
    packed, scale, zero = _int4_weight(out, width, group)
    cpu = pack_for_cpu(packed, scale, zero, 4, width)
    x = torch.randn(*lead, width, generator=torch.Generator().manual_seed(1)).bfloat16()
    bias = torch.randn(out)
    want = quant_matmul_reference(x.reshape(-1, width), packed, scale, zero, 4, bias).view(*lead, out)
    with use_backend("reference"):
        assert torch.equal(quant_matmul(x, packed, scale, zero, 4, bias, cpu), want)  # forced: cpu_packed unused
    got = quant_matmul(x, packed, scale, zero, 4, bias, cpu)
    atol = 2e-2 * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=2e-2, atol=atol)
    other = pack_for_cpu(packed, scale, zero + 1, 4, width)  # the kernel reads cpu_packed, not packed/scale/zero
    shifted = want.float() - x.float() @ scale.repeat_interleave(group, 1).t()
    torch.testing.assert_close(quant_matmul(x, packed, scale, zero, 4, bias, other).float(), shifted, rtol=2e-2,
                               atol=atol)


def test_fp32_activations_stay_on_the_reference():
    packed, scale, zero = _int4_weight(32, 64, 32)
    x = torch.randn(4, 64)
    other = pack_for_cpu(packed, scale, zero + 1, 4, 64)
    assert torch.equal(quant_matmul(x, packed, scale, zero, 4, cpu_packed=other),
                       quant_matmul_reference(x, packed, scale, zero, 4))


def test_cpu_int4_kernel_gradient_is_the_reference_one():
    packed, scale, zero = _int4_weight(32, 64, 32)
    x = torch.randn(4, 64).bfloat16().requires_grad_()
    g = torch.randn(4, 32).bfloat16()
    cpu = pack_for_cpu(packed, scale, zero, 4, 64)
    (got,) = torch.autograd.grad(quant_matmul(x, packed, scale, zero, 4, cpu_packed=cpu), x, g)
    (want,) = torch.autograd.grad(quant_matmul_reference(x, packed, scale, zero, 4), x, g)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bits,width,out,group", [(2, 64, 32, 32), (8, 64, 32, 32), (4, 64, 24, 32), (4, 96, 32, 48),
                                                  (4, 576, 32, 576)])
def test_cpu_int4_kernel_is_used_only_where_it_applies(bits, width, out, group):
    packed = pack_codes(torch.randint(0, 2**bits, (out, width)), bits)
    scale = torch.rand(out, width // group) + 0.1
    assert pack_for_cpu(packed, scale, torch.zeros_like(scale), bits, width) is None
