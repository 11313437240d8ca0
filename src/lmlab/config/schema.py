"""Typed configuration: one dataclass per part of a run, nested in :class:`Config`.

Every field has a default so a preset only states what differs. Validation lives in
``validate()`` methods so a bad value is reported before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from lmlab.errors import LmlabError

DEFAULT_LETTERS = {
    "A": "attention",
    "M": "mamba2",
    "G": "gla",
    "D": "deltanet",
    "N": "gated_deltanet",
    "K": "kda",
    "R": "retnet",
    "W": "rwkv7",
    "H": "hyena",
    "B": "bdh",
    "L": "mla",
    "X": "diff_attention",
    "O": "moh",
}


PER_LAYER_FIELDS = (
    "mixer",
    "channel_mixer",
    "mlp_hidden",
    "mixer_options",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "position",
    "rope_theta",
    "bitlinear",
    "mod_capacity",
    "mod_aux_loss_coef",
)
"""ModelConfig fields that ``model.layer_overrides`` may change for single layers (those that
exist: ``bitlinear`` is listed by name for the quantisation work)."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise LmlabError(message)


INT_MAX = 2**31 - 1
"""Default upper bound of integer settings: torch takes thread counts as C ints, and no size,
count or seed past it fits in memory or in a run."""


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric setting: ``low`` to ``high``, inclusive unless marked
    open (integers also stop at :data:`INT_MAX`); ``note`` says what an edge value means or what
    to set."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def requirement(self) -> str:
        """The rule in words: ``must be positive``, ``must be in [0, 1)``, ..."""
        if self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"must be in {left}{_show(self.low)}, {_show(self.high)}{right}"
        if self.low == 0:
            return "must be positive" if self.low_open else "must not be negative"
        return f"must be {'>' if self.low_open else '>='} {_show(self.low)}"

    def check(self, key: str, value: float) -> None:
        """Raise a one-line error naming ``key`` unless ``value`` is finite and in range."""
        note = f"; {self.note}" if self.note else ""
        if isinstance(value, float) and not math.isfinite(value):
            raise LmlabError(f"{key}={value} must be a finite number{note}")
        below = value <= self.low if self.low_open else value < self.low
        above = self.high is not None and (
            value >= self.high if self.high_open else value > self.high
        )
        if below or above:
            raise LmlabError(f"{key}={value} {self.requirement()}{note}")
        if self.high is None and isinstance(value, int) and value > INT_MAX:
            raise LmlabError(f"{key}={value} must be at most {INT_MAX}")


@dataclass(frozen=True)
class Choice:
    """The allowed values of a setting that names one of a few options."""

    options: tuple[str, ...]

    def check(self, key: str, value: str) -> None:
        if value not in self.options:
            listed = ", ".join(self.options[:-1]) + f" or {self.options[-1]}"
            raise LmlabError(f"{key}={value!r} is unknown; use {listed}")


