"""One real SGLang prefill rank: the installed release's `CommonKVManager`, built as SGLang does.

Run by an SGLang test env's python (see scripts/sglang-test-env.sh), one process per rank:

    .cache/sglang-envs/0.5.23/bin/python tests/sglang/rank.py config.json

The config (JSON) names the gloo world and this rank's place in the prefill topology:

    world_size, rank        the gloo world: the number of processes and this one's rank
    init_port               its TCP store: distributed_init_method tcp://127.0.0.1:<init_port>
    local_rank              optional, default = rank
    bootstrap_port          this NODE's local --disaggregation-bootstrap-port
    nnodes, node_rank       optional, default 1 and 0
    dist_init_addr          optional, default "127.0.0.1:<init_port>" when nnodes > 1, else null
    sizes                   {"dp": .., "cp": .., "tp": .., "pp": ..}  (attention dp/cp/tp, pp)
    cell                    {"dp": .., "cp": .., "tp": .., "pp": ..}  this rank's cell
    dp_kind                 optional: "attention" (default, --enable-dp-attention) or "system"
    page_size, kv_cache_dtype, timeout_seconds    optional

The sizes may claim more cells than there are processes (a world of 3 for a 2x2 topology): then
the model-parallel groups cannot be built as SGLang builds them, and the harness states the
cell's ranks on per-process groups instead (see README.md, "partial worlds").

stdout carries exactly one JSON line, written last:
    {"ok": true, "bootstrap_port": .., "rank_ip": .., "rank_port": ..}
    {"ok": false, "error_type": "<module.Class>", "error": "<str(exc)>"}
Everything else (SGLang's logging at INFO, tracebacks) goes to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torchvision_schemas

torchvision_schemas.declare()

logger = logging.getLogger("sglang_harness.rank")

# A small Llama: ServerArgs resolves a model config from model_path; no weights are read.
_MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "torch_dtype": "float32",
}


class Topology:
    """The prefill topology of the config and this rank's cell in it, in SGLang's layout."""

    def __init__(self, config: dict[str, Any]) -> None:
        sizes, cell = config["sizes"], config["cell"]
        self.dp, self.cp, self.tp, self.pp = (int(sizes[k]) for k in ("dp", "cp", "tp", "pp"))
        self.dp_rank, self.cp_rank, self.tp_rank, self.pp_rank = (
            int(cell[k]) for k in ("dp", "cp", "tp", "pp")
        )
        self.dp_kind = config.get("dp_kind", "attention")
        if self.dp_kind not in ("attention", "system"):
            raise ValueError(f"dp_kind must be 'attention' or 'system', not {self.dp_kind!r}")
        self.attention_dp = self.dp_kind == "attention"

    @property
    def attn_dp(self) -> int:
        return self.dp if self.attention_dp else 1

    @property
    def attn_dp_rank(self) -> int:
        return self.dp_rank if self.attention_dp else 0

    @property
    def tp_size(self) -> int:
        """SGLang's --tp-size: attention dp x cp x tp (dp only with dp attention)."""
        return self.attn_dp * self.cp * self.tp

    @property
    def global_tp_rank(self) -> int:
        """tp_rank == (attn_dp_rank * attn_cp_size + attn_cp_rank) * attn_tp_size + attn_tp_rank."""
        return (self.attn_dp_rank * self.cp + self.cp_rank) * self.tp + self.tp_rank

    @property
    def spawn_world_rank(self) -> int:
        """The rank SGLang's launcher gives this cell in its (per dp replica) world."""
        return self.pp_rank * self.tp_size + self.global_tp_rank

    def is_sglang_world(self, world_size: int, rank: int) -> bool:
        """True when the gloo world is exactly the world SGLang itself would launch."""
        return world_size == self.tp_size * self.pp and rank == self.spawn_world_rank


def main(argv: list[str]) -> int:
    result_fd = os.dup(1)
    os.dup2(2, 1)  # whatever SGLang prints goes to stderr; stdout carries the result only
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
        force=True,
    )
    try:
        config = json.loads(Path(argv[1]).read_text())
        result = run(config)
    except Exception as exc:  # the harness reports every failure as data
        traceback.print_exc()
        result = {
            "ok": False,
            "error_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "error": str(exc),
        }
    with os.fdopen(result_fd, "w") as out:
        out.write(json.dumps(result) + "\n")
    return 0


