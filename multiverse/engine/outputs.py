"""What a finished request gives back: :class:`RequestOutput` (canonical order) and :class:`Usage`;
:func:`build_output` reads a finished :class:`~multiverse.engine.request.Request`. Read only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from multiverse.engine import stops
from multiverse.engine.request import Request

__all__ = ["RequestOutput", "Usage", "build_output", "progress"]


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # all branches, engine-inserted tokens included
    depth_tokens: int  # final position + 1 - the prompt's next position
    parallel_degree: float  # completion_tokens / depth_tokens (# parallel, SPEC 2)
    forced_tokens: int  # tokens the engine inserted (``<Path>\n1:``, ``\n``, ``<Conclusion>\n``...)
    blocks: int  # forked blocks
    branches: int  # child branches created
    seconds: float  # from the call to generate until this request finished
    tokens_per_s: float  # completion_tokens / seconds


@dataclass(slots=True)
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    forced: list[bool]
    logprobs: list[float | None] | None
    prompt_logprobs: list[float | None] | None
    position_ids: list[int]  # the layout rule's position of each generated token
    tree: dict[str, Any]
    usage: Usage
    finish_reason: str
    error: str | None = None  # finish_reason "error": the exception that ended this request
    seed: int = 0  # the request's seed (given or drawn): SamplingParams(seed=...) replays it
    forking: str = "on"  # "on", "off" (parallel=False), "unavailable" (the tokenizer has no tags)
    ended_by: tuple[int, float | None] | None = None  # the sampled stop token left out (id, logprob)

    @property
    def outputs(self) -> list[RequestOutput]:
        """vLLM style access (``out.outputs[0].text``): one completion per request, itself."""
        return [self]


def build_output(tokenizer: Any, req: Request, prompt: str | None = None, start: float | None = None) -> RequestOutput:
    """The output of a finished request (``start``: when its timing begins; default its arrival)."""
    if not req.finished:
        raise ValueError(f"request {req.id} has not finished yet")
    start = req.t_arrival if start is None else start
    root, n0 = req.root, req.prompt_len
    ids = root.own_ids[n0:]
    text = stops.output_text(tokenizer, root.own_ids, root.cuts, n0)  # stop strings cut (.stops)
    pos = root.own_pos[n0:]
    depth = (max(pos) + 1 - req.gen_start) if pos else 0
    secs = max(req.t_finish - start, 1e-9)
    usage = Usage(n0, len(ids), depth, len(ids) / depth if depth > 0 else 1.0, sum(root.own_forced[n0:]),
                  req.num_blocks, req.num_branches, secs, len(ids) / secs)  # fmt: skip
    tree = {"start": 0, "end": len(ids), "blocks": [b.to_dict(n0) for b in root.blocks]}
    lps = root.own_logprobs[n0:] if req.params.logprobs else None
    plp = req.prompt_logprobs if req.params.prompt_logprobs else None
    return RequestOutput(prompt, list(req.prompt_ids), text, ids, root.own_forced[n0:], lps, plp, pos, tree,
                         usage, req.finish_reason or "length", req.error, req.root.seed,
                         "on" if req.parallel else "unavailable" if req.params.parallel else "off",
                         req.ended_by)  # fmt: skip


class progress:  # a tqdm bar when tqdm is installed, else a one-line counter on stderr
    def __init__(self, total: int) -> None:
        try:
            from tqdm import tqdm

            self.bar: Any = tqdm(total=total, desc="generate")
        except ImportError:
            self.bar, self.total, self.done = None, total, 0

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
        else:
            import sys

            self.done += n
            print(f"\rgenerate: {self.done}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            import sys

            print(file=sys.stderr)
