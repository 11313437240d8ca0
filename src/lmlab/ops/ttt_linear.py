"""TTT-Linear (Sun et al. 2024, "Learning to (Learn at Test Time)"): a linear inner model trained
by mini-batch gradient descent while the sequence is read.

Per head the hidden state is a linear map ``W`` (``[D, D]``, rows indexed by the input) and a
bias ``b`` (``[1, D]``); token ``t``'s self-supervised loss is

    l_t(W, b) = 0.5 * || LN(k_t W + b) - (v_t - k_t) ||^2

with ``LN`` a layer norm over the head's ``D`` channels with the learned ``ln_weight, ln_bias``.
Tokens are grouped in mini-batches of ``mini_batch_size`` consecutive positions counted from the
start of the stream. Inside a mini-batch every gradient is taken at the mini-batch's initial
weights ``W_0, b_0``; token ``i`` (0-based inside its mini-batch) uses

    W_i = W_0 - sum_{j <= i} lr_j / (i + 1) * grad_W l_j(W_0, b_0)      (b_i likewise)
    o_i = q_i + LN(q_i W_i + b_i)

and the next mini-batch starts from the last token's ``W_{b-1}, b_{b-1}``. This is the official
code's (test-time-training/ttt-lm-pytorch) step size ``lr_j * token_idx_i`` without its learnable
offset of ``token_idx``.

``mode="recurrent"`` is the oracle: token by token, each inner gradient computed by
``torch.func.grad`` of the loss above (so it shares no LN derivative with the chunked form).
``mode="chunk"`` is the paper's dual form: per mini-batch, the LN gradients ``dZ`` of all its
tokens at ``W_0`` (written out), then
``Z = Q W_0 + b_0 - diag(1/(i+1)) tril(Q K^T + 1) diag(lr) dZ`` and the next weights as matmuls;
only the loop over mini-batches is sequential.

The state is a :class:`TTTLinearState`: a stream may stop inside a mini-batch (a partial last
mini-batch, a prefill followed by one-token decode steps), so besides the mini-batch's initial
weights it carries the open mini-batch's accumulated ``sum_j lr_j grad l_j`` and how many of its
tokens were seen. A ``T = 1`` call with that state is the decode step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lmlab.ops.checks import MODES
from lmlab.ops.chunks import AlignedChunks

__all__ = ["TTTLinearState", "ttt_linear"]


class TTTLinearState(NamedTuple):
    """The inner model between two calls (weights in float32, or float64 for float64 inputs)."""

    weight: torch.Tensor
    """``[B, H, D, D]``: ``W`` at the start of the open mini-batch."""
    bias: torch.Tensor
    """``[B, H, 1, D]``: ``b`` at the start of the open mini-batch."""
    grad_weight: torch.Tensor
    """``[B, H, D, D]``: ``sum_j lr_j grad_W l_j`` over the open mini-batch's tokens so far."""
    grad_bias: torch.Tensor
    """``[B, H, 1, D]``: the same for ``b``."""
    seen: int
    """Tokens of the open mini-batch already consumed, ``0 <= seen < mini_batch_size``."""


def ttt_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    lr: torch.Tensor,
    *,
    eps: float = 1e-6,
    mini_batch_size: int = 16,
    initial_state: torch.Tensor | TTTLinearState | None = None,
    initial_state_bias: torch.Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
) -> tuple[torch.Tensor, TTTLinearState | None]:
    """Run TTT-Linear over ``[B, T, H, D]`` queries, keys and values.

    ``lr``: ``[B, T, H]`` per-token inner learning rates (``>= 0``); ``ln_weight, ln_bias``:
    ``[H, D]``. ``initial_state`` is either the weights ``W`` (``[B, H, D, D]``, with
    ``initial_state_bias`` ``[B, H, 1, D]`` or zeros) at a mini-batch boundary, or a
    :class:`TTTLinearState` returned by an earlier call (then ``initial_state_bias`` must be
    ``None``); ``None`` starts from zeros. Returns ``o`` (``[B, T, H, D]``, dtype of ``v``) and,
    when ``output_final_state``, the :class:`TTTLinearState` after the last token (its
    ``weight, bias`` are the issue's ``state, state_bias`` whenever the stream ends on a
    mini-batch boundary), else ``None``.
    """
    _check(q, k, v, ln_weight, ln_bias, lr, mini_batch_size, initial_state, initial_state_bias)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cdt = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    state = _start_state(q, cdt, initial_state, initial_state_bias)
    run = _recurrent if mode == "recurrent" else _chunk
    with torch.autocast(q.device.type, enabled=False):  # keep the promised precision
        o, state = run(
            *(x.to(cdt) for x in (q, k, v, ln_weight, ln_bias, lr)), eps, mini_batch_size, state
        )
    return o.to(v.dtype), state if output_final_state else None


