"""The plan behind every synthetic problem and its rendering into the two solution texts.

A task family (:mod:`multiverse.eval.task_families`) builds a :class:`Plan`: the question, the
answer and a body of text lines and :class:`PlanBlock` s (one Outline and one Path per branch,
a Conclusion). :func:`to_record` renders the same plan twice, so the two texts always agree:
the Multiverse chain (canonical SPEC 1.2 layout, labels ``1:``, ``1.2:``) and the sequential
chain (the paths' lines one after another).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from multiverse.format import grammar


def problem_key(task: str, question: str) -> str:
    """The canonical content key of a problem (its split and id derive from it)."""
    return f"{task}:{question}"


@dataclass(slots=True)
class Record:
    """One problem with both solution texts. ``num_paths``: paths of the first top-level block;
    ``depth``: deepest nesting of ``<Parallel>`` blocks (1 or 2; both 0 for a plan without a
    block); ``structure``: ``"parallel"`` when the chain has a ``<Parallel>`` block, else
    ``"sequential"`` (the default only for records written before the field existed)."""

    id: str
    question: str
    chain: str
    sequential_chain: str
    answer: int
    task: str
    num_paths: int
    depth: int
    structure: str = "parallel"

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "question": self.question,
            "chain": self.chain,
            "sequential_chain": self.sequential_chain,
            "answer": self.answer,
            "task": self.task,
            "num_paths": self.num_paths,
            "depth": self.depth,
            "structure": self.structure,
        }


@dataclass(slots=True)
class PlanBlock:
    """A Map/Reduce step: one outline and one path (lines and nested blocks) per branch."""

    outlines: list[str]
    paths: list[list[str | PlanBlock]]
    conclusion: str


@dataclass(slots=True)
class Plan:
    """A solved problem before rendering."""

    task: str
    question: str
    body: list[str | PlanBlock] = field(default_factory=list)
    answer: int = 0

    @property
    def key(self) -> str:
        """Canonical content: the question states the whole problem, so it decides the split."""
        return problem_key(self.task, self.question)


def _render_parallel(items: list[str | PlanBlock], prefix: str = "") -> str:
    out: list[str] = []
    for item in items:
        if isinstance(item, str):
            out.append(item + "\n")
            continue
        out.append(f"{grammar.CUE}\n<Parallel>\n<Goal>\n")
        labels = [f"{prefix}{k + 1}" for k in range(len(item.paths))]
        for label, text in zip(labels, item.outlines, strict=True):
            out.append(f"<Outline>\n{label}: {text}\n</Outline>\n")
        out.append("</Goal>\n")
        for label, path in zip(labels, item.paths, strict=True):
            if not path or not isinstance(path[0], str):
                raise ValueError("a path must start with a text line (it carries the label)")
            out.append(f"<Path>\n{label}: {_render_parallel(path, label + '.')}</Path>\n")
        out.append(f"<Conclusion>\n{item.conclusion}\n</Conclusion>\n</Parallel>\n")
    return "".join(out)


def _render_sequential(items: list[str | PlanBlock]) -> list[str]:
    lines: list[str] = []
    for item in items:
        if isinstance(item, str):
            lines.append(item)
        else:
            for path in item.paths:
                lines.extend(_render_sequential(path))
    return lines


def _depth(items: list[str | PlanBlock]) -> int:
    return max(
        (1 + max(_depth(p) for p in x.paths) for x in items if isinstance(x, PlanBlock)), default=0
    )


def to_record(plan: Plan) -> Record:
    """Both texts of ``plan``; a plan without a block renders the same plain text twice."""
    chain = "<Think>\n" + _render_parallel(plan.body) + "</Think>"
    sequential = "<Think>\n" + "".join(f"{x}\n" for x in _render_sequential(plan.body)) + "</Think>"
    first = next((x for x in plan.body if isinstance(x, PlanBlock)), None)
    digest = hashlib.sha256(plan.key.encode()).hexdigest()[:12]
    return Record(
        id=f"{plan.task}-{digest}",
        question=plan.question,
        chain=chain,
        sequential_chain=sequential,
        answer=plan.answer,
        task=plan.task,
        num_paths=len(first.paths) if first is not None else 0,
        depth=_depth(plan.body),
        structure="parallel" if first is not None else "sequential",
    )
