"""lmlab's plain transformer as ``LlamaForCausalLM`` and back: which configs map, the
``config.json`` fields, and the tensor names.

An lmlab block is ``x + attention(rmsnorm(x))`` then ``x + swiglu(rmsnorm(x))``, RoPE in the
"rotate halves" convention with ``theta ** (-2i / d)`` frequencies, attention scaled by
``head_dim ** -0.5``, no biases: exactly Llama's computation, so no weight is permuted (HF's
own conversion permutes q/k only for Meta's interleaved checkpoints). Only the fused
projections are split: ``qkv`` into ``q_proj``, ``k_proj``, ``v_proj`` (in that order along the
output dimension) and ``gate_up`` into ``gate_proj`` and ``up_proj``.
"""

from __future__ import annotations

import torch

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError

LLAMA_ARCHITECTURE = "LlamaForCausalLM"


def _layer_shape(layer: ModelConfig) -> tuple:
    """What must be equal in every layer for one Llama config to describe them all."""
    return (
        layer.n_heads,
        layer.resolved_kv_heads,
        layer.resolved_head_dim,
        layer.resolved_mlp_hidden,
        layer.rope_theta,
    )


def llama_mismatches(config: ModelConfig) -> list[str]:
    """Why ``config`` is not a plain Llama model (empty when it is)."""
    found: list[str] = []
    layers = config.layer_configs()
    for index, layer in enumerate(layers):
        options = layer.mixer_options.get("attention", {})
        checks = {
            f"layer {index} mixer {layer.mixer}": layer.mixer != "attention",
            f"layer {index} channel mixer {layer.channel_mixer}": layer.channel_mixer != "swiglu",
            f"layer {index} position {layer.position}": layer.position != "rope",
            f"layer {index} BitLinear": layer.bitlinear,
            f"layer {index} Mixture-of-Depths": layer.mod_capacity > 0,
            f"layer {index} sliding window": bool(options.get("window", 0)),
            f"layer {index} top-k decode": bool(options.get("decode_top_k", 0)),
            f"layer {index} q/k/v convolution": bool(options.get("qkv_conv", 0)),
        }
        found.extend(name for name, differs in checks.items() if differs)
    if len({_layer_shape(layer) for layer in layers}) > 1:
        found.append("layers of different sizes")
    if config.d_model % config.n_heads:
        found.append(f"d_model {config.d_model} not a multiple of n_heads {config.n_heads}")
    return found


def llama_config(config: ModelConfig, max_positions: int) -> dict:
    """The ``config.json`` of the Llama form of ``config`` (which must have no mismatches)."""
    return {
        "architectures": [LLAMA_ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.resolved_mlp_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.resolved_kv_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": "float32",
    }


def _block_names(i: int) -> dict[str, str]:
    """lmlab name -> Llama name of the unsplit tensors of block ``i``."""
    return {
        f"blocks.{i}.mixer_norm.weight": f"model.layers.{i}.input_layernorm.weight",
        f"blocks.{i}.channel_norm.weight": f"model.layers.{i}.post_attention_layernorm.weight",
        f"blocks.{i}.mixer.out.weight": f"model.layers.{i}.self_attn.o_proj.weight",
        f"blocks.{i}.channel.out.weight": f"model.layers.{i}.mlp.down_proj.weight",
    }


def _split_sizes(config: ModelConfig) -> tuple[list[int], list[int]]:
    q = config.n_heads * config.resolved_head_dim
    kv = config.resolved_kv_heads * config.resolved_head_dim
    hidden = config.resolved_mlp_hidden
    return [q, kv, kv], [hidden, hidden]


def to_llama_tensors(state: dict[str, torch.Tensor], config: ModelConfig) -> dict:
    """lmlab's state dict renamed (and fused projections split) for ``LlamaForCausalLM``."""
    qkv_sizes, mlp_sizes = _split_sizes(config)
    out = {
        "model.embed_tokens.weight": state["embed.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    for i in range(config.n_layers):
        out.update({llama: state[ours] for ours, llama in _block_names(i).items()})
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        q, k, v = state[f"blocks.{i}.mixer.qkv.weight"].split(qkv_sizes)
        gate, up = state[f"blocks.{i}.channel.gate_up.weight"].split(mlp_sizes)
        out.update({f"{attn}.q_proj.weight": q, f"{attn}.k_proj.weight": k})
        out.update({f"{attn}.v_proj.weight": v, f"{mlp}.gate_proj.weight": gate})
        out[f"{mlp}.up_proj.weight"] = up
    return {name: tensor.detach().float().contiguous() for name, tensor in out.items()}


def from_llama_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict:
    """A Llama checkpoint's tensors as lmlab's state dict (the inverse of
    :func:`to_llama_tensors`); KeyError names a missing tensor."""
    state = {"embed.weight": tensors["model.embed_tokens.weight"]}
    state["norm.weight"] = tensors["model.norm.weight"]
    head = "model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"
    state["head.weight"] = tensors[head]
    for i in range(config.n_layers):
        state.update({ours: tensors[llama] for ours, llama in _block_names(i).items()})
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        state[f"blocks.{i}.mixer.qkv.weight"] = torch.cat(
            [tensors[f"{attn}.{name}_proj.weight"] for name in ("q", "k", "v")]
        )
        state[f"blocks.{i}.channel.gate_up.weight"] = torch.cat(
            [tensors[f"{mlp}.{name}_proj.weight"] for name in ("gate", "up")]
        )
    return state


UNSUPPORTED_LLAMA_FEATURES = {
    "attention_bias": "attention biases",
    "mlp_bias": "MLP biases",
    "sliding_window": "a sliding window",
    "use_sliding_window": "a sliding window",
    "layer_types": "per-layer attention types",
    "qk_norm": "query/key norms",
}
"""``config.json`` keys that, when set (true, non-empty, not null), describe a model lmlab does
not build; the value words them in the error."""


def model_config_from_llama(hf: dict) -> ModelConfig:
    """lmlab's ``ModelConfig`` of a Llama-family ``config.json``; one error naming every
    feature lmlab lacks."""
    problems = []
    model_type = hf.get("model_type")
    if model_type not in ("llama", "mistral"):
        problems.append(f"model_type {model_type!r} (lmlab imports llama and mistral models)")
    for key, words in UNSUPPORTED_LLAMA_FEATURES.items():
        value = hf.get(key)
        if value and not (key == "layer_types" and set(value) == {"full_attention"}):
            problems.append(f"{words} ({key}={value})")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {hf['hidden_act']} (lmlab's SwiGLU uses silu)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope scaling {rope_type!r} (lmlab has plain RoPE)")
    if hf.get("pretraining_tp", 1) not in (1, None):
        problems.append(f"pretraining_tp={hf['pretraining_tp']}")
    if problems:
        raise LmlabError("cannot import this model, lmlab lacks: " + "; ".join(problems))
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim if head_dim != hf["hidden_size"] // heads else 0,
        mlp_hidden=hf["intermediate_size"],
        rope_theta=float(theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