def _start_state(
    q: torch.Tensor,
    cdt: torch.dtype,
    initial: torch.Tensor | TTTLinearState | None,
    initial_bias: torch.Tensor | None,
) -> TTTLinearState:
    b, _, h, d = q.shape
    if isinstance(initial, TTTLinearState):
        return initial._replace(**{f: getattr(initial, f).to(cdt) for f in initial._fields[:4]})
    weight = q.new_zeros(b, h, d, d, dtype=cdt) if initial is None else initial.to(cdt)
    bias = q.new_zeros(b, h, 1, d, dtype=cdt) if initial_bias is None else initial_bias.to(cdt)
    return TTTLinearState(weight, bias, torch.zeros_like(weight), torch.zeros_like(bias), 0)


def _layer_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """The inner model's LN over the last axis; ``weight, bias`` broadcast (``[H, 1, D]``)."""
    mean = z.mean(-1, keepdim=True)
    var = (z - mean).square().mean(-1, keepdim=True)
    return weight * (z - mean) / (var + eps).sqrt() + bias


def _recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    lr: torch.Tensor,
    eps: float,
    mini_batch_size: int,
    state: TTTLinearState,
) -> tuple[torch.Tensor, TTTLinearState]:
    """The oracle: one token at a time, straight from the definition in the module docstring."""
    ln_w, ln_b = ln_weight[:, None, :], ln_bias[:, None, :]  # [H, 1, D]

    def inner_loss(weight: torch.Tensor, bias: torch.Tensor, key, target) -> torch.Tensor:
        # Summed over batch and heads: their weights are independent, so the gradient of the
        # sum is each one's own gradient.
        return 0.5 * (_layer_norm(key @ weight + bias, ln_w, ln_b, eps) - target).square().sum()

    inner_grad = torch.func.grad(inner_loss, argnums=(0, 1))
    weight, bias, acc_w, acc_b, seen = state
    outs = []
    for t in range(q.shape[1]):
        key, query = k[:, t, :, None, :], q[:, t, :, None, :]  # [B, H, 1, D]
        g_w, g_b = inner_grad(weight, bias, key, v[:, t, :, None, :] - key)
        step = lr[:, t, :, None, None]
        acc_w, acc_b = acc_w + step * g_w, acc_b + step * g_b
        seen += 1
        w_t, b_t = weight - acc_w / seen, bias - acc_b / seen
        outs.append(query + _layer_norm(query @ w_t + b_t, ln_w, ln_b, eps))
        if seen == mini_batch_size:  # the mini-batch closes with its last token's weights
            weight, bias, seen = w_t, b_t, 0
            acc_w, acc_b = torch.zeros_like(acc_w), torch.zeros_like(acc_b)
    o = torch.stack(outs, dim=1).squeeze(3)  # [B, T, H, D]
    return o, TTTLinearState(weight, bias, acc_w, acc_b, seen)


