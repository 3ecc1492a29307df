"""Pictures: the attention mask with positions, an HTML branch view, the speedup scatter.

matplotlib is imported lazily (extra ``viz``); the HTML page is self-contained (no scripts, no
external assets: nesting collapses with ``<details>``).
"""

from __future__ import annotations

import html
import sys
from pathlib import Path as FsPath
from typing import TYPE_CHECKING

import torch

from multiverse.eval.evaluate import batch_points
from multiverse.format import grammar as g

if TYPE_CHECKING:
    from multiverse.eval.evaluate import EvalResult
    from multiverse.eval.structure import Report, TokenCounter

MAX_PIXELS = 1200  # longer sequences are max-pooled into this many bins per axis


def _region_ids(rep: Report) -> torch.Tensor:
    """Per token: 0 outside paths, else a distinct id per innermost (block, path) it is in."""
    lay = rep.layout
    n = len(lay)
    keys = torch.full((n,), -1, dtype=torch.long)
    for level in range(lay.num_levels):
        inside = lay.block_ids[level] >= 0
        keys[inside] = lay.block_ids[level][inside] * 4096 + lay.path_ids[level][inside]
    uniq, inverse = torch.unique(keys, return_inverse=True)
    return inverse + (0 if bool((uniq == -1).any()) else 1)


def _colour(cmap, region: int):  # noqa: ANN001, ANN202 - matplotlib types stay lazy
    """Region 0 (outside every path) grey, path regions the tab10 colours."""
    return (0.62, 0.62, 0.62, 1.0) if region == 0 else cmap((region - 1) % 10)


def plot_range(rep: Report, tokens: tuple[int, int | None] | None = None) -> tuple[int, int]:
    """The token indices ``[start, end)`` :func:`plot_mask` draws: ``tokens`` (a zoom) when
    given, else the whole text, or, for a text longer than :data:`MAX_PIXELS` tokens, the span
    from 32 tokens before its first block to 32 after its last (the structure, not the prefix)."""
    n = len(rep.layout)
    if tokens is not None:
        start, end = tokens
        end = n if end is None else min(end, n)
        if start >= end:
            raise ValueError(f"--plot-tokens {start}:{end}: outside the text's {n} tokens")
        return start, end
    if n <= MAX_PIXELS or rep.layout.num_levels == 0:
        return 0, n
    inside = (rep.layout.block_ids[0] >= 0).nonzero().flatten()
    if len(inside) == 0:
        return 0, n
    return max(0, int(inside[0]) - 32), min(n, int(inside[-1]) + 33)


def mask_image(rep: Report, start: int, end: int, bins: int) -> torch.Tensor:
    """``[bins, bins]`` picture of the mask over tokens ``[start, end)``: 0 = masked, else
    1 + the query's region id (max-pooled), built in row chunks (never ``n x n`` at once)."""
    lay = rep.layout
    region = _region_ids(rep)
    width = end - start
    row_bin = (torch.arange(width) * bins) // width
    img = torch.zeros(bins, bins)
    chunk = 256
    for a in range(start, end, chunk):
        b = min(a + chunk, end)
        m = lay.dense_mask(slice(a, b))[:, start:end].float()  # [rows, width]
        pooled = torch.nn.functional.adaptive_max_pool1d(m[None], bins)[0]  # [rows, bins]
        value = pooled * (region[a:b].float() + 1)[:, None]
        rows = row_bin[a - start : b - start][:, None].expand(-1, bins)
        img.scatter_reduce_(0, rows, value, reduce="amax")
    return img