def run(config: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("SGLANG_HOST_IP", config.get("host_ip", "127.0.0.1"))

    # As run_scheduler_process does: plugins first, so their hooks see everything after.
    from sglang.srt.plugins import load_plugins

    load_plugins()

    import torch.distributed as dist

    topology = Topology(config)
    world_size, rank = int(config["world_size"]), int(config["rank"])
    manager = None
    try:
        with tempfile.TemporaryDirectory(prefix="sglang-harness-model-") as model_dir:
            (Path(model_dir) / "config.json").write_text(json.dumps(_MODEL_CONFIG))
            server_args = _server_args(config, topology, model_dir)
            _publish(server_args, topology)
            _init_distributed(config, topology, world_size, rank)
            manager = _kv_manager(server_args, topology)
        return {
            "ok": True,
            "bootstrap_port": manager.bootstrap_port,
            "rank_ip": manager.local_ip,
            "rank_port": manager.rank_port,
        }
    finally:
        if manager is not None:
            manager.server_socket.close(linger=0)
        if dist.is_initialized():
            dist.destroy_process_group()


def _server_args(config: dict[str, Any], topology: Topology, model_dir: str):
    from sglang.srt.server_args import ServerArgs

    nnodes = int(config.get("nnodes", 1))
    dist_init_addr = config.get("dist_init_addr")
    if dist_init_addr is None and nnodes > 1:
        dist_init_addr = f"127.0.0.1:{config['init_port']}"
    return ServerArgs(
        model_path=model_dir,
        skip_tokenizer_init=True,
        device="cpu",
        host="127.0.0.1",
        port=int(config.get("http_port", 30000)),
        tp_size=topology.tp_size,
        pp_size=topology.pp,
        dp_size=topology.dp,
        enable_dp_attention=topology.attention_dp and topology.dp > 1,
        attn_cp_size=topology.cp,
        nnodes=nnodes,
        node_rank=int(config.get("node_rank", 0)),
        dist_init_addr=dist_init_addr,
        disaggregation_mode="prefill",
        disaggregation_bootstrap_port=int(config["bootstrap_port"]),
        page_size=int(config.get("page_size", 16)),
        kv_cache_dtype=config.get("kv_cache_dtype", "auto"),
    )


def _has_runtime_context() -> bool:
    """0.5.16+ keep config and ranks in sglang.srt.runtime_context; older ones in module globals."""
    import importlib.util

    return importlib.util.find_spec("sglang.srt.runtime_context") is not None


def _publish(server_args, topology: Topology) -> None:
    """0.5.16+: publish the config and this process's placement, as run_scheduler_process does."""
    if not _has_runtime_context():
        return  # older releases read module-level state, set in _init_dp_attention
    from sglang.srt import runtime_context

    runtime_context.publish(
        server_args,
        role="scheduler",
        ranks=runtime_context.SpawnRanks(
            world_rank=topology.spawn_world_rank,
            dp_rank=None if topology.attention_dp else topology.dp_rank,
            gpu_id=0,
        ),
    )


def _init_distributed(
    config: dict[str, Any], topology: Topology, world_size: int, rank: int
) -> None:
    from sglang.srt.distributed import parallel_state

    parallel_state.init_distributed_environment(
        world_size=world_size,
        rank=rank,
        distributed_init_method=f"tcp://127.0.0.1:{config['init_port']}",
        local_rank=int(config.get("local_rank", rank)),
        backend="gloo",
        timeout=int(config.get("timeout_seconds", 60)),
    )
    if topology.is_sglang_world(world_size, rank):
        _init_model_parallel(parallel_state, topology)
    else:
        _init_partial_world(parallel_state, topology, world_size)
    _init_dp_attention(topology)


def _init_model_parallel(parallel_state, topology: Topology) -> None:
    """The groups exactly as ModelRunner builds them (the world is the one SGLang would launch)."""
    import inspect

    params = inspect.signature(parallel_state.initialize_model_parallel).parameters
    if "tensor_model_parallel_size" in params:  # up to 0.5.15: widths as arguments
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=topology.tp_size,
            attention_data_parallel_size=topology.attn_dp,
            pipeline_model_parallel_size=topology.pp,
            attention_context_model_parallel_size=topology.cp,
            backend="gloo",
        )
    else:  # 0.5.16+: widths from the published runtime context
        parallel_state.initialize_model_parallel(backend="gloo")


