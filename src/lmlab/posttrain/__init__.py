"""Post-training: methods that start from a trained run (``train.init_from``) and train it
further as an ordinary run, each a :class:`lmlab.train.task.Task` registered by
``post.method``. Importing this package registers them."""

from lmlab.posttrain import dpo, grpo, sft  # noqa: F401  (register their post.method)
