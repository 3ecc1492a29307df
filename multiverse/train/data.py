"""Training data: records in, token ids with assistant-only labels out.

A record is one of
  * ``{"question", "chain", "answer"}``: ``chain`` is Multiverse text (the ``<Think>...</Think>``
    part). Rendered with the tokenizer's chat template: user turn = question + the prompt suffix
    of SPEC 1.3 (parallel or sequential), assistant turn = chain + ``"\\n\\nAnswer: "`` + answer.
    An optional ``"sequential_chain"`` gives the record's own sequential version; otherwise the
    sequential form is the flattened chain (:func:`sequential_view`).
  * ``{"messages": [{"role", "content"}, ...]}``: a chat as is; every assistant turn a target.

Either kind may name its ``"task"`` (as records of :mod:`multiverse.eval.tasks` do); the report
counts the records kept per task (:attr:`DataReport.tasks`, :mod:`multiverse.train.summary`).

Invariants:
  * ``labels[i] == input_ids[i]`` on assistant tokens (the assistant turn, end-of-turn marker
    included) but the path labels (:mod:`multiverse.train.path_labels`), ``-100`` everywhere
    else (system, user, template scaffolding). Unshifted: the collator shifts them per document.
  * Every assistant turn is checked with :func:`multiverse.format.grammar.validate`; a record with any
    issue is skipped and reported (source line and the issues), never repaired or truncated.
    Records longer than ``max_length`` tokens are skipped and reported the same way.
  * ``render``/``tokenize`` never reorder records; the curriculum (SPEC 6) is a fixed order.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from multiverse.format import grammar, prompts
from multiverse.train.path_labels import IGNORE_INDEX, mask_path_labels

Form = Literal["multiverse", "sequential"]
Mode = Literal["multiverse", "autoregressive"]


# SPEC section 6: share of Multiverse examples in each of the 8 curriculum segments, in order.
CURRICULUM_MV_SHARES: tuple[float, ...] = (0.0, 0.0, 0.1, 0.5, 0.5, 0.9, 1.0, 1.0)


class TrainError(ValueError):
    """Bad user input to training (options, files, data): reported in one line, no traceback."""


class DataError(TrainError):
    """Bad training data or a missing reader; the message names the file and what is wrong."""


class ConfigError(TrainError):
    """An option or combination of options that cannot run."""


@dataclass(slots=True)
class Record:
    """One input record with where it came from (``file:line`` or ``file:row``)."""

    source: str
    question: str | None = None
    chain: str | None = None
    answer: str | None = None
    sequential_chain: str | None = None
    messages: list[dict[str, str]] | None = None
    task: str | None = None


@dataclass(slots=True)
class Example:
    """A tokenised conversation: ids, unshifted labels (-100 off the assistant turns)."""

    input_ids: list[int]
    labels: list[int]
    form: Form
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass(slots=True)
class Skipped:
    source: str
    reason: str


@dataclass(slots=True)
class DataReport:
    """What happened to the records of one file: kept, skipped with reasons; ``tasks``: the
    records kept per named task, first seen first."""

    records: int = 0
    examples: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    forms: Counter = field(default_factory=Counter)
    tasks: Counter = field(default_factory=Counter)

    def summary(self, limit: int = 10) -> str:
        lines = [
            f"{self.records} records read, {self.examples} training examples "
            f"({', '.join(f'{v} {k}' for k, v in sorted(self.forms.items())) or 'none'}), "
            f"{len(self.skipped)} records skipped"
        ]
        for s in self.skipped[:limit]:
            lines.append(f"  skipped {s.source}: {s.reason}")
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- reading


def read_records(path: str | Path) -> tuple[list[Record], list[Skipped]]:
    """Read JSONL (``.jsonl``/``.json`` lines) or Parquet (``.parquet``, needs pyarrow).

    Malformed lines and records without the needed fields are returned as :class:`Skipped`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training data not found: {path}")
    if path.suffix.lower() in (".parquet", ".pq"):
        rows = _read_parquet(path)
    else:
        rows = _read_jsonl(path)
    records: list[Record] = []
    skipped: list[Skipped] = []
    for source, row in rows:
        if isinstance(row, Skipped):
            skipped.append(row)
            continue
        try:
            records.append(_to_record(source, row))
        except DataError as e:
            skipped.append(Skipped(source, str(e)))
    return records, skipped