RULES: dict[str, Range | Choice] = {
    "model.vocab_size": Range(0, note="0 takes the tokenizer's vocabulary size"),
    "model.d_model": Range(1),
    "model.n_layers": Range(1),
    "model.n_heads": Range(1),
    "model.n_kv_heads": Range(0, note="0 means model.n_heads"),
    "model.head_dim": Range(0, note="0 means model.d_model // model.n_heads"),
    "model.mlp_hidden": Range(0, note="0 means 8/3 * model.d_model"),
    "model.position": Choice(("rope", "alibi", "cope", "none")),
    "model.rope_theta": Range(0, low_open=True, note="RoPE's base, e.g. 10000"),
    "model.norm_eps": Range(0, low_open=True, note="e.g. 1e-5"),
    "model.init_std": Range(0, low_open=True, note="e.g. 0.02"),
    "model.mod_capacity": Range(0, 1, note="0 disables Mixture-of-Depths"),
    "model.mod_every": Range(1),
    "model.mod_aux_loss_coef": Range(0),
    "data.edition": Choice(("modern", "folio")),
    "data.tokenizer": Choice(("byte", "char", "bpe")),
    "data.vocab_size": Range(1),
    "data.val_fraction": Range(0, 1, low_open=True, high_open=True),
    "data.split": Choice(("auto", "by_document", "tail")),
    "data.seq_len": Range(1),
    "data.seed": Range(0),
    "train.batch_size": Range(1),
    "train.grad_accum": Range(1),
    "train.optimizer": Choice(("adamw", "muon")),
    "train.lr": Range(0, low_open=True, note="e.g. train.lr=3e-3"),
    "train.muon_lr": Range(0, low_open=True, note="e.g. train.muon_lr=0.02"),
    "train.weight_decay": Range(0),
    "train.beta1": Range(0, 1, high_open=True, note="e.g. 0.9"),
    "train.beta2": Range(0, 1, high_open=True, note="e.g. 0.95"),
    "train.schedule": Choice(("cosine", "wsd", "constant")),
    "train.warmup_steps": Range(0),
    "train.decay_fraction": Range(0, 1),
    "train.min_lr_ratio": Range(0, 1, note="the final lr as a fraction of the peak"),
    "train.grad_clip": Range(0, note="0 disables clipping"),
    "train.max_steps": Range(0),
    "train.max_tokens": Range(0, 10**15, note="0 disables the token budget"),
    "train.max_time": Range(0, note="seconds; 0 disables the time budget"),
    "train.precision": Choice(("auto", "bf16", "fp32")),
    "train.seed": Range(0),
    "train.eval_interval": Range(1),
    "train.eval_batches": Range(1),
    "train.checkpoint_interval": Range(1),
    "train.keep_checkpoints": Range(1),
    "train.threads": Range(0, note="0 leaves torch's default"),
    "train.seq_len_start": Range(0, note="0 disables the curriculum"),
    "train.curriculum_steps": Range(0),
    "parent.step": Range(0),
    "post.method": Choice(("none", "sft", "dpo", "grpo")),
    "post.grpo_group": Range(2, note="completions per prompt; advantages need 2 or more"),
    "post.grpo_clip": Range(0, low_open=True),
    "post.grpo_kl": Range(0, note="0: no KL to the reference (none is loaded)"),
    "post.rollout_temperature": Range(0, low_open=True),
    "post.dpo_beta": Range(0, low_open=True, note="DPO's beta: how far from the reference"),
    "post.dpo_loss": Choice(("sigmoid", "ipo")),
    "post.distill_alpha": Range(0, 1, note="0: the usual loss alone, 1: distillation alone"),
    "post.distill_temperature": Range(0, low_open=True),
    "post.val_fraction": Range(0, 1, high_open=True, note="0: no held-out split"),
    "post.overlong": Choice(("truncate", "drop", "refuse")),
    "post.eval_examples": Range(0, note="held-out prompts answered per evaluation"),
    "post.max_new_tokens": Range(1),
    "post.lora_rank": Range(1),
    "post.lora_alpha": Range(0, low_open=True),
    "post.lora_dropout": Range(0, 1, high_open=True),
    "post.quantize_base": Choice(("none", "int8")),
    "train.parallel": Choice(("none", "ddp", "fsdp")),
    "train.comm_timeout": Range(
        0, low_open=True, note="seconds a collective may wait for the other processes"
    ),
}
"""One rule per setting, keyed ``section.field``. Every int and float field must have one
(:func:`check_rules` fails on a numeric field without), so a new setting is range-checked too."""


def check_rules(
    section: ModelConfig | DataConfig | TrainConfig | PostConfig | ParentRun, prefix: str
) -> None:
    """Check each field of a config section against :data:`RULES`."""
    for item in dataclasses.fields(section):
        key, value = f"{prefix}.{item.name}", getattr(section, item.name)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        rule = RULES[key] if numeric else RULES.get(key)
        if rule is not None:
            rule.check(key, value)


