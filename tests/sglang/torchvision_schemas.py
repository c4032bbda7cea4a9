"""Declare the two torchvision operator schemas that CPU torch cannot get from torchvision.

Import this module before anything imports torchvision (SGLang reaches it through transformers).

Why: the only torchvision wheel that matches torch 2.13.0 (0.28.0) is a CUDA build. Its `_C`
extension needs libtorch_cuda.so, so against the CPU torch it fails to load and torchvision runs
without its ops (`torchvision.extension._has_ops()` is False), which it supports. One module does
not expect that: `torchvision/_meta_registrations.py` calls
`torch.library.register_fake("torchvision::nms")` and `("torchvision::qnms")` unconditionally,
and `register_fake` refuses an operator nobody declared
(`RuntimeError: operator torchvision::nms does not exist`).

So we declare the two schemas exactly as the unloadable extension would have (its `m.def` lines,
same text as `torch.ops.torchvision.nms` is called with in `torchvision/ops/boxes.py`). Nothing
is implemented: calling either op still raises, as it would with any op-less torchvision. No
stub module, no edit of SGLang or torchvision. The library object must stay alive for the
declarations to stay registered, hence the module-level name.
"""

from __future__ import annotations

import torch

__all__ = ["SCHEMAS", "declare"]

SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_LIBRARY: torch.library.Library | None = None


def declare() -> None:
    """Declare `torchvision::nms` and `torchvision::qnms` once per process (idempotent)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    missing = [s for s in SCHEMAS if not _declared(s.split("(", 1)[0])]
    if not missing:
        return
    library = torch.library.Library("torchvision", "DEF")
    for schema in missing:
        library.define(schema)
    _LIBRARY = library


def _declared(name: str) -> bool:
    """True when `torchvision::<name>` has a schema (its extension loaded, or we declared it)."""
    return bool(torch._C._jit_get_schemas_for_operator(f"torchvision::{name}"))