def _chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    lr: torch.Tensor,
    eps: float,
    mini_batch_size: int,
    state: TTTLinearState,
) -> tuple[torch.Tensor, TTTLinearState]:
    """The dual form, one mini-batch per loop step.

    The stream is padded in front by the ``seen`` tokens of the open mini-batch and at the end
    up to a whole mini-batch, so that every loop step is one aligned mini-batch. Padding is
    inert: its ``lr`` is zero, so it adds nothing to any step, and its outputs are dropped.
    """
    c = mini_batch_size
    chunks = AlignedChunks(q.shape[1], state.seen, c)
    split = chunks.split

    q, k, v = split(q), split(k), split(v)
    lr = split(lr[..., None]).transpose(-1, -2)  # [N, B, H, 1, C]: lr_j along the columns
    ln_w, ln_b = ln_weight[:, None, :], ln_bias[:, None, :]
    lower = torch.tril(torch.ones(c, c, dtype=torch.bool, device=q.device))
    inv_pos = 1.0 / torch.arange(1, c + 1, dtype=q.dtype, device=q.device)[:, None]  # 1/(i+1)
    # The step matrices depend on the inputs only: one batched product for all mini-batches.
    steps = ((q @ k.mT + 1.0) * lr).masked_fill(~lower, 0.0) * inv_pos  # [N, B, H, C, C]
    # Per-mini-batch views by unbind: its backward stacks once, where indexing in the loop
    # would fill and add a whole-sequence gradient per mini-batch (quadratic in T).
    q, k, v, lr, steps = (x.unbind(0) for x in (q, k, v, lr, steps))
    weight, bias, acc_w, acc_b, _ = state
    outs = []
    for i in range(chunks.count):
        q_i, k_i = q[i], k[i]
        dz = _inner_grad_z(k_i @ weight + bias, v[i] - k_i, ln_w, ln_b, eps)  # [B, H, C, D]
        z = q_i @ weight + bias - steps[i] @ dz
        lr_dz = lr[i].mT * dz
        grad_w, grad_b = k_i.mT @ lr_dz, lr_dz.sum(-2, keepdim=True)
        if i == 0:  # the open mini-batch's earlier steps, carried in by the state
            z = z - inv_pos * (q_i @ acc_w + acc_b)
            grad_w, grad_b = grad_w + acc_w, grad_b + acc_b
        outs.append(q_i + _layer_norm(z, ln_w, ln_b, eps))
        if chunks.closes(i):  # close the mini-batch: the last token's factor 1/c
            weight, bias = weight - grad_w / c, bias - grad_b / c
            grad_w, grad_b = torch.zeros_like(grad_w), torch.zeros_like(grad_b)
        acc_w, acc_b = grad_w, grad_b
    o = chunks.merge(outs)
    return o, TTTLinearState(weight, bias, acc_w, acc_b, chunks.next_seen)


def _inner_grad_z(
    z: torch.Tensor, target: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float
) -> torch.Tensor:
    """``d l / d z`` of ``0.5 ||LN(z) - target||^2`` (the LN backward written out); the
    gradients of ``W`` and ``b`` are ``k^T dz`` and ``dz``."""
    mean = z.mean(-1, keepdim=True)
    centred = z - mean
    inv_std = (centred.square().mean(-1, keepdim=True) + eps).rsqrt()
    x_hat = centred * inv_std
    g = (ln_w * x_hat + ln_b - target) * ln_w
    return inv_std * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    lr: torch.Tensor,
    mini_batch_size: int,
    initial: torch.Tensor | TTTLinearState | None,
    initial_bias: torch.Tensor | None,
) -> None:
    """Raise ``ValueError`` naming the expected layout for the first bad argument."""
    if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int):
        raise ValueError(f"mini_batch_size must be an integer >= 1, got {mini_batch_size!r}")
    if mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be an integer >= 1, got {mini_batch_size}")
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must all be [batch, time, heads, dim], got {tuple(q.shape)}, "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    b, t, h, d = q.shape
    if t < 1:
        raise ValueError("the core needs at least one time step, got T=0")
    if lr.shape != (b, t, h):
        raise ValueError(f"lr must be [B, T, H] = {(b, t, h)}, got {tuple(lr.shape)}")
    for name, x in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if x.shape != (h, d):
            raise ValueError(f"{name} must be [H, D] = {(h, d)}, got {tuple(x.shape)}")
    if isinstance(initial, TTTLinearState):
        if initial_bias is not None:
            raise ValueError(
                "initial_state_bias must be None when initial_state is a TTTLinearState"
            )
        if not 0 <= initial.seen < mini_batch_size:
            raise ValueError(
                f"initial_state.seen={initial.seen} must lie in [0, mini_batch_size="
                f"{mini_batch_size})"
            )
        shapes = [tuple(initial.weight.shape), tuple(initial.grad_weight.shape)]
        shapes += [tuple(initial.bias.shape), tuple(initial.grad_bias.shape)]
        if shapes != [(b, h, d, d)] * 2 + [(b, h, 1, d)] * 2:
            raise ValueError(
                f"initial_state weights must be {(b, h, d, d)} and biases {(b, h, 1, d)}, "
                f"got {shapes}"
            )
        return
    if initial is not None and tuple(initial.shape) != (b, h, d, d):
        raise ValueError(
            f"initial_state must be [B, H, D, D] = {(b, h, d, d)}, got {tuple(initial.shape)}"
        )
    if initial_bias is not None and tuple(initial_bias.shape) != (b, h, 1, d):
        raise ValueError(
            f"initial_state_bias must be [B, H, 1, D] = {(b, h, 1, d)}, "
            f"got {tuple(initial_bias.shape)}"
        )
