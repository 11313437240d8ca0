"""Start a post-training run: the parent's tokenizer (with a chat template's special tokens
when the examples hold chats), then an ordinary run folder trained by the Trainer."""

from __future__ import annotations

from lmlab.config.schema import Config
from lmlab.data.chat import ChatTemplate
from lmlab.data.examples import FORMATS, read_examples
from lmlab.posttrain.datasets import resolve_data
from lmlab.posttrain.sft import needs_template
from lmlab.train.launch import new_trainer
from lmlab.train.run import TOKENIZER_DIR, open_run, run_tokenizer, split_init_spec
from lmlab.train.trainer import Trainer

METHOD_DATA = {"sft": "sft", "dpo": "preference", "grpo": "rl"}
"""The format of a shipped data set each method reads (see lmlab.posttrain.datasets)."""


def start_run(config: Config, label: str, show_progress: bool = True) -> Trainer:
    """A trainer for a new run of ``config``: pretraining (``post.method=none``) or a
    post-training method on ``post.data``."""
    if config.post.method == "none":
        return new_trainer(config, label, show_progress)
    parent_dir, parent = open_run(split_init_spec(config.train.init_from)[0])
    tokenizer = run_tokenizer(parent_dir, parent)
    template = ChatTemplate.load(parent_dir / TOKENIZER_DIR)
    data = resolve_data(config.post.data, METHOD_DATA[config.post.method])
    examples = read_examples(data, FORMATS)
    if needs_template(examples):
        template = template or ChatTemplate()
        tokenizer = tokenizer.with_special_tokens(template.special_tokens)
    return new_trainer(
        config,
        label,
        show_progress,
        tokenizer=tokenizer,
        save_extra=template.save if template is not None else None,
    )
