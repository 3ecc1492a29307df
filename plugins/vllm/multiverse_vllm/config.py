"""What both hooks check and share: the tag ids (from the served model's tokenizer), the
connector's presence (both hooks or neither), and the ``--hf-overrides`` that turn the position
hook on for a model directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ARCHITECTURES = {
    "LlamaForCausalLM": "MultiverseLlamaForCausalLM",
    "Qwen2ForCausalLM": "MultiverseQwen2ForCausalLM",
    "Qwen3ForCausalLM": "MultiverseQwen3ForCausalLM",
}
CONNECTOR = "MultiverseConnector"
CONNECTOR_MODULE = "multiverse_vllm.connector"


def model_tag_ids(model_config: Any) -> dict[str, int]:
    """The 12 tags' ids in the served model's tokenizer (the project's one reading of them)."""
    from multiverse.format.tokenizer import load_tokenizer, tag_ids

    return tag_ids(load_tokenizer(model_config.tokenizer))


def check_connector(vllm_config: Any) -> None:
    """Refuse the position hook without the connector: layout positions over causally
    re-prefilled paths are further from exact than a flat merge (SPEC 4.1)."""
    kv = vllm_config.kv_transfer_config
    if kv is None or kv.kv_connector != CONNECTOR:
        raise ValueError("the Multiverse position hook needs the Multiverse KV connector: start vLLM with "
                         f"--kv-transfer-config '{json.dumps(transfer_config())}' (positions alone are further "
                         "from exact than a flat merge)")  # fmt: skip


def check_positions(vllm_config: Any) -> None:
    """Refuse the connector without the position hook (the same reason, the other way)."""
    mc = vllm_config.model_config
    archs = list(getattr(mc.hf_config, "architectures", None) or [])
    if not mc.uses_mrope or not archs or archs[0] not in ARCHITECTURES.values():
        raise ValueError(f"the Multiverse KV connector needs the Multiverse position hook (architectures {archs}, "
                         f"M-RoPE {mc.uses_mrope}): start vLLM with --hf-overrides \"$(python -m multiverse_vllm "
                         "overrides MODEL_DIR)\"")  # fmt: skip


def transfer_config(max_tokens: int | None = None) -> dict[str, Any]:
    """The ``--kv-transfer-config`` that loads the connector (``max_tokens``: its cap)."""
    cfg: dict[str, Any] = {"kv_connector": CONNECTOR, "kv_connector_module_path": CONNECTOR_MODULE,
                           "kv_role": "kv_both"}  # fmt: skip
    if max_tokens is not None:
        cfg["kv_connector_extra_config"] = {"max_tokens": int(max_tokens)}
    return cfg


def hf_overrides(model_dir: str | Path) -> dict[str, Any]:
    """The ``--hf-overrides`` for a Llama / Qwen2 / Qwen3 model directory: the Multiverse
    architecture and an M-RoPE section (three rows; equal rows make it plain RoPE)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    archs = cfg.get("architectures") or []
    if not archs or archs[0] not in ARCHITECTURES:
        raise ValueError(f"{model_dir}: architecture {archs} has no Multiverse variant "
                         f"(one of {', '.join(ARCHITECTURES)})")  # fmt: skip
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rope = dict(cfg.get("rope_parameters") or {})
    if not rope:  # transformers 4 configs: rope_theta / rope_scaling at the top level
        rope = dict(cfg.get("rope_scaling") or {"rope_type": "default"})
        rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(
            f"{model_dir}: rope type {rope.get('rope_type')!r}: only plain RoPE is supported"
        )
    half = int(head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
    rope["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3]
    return {"architectures": [ARCHITECTURES[archs[0]]], "rope_parameters": rope}
