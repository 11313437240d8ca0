"""Settings shared by the tests that train many tiny runs (scale, search)."""

TINY_RUN = [
    "model.n_layers=1",
    "model.n_heads=2",
    "data.seq_len=32",
    "train.batch_size=8",
    "train.eval_batches=2",
    "train.warmup_steps=2",
    "train.optimizer=adamw",
    "train.precision=fp32",
    "train.threads=1",
]