def coerce_value(value: Any, kind: Any, key: str) -> Any:
    """Check a YAML value against a field's type, converting the harmless cases (int -> float);
    a union type (``str | list[str]``) takes the first member that fits."""
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        for member in typing.get_args(kind):
            try:
                return coerce_value(value, member, key)
            except LmlabError:
                continue
        raise LmlabError(f"{key}={value!r} must be of type {kind}")
    origin = typing.get_origin(kind)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    expected = origin or kind
    if expected in (int, float) and isinstance(value, bool):
        expected = None
    if expected is None or not isinstance(value, expected):
        name = getattr(kind, "__name__", str(kind))
        raise LmlabError(f"{key}={value!r} must be of type {name}")
    return value


def _layer_indices(key: object, n_layers: int) -> list[int]:
    """Layer indices named by a ``layer_overrides`` key: an int, or a string such as ``"3"`` or
    ``"0,5"``; negative indices count from the last layer."""
    parts = [key] if isinstance(key, int) and not isinstance(key, bool) else str(key).split(",")
    indices = []
    for part in parts:
        try:
            index = int(part)
        except ValueError:
            raise LmlabError(
                f"model.layer_overrides key {key!r} is not a layer index; use an int or a comma "
                "list such as '0,5'"
            ) from None
        _require(
            -n_layers <= index < n_layers,
            f"model.layer_overrides index {index} is out of range for model.n_layers={n_layers}; "
            f"use 0..{n_layers - 1} (or -{n_layers}..-1 from the end)",
        )
        indices.append(index % n_layers)
    return indices