def _read_jsonl(path: Path) -> Iterable[tuple[str, dict[str, Any] | Skipped]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            source = f"{path.name}:{lineno}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield source, Skipped(source, f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            if not isinstance(row, dict):
                yield source, Skipped(source, f"expected a JSON object, got {type(row).__name__}")
                continue
            yield source, row


def _read_parquet(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(
            f"reading {path.name} needs pyarrow, which is not installed: "
            "`pip install pyarrow`, or convert the file to JSONL"
        ) from e
    table = pq.read_table(path)
    for i, row in enumerate(table.to_pylist()):
        yield f"{path.name}:row {i}", row


def _to_record(source: str, row: dict[str, Any]) -> Record:
    if not isinstance(task := row.get("task"), str | None):
        raise DataError(f"'task' must be a task name (a string), got {task!r}")
    if row.get("messages") is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise DataError("'messages' must be a list of {'role': str, 'content': str}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError("'messages' has no assistant turn to train on")
        kept = [{"role": m["role"], "content": m["content"]} for m in messages]
        return Record(source, messages=kept, task=task)
    missing = [k for k in ("question", "chain", "answer") if row.get(k) is None]
    if missing:
        raise DataError(
            f"missing field(s) {', '.join(missing)}: a record needs question/chain/answer or messages"
        )
    seq = row.get("sequential_chain")
    return Record(
        source,
        question=str(row["question"]),
        chain=str(row["chain"]),
        answer=str(row["answer"]),
        sequential_chain=None if seq is None else str(seq),
        task=task,
    )


# ----------------------------------------------------------------------------- rendering


def sequential_view(text: str) -> str:
    """The sequential (AR) form of an assistant text: ``<Think>`` body flattened.

    Text before ``<Think>`` and after ``</Think>`` (the answer) is kept verbatim; the body
    becomes :func:`multiverse.format.grammar.flatten` of it wrapped as ``<Think>\\n...\\n</Think>``.
    Text with no tag at all is returned unchanged.
    """
    if not any(tag in text for tag in grammar.TAGS):
        return text
    doc, _ = grammar.read(text)
    if not doc.has_think:
        return grammar.flatten(doc)
    body = grammar.flatten(grammar.Document(body=doc.body))
    return f"{doc.before}<Think>\n{body}\n</Think>{doc.after}"


def render(record: Record, form: Form) -> list[dict[str, str]]:
    """The chat messages of ``record`` in ``form`` (SPEC 1.3 prompt suffix and answer)."""
    if record.messages is not None:
        if form == "multiverse":
            return [dict(m) for m in record.messages]
        return [
            {"role": m["role"], "content": sequential_view(m["content"])}
            if m["role"] == "assistant"
            else dict(m)
            for m in record.messages
        ]
    assert record.question is not None and record.chain is not None and record.answer is not None
    if form == "multiverse":
        chain = record.chain
    else:
        chain = (
            record.sequential_chain
            if record.sequential_chain is not None
            else sequential_view(record.chain)
        )
    return prompts.qa_messages(record.question, chain, record.answer, parallel=form == "multiverse")


def check(record: Record) -> list[str]:
    """Grammar issues of every assistant text of ``record`` (both forms derive from these)."""
    texts = (
        [m["content"] for m in record.messages if m["role"] == "assistant"]
        if record.messages is not None
        else [record.chain or ""] + ([record.sequential_chain] if record.sequential_chain else [])
    )
    problems: list[str] = []
    for text in texts:
        problems.extend(str(issue) for issue in grammar.validate(text))
    return problems


def tokenize(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of the chat; labels: the ids on assistant turns, -100 elsewhere (and on the
    path labels the engine writes itself, :mod:`multiverse.train.path_labels`).

    The chat template renders ``messages[:i]`` with the generation prompt and ``messages[:i+1]``
    for each assistant turn ``i``; the text between the two is that turn (content and the
    template's end-of-turn marker). Segments are tokenised separately and concatenated, so the
    boundary between prompt and target is exact.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _template(tokenizer, messages[:i], add_generation_prompt=True)
        full = _template(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError(
                "the tokenizer's chat template is not prefix-stable (rendering a longer chat "
                "changed the text of the earlier turns); cannot locate the assistant turns"
            )
        segments.append((prefix[len(done) :], False))
        segments.append((full[len(prefix) :], True))
        done = full
    input_ids: list[int] = []
    labels: list[int] = []
    for text, target in segments:
        ids = tokenizer.encode(text, add_special_tokens=False)
        input_ids.extend(ids)
        labels.extend(ids if target else [IGNORE_INDEX] * len(ids))
    return input_ids, mask_path_labels(input_ids, labels, tokenizer)


def _template(
    tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool
) -> str:
    return prompts.render_chat(tokenizer, messages, add_generation_prompt)


def prompt_ids(tokenizer: Any, question: str, form: Form = "multiverse") -> list[int]:
    """Ids of the prompt a trained model is asked with (chat template + SPEC 1.3 suffix)."""
    text = prompts.chat_prompt(tokenizer, question, parallel=form == "multiverse")
    return tokenizer.encode(text, add_special_tokens=False)


# ----------------------------------------------------------------------------- building


def forms_for(
    num_records: int, mode: Mode, curriculum: bool, epochs: int = 1
) -> list[tuple[int, Form]]:
    """The training order: ``(record index, form)`` pairs.

    Without curriculum: every record once per epoch in its mode's form (multiverse mode trains
    on the Multiverse form, autoregressive mode on the sequential form). With curriculum
    (multiverse mode only): ``epochs`` passes over the records in file order, cut into the 8
    equal segments of SPEC section 6; within segment ``s`` the Multiverse examples are spread
    evenly: ``floor(size * share)`` of them with ``share`` = :data:`CURRICULUM_MV_SHARES` ``[s]``.
    Never shuffled.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    total = num_records * epochs
    if not curriculum:
        form: Form = "multiverse" if mode == "multiverse" else "sequential"
        return [(k % num_records, form) for k in range(total)]
    if mode != "multiverse":
        raise ValueError(
            "the curriculum moves from sequential to Multiverse examples: use mode='multiverse'"
        )
    nseg = len(CURRICULUM_MV_SHARES)
    order: list[tuple[int, Form]] = []
    for seg, share in enumerate(CURRICULUM_MV_SHARES):
        lo, hi = seg * total // nseg, (seg + 1) * total // nseg
        for j in range(hi - lo):
            # j-th example of the segment is MV iff the running MV count steps up here
            mv = int((j + 1) * share + 1e-9) > int(j * share + 1e-9)
            order.append(((lo + j) % num_records, "multiverse" if mv else "sequential"))
    return order


def build_examples(
    records: Sequence[Record],
    tokenizer: Any,
    mode: Mode = "multiverse",
    max_length: int | None = None,
    curriculum: bool = False,
    epochs: int = 1,
    report: DataReport | None = None,
) -> tuple[list[Example], DataReport]:
    """Check, render and tokenise ``records`` in training order (see :func:`forms_for`)."""
    report = report if report is not None else DataReport()
    report.records += len(records)
    bad: dict[int, str] = {}
    for i, record in enumerate(records):
        problems = check(record)
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            bad[i] = "invalid Multiverse text: " + "; ".join(problems[:3]) + more
    order = forms_for(len(records), mode, curriculum, epochs)
    rendered: dict[tuple[int, Form], Example] = {}
    for index, form in order:
        if index in bad or (index, form) in rendered:
            continue
        record = records[index]
        ids, labels = tokenize(tokenizer, render(record, form))
        if max_length is not None and len(ids) > max_length:
            bad[index] = f"{len(ids)} tokens in the {form} form, over max_length={max_length}"
            continue
        rendered[(index, form)] = Example(ids, labels, form, record.source)
    examples: list[Example] = []
    for index, form in order:
        if index not in bad:
            examples.append(rendered[(index, form)])
            report.forms[form] += 1
    report.skipped.extend(Skipped(records[i].source, reason) for i, reason in sorted(bad.items()))
    report.tasks.update(r.task for i, r in enumerate(records) if i not in bad and r.task)
    report.examples += len(examples)
    return examples, report


def load_examples(
    path: str | Path,
    tokenizer: Any,
    mode: Mode = "multiverse",
    max_length: int | None = None,
    curriculum: bool = False,
    epochs: int = 1,
) -> tuple[list[Example], DataReport]:
    """Read ``path`` and build its examples; raises :class:`DataError` when none is usable."""
    records, skipped = read_records(path)
    report = DataReport(skipped=list(skipped))
    report.records += len(skipped)
    examples, report = build_examples(
        records, tokenizer, mode, max_length, curriculum, epochs, report
    )
    if not examples:
        raise DataError(f"no usable training example in {path}\n{report.summary()}")
    return examples, report
