"""``lmlab quantize``: a run folder whose linear layers and embedding hold int8 or int4 weights.

The new run is a copy of the source run's config and tokenizer with one checkpoint: every plain
``nn.Linear`` in the blocks, the output head and the token embedding quantised
(``lmlab.model.quantized``; a tied embedding and head stored once, in int8 unless asked
otherwise), norms, routers and other parameters as trained. Its trainer
state records the method (``quantization``), so ``load_trained_model`` rebuilds the same
layers before loading the weights: ``lmlab eval``, ``lmlab generate``, ``lmlab serve`` and
anything else that loads runs need no change. A quantised run cannot be trained further
(there is no float weight left to update).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lmlab.errors import LmlabError, ParamError
from lmlab.files import atomic_write_json
from lmlab.layers.quantized import GROUP_SIZES
from lmlab.model.quantized import quantize_model
from lmlab.train.checkpoint import MODEL_FILE, save_checkpoint
from lmlab.train.run import CONFIG_FILE, TOKENIZER_DIR, load_run_checkpoint

METHODS = {"int8": 8, "int4": 4}
EMBEDDINGS = {"int8": 8, "int4": 4, "float": None}
"""How the embedding and head can be stored. int8 is the default for both methods: with int4
blocks of 64 it left gpt-tiny's file 6.96x smaller (7.01x with an int4 table) at half the
loss in bits per byte, +0.36% against +0.68% (docs/serving.md)."""
QUANTIZATION_FILE = "quantization.json"
"""What ``lmlab quantize`` did (method, sizes, source run), for people; loading reads the
checkpoint's trainer state."""


def quantize_run(
    run: str | Path,
    out: str | Path,
    method: str,
    group_size: int = 64,
    embeddings: str = "int8",
) -> dict:
    """Write ``out``, a new run folder holding ``run``'s newest checkpoint quantised with
    ``method`` (``int8``: per output channel; ``int4``: groups of ``group_size`` inputs, or the
    largest smaller group that divides a layer), the embedding and head as ``embeddings``
    says (``int8``, ``int4`` with int4 blocks only, or ``float``); returns its sizes and what
    it quantised."""
    if method not in METHODS:
        raise ParamError(f"<method>={method!r} must be one of {', '.join(METHODS)}", "method")
    if embeddings not in EMBEDDINGS:
        raise ParamError(
            f"<embeddings>={embeddings!r} must be one of {', '.join(EMBEDDINGS)}", "embeddings"
        )
    bits, embedding_bits = METHODS[method], EMBEDDINGS[embeddings]
    if embedding_bits == 4 and bits != 4:
        raise ParamError(
            f"<embeddings>=int4 needs int4 blocks, not {method}: the embedding and head are "
            "never stored coarser than the blocks",
            "embeddings",
        )
    if bits == 4 and group_size not in GROUP_SIZES:
        raise ParamError(
            f"<group_size>={group_size} must be one of {', '.join(map(str, GROUP_SIZES))}",
            "group_size",
        )
    out = Path(out)
    if out.exists():
        raise ParamError(f"<out> {out} already exists; give a new folder name", "out")
    if not out.parent.is_dir():
        raise ParamError(f"the folder of <out> {out} does not exist; create it first", "out")
    _, model, _, checkpoint = load_run_checkpoint(run)
    if checkpoint.trainer.get("quantization"):
        raise LmlabError(f"{run} is already quantised; quantise the float run it came from")
    group = group_size if bits == 4 else 0
    done = quantize_model(model, bits, group, embedding_bits)
    source = Path(run)
    out.mkdir()
    try:
        shutil.copy2(source / CONFIG_FILE, out / CONFIG_FILE)
        shutil.copytree(source / TOKENIZER_DIR, out / TOKENIZER_DIR)
        quantization = {"bits": bits, "group_size": group, "embedding_bits": embedding_bits}
        trainer = {"origin": checkpoint.trainer.get("origin"), "quantization": quantization}
        folder = save_checkpoint(out, checkpoint.step, model.state_dict(), {}, trainer)
        result = {
            "out": str(out),
            "method": method,
            "group_size": group,
            "step": checkpoint.step,
            "source": str(source),
            "bytes": (folder / MODEL_FILE).stat().st_size,
            "source_bytes": (checkpoint.path / MODEL_FILE).stat().st_size,
            "embeddings": done.embeddings,
            "tied": done.tied,
            "float_layers": done.float_layers,
            "smaller_groups": done.smaller_groups,
        }
        atomic_write_json(out / QUANTIZATION_FILE, result)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return result