@dataclass
class ModelConfig:
    """The architecture: a stack of pre-norm blocks, each a token mixer plus a channel mixer."""

    vocab_size: int = 0
    """0 takes the tokenizer's vocabulary size."""
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0
    """Key/value heads for grouped-query attention; 0 means n_heads (MHA), 1 is MQA."""
    head_dim: int = 0
    """0 means d_model // n_heads."""
    mixer: str = "attention"
    """Token mixer of every layer, unless ``pattern`` is set."""
    pattern: str | list[str] = ""
    """One letter per layer (e.g. ``MMMMMA``), each mapped to a mixer by ``letters``; or a list
    of mixer names, one per layer (e.g. ``[mamba2, mamba2, attention]``)."""
    letters: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_LETTERS))
    mixer_options: dict[str, dict] = field(default_factory=dict)
    """Per-mixer settings keyed by mixer name, e.g. ``{gla: {expand_k: 0.5}}``."""
    channel_mixer: str = "swiglu"
    """``swiglu``, ``moe`` (options under ``mixer_options.moe``) or ``none`` (BDH: the token
    mixer holds the MLP)."""
    mlp_hidden: int = 0
    """Hidden width of the channel mixer; 0 means 8/3 * d_model rounded up to a multiple of 64."""
    position: str = "rope"
    """Position encoding used by attention layers: ``rope``, ``alibi``, ``cope`` or ``none``."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    bitlinear: bool = False
    """Ternary BitLinear (BitNet b1.58) for every linear layer inside the blocks; the embedding
    and head stay full precision. See docs/bitlinear.md."""
    layer_overrides: dict[str, dict] = field(default_factory=dict)
    """Per-layer settings keyed by layer index (``3``, ``"0,5"``, ``-1`` for the last layer), each
    a mapping of :data:`PER_LAYER_FIELDS` (e.g. ``{3: {mixer: attention, mlp_hidden: 512}}``).
    ``mixer_options`` merge into the global ones per setting; a ``mixer`` here beats
    ``pattern``; ``mod_capacity`` here beats ``mod_every``."""
    mod_capacity: float = 0.0
    """Mixture-of-Depths: the fraction of each sequence's tokens that a routed block processes
    (the rest skip it through the residual); 0 disables it."""
    mod_every: int = 2
    """Mixture-of-Depths on every ``mod_every``-th layer (layers ``mod_every - 1``,
    ``2 * mod_every - 1``, ...: with 2, every other layer, as in the paper)."""
    mod_aux_loss_coef: float = 0.01
    """Weight of the router's binary cross-entropy toward its own top-k choice, which teaches it
    the causal threshold (logit > 0) used in eval mode and generation."""

    def layer_mixers(self) -> list[str]:
        """The token-mixer name of each layer, from ``mixer``, ``pattern`` and the overrides."""
        return [layer.mixer for layer in self.layer_configs()]

    def _pattern_mixers(self) -> list[str]:
        if not self.pattern:
            return [self.mixer] * self.n_layers
        if isinstance(self.pattern, list):
            return [str(name) for name in self.pattern]
        unknown = sorted(set(self.pattern) - set(self.letters))
        _require(
            not unknown,
            f"model.pattern uses letter(s) {', '.join(unknown)} that model.letters does not map; "
            f"known letters: {', '.join(sorted(self.letters))}",
        )
        return [self.letters[c] for c in self.pattern]

    def _overrides_per_layer(self) -> list[dict[str, Any]]:
        """The checked override fields of each layer (later keys win per field; mixer options
        merge per setting)."""
        hints = typing.get_type_hints(ModelConfig)
        known = {f.name for f in dataclasses.fields(self)}
        allowed = [name for name in PER_LAYER_FIELDS if name in known]
        layers: list[dict[str, Any]] = [{} for _ in range(self.n_layers)]
        for key, fields in self.layer_overrides.items():
            _require(
                isinstance(fields, dict),
                f"model.layer_overrides.{key} must map settings to values, e.g. "
                f"{{mixer: attention}}, not {fields!r}",
            )
            for index in _layer_indices(key, self.n_layers):
                for name, value in fields.items():
                    where = f"model.layer_overrides.{key}.{name}"
                    if name not in allowed:
                        close = difflib.get_close_matches(str(name), allowed, n=1)
                        hint = f"did you mean {close[0]}? " if close else ""
                        what = "cannot differ per layer" if name in known else "is unknown"
                        raise LmlabError(
                            f"{where} {what}; {hint}per-layer settings: {', '.join(allowed)}"
                        )
                    value = coerce_value(value, hints[name], where)
                    if name == "mixer_options":
                        merged = layers[index].setdefault(name, {})
                        for mixer, settings in value.items():
                            _require(
                                isinstance(settings, dict),
                                f"{where}.{mixer} must map settings to values, not {settings!r}",
                            )
                            merged[mixer] = {**merged.get(mixer, {}), **settings}
                    else:
                        layers[index][name] = value
        return layers

    def layer_configs(self) -> list[ModelConfig]:
        """One resolved config per layer: ``mixer`` is that layer's token mixer, ``mod_capacity``
        its Mixture-of-Depths capacity (0: a plain block), overrides applied."""
        configs = []
        for index, (mixer, fields) in enumerate(
            zip(self._pattern_mixers(), self._overrides_per_layer(), strict=True)
        ):
            routed = (index + 1) % self.mod_every == 0 if self.mod_every > 0 else False
            settings: dict[str, Any] = {
                "mixer": mixer,
                "mod_capacity": self.mod_capacity if routed else 0.0,
                **fields,
                "pattern": "",
                "layer_overrides": {},
            }
            options = fields.get("mixer_options", {})
            settings["mixer_options"] = {
                name: {**self.mixer_options.get(name, {}), **options.get(name, {})}
                for name in {**self.mixer_options, **options}
            }
            layer = dataclasses.replace(self, **settings)
            try:
                layer._validate_layer()
            except LmlabError as exc:
                if not fields:
                    raise
                raise LmlabError(f"layer {index} (model.layer_overrides): {exc}") from None
            configs.append(layer)
        return configs

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def resolved_mlp_hidden(self) -> int:
        return self.mlp_hidden or -(-int(8 * self.d_model / 3) // 64) * 64

    def _validate_layer(self) -> None:
        """The checks of settings that a layer override may change."""
        check_rules(self, "model")
        _require(
            self.head_dim > 0 or self.d_model % self.n_heads == 0,
            f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
            "change one of them or set model.head_dim",
        )
        _require(
            self.n_heads % self.resolved_kv_heads == 0,
            f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads="
            f"{self.resolved_kv_heads}",
        )

    def validate(self) -> None:
        self._validate_layer()
        _require(
            not self.pattern or len(self.pattern) == self.n_layers,
            f"model.pattern has {len(self.pattern)} "
            f"{'names' if isinstance(self.pattern, list) else 'letters'} but model.n_layers="
            f"{self.n_layers}; give one per layer",
        )
        _require(
            not self.mod_capacity or self.mod_every <= self.n_layers,
            f"model.mod_capacity is set but model.mod_every={self.mod_every} selects none of the "
            f"{self.n_layers} layers; lower model.mod_every",
        )
        for letter, name in self.letters.items():
            _require(
                isinstance(letter, str) and len(letter) == 1 and isinstance(name, str),
                f"model.letters maps single letters to mixer names, e.g. {{A: attention}}; "
                f"not {letter!r}: {name!r}",
            )
        for name, settings in self.mixer_options.items():
            _require(
                isinstance(settings, dict),
                f"model.mixer_options.{name} must map settings to values, e.g. "
                f"{{expand_k: 0.5}}, not {settings!r}",
            )
        self.layer_configs()


@dataclass
class DataConfig:
    """Where text comes from, how it is tokenised and split."""

    path: str = ""
    """Empty: the embedded Shakespeare corpus. Else a text, JSONL or Parquet file, a CSV/TSV/
    JSON/Arrow file (read by ``datasets.load_dataset``), a folder of such files, a ``datasets``
    folder written by ``save_to_disk``, or a token-shard folder (``lmlab prepare``)."""
    text_field: str = "text"
    """The field (JSONL) or column (Parquet, data sets, CSV) that holds each document's text."""
    edition: str = "modern"
    """Embedded corpus edition: ``modern`` (Gutenberg modern spelling) or ``folio``."""
    tokenizer: str = "char"
    """``byte``, ``char`` or ``bpe``."""
    vocab_size: int = 1000
    """Vocabulary size of a trained BPE tokenizer."""
    val_fraction: float = 0.1
    split: str = "auto"
    """``by_document`` (no work on both sides), ``tail`` (last fraction of the text, as nanoGPT),
    or ``auto`` (by document when there are several, else tail)."""
    seq_len: int = 256
    seed: int = 0
    """Seed of the document split."""

    def validate(self) -> None:
        check_rules(self, "data")
        _require(
            bool(self.text_field.strip()),
            "data.text_field is empty; name the field holding the text, e.g. data.text_field=text",
        )
        _require(
            self.tokenizer != "bpe" or self.vocab_size >= 260,
            "data.vocab_size must be at least 260 for a BPE tokenizer (256 bytes + specials)",
        )


