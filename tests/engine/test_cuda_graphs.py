"""CUDA graphs for decode (skipped without a CUDA device; ``benchmarks/gpu_check.sh`` runs them):
a graph replay equals the same static step run eagerly (exactly in fp32, within tolerance in
bf16), and the engine with graphs gives the eager engine's tokens and the full forward's
logprobs, with forks, merges, preemption and sampling; a bucket whose capture fails runs eagerly
with the same tokens (the fail-safe path, on a real capture)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from _engine_util import assert_no_leak, block, check_output, engine  # noqa: E402

from multiverse import SamplingParams  # noqa: E402
from multiverse.engine.model import CausalLM, KVPool  # noqa: E402
from multiverse.engine.model.graphs import CudaGraphCapturer, DecodeGraphs, EagerCapturer  # noqa: E402


def _cuda_model(pair, dtype):
    hf = pair[0]
    model = CausalLM(hf.config, dtype=dtype, device="cuda")
    model.load_hf_state_dict(hf.state_dict())
    return model


def _think(*parts: str) -> str:
    return "<Think>\n" + "".join(parts) + "</Think>\n\nAnswer: 7"


FORK = _think("first\n", block([("1", "a b c d e f g h"), ("2", "x"), ("3", "y z")]), "after\n")
NESTED = _think(block([("1", "deep\n" + block([("1.1", "bottom a"), ("1.2", "side")])), ("2", "flat")]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_the_eager_static_step(pair, dtype):
    model = _cuda_model(pair, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    init = torch.randn(KVPool.for_model(model, 129).kv.shape, generator=g, device="cuda").to(dtype)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(1)).tolist()
    lists = [perm[0:9], perm[9:10], perm[10:70], perm[70:71], perm[71:100]]
    rows = [(5 + i, len(x) - 1, x[-1]) for i, x in enumerate(lists)]
    outs, pools = [], []
    for capturer in (CudaGraphCapturer(torch.device("cuda")), EagerCapturer()):
        pool = KVPool.for_model(model, 129)
        pool.kv.copy_(init)
        graphs = DecodeGraphs(model, pool.kv, 128, max_batch=8, max_kv=64, capturer=capturer)
        parts = [[torch.tensor(x[:-1], device="cuda"), x[-1:]] for x in lists]
        for _ in range(3):  # replays after the first keep giving the same (the K/V they write is the same)
            out = graphs.run(rows, parts)
        outs.append(out.clone())
        pools.append(pool.kv.clone())
    if dtype == torch.float32:
        assert torch.equal(outs[0], outs[1]) and torch.equal(pools[0][:, :128], pools[1][:, :128])
    else:
        torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)


def _mixed():
    texts = [FORK, NESTED, None, FORK]
    params = []
    for i, text in enumerate(texts):
        kw = dict(max_tokens=160, logprobs=True, seed=3 + i)
        params.append(SamplingParams(temperature=0.9, top_p=0.95, **kw) if text is None
                      else SamplingParams(temperature=0.0, forced_output=text, **kw))  # fmt: skip
    return [f"Question {i}: {i} + {i}?" for i in range(len(texts))], params


@pytest.mark.parametrize("cfg", [dict(num_kv_slots=4096),
                                 dict(num_kv_slots=400, max_batch_tokens=64, prefill_chunk=16)],
                         ids=["roomy", "preempting"])  # fmt: skip
def test_engine_with_cuda_graphs_equals_the_eager_engine_and_the_full_forward(pair, tok, cfg):
    model = _cuda_model(pair, torch.float32)
    prompts, params = _mixed()
    ref = engine(model, tok, cuda_graphs=False, **cfg).generate(prompts, params)
    llm = engine(model, tok, graph_max_batch=8, graph_max_kv=512, **cfg)  # graphs: the CUDA default
    graphs = llm.runner.graphs
    assert graphs is not None and isinstance(graphs.capturer, CudaGraphCapturer)
    assert graphs.capturer.captures == len(graphs.batch_buckets) * len(graphs.kv_buckets)  # at start-up
    got = llm.generate(prompts, params)
    assert llm.runner.static_steps > 0 and graphs.capturer.replays == llm.runner.static_steps
    for a, b in zip(got, ref, strict=True):
        assert a.token_ids == b.token_ids and a.position_ids == b.position_ids
        assert [x is None for x in a.logprobs] == [y is None for y in b.logprobs]
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True) if x is not None) < 1e-4
        check_output(pair[0], tok, a, atol=1e-3)
    assert_no_leak(llm)


def test_bf16_engine_with_graphs_matches_eager(pair, tok):
    model = _cuda_model(pair, torch.bfloat16)
    prompts, params = _mixed()
    ref = engine(model, tok, num_kv_slots=4096, cuda_graphs=False).generate(prompts, params)
    got = engine(model, tok, num_kv_slots=4096, graph_max_batch=8, graph_max_kv=512).generate(prompts, params)
    for a, b, sp in zip(got, ref, params, strict=True):
        if sp.forced_output is not None:  # same tokens by construction: compare the logprobs
            assert a.token_ids == b.token_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True) if x is not None) < 0.1


class _FailingCapture(CudaGraphCapturer):
    """Raises inside the real ``torch.cuda.graph`` capture (after the warm-up) of chosen buckets."""

    def __init__(self, fail):
        super().__init__(torch.device("cuda"))
        self.fail = fail

    def capture(self, fn, bucket):
        def step():
            out = fn()
            if bucket in self.fail and torch.cuda.is_current_stream_capturing():
                raise torch.OutOfMemoryError(f"injected at the capture of {bucket}")
            return out

        return super().capture(step, bucket)


def test_a_bucket_whose_cuda_capture_fails_runs_eagerly_with_the_same_tokens(pair, tok, caplog):
    model = _cuda_model(pair, torch.float32)
    prompts, params = _mixed()
    ref = engine(model, tok, cuda_graphs=False, num_kv_slots=4096).generate(prompts, params)
    fail = [(1, 256), (8, 512)]
    with caplog.at_level("WARNING", logger="multiverse.engine.model.graphs"):
        llm = engine(model, tok, num_kv_slots=4096, graph_max_batch=8, graph_max_kv=512,
                     graph_capturer=_FailingCapture(fail))  # fmt: skip
        got = llm.generate(prompts, params)
    graphs = llm.runner.graphs
    assert set(graphs.failed) == set(fail) and graphs.report.captured == graphs.report.buckets - 2
    assert graphs.report.device_bytes > 0 and llm.runner.static_steps > 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2 and all("capture failed" in m and "injected" in m for m in warned)
    for a, b in zip(got, ref, strict=True):
        assert a.token_ids == b.token_ids and a.position_ids == b.position_ids
    assert_no_leak(llm)
