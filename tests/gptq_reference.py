"""A GPTQ reader and writer written from the published layout, independent of lowbit.io.gptq.

The layout (docs/CHECKPOINTS.md, GPTQ section): `qweight` int32 [K * b / 32, N]
holds, for each column n, the codes q[0..K-1, n] as one little-endian bit
stream (value i in bits i*b .. i*b+b-1, bit j of the stream being bit j % 32 of
word j // 32); `qzeros` int32 [G, ceil(N * b / 32)] holds each group's zero
points z[g, 0..N-1] the same way along a row; `scales` [G, N]; `g_idx` [K];
W[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]). Version 1 stores
z - 1 in `qzeros`.

This module works bit by bit with numpy's packbits/unpackbits rather than with
shifts and masks, so it shares no code or method with lowbit.io.gptq.
"""

import numpy as np
import torch


def stream_to_values(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """int32 words (1-D) -> the first `count` b-bit values of their bit stream."""
    stream = np.unpackbits(words.astype("<i4").view(np.uint8), bitorder="little")
    fields = stream[: count * bits].reshape(count, bits).astype(np.int64)
    return fields @ (1 << np.arange(bits, dtype=np.int64))


def values_to_stream(values: np.ndarray, bits: int, n_words: int) -> np.ndarray:
    """b-bit values (1-D) -> `n_words` int32 words holding them as one bit stream."""
    fields = (values.astype(np.int64)[:, None] >> np.arange(bits)) & 1
    stream = np.zeros(n_words * 32, dtype=np.uint8)
    stream[: fields.size] = fields.reshape(-1)
    return np.packbits(stream, bitorder="little").view("<i4").copy()


def read_qweight(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    words = qweight.numpy()
    return torch.from_numpy(
        np.stack([stream_to_values(words[:, n], bits, k) for n in range(words.shape[1])], 1)
    )


def read_qzeros(qzeros: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    words = qzeros.numpy()
    return torch.from_numpy(np.stack([stream_to_values(row, bits, n) for row in words]))


def write_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [K, N] -> qweight [K * b / 32, N]."""
    k, n = codes.shape
    values = codes.numpy()
    return torch.from_numpy(
        np.stack([values_to_stream(values[:, j], bits, k * bits // 32) for j in range(n)], 1)
    )


def write_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """zero points [G, N] -> qzeros [G, ceil(N * b / 32)]."""
    n_words = -(-zeros.shape[1] * bits // 32)
    return torch.from_numpy(np.stack([values_to_stream(row, bits, n_words) for row in zeros.numpy()]))


def dequantize(qweight, qzeros, scales, g_idx, bits, version=2) -> torch.Tensor:
    """W [K, N] in float32 from a layer's GPTQ tensors."""
    k = g_idx.shape[0]
    q = read_qweight(qweight, bits, k).float()
    z = read_qzeros(qzeros, bits, scales.shape[1]).float() + (1 if version == 1 else 0)
    g = g_idx.long()
    return scales.float()[g] * (q - z[g])