@dataclass
class TrainConfig:
    """The optimisation recipe and its budget."""

    batch_size: int = 32
    """Rows per micro-batch of the whole job: with N processes each reads batch_size / N of
    them, so one optimiser step sees ``batch_size x grad_accum`` rows whatever N is."""
    grad_accum: int = 1
    optimizer: str = "adamw"
    """``adamw``, or ``muon`` (Muon for 2-D hidden weights, AdamW for the rest)."""
    lr: float = 3e-3
    """AdamW learning rate (for every parameter with adamw; embeddings/head/norms with muon)."""
    muon_lr: float = 0.02
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    schedule: str = "cosine"
    """``cosine`` (warmup + cosine), ``wsd`` (warmup-stable-decay) or ``constant``."""
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    """Fraction of the budget spent in the final linear decay of ``wsd``."""
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    max_steps: int = 1000
    """The budget in optimiser steps, unless max_tokens or max_time is set."""
    max_tokens: int = 0
    """If set, the budget in tokens (wins over max_steps)."""
    max_time: float = 0.0
    """If set, the budget in seconds of training wall time (wins over max_tokens and max_steps;
    refused with ``deterministic``). A budget given as a command-line override replaces the
    budgets of the preset, file or saved run: see :func:`lmlab.config.load.build_config`."""
    precision: str = "auto"
    """``auto`` (bf16 autocast where bf16 matmuls are fast: CUDA, CPUs with AMX/AVX512-BF16),
    ``bf16`` or ``fp32``."""
    compile: bool = False
    """Train through ``torch.compile(model)`` (needs a C++ compiler on CPU): the first steps pay
    the compilation; the losses match eager training to rounding."""
    activation_checkpointing: bool = False
    """Recompute each block's activations during backward instead of storing them: less peak
    memory for about one extra forward per step (``benchmarks/bench_checkpointing.py``)."""
    device: str = "auto"
    seed: int = 0
    eval_interval: int = 200
    eval_batches: int = 20
    checkpoint_interval: int = 500
    keep_checkpoints: int = 3
    deterministic: bool = False
    tensorboard: bool = False
    threads: int = 0
    """CPU threads for torch; 0 leaves torch's default."""
    tbptt: bool = False
    """Truncated BPTT: each batch row reads its own contiguous stream and recurrent states are
    carried (detached) from one segment to the next."""
    seq_len_start: int = 0
    """Sequence-length curriculum: start at this length (0 disables the curriculum) ..."""
    curriculum_steps: int = 0
    """... and grow linearly to data.seq_len over this many steps."""
    init_from: str = ""
    """Start from the weights (only the weights) of another run's checkpoint: ``RUN`` (its
    newest valid checkpoint) or ``RUN@STEP``. The optimiser, schedule and data are this run's;
    the model must have the same parameters. The checkpoint used is recorded in ``parent``."""
    parallel: str = "none"
    """Under torchrun (or ``lmlab train --nproc N``): ``ddp`` (a replica per process) or
    ``fsdp`` (FSDP2: parameters, gradients and optimiser state sharded); ``none`` refuses to
    run in several processes. One process ignores it."""
    comm_timeout: float = 600.0
    """Seconds a collective waits for the other processes before the job fails (a rank that
    died or hangs ends the job instead of blocking it forever)."""

    def validate(self) -> None:
        check_rules(self, "train")
        _require(
            self.max_steps > 0 or self.max_tokens > 0 or self.max_time > 0,
            "no training budget: set train.max_steps, train.max_tokens or train.max_time",
        )
        _require(
            not (self.deterministic and self.max_time),
            f"train.deterministic=true cannot use a time budget (train.max_time={self.max_time}):"
            " the number of steps would depend on the machine's speed; give train.max_steps or"
            " train.max_tokens instead (as an override it replaces the time budget)",
        )
        _require(
            not self.seq_len_start or self.curriculum_steps > 0,
            "train.seq_len_start needs train.curriculum_steps > 0 (steps to reach data.seq_len)",
        )


