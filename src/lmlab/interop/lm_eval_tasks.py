"""``lmlab eval RUN --tasks ...``: score a run on lm-evaluation-harness tasks and keep the
scores in the run folder (``lm_eval.json``) and the run registry.

The harness (and its task registry) is imported only when a task runs: importing it costs a
few seconds that every other lmlab command would otherwise pay.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmlab.errors import LmlabError, ParamError
from lmlab.train.checkpoint import atomic_write_json
from lmlab.train.registry import record_evals

LM_EVAL_FILE = "lm_eval.json"


def run_lm_eval(
    run: str | Path,
    tasks: str,
    tasks_path: str | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    registry: str | None = None,
) -> dict:
    """Score a run on lm-evaluation-harness tasks (comma-separated names; YAML tasks of your
    own in ``tasks_path``); the scores go to ``RUN/lm_eval.json`` (merged per task with earlier
    ones) and the run registry. Returns that file's content for these tasks."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmlab.interop.harness import LmlabLM

    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise ParamError("<tasks> is empty; give task names, e.g. hellaswag,arc_easy", "tasks")
    if tasks_path is not None and not Path(tasks_path).is_dir():
        raise ParamError(
            f"<tasks_path> {tasks_path} is not a folder of task YAML files", "tasks_path"
        )
    if limit is not None and not limit > 0:
        raise ParamError(f"<limit>={limit} must be above 0", "limit")
    # Indexing the harness's thousands of task files takes seconds: skip it when the user's
    # folder holds every task asked for.
    manager = TaskManager(include_path=tasks_path, include_defaults=False) if tasks_path else None
    if manager is None or any(not manager.match_tasks([name]) for name in names):
        manager = TaskManager(include_path=tasks_path)
    unknown = [name for name in names if not manager.match_tasks([name])]
    if unknown:
        raise LmlabError(
            f"unknown lm-eval task(s) {', '.join(unknown)}; see 'lm_eval ls tasks', or give "
            "--tasks-path with your own task YAML files"
        )
    model = LmlabLM(str(run), batch_size=batch_size, device=device)
    start = time.perf_counter()
    try:
        output = lm_eval.simple_evaluate(
            model=model,
            tasks=names,
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=False,
            bootstrap_iters=1000,
        )
    except (ConnectionError, OSError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise LmlabError(
            f"lm-eval could not load a task's data set ({type(exc).__name__}: {first_line}); "
            "the harness's own tasks download theirs from the Hugging Face Hub on first use "
            "(needs internet, see docs/ecosystem.md), a YAML task of yours needs its data_files"
        ) from None
    seconds = time.perf_counter() - start
    scores = {task: _metrics(values) for task, values in output["results"].items()}
    record = {
        "step": model.step,
        "lm_eval_version": lm_eval.__version__,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "seconds": round(seconds, 3),
        "samples": {
            task: output.get("n-samples", {}).get(task, {}).get("effective") for task in scores
        },
    }
    path = Path(run) / LM_EVAL_FILE
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"tasks": {}}
    for task, metrics in scores.items():
        saved["tasks"][task] = {**record, "metrics": metrics, "samples": record["samples"][task]}
    atomic_write_json(path, saved)
    record_evals(Path(run), scores, model.step, registry)
    return {"run": str(run), "seconds": seconds, "step": model.step, "tasks": scores}


def _metrics(values: dict) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` as ``{"acc": 0.5,
    "acc_stderr": 0.1}`` (the filter name kept when it is not ``none``)."""
    metrics = {}
    for key, value in values.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        metrics[metric if filter_name == "none" else f"{metric}[{filter_name}]"] = float(value)
    return metrics
