"""lm-evaluation-harness tasks on a model already in memory (`lowbit eval --tasks`).

The model, a lowbit checkpoint or any other, is handed to lm-eval's Hugging Face adapter
(`HFLM(pretrained=model)`) as it is, so lm-eval never loads it by path. lm-eval is optional
(`pip install lm_eval`). Task directories given with `include_path` are read as YAML; one
that names Python code (`!function`, `!!python`) is refused, since lowbit runs no code from
the files it is given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.calib.blocks import input_device
from lowbit.errors import UsageError

# YAML tags by which a task file would make lm-eval import and run Python.
CODE_TAGS = ("!function", "!!python")


def run_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
) -> dict[str, Any]:
    """lm-eval's results ({"results": {task: {metric: value}}, ...}) of `tasks` on `model`."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UsageError(f"lowbit: tasks need lm-evaluation-harness (pip install lm_eval): {exc}") from exc
    if include_path is not None:
        refuse_task_code(Path(include_path))
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise UsageError(f"lowbit: unknown lm-eval task(s) {', '.join(unknown)} (`lm-eval ls tasks` lists them; "
                         "a task of your own: its directory with --tasks-path)")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(input_device(model)))
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False)
    if results is None:  # lm-eval returns None on the non-main ranks of a distributed run
        raise UsageError("lowbit: lm-eval returned no results")
    return results


def refuse_task_code(path: Path) -> None:
    """Refuses a task directory (or file) whose YAML would run Python."""
    if not path.exists():
        raise UsageError(f"lowbit: no such task directory: {path}")
    files = [path] if path.is_file() else sorted([*path.rglob("*.yaml"), *path.rglob("*.yml")])
    for file in files:
        text = file.read_text(encoding="utf-8")
        tag = next((tag for tag in CODE_TAGS if tag in text), None)
        if tag:
            raise UsageError(f"lowbit: {file} runs Python code ({tag}); lowbit runs no code from task files")


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own table of the results."""
    from lm_eval.utils import make_table

    return make_table(results)