@dataclass
class PostConfig:
    """Post-training: what a run started from another (``train.init_from``) optimises, on which
    examples, and whether through LoRA adapters. See docs/post-training.md."""

    method: str = "none"
    """``none`` (pretraining on ``data``), ``sft`` (supervised fine-tuning on ``post.data``),
    ``dpo`` (preference optimisation on ``post.data``'s pairs against the init run) or ``grpo``
    (RL on ``post.data``'s prompts, rewarded by their verifiers)."""
    data: str = ""
    """A JSONL file of examples, or a data set shipped with lmlab (``lmlab datasets``)."""
    val_data: str = ""
    """Held-out examples; empty: a shipped set's test split, else ``val_fraction`` of ``data``."""
    val_fraction: float = 0.1
    overlong: str = "truncate"
    """An example longer than data.seq_len + 1 tokens: ``truncate`` its prompt on the left
    (dropped if its completion alone is too long), ``drop`` it, or ``refuse`` (an error)."""
    eval_examples: int = 100
    """Held-out prompts answered greedily at each evaluation for exact-match accuracy (those
    with an ``answer``/``completion`` and a verifier); 0 skips it."""
    max_new_tokens: int = 16
    """Tokens generated per held-out prompt for the accuracy."""
    lora: bool = False
    """Train LoRA adapters (PEFT) on the frozen model instead of every weight."""
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ""
    """Comma-separated suffixes of the ``nn.Linear`` modules that get adapters (e.g.
    ``qkv,out``); empty: every linear layer inside the blocks."""
    dpo_beta: float = 0.1
    """DPO's beta: the scale of the implicit reward ``beta * (log pi - log ref)``."""
    dpo_loss: str = "sigmoid"
    """``sigmoid`` (DPO's ``-log sigmoid(beta h)``) or ``ipo`` (``(h - 1/(2 beta))^2``)."""
    grpo_group: int = 8
    """GRPO: completions sampled per prompt (the group its advantages are relative to)."""
    grpo_clip: float = 0.2
    """GRPO: the ratio's clip range ``1 +- grpo_clip``."""
    grpo_kl: float = 0.0
    """GRPO: weight of the k3 KL to the init run (0: none)."""
    rollout_temperature: float = 1.0
    """GRPO: sampling temperature of the rollouts."""
    teacher: str = ""
    """A run to distil from (same tokenizer): its frozen logits teach the student (SFT)."""
    distill_alpha: float = 0.5
    """The distillation share: ``(1 - alpha) * usual loss + alpha * T^2 * KL(teacher||student)``."""
    distill_temperature: float = 2.0
    """T: both distributions are softmax(logits / T) in the KL."""
    quantize_base: str = "none"
    """``int8``: the frozen base weights of a LoRA run are stored as int8 (weight-only, one
    scale per output row): QLoRA's idea on CPU."""

    def validate(self) -> None:
        check_rules(self, "post")
        _require(
            self.method == "none" or bool(self.data),
            f"post.method={self.method} needs examples: set post.data=FILE.jsonl or a shipped set",
        )
        _require(
            not self.teacher or self.method == "sft",
            f"post.teacher distils into SFT; post.method={self.method} does not take a teacher",
        )
        _require(
            self.quantize_base == "none" or self.lora,
            "post.quantize_base needs post.lora=true (only frozen weights can be quantised)",
        )


