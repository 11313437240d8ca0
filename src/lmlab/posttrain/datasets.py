"""Small generated data sets shipped with lmlab, so every post-training method runs offline:
2-digit addition, n-digit addition (1 to 4 digits) and copy/reverse of letter strings, each
with an exact-match verifier, in three formats:

- ``sft``: ``{"prompt": "12+34=", "completion": "46\\n"}`` (the newline ends the answer);
- ``rl``: ``{"prompt": "12+34=", "answer": "46", "verifier": "exact_match"}``;
- ``preference``: ``{"prompt", "chosen", "rejected"}``, chosen the right completion, rejected a
  corrupted one (one digit or letter changed, or the answer of a neighbouring problem).

:func:`generate_datasets` writes them deterministically (``python -m
lmlab.posttrain.datasets`` regenerates the shipped files); train and test problems never
overlap. ``post.data=addition2`` names the shipped set; the method picks the format.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from lmlab.errors import LmlabError

SETS = ("addition2", "addition", "copy_reverse")
FORMATS = ("sft", "rl", "preference")
SPLITS = ("train", "test")
SIZES = {"train": 2000, "test": 200}
SEED = 1234
LETTERS = "abcdefghij"


def _addition(rng: random.Random, digits: tuple[int, int]) -> tuple[str, str]:
    def number() -> int:
        width = rng.randint(*digits)
        return rng.randint(0 if width == 1 else 10 ** (width - 1), 10**width - 1)

    a, b = number(), number()
    return f"{a}+{b}=", str(a + b)


def _copy_reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))
    if rng.random() < 0.5:
        return f"copy {word}:", word
    return f"reverse {word}:", word[::-1]


PROBLEMS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "addition2": lambda rng: _addition(rng, (2, 2)),
    "addition": lambda rng: _addition(rng, (1, 4)),
    "copy_reverse": _copy_reverse,
}
"""Each set's problem generator: ``rng -> (prompt, answer)``."""


def problems(name: str) -> dict[str, list[tuple[str, str]]]:
    """Distinct problems of set ``name``, split into train and test (no prompt in both)."""
    rng = random.Random(f"{SEED}-{name}")
    seen: dict[str, str] = {}
    wanted = sum(SIZES.values())
    while len(seen) < wanted:
        prompt, answer = PROBLEMS[name](rng)
        seen.setdefault(prompt, answer)
    items = list(seen.items())
    return {"test": items[: SIZES["test"]], "train": items[SIZES["test"] :]}


def corrupt(answer: str, rng: random.Random) -> str:
    """A wrong answer close to ``answer``: one character changed to another of its kind."""
    position = rng.randrange(len(answer))
    pool = "0123456789" if answer[position].isdigit() else LETTERS
    replacement = rng.choice([c for c in pool if c != answer[position]])
    return answer[:position] + replacement + answer[position + 1 :]


def records(name: str, fmt: str, split: str) -> list[dict]:
    """The examples of one set, format and split."""
    rng = random.Random(f"{SEED}-{name}-{fmt}-{split}")
    out = []
    for prompt, answer in problems(name)[split]:
        if fmt == "sft":
            out.append({"prompt": prompt, "completion": answer + "\n"})
        elif fmt == "rl":
            out.append({"prompt": prompt, "answer": answer, "verifier": "exact_match"})
        else:
            rejected = corrupt(answer, rng)
            out.append({"prompt": prompt, "chosen": answer + "\n", "rejected": rejected + "\n"})
    return out


def file_name(name: str, fmt: str, split: str) -> str:
    return f"{name}.{fmt}.{split}.jsonl"


def generate_datasets(folder: Path) -> list[Path]:
    """Write every set, format and split into ``folder``; returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SETS:
        for fmt in FORMATS:
            for split in SPLITS:
                path = folder / file_name(name, fmt, split)
                lines = (json.dumps(r, ensure_ascii=False) for r in records(name, fmt, split))
                path.write_text("\n".join(lines) + "\n", encoding="utf-8")
                written.append(path)
    return written


def pretraining_text(names: tuple[str, ...] = ("addition2", "addition")) -> str:
    """The train problems of ``names`` as plain text, one ``prompt answer`` line each, for
    pretraining a model on the same kind of data before fine-tuning it."""
    lines = [prompt + answer for name in names for prompt, answer in problems(name)["train"]]
    random.Random(SEED).shuffle(lines)
    return "\n".join(lines) + "\n"


def shipped_path(name: str, fmt: str, split: str) -> Path:
    """The packaged file of a shipped set."""
    return Path(str(resources.files("lmlab.posttrain") / "datasets" / file_name(name, fmt, split)))


def resolve_data(data: str, fmt: str, split: str = "train") -> Path:
    """``post.data`` as a file: a shipped set's name gives its packaged file in ``fmt``, else
    it is a JSONL path, which must exist."""
    if data in SETS:
        return shipped_path(data, fmt, split)
    path = Path(data)
    if not path.is_file():
        raise LmlabError(
            f"post.data={data} is neither a JSONL file nor a shipped data set ({', '.join(SETS)})"
        )
    return path


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "datasets"
    for written in generate_datasets(target):
        print(written)
