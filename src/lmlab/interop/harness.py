"""lmlab runs as an lm-evaluation-harness model (``--model lmlab --model_args run=RUN``).

``loglikelihood`` and ``loglikelihood_rolling`` score many requests per forward: requests are
sorted by length and right-padded into batches, which is exact for lmlab's causal models (a
token never sees the padding after it; recurrent states only run forward). ``generate_until``
decodes with lmlab's state cache (one prefill, then one token per step), batching prompts of
equal length since lmlab models take no padding on the left.

lmlab's tokenizers have no begin/end-of-text token: where the harness needs one (the first
token of a rolling window, an empty context), the model is given the id of ``"\\n"``, the
separator lmlab's corpora put between documents. Contexts are cut on the left to the run's
``data.seq_len``, the length it was trained at.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lmlab.errors import ParamError
from lmlab.model.generate import SamplingSettings, stream_tokens
from lmlab.train.device import pick_device
from lmlab.train.run import load_trained_model

DOCUMENT_SEPARATOR = "\n"


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@register_model("lmlab")
class LmlabLM(LM):
    """The newest valid checkpoint of an lmlab run behind the harness's ``LM`` interface."""

    def __init__(
        self,
        run: str,
        batch_size: int | str = 16,
        device: str = "auto",
        max_length: int | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        """``max_batch_size`` is accepted because the harness passes it to every model; the
        batch size is fixed (no automatic search)."""
        super().__init__()
        self.run = str(run)
        self._device = pick_device(str(device))
        self.config, self.model, self.tokenizer, self.step = load_trained_model(run, self._device)
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:
            raise ParamError(f"<batch_size>={batch_size} must be at least 1", "batch_size")
        self.max_length = int(max_length or self.config.data.seq_len)
        separator = self.tokenizer.encode(DOCUMENT_SEPARATOR)
        self.prefix_token = separator[0] if separator else 0

    @property
    def tokenizer_name(self) -> str:
        return f"lmlab-{self.tokenizer.kind}-{self.tokenizer.vocab_size}"

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Ids of context and continuation as the whole text tokenises (a BPE merge may cross
        the boundary); trailing spaces of the context go to the continuation, as the
        harness's own models do."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix_token], self.tokenizer.encode(continuation)
        whole = self.tokenizer.encode(context + continuation)
        head = len(self.tokenizer.encode(context))
        return whole[:head], whole[head:]

    def _windows(self, context: list[int], continuation: list[int]) -> list[tuple[list, list]]:
        """(inputs, targets) pairs covering every continuation token: at most ``max_length``
        inputs each, as much preceding text as fits, the targets predicted at their end."""
        full = context + continuation
        windows = []
        start = len(context)
        while start < len(full):
            end = min(len(full), start + self.max_length)
            windows.append((full[max(0, end - 1 - self.max_length) : end - 1], full[start:end]))
            start = end
        return windows

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its (non-empty) context, and whether
        greedy decoding would produce it; windows of similar length share a forward."""
        windows = [
            (owner, inputs, targets)
            for owner, pair in enumerate(pairs)
            for inputs, targets in self._windows(*pair)
        ]
        windows.sort(key=lambda window: -len(window[1]))
        totals, greedy = [0.0] * len(pairs), [True] * len(pairs)
        for batch in _batches(windows, self.batch_size):
            width = max(len(inputs) for _, inputs, _ in batch)
            padded = torch.zeros(len(batch), width, dtype=torch.long)
            for row, (_, inputs, _) in enumerate(batch):
                padded[row, : len(inputs)] = torch.tensor(inputs)
            logits, _ = self.model(padded.to(self._device))
            log_probs = F.log_softmax(logits.float(), dim=-1)
            for row, (owner, inputs, targets) in enumerate(batch):
                target = torch.tensor(targets, device=self._device)
                rows = log_probs[row, len(inputs) - len(targets) : len(inputs)]
                totals[owner] += rows.gather(1, target[:, None]).sum().item()
                greedy[owner] &= bool((rows.argmax(-1) == target).all())
        return list(zip(totals, greedy, strict=True))

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args) for request in requests]
        results = self.score(pairs)
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-probability, scored in disjoint windows of ``max_length``
        (each conditioned on the previous window's tokens: the harness's own windows)."""
        windows: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            ids = self.tokenizer.encode(request.args[0])
            for window in get_rolling_token_windows(ids, self.prefix_token, self.max_length, 1):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self.score(windows), strict=True):
            totals[owner] += log_prob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continuations decoded with the state cache until a stop string or ``max_gen_toks``;
        requests with equal prompt length and settings decode as one batch."""
        groups: dict[tuple, list[tuple[int, list[int]]]] = {}
        for index, request in enumerate(requests):
            context, settings = request.args
            new_tokens = int(settings.get("max_gen_toks", 256))
            ids = self.tokenizer.encode(context)
            ids = ids[-max(1, self.max_length - new_tokens) :] or [self.prefix_token]
            key = (len(ids), json.dumps(settings, sort_keys=True, default=str))
            groups.setdefault(key, []).append((index, ids))
        outputs = [""] * len(requests)
        for (_, settings_json), members in groups.items():
            settings = json.loads(settings_json)
            for batch in _batches(members, self.batch_size):
                texts = self._generate([ids for _, ids in batch], settings)
                for (index, _), text in zip(batch, texts, strict=True):
                    outputs[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return outputs

    def _generate(self, prompts: list[list[int]], settings: dict) -> list[str]:
        until = settings.get("until") or []
        stops = [until] if isinstance(until, str) else list(until)
        sampling = SamplingSettings(
            temperature=float(settings.get("temperature", 0.0)) if settings.get("do_sample") else 0
        )
        prompt = torch.tensor(prompts, device=self._device)
        new_ids: list[list[int]] = [[] for _ in prompts]
        texts = [""] * len(prompts)
        done = [False] * len(prompts)
        steps = stream_tokens(
            self.model, prompt, int(settings.get("max_gen_toks", 256)), sampling, seed=0
        )
        for token in steps:
            for row, value in enumerate(token[:, 0].tolist()):
                if done[row]:
                    continue
                new_ids[row].append(value)
                texts[row] = self.tokenizer.decode(new_ids[row])
                cut = min((texts[row].find(s) for s in stops if s in texts[row]), default=-1)
                if cut >= 0:
                    texts[row], done[row] = texts[row][:cut], True
            if all(done):
                break
        return texts
