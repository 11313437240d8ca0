"""The contract between the layers and the model, the optimiser set-up and the trainer.

Every hook that they call on a layer is declared here with its default, so that a layer states
what it needs instead of being probed with ``hasattr``:

- :class:`LayerHooks`: hooks any module inside the model may declare (token ids, auxiliary
  loss, statistics, optimiser hint, end of training); the model finds them by this base class;
- :class:`Mixer`: adds what the model needs from every registered mixer (its FLOPs correction,
  which is abstract so that forgetting it is an error rather than a silent zero, and its own
  initialisation);
- :class:`TokenMixer` and :class:`ChannelMixer`: the two kinds the registry accepts;
- :class:`Router`: the linear layer of a discrete choice (full precision, AdamW).
"""

from __future__ import annotations

import dataclasses
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

Decode = Callable[[Sequence[int]], str]
"""Token ids to text (``tokenizer.decode``), for reports written at the end of training."""


@dataclasses.dataclass
class NoOptions:
    """For mixers without settings of their own."""


class LayerHooks(nn.Module):
    """Hooks the model calls on every module deriving from this class; each default is a no-op.

    Modules that are not mixers but take part in training (the Mixture-of-Depths and
    mixture-of-heads routers, a routed block) derive from it too."""

    wants_token_ids: bool = False
    """True: the model calls :meth:`set_token_ids` with the input ids before each forward (the
    MoE specialisation table counts tokens per expert; a routed block hands on the routed ids)."""

    optimizer_hint: ClassVar[Literal["adamw"] | None] = None
    """``"adamw"``: every parameter under this module goes to AdamW even with the Muon recipe
    (a router's rows are per-class logits, not a hidden map); None: the default rule of
    ``lmlab.train.optim.split_parameters``."""

    aux_loss: torch.Tensor | None = None
    """The auxiliary loss (load balancing) of the last training forward, which the trainer adds
    to the language-model loss; None when there is none. Set it only while
    ``lmlab.layers.features.recording()``, so a recomputed forward does not count it twice."""

    def set_token_ids(self, idx: torch.Tensor) -> None:
        """The input token ids ``[B, T]`` of the next forward; called only when
        :attr:`wants_token_ids` is true, so a module that sets it must override this."""
        raise NotImplementedError(
            f"{type(self).__name__} sets wants_token_ids but does not define set_token_ids"
        )

    def pop_statistics(self) -> dict:
        """Statistics gathered since the last call, then reset; the trainer logs them once per
        step (after the optimiser step) under the module's path. Empty: nothing to log."""
        return {}

    def on_training_end(self, run_dir: Path, name: str, decode: Decode | None) -> None:
        """Write what the module gathered over the training into ``run_dir`` (``name``: its
        path in the model, ``decode``: the tokenizer's); the trainer calls it once, when the
        budget is spent."""


class Mixer(LayerHooks, metaclass=ABCMeta):
    """What the model needs from every registered mixer besides :class:`LayerHooks`.

    Built as ``cls(cfg: ModelConfig, layer_idx: int, options: cls.Options)``."""

    name: ClassVar[str] = ""
    """The registered name, set by the registry (error messages, reports)."""

    Options: ClassVar[type] = NoOptions
    """Dataclass of the ``model.mixer_options.<name>`` settings; unknown keys are refused."""

    @abstractmethod
    def extra_flops_per_token(self, context: int) -> float:
        """Forward FLOPs per token at ``context`` that the model's count of 2 per ``nn.Linear``
        weight misses: attention scores, scans, convolutions; negative for experts that do not
        run. Abstract because a forgotten correction would silently skew every FLOP budget:
        a mixer with nothing to add returns 0.0 on purpose."""

    def reset_parameters(self) -> None:
        """The mixer's own initialisation (decay rates, gates), run after the model's generic
        Normal(0, init_std) initialisation of every linear layer and embedding."""


class TokenMixer(Mixer):
    """Mixes along time: ``forward(x [B, T, D], state=None) -> (y [B, T, D], new_state)``."""

    cache_grows_with_context: bool = False
    """True when the decode state keeps something per past token (an attention cache without a
    window, Hyena's past inputs): truncated BPTT, which carries the state across the whole
    stream, refuses such a mixer."""

    def stack_states(self, states: list[Any]) -> Any | None:
        """One decode state holding the rows of ``states`` (each a batch of rows) although
        they differ in more than the batch size (e.g. attention caches of different lengths),
        so that requests at different points decode in one forward (``lmlab serve``'s
        continuous batching); the result must decode one token at a time and its rows be
        selectable along dim 0 of every tensor. None (the default): the server stacks only
        states whose shapes match exactly."""
        return None

    def truncate_state(self, state: Any, drop: int) -> Any | None:
        """``state`` without the last ``drop`` tokens it consumed, or None (the default) when
        that cannot be done without recomputation.

        Speculative decoding verifies several drafted tokens in one forward and then forgets
        the rejected ones (``LanguageModel.rewind``). A cache that keeps every past token apart
        (an attention KV cache) is cut by shortening it; a state that has folded the tokens in
        (a recurrent matrix state, a convolution tail, a windowed cache that dropped its oldest
        keys) cannot be, and None makes the model re-run the kept tokens from the state before
        the verification instead, which is exact for every mixer."""
        return None


class ChannelMixer(Mixer):
    """Mixes within each token: ``forward(x [B, T, D]) -> y [B, T, D]``."""


class Router(nn.Linear, LayerHooks):
    """The linear layer of a discrete choice (a MoE router's per-expert logits).

    AdamW rather than Muon: its rows are per-class logits. Kept in full precision under
    ``model.bitlinear`` (``convert_to_bitlinear`` converts plain ``nn.Linear`` layers only), as
    BitNet-style MoE models do: a ternary router would flip expert choices for a negligible
    saving, and training and the ternary export then agree on its weight."""

    optimizer_hint = "adamw"
