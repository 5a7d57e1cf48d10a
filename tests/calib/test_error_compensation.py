"""GPTQ error compensation: the column loop against an independent reference, its
effect on the output error, the true-sequential steps, bad Hessians and inputs, and
GPTQ as the starting point of the trained methods."""

import pytest
import torch
from tiny import random_tokens, tiny_model

import lowbit
from lowbit.calib import gptq
from lowbit.calib.gptq import GPTQOptions, HessianCollector, compensate, inverse_cholesky
from lowbit.calib.methods.lwc import ClippedLinear
from lowbit.errors import CalibrationError, UsageError
from lowbit.quant.grid import codes_for, minmax_scales_zeros

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_inputs(rows, k, seed):
    """Inputs with strongly correlated features and a few large ones, like a layer's."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(rows, k, generator=g) @ mixing
    return x * (1 + 4 * (torch.rand(k, generator=g) > 0.9))


def hessian_of(x):
    return 2 * x.T @ x / x.shape[0]


def grid(w, bits, group_size):
    scales, zeros = minmax_scales_zeros(w, bits, group_size, torch.float16)
    return scales.float(), zeros.float()


def dequantized(w_round, scales, zeros, bits):
    codes = codes_for(w_round, scales, zeros, bits).float()
    g = w_round.shape[1] // scales.shape[1]
    return (codes - zeros.repeat_interleave(g, 1)) * scales.repeat_interleave(g, 1)


def reference_gptq(w, h, scales, zeros, bits, order, damp):
    """Optimal Brain Quantization as first written: quantize one column, spread its error
    with the current inverse Hessian, then remove that column from the inverse."""
    w, k = w.double().clone(), w.shape[1]
    h = h.double() + damp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    g = k // scales.shape[1]
    out = torch.empty_like(w)
    remaining = list(order.tolist())
    for j in order.tolist():
        s, z = scales[:, j // g].double(), zeros[:, j // g].double()
        q = torch.clamp(torch.round(w[:, j] / s) + z, 0, 2**bits - 1)
        out[:, j] = w[:, j]
        error = (w[:, j] - s * (q - z)) / hinv[j, j]
        remaining.remove(j)
        w[:, remaining] -= error[:, None] * hinv[j, remaining][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return out.float()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("n,k,group_size", [(5, 64, 32), (33, 96, 32), (16, 128, 64)])
def test_compensation_matches_the_reference(bits, act_order, n, k, group_size):
    seed = 100 * bits + k + n
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    h = hessian_of(correlated_inputs(4 * k, k, seed))
    scales, zeros = grid(w, bits, group_size)
    options = GPTQOptions(damp=0.01, block_size=7, act_order=act_order, clip_search=False)
    got = compensate(w, h, scales, zeros, bits, options, "layer")
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    want = reference_gptq(w, h, scales, zeros, bits, order, 0.01)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    # float32 rounding can flip a code sitting on a rounding boundary, nothing more
    assert (codes_for(got, scales, zeros, bits) != codes_for(want, scales, zeros, bits)).float().mean() < 0.01


def test_lazy_batches_do_not_change_the_result():
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(3))
    h = hessian_of(correlated_inputs(512, 128, 3))
    scales, zeros = grid(w, 3, 32)
    one = compensate(w, h, scales, zeros, 3, GPTQOptions(block_size=1), "layer")
    lazy = compensate(w, h, scales, zeros, 3, GPTQOptions(block_size=128), "layer")
    torch.testing.assert_close(one, lazy, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_beats_round_to_nearest_on_the_output_error(bits, seed):
    k, n = 256, 48
    x = correlated_inputs(2048, k, seed)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 10))
    scales, zeros = grid(w, bits, 64)

    def output_error(w_hat):
        return (x @ (w - w_hat).T).square().mean().item()

    rtn = output_error(dequantized(w, scales, zeros, bits))
    for act_order in (False, True):
        compensated = compensate(w, hessian_of(x), scales, zeros, bits,
                                 GPTQOptions(act_order=act_order, clip_search=False), "layer")
        assert output_error(dequantized(compensated, scales, zeros, bits)) < 0.8 * rtn


def test_clip_search_lowers_the_weighted_rounding_error():
    linear = torch.nn.Linear(128, 16, bias=False)
    torch.nn.init.normal_(linear.weight, generator=torch.Generator().manual_seed(4))
    importance = torch.rand(128, generator=torch.Generator().manual_seed(5)) + 0.1
    wrapper = ClippedLinear(linear, 3, 32, torch.float16, init=100.0)

    def weighted_error():
        with torch.no_grad():
            return (importance * (wrapper.fake_weight() - linear.weight).square()).sum().item()

    minmax = weighted_error()
    gptq.search_clip(wrapper, importance)
    assert weighted_error() < minmax
    assert (torch.sigmoid(wrapper.upper) < 1).any()  # some groups were shrunk


def test_an_indefinite_hessian_gets_more_dampening_then_a_clear_error():
    x = correlated_inputs(8, 64, 0)  # rank 8 of 64: singular
    h = hessian_of(x)
    with pytest.warns(UserWarning, match="needed dampening"):
        inverse_cholesky(h, 1e-12, "model.layers.0.mlp.up_proj")
    broken = torch.eye(64)
    broken[3, 4] = broken[4, 3] = 10.0  # eigenvalue -9: no dampening up to the mean diagonal helps
    with pytest.raises(CalibrationError, match="model.layers.0.mlp.up_proj.*singular"):
        inverse_cholesky(broken, 0.01, "model.layers.0.mlp.up_proj")


def test_dead_inputs_are_left_to_round_to_nearest():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    x = correlated_inputs(256, 64, 6)
    x[:, :5] = 0
    scales, zeros = grid(w, 3, 32)
    got = compensate(w, hessian_of(x), scales, zeros, 3, GPTQOptions(), "layer")
    assert torch.isfinite(got).all()


def test_true_sequential_steps_of_a_llama_block():
    model = tiny_model("llama", layers=1)
    block = model.model.layers[0]
    layers = {name: block.get_submodule(name) for name in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    normed = []
    handle = block.input_layernorm.register_forward_hook(lambda m, a, out: normed.append(out))
    with HessianCollector(layers, "model.layers.0") as collector, torch.no_grad():
        model(input_ids=random_tokens(2, 16))
    handle.remove()
    assert [sorted(step) for step in collector.steps] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    x = normed[0].reshape(-1, normed[0].shape[-1]).float()
    for local in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):  # one input, one sum
        torch.testing.assert_close(collector.hessian(local), 2 * x.T @ x / x.shape[0])
    with pytest.raises(ValueError, match="not in the first step"):  # its inputs change with step 1
        collector.hessian("mlp.down_proj")


def config(**kw):
    defaults = dict(bits=3, group_size=32, nsamples=8, seqlen=32, epochs=2, progress=False)
    return lowbit.QuantConfig(**{**defaults, **kw})


def test_nan_activations_stop_the_run_naming_the_layer():
    model = tiny_model("llama", layers=2)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    with pytest.raises(CalibrationError, match=r"model\.layers\.1\.mlp\.(gate|up)_proj"):
        lowbit.quantize(model, config(method="gptq"), random_tokens())


def test_gptq_method_lowers_the_block_loss_below_round_to_nearest():
    tokens = random_tokens()
    losses = {}
    for init in ("rtn", "gptq"):  # omniquant with no training: its starting point
        model = tiny_model("llama", layers=2)
        report = lowbit.quantize(model, config(method="omniquant", bits=2, epochs=0, clip_init=100.0,
                                               init=init), tokens)
        losses[init] = [b.loss_after["mse"] for b in report.blocks]
    assert all(g < r for g, r in zip(losses["gptq"], losses["rtn"])), losses


def test_omniquant_without_training_from_gptq_is_gptq():
    tokens = random_tokens()
    reference = tiny_model("llama", layers=2)
    lowbit.quantize(reference, config(method="gptq"), tokens)
    started = tiny_model("llama", layers=2)
    report = lowbit.quantize(started, config(method="omniquant", epochs=0, init="gptq"), tokens)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, started.state_dict()[key]), key
    assert [b.loss_before for b in report.blocks] == [b.loss_after for b in report.blocks]


@pytest.mark.parametrize("method,options", [("apiq", {"lora_rank": 4})])
def test_training_from_gptq_lowers_the_block_loss(method, options):
    """Adapters learn on top of GPTQ's codes. (Clipping, omniquant, and rounding,
    tesseraq, move the codes under the compensated weights and on the tiny model lose
    part of what GPTQ gained in so few steps.)"""
    model = tiny_model("llama", layers=2)
    report = lowbit.quantize(model, config(method=method, bits=2, epochs=4, lr={"clip": 1e-3},
                                           options={**options, "init": "gptq"}), random_tokens())
    for log in report.blocks:
        assert log.loss_after["mse"] < log.loss_before["mse"], log


def test_gptq_resumes_bit_identical(tmp_path):
    tokens = random_tokens()
    first = tiny_model("llama", layers=2)
    lowbit.quantize(first, config(method="omniquant", epochs=1, init="gptq", cache_dir=str(tmp_path)), tokens)
    again = tiny_model("llama", layers=2)
    report = lowbit.quantize(again, config(method="omniquant", epochs=1, init="gptq", cache_dir=str(tmp_path)),
                             tokens)
    assert all(b.resumed for b in report.blocks)
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_bad_settings_are_refused():
    with pytest.raises(UsageError, match="init must be one of"):
        config(method="omniquant", init="awq")
    with pytest.raises(UsageError, match="damp"):
        config(method="gptq", damp=-1)