def plot_mask(
    rep: Report, counter: TokenCounter, path: str | FsPath, tokens: tuple[int, int | None] | None = None
) -> None:
    """Paper-Figure-(b)-style picture: the Multiverse Attention mask (colour = the query's path)
    and the position ids against token index (siblings restart at the same position), with a
    legend; ``tokens=(start, end)`` zooms in (default :func:`plot_range`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError as e:  # pragma: no cover - depends on extras
        raise ValueError("--plot needs matplotlib: pip install 'multiverse[viz]'") from e
    lay = rep.layout
    n = len(lay)
    if n == 0:
        raise ValueError("--plot: nothing to draw (empty text)")
    start, end = plot_range(rep, tokens)
    width = end - start
    bins = min(width, MAX_PIXELS)
    img = mask_image(rep, start, end, bins)
    region = _region_ids(rep)
    cmap = plt.get_cmap("tab10")
    colours = ["white"] + [_colour(cmap, k) for k in range(max(int(img.max()), 1))]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [1.1, 1]})
    ax1.imshow(img.numpy(), cmap=ListedColormap(colours), interpolation="nearest",
               vmin=0, vmax=max(len(colours) - 1, 1), extent=(start, end, end, start))  # fmt: skip
    ax1.set_title("Multiverse Attention mask (row = query; colour = its path)")
    ax1.set_xlabel("key index")
    ax1.set_ylabel("query index")
    if width <= 60:
        labels = _token_labels(rep, counter)[start:end]
        ticks = [start + k + 0.5 for k in range(width)]
        names = [f"{t} ({int(p)})" for t, p in zip(labels, lay.position_ids[start:end].tolist())]
        ax1.set_xticks(ticks, names, rotation=90, fontsize=6)
        ax1.set_yticks(ticks, names, fontsize=6)
    idx = list(range(start, end))
    ax2.scatter(idx, lay.position_ids[start:end].tolist(),
                c=[_colour(cmap, int(r)) for r in region[start:end].tolist()], s=4)  # fmt: skip
    ax2.set_title("position id per token (siblings restart at the same position)")
    ax2.set_xlabel("token index")
    ax2.set_ylabel("position id")
    legend = [Patch(facecolor="white", edgecolor="black", label="masked (not attended)"),
              Patch(color=_colour(cmap, 0), label="outside paths (prefix, Goal, Conclusion)")]  # fmt: skip
    legend += [Patch(color=_colour(cmap, k), label=f"path region {k}") for k in range(1, min(int(region.max()) + 1, 6))]
    if int(region.max()) >= 6:
        legend.append(Patch(color="none", label="... (colours cycle per path)"))
    ax2.legend(handles=legend, fontsize=7, loc="upper left")
    d = rep.to_dict()
    shown = "" if (start, end) == (0, n) else f", tokens {start}-{end} shown"
    fig.suptitle(f"{rep.name}: {d['blocks']} blocks, {d['total_tokens']} tokens{shown}, depth "
                 f"{d['depth_tokens']}, # parallel {d['parallel_degree']:.2f} ({d['tokenizer']})", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _token_labels(rep: Report, counter: TokenCounter) -> list[str]:
    if counter.tok is None:
        return [t.replace("\n", "⏎") for t in g.approx_tokens("".join(_text_of(rep)))]
    ids = counter.tok.encode(_text_of(rep), add_special_tokens=False)
    return [counter.tok.decode([i]).replace("\n", "⏎") for i in ids]


def _text_of(rep: Report) -> str:
    return rep.extra.get("text", g.serialize(rep.doc))


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.2em} .meta{color:#555;margin-bottom:1em}
.text{white-space:pre-wrap;background:#fff;border-left:3px solid #bbb;padding:.3em .6em;margin:.3em 0}
details.block{border:1px solid #9ab;border-radius:6px;background:#eef4f8;margin:.5em 0;padding:.3em .6em}
details.block>summary{cursor:pointer;font-weight:600;color:#246}
.goal{margin:.3em 0;color:#345} .goal li{margin:.1em 0}
.paths{display:flex;gap:.6em;align-items:flex-start;overflow-x:auto}
.path{flex:1 1 0;min-width:14em;background:#fff;border:1px solid #cde;border-radius:5px;padding:.4em}
.path>h3{margin:0 0 .3em 0;font-size:.95em;color:#135}
.path .text{border-left-color:#7ab}
.conclusion{white-space:pre-wrap;background:#fff8e6;border-left:3px solid #e0b040;padding:.3em .6em;margin-top:.4em}
.issues{color:#a00} .answer{white-space:pre-wrap;background:#eef8ee;border-left:3px solid #5a5;padding:.3em .6em}
"""


def render_html(doc: g.Document, title: str = "Multiverse", meta: str = "", issues: list[g.Issue] | None = None) -> str:
    """A self-contained HTML page: paths of a block side by side, nested blocks collapsible."""
    esc = html.escape
    counter = [0]

    def items(body: list[g.Item]) -> str:
        out = []
        for x in body:
            if isinstance(x, str):
                lines = [ln for ln in x.split("\n") if not g.is_cue(ln)]
                text = "\n".join(lines).strip("\n")
                if text.strip():
                    out.append(f'<div class="text">{esc(text)}</div>')
                continue
            counter[0] += 1
            state = "" if x.closed else " (unclosed)"
            goal = "".join(f"<li><b>{esc(o.label or '?')}</b>: {esc(o.text)}</li>" for o in x.outlines)
            paths = "".join(
                f'<div class="path"><h3>Path {esc(p.label or str(j + 1))}</h3>{items(p.body)}</div>'
                for j, p in enumerate(x.paths)
            )
            concl = f'<div class="conclusion"><b>Conclusion</b>\n{esc(x.conclusion)}</div>' if x.conclusion is not None else ""
            out.append(
                f'<details class="block" open><summary>Parallel block #{counter[0]}: {len(x.paths)} paths{state}'
                f"</summary><ol class=\"goal\">{goal}</ol><div class=\"paths\">{paths}</div>{concl}</details>"
            )
        return "".join(out)

    body = items(doc.body)
    issue_html = ""
    if issues:
        issue_html = '<div class="issues"><b>Validation issues</b><ul>' + "".join(
            f"<li>{esc(str(i))}</li>" for i in issues[:200]
        ) + "</ul></div>"
    answer = f'<div class="answer">{esc(doc.after.strip())}</div>' if doc.after.strip() else ""
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1><div class=\"meta\">{esc(meta)}</div>"
        f"{issue_html}{body}{answer}</body></html>"
    )


def write_html(rep: Report, path: str | FsPath) -> None:
    d = rep.to_dict()
    meta = (
        f"{'valid' if d['valid'] else 'INVALID'} · {d['blocks']} blocks · max depth {d['max_depth']} · "
        f"{d['total_tokens']} tokens · depth {d['depth_tokens']} · # parallel {d['parallel_degree']:.2f} · "
        f"tokenizer {d['tokenizer']}"
    )
    FsPath(path).write_text(render_html(rep.doc, rep.name, meta, rep.issues), encoding="utf-8")


def plot_speedup(result: EvalResult, path: str | FsPath) -> bool:
    """Write ``speedup.png``: speedup against # parallel (per batch). False if nothing to plot
    or matplotlib is missing."""
    points = batch_points(result)
    if not points:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "multiverse eval: matplotlib missing, no speedup.png (pip install 'multiverse[viz]')",
            file=sys.stderr,
        )
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, alpha=0.7)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    unit = "sample" if result.batch_size == 1 else f"batch of {result.batch_size}"
    ax.set_xlabel("# parallel (generated tokens / sequential depth)")
    ax.set_ylabel("speedup (time off / time on)")
    model = FsPath(result.model).name or result.model
    threads = result.environment.get("threads")
    ax.set_title(f"{result.benchmark}, model {model}, batch size {result.batch_size}"
                 + (f", {threads} thread(s)" if threads else "") + f"\none point per {unit}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
