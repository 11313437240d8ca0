"""``lmlab eval RUN --tasks ...``: score a run on lm-evaluation-harness tasks and keep the
scores in the run folder (``lm_eval.json``) and the run registry.

The harness (and its task registry) is imported only when a task runs: importing it costs a
few seconds that every other lmlab command would otherwise pay.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from lmlab.errors import LmlabError, ParamError
from lmlab.files import atomic_write_json
from lmlab.train.registry import record_evals

LM_EVAL_FILE = "lm_eval.json"


@functools.lru_cache(maxsize=8)
def check_tasks(tasks: str, tasks_path: str | None = None, limit: float | None = None):
    """The task names of ``tasks`` (comma-separated) and an lm-eval ``TaskManager`` that knows
    them all, or a one-line error: what every caller checks before spending time on a model
    (cached: a comparison scores many runs on the same tasks)."""
    from lm_eval.tasks import TaskManager

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
    return names, manager


def read_lm_eval(run: str | Path) -> dict:
    """The run's ``lm_eval.json`` (``{"tasks": {}}`` when it has none yet)."""
    path = Path(run) / LM_EVAL_FILE
    if not path.is_file():
        return {"tasks": {}}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise LmlabError(f"{path} is not JSON; delete it and evaluate again") from None


def run_lm_eval(
    run: str | Path,
    tasks: str,
    tasks_path: str | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    registry: str | None = None,
    reuse: bool = False,
) -> dict:
    """Score a run on lm-evaluation-harness tasks (comma-separated names; YAML tasks of your
    own in ``tasks_path``); the scores go to ``RUN/lm_eval.json`` (merged per task with earlier
    ones) and the run registry. With ``reuse``, tasks already scored at this step with the same
    limit and few-shot setting are not run again. Returns the scores of these tasks."""
    import lm_eval

    from lmlab.interop.harness import LmlabLM

    names, manager = check_tasks(tasks, tasks_path, limit)
    model = LmlabLM(str(run), batch_size=batch_size, device=device)
    saved = read_lm_eval(run)
    setting = {"step": model.step, "limit": limit, "num_fewshot": num_fewshot}
    if reuse and all(
        name in saved["tasks"]
        and all(saved["tasks"][name].get(key) == value for key, value in setting.items())
        for name in names
    ):
        scores = {name: saved["tasks"][name]["metrics"] for name in names}
        return {"run": str(run), "seconds": 0.0, "step": model.step, "tasks": scores}
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
    better = output.get("higher_is_better", {})
    samples = output.get("n-samples", {})
    for task, metrics in scores.items():
        saved["tasks"][task] = {
            **setting,
            "lm_eval_version": lm_eval.__version__,
            "seconds": round(seconds, 3),
            "samples": samples.get(task, {}).get("effective"),
            "metrics": metrics,
            "higher_is_better": {
                metric: bool(value)
                for metric, value in better.get(task, {}).items()
                if metric in metrics and value is not None
            },
        }
    atomic_write_json(Path(run) / LM_EVAL_FILE, saved)
    record_evals(Path(run), scores, model.step, registry)
    return {"run": str(run), "seconds": seconds, "step": model.step, "tasks": scores}


def headline_score(run: str | Path, task: str) -> tuple[str, float, bool] | None:
    """The first metric a task reports (its ``metric_list`` order, standard errors left out):
    name, value and whether higher is better; None when the run has no score for the task."""
    entry = read_lm_eval(run)["tasks"].get(task)
    if entry is None:
        return None
    for metric, value in entry["metrics"].items():
        if not metric.endswith("_stderr"):
            return metric, value, entry.get("higher_is_better", {}).get(metric, True)
    return None


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
