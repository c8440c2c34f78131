"""quant_matmul's reference path (the CPU path): packing layout, exactness against QuantLinear, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blocktrain.kernels import quant_matmul
from blocktrain.kernels.quant_matmul import pack_codes, unpack_codes
from blocktrain.trainer.compression.packing import pack_quant_linear
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
