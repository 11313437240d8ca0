"""Any lmlab model as a ``transformers`` model (``model_type: lmlab``), with a generation cache.

``LmlabForCausalLM`` wraps :class:`lmlab.model.lm.LanguageModel` unchanged, so every mixer,
MoE and hybrid pattern works; its config carries lmlab's model config. ``generate()`` gets an
:class:`LmlabCache` holding lmlab's own per-layer state (attention key/value caches, recurrent
matrix states, convolution tails): transformers' ``DynamicCache`` stores keys and values per
layer and cannot hold a recurrent state, so the model declines it (as Mamba and RWKV do) and
returns its own cache from each forward.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from lmlab.config.load import build_config
from lmlab.config.schema import ModelConfig
from lmlab.model.cache import ModelState
from lmlab.model.lm import LanguageModel

MODEL_TYPE = "lmlab"
ARCHITECTURE = "LmlabForCausalLM"


class LmlabConfig(PreTrainedConfig):
    """A ``transformers`` config whose ``lmlab`` field is lmlab's whole ``model`` section."""

    model_type = MODEL_TYPE
    lmlab: dict | None = None
    vocab_size: int = 0
    tie_word_embeddings: bool = True
    use_cache: bool = True

    def model_config(self) -> ModelConfig:
        """lmlab's validated model config (defaults filled in for fields a newer lmlab added);
        ``vocab_size`` is this config's, which transformers keeps up to date."""
        section = dict(self.lmlab or {})
        if self.vocab_size:
            section["vocab_size"] = self.vocab_size
        return build_config(base={"model": section}).model


class LmlabCache:
    """What ``generate()`` carries between steps: lmlab's :class:`ModelState`. Not croppable,
    so assisted decoding that rolls tokens back is not supported."""

    is_croppable = False

    def __init__(self, state: ModelState) -> None:
        self.state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens consumed so far (every layer has seen the same tokens)."""
        return self.state.position


class LmlabForCausalLM(PreTrainedModel, GenerationMixin):
    """An lmlab :class:`LanguageModel` behind the ``transformers`` causal-LM interface."""

    config: LmlabConfig
    config_class = LmlabConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys: ClassVar[dict[str, str]] = {"model.head.weight": "model.embed.weight"}

    def __init__(self, config: LmlabConfig) -> None:
        super().__init__(config)
        self.model = LanguageModel(config.model_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """No ``DynamicCache``: the forward returns an :class:`LmlabCache` instead."""
        return False

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    def _init_weights(self, module: torch.nn.Module) -> None:
        """lmlab's own initialisation runs in ``LanguageModel``; loading overwrites it."""

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: LmlabCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: object,
    ) -> CausalLMOutputWithPast:
        """Logits of ``input_ids`` after the cached tokens; with ``labels``, the mean
        next-token cross-entropy (labels -100 ignored), as every ``transformers`` causal LM."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "lmlab models take no padding (their recurrent states would read the pad "
                "tokens): pass sequences of one length, or one prompt at a time"
            )
        logits, state = self.model(input_ids, cache.state if cache is not None else None)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        keep = use_cache if use_cache is not None else self.config.use_cache
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=LmlabCache(state) if keep else None
        )


def register() -> None:
    """Make ``AutoConfig`` and ``AutoModelForCausalLM`` know ``model_type: lmlab``."""
    AutoConfig.register(MODEL_TYPE, LmlabConfig, exist_ok=True)
    AutoModelForCausalLM.register(LmlabConfig, LmlabForCausalLM, exist_ok=True)