@dataclass
class ParentRun:
    """The run whose weights a run started from (``train.init_from``), filled in when the run
    starts so its lineage can be followed back: set by lmlab, not by hand."""

    run: str = ""
    """The parent's run folder (absolute); empty for a run trained from scratch."""
    step: int = 0
    """The parent's checkpoint step whose weights were loaded."""
    config_hash: str = ""
    """The parent's config hash (as in the run registry)."""

    def validate(self) -> None:
        check_rules(self, "parent")


@dataclass
class Config:
    """Everything a run needs; saved as ``config.yaml`` in every run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    post: PostConfig = field(default_factory=PostConfig)
    parent: ParentRun = field(default_factory=ParentRun)
    name: str = ""
    """Run name; empty makes one from the preset and the time."""
    out_dir: str = "runs"

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.post.validate()
        self.parent.validate()
        _require(
            self.post.method == "none" or bool(self.train.init_from),
            f"post.method={self.post.method} fine-tunes a trained run: give train.init_from=RUN",
        )
        _require(
            self.post.method == "none" or not self.train.max_tokens,
            f"post.method={self.post.method} trains on whole examples, not data.seq_len windows, "
            "so a token budget would not mean what it says; give train.max_steps (or max_time)",
        )
        _require(
            self.train.seq_len_start <= self.data.seq_len,
            f"train.seq_len_start={self.train.seq_len_start} exceeds data.seq_len="
            f"{self.data.seq_len}; the curriculum grows up to data.seq_len",
        )