def _init_partial_world(parallel_state, topology: Topology, world_size: int) -> None:
    """A world smaller than the topology: groups of one process that state the cell's ranks.

    SGLang cannot build its model-parallel groups over processes that do not exist, but the KV
    manager only reads this rank's names from them (and keeps the pp group). So each group is a
    real, per-process GroupCoordinator whose width and rank are set to the declared cell.
    """
    if topology.pp > 1 and _has_runtime_context():
        # 0.5.16+ build a PPConsensusStore that talks over the pp group right after registering.
        raise ValueError(
            "the harness runs a partial world (fewer processes than cells) with pp_size 1 only "
            "on SGLang 0.5.16+: give every cell its process, or pp size 1"
        )
    world = parallel_state.get_world_group()
    views = {"pp": (topology.pp, topology.pp_rank)}
    if not _has_runtime_context():
        views |= {
            "tp": (topology.tp_size, topology.global_tp_rank),
            "attn_tp": (topology.tp, topology.tp_rank),
            "attn_cp": (topology.cp, topology.cp_rank),
        }
    built = {}
    for name, (size, rank_in_group) in views.items():
        group = parallel_state.init_model_parallel_group(
            [[r] for r in range(world_size)],
            world.local_rank,
            "gloo",
            use_custom_allreduce=False,
            group_name=f"harness_{name}",
        )
        group.world_size, group.rank_in_group = size, rank_in_group
        built[name] = group
        logger.info(
            "Partial world: group %s states width %d, rank %d for this process.",
            name,
            size,
            rank_in_group,
        )
    if _has_runtime_context():
        from sglang.srt.runtime_context import get_parallel

        get_parallel().override_permanently(pp_group=built["pp"])
    else:
        parallel_state._PP = built["pp"]
        parallel_state._TP = built["tp"]
        parallel_state._ATTN_TP = built["attn_tp"]
        parallel_state._ATTN_CP = built["attn_cp"]


def _init_dp_attention(topology: Topology) -> None:
    """Up to 0.5.15: the module-level dp-attention ranks initialize_dp_attention would set.

    (initialize_dp_attention itself also sizes a GPU gather buffer from the model config, which
    a CPU run without weights has no use for; the ranks come from SGLang's own functions.)
    """
    if _has_runtime_context():
        return  # 0.5.16+: publish() wrote them into get_parallel()
    from sglang.srt.layers import dp_attention

    enable = topology.attention_dp and topology.dp > 1
    _, _, attn_dp_rank = dp_attention.compute_dp_attention_world_info(
        enable, topology.global_tp_rank, topology.tp_size, topology.dp, topology.cp
    )
    _, _, local_attn_dp_rank = dp_attention.compute_dp_attention_local_info(
        enable, topology.global_tp_rank, topology.tp_size, topology.dp, None
    )
    dp_attention._ENABLE_DP_ATTENTION_FLAG = enable
    dp_attention._ATTN_DP_RANK = attn_dp_rank
    dp_attention._ATTN_DP_SIZE = topology.dp if enable else 1
    dp_attention._LOCAL_ATTN_DP_RANK = local_attn_dp_rank
    dp_attention._LOCAL_ATTN_DP_SIZE = topology.dp if enable else 1


def _kv_manager(server_args, topology: Topology):
    from sglang.srt.disaggregation.base.conn import KVArgs
    from sglang.srt.disaggregation.common.conn import CommonKVManager
    from sglang.srt.disaggregation.utils import DisaggregationMode

    kv_args = _kv_args(KVArgs, server_args, topology)
    return CommonKVManager(kv_args, DisaggregationMode.PREFILL, server_args)


def _kv_args(kv_args_class, server_args, topology: Topology):
    """A KVArgs with every field the release declares: no KV buffers, this rank's placement."""
    known = {
        "engine_rank": topology.global_tp_rank,
        "kv_cache_dtype_str": server_args.kv_cache_dtype,
        "page_size": server_args.page_size,
        "pp_rank": topology.pp_rank,
        "system_dp_rank": 0 if topology.attention_dp else topology.dp_rank,
        "prefill_start_layer": 0,
        "gpu_id": 0,
        "kv_head_num": _MODEL_CONFIG["num_key_value_heads"] // max(topology.tp, 1) or 1,
        "total_kv_head_num": _MODEL_CONFIG["num_key_value_heads"],
        "state_type": "none",
        "is_hybrid_mla_backend": False,
        "kv_buf_groups": 1,
        "hidden_kv_layers": _MODEL_CONFIG["num_hidden_layers"],
    }
    kv_args = kv_args_class()
    annotations: dict[str, Any] = {}
    for cls in reversed(kv_args_class.__mro__):
        annotations.update(getattr(cls, "__annotations__", {}))
    for name, annotation in annotations.items():
        if name in known:
            value = known[name]
        elif hasattr(kv_args_class, name):
            continue  # the class default
        elif str(annotation).startswith(("List", "list")):
            value = []
        else:
            value = None
        setattr(kv_args, name, value)
    return kv_args


if __name__ == "__main__":
    sys.exit(main(sys.argv))
