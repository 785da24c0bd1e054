"""Which build of each client a measurement ran: its compiled parts, found in the child.

A peer measured without its compiled code is a different, slower program, and
a ratio against it says nothing about the peer. Each child reports, after its
run, what it had loaded (:func:`probe`): for every component of its client,
the module's file, whether that file is a compiled extension, and whether the
client's hot path actually uses it. The parent checks the report against what
the client's column claims (:func:`problems`): ``requires`` components must be
compiled and in use, ``forbids`` components must not be in use (a column
measured *without* them, such as ``blockws-pure`` or websocket-client without
wsaccel).

Components:

* ``blockws-speedups``: ``blockws._speedups`` (C masking), in use when
  ``blockws.frames.apply_mask`` is its function;
* ``websockets-speedups``: ``websockets.speedups`` (C masking), in use when
  ``websockets.frames.apply_mask`` is its function;
* ``wsaccel``: ``wsaccel.xormask`` and ``wsaccel.utf8validator``, in use when
  websocket-client imported them (it does whenever they import);
* ``picows``: ``picows.picows``, the Cython core (picows has no pure-Python
  fallback, so it is always compiled when it imports);
* ``aiofastnet``: the transport under picows' connection (the child records
  its type); picows falls back to asyncio's own transport without it;
* ``aiohttp-speedups``: ``aiohttp._websocket.reader_c`` (its Cython frame
  reader) and ``aiohttp._websocket.mask``, in use when aiohttp's
  ``WebSocketReader`` and ``websocket_mask`` are theirs (``benchmarks/deflate.py``).
"""

from __future__ import annotations

import importlib.machinery
import sys
from typing import Any

#: What each client's column needs (``requires``) and must run without (``forbids``).
REQUIRES: dict[str, tuple[str, ...]] = {
    "blockws-cb": ("blockws-speedups",),
    "blockws-recv": ("blockws-speedups",),
    "websocket-client+wsaccel": ("wsaccel",),
    "websockets-sync": ("websockets-speedups",),
    "picows": ("picows", "aiofastnet"),
    # benchmarks/deflate.py's clients
    "blockws": ("blockws-speedups",),
    "websockets": ("websockets-speedups",),
    "aiohttp": ("aiohttp-speedups",),
}
FORBIDS: dict[str, tuple[str, ...]] = {
    "blockws-pure": ("blockws-speedups",),
    "websocket-client": ("wsaccel",),
}

#: The components a client's child looks for (what it requires or forbids).
COMPONENTS: dict[str, tuple[str, ...]] = {
    name: REQUIRES.get(name, ()) + FORBIDS.get(name, ()) for name in {*REQUIRES, *FORBIDS}
}


def is_compiled(path: str | None) -> bool:
    """Whether ``path`` names a compiled extension module (``.so``, ``.pyd``)."""
    return bool(path) and any(str(path).endswith(s) for s in importlib.machinery.EXTENSION_SUFFIXES)


def _module(name: str) -> dict[str, Any]:
    mod = sys.modules.get(name)
    path = getattr(mod, "__file__", None) if mod is not None else None
    return {"module": name, "loaded": mod is not None, "file": path, "compiled": is_compiled(path)}


def _combine(parts: list[dict[str, Any]], in_use: bool) -> dict[str, Any]:
    return {
        "module": ", ".join(p["module"] for p in parts),
        "loaded": all(p["loaded"] for p in parts),
        "file": ", ".join(str(p["file"]) for p in parts if p["file"]) or None,
        "compiled": all(p["compiled"] for p in parts),
        "in_use": in_use,
    }


def _blockws_speedups() -> dict[str, Any]:
    frames = sys.modules.get("blockws.frames")
    in_use = bool(
        frames is not None
        and getattr(frames, "c_apply_mask", None) is not None
        and getattr(frames, "apply_mask", None) is getattr(frames, "c_apply_mask", None)
    )
    return _combine([_module("blockws._speedups")], in_use)


def _websockets_speedups() -> dict[str, Any]:
    frames = sys.modules.get("websockets.frames")
    speedups = sys.modules.get("websockets.speedups")
    # By identity: the C function's __module__ says "websocket.speedups" (sic).
    fn = getattr(frames, "apply_mask", None)
    in_use = fn is not None and fn is getattr(speedups, "apply_mask", None)
    return _combine([_module("websockets.speedups")], in_use)


def _wsaccel() -> dict[str, Any]:
    parts = [_module("wsaccel.xormask"), _module("wsaccel.utf8validator")]
    abnf = sys.modules.get("websocket._abnf")
    in_use = all(p["loaded"] for p in parts) and hasattr(abnf, "XorMaskerSimple")
    return _combine(parts, in_use)


def _aiohttp_speedups() -> dict[str, Any]:
    parts = [_module("aiohttp._websocket.reader_c"), _module("aiohttp._websocket.mask")]
    reader, reader_c = (sys.modules.get(f"aiohttp._websocket.{m}") for m in ("reader", "reader_c"))
    helpers, mask = (sys.modules.get(f"aiohttp._websocket.{m}") for m in ("helpers", "mask"))
    in_use = (
        reader_c is not None
        and getattr(reader, "WebSocketReader", None) is getattr(reader_c, "WebSocketReader", 0)
        and mask is not None
        and getattr(helpers, "websocket_mask", None) is getattr(mask, "_websocket_mask_cython", 0)
    )
    return _combine(parts, bool(in_use))


def _picows() -> dict[str, Any]:
    part = _module("picows.picows")
    return _combine([part], part["loaded"])


def _aiofastnet(transport_type: type | None) -> dict[str, Any]:
    """``transport_type``: the class of the transport under picows' connection."""
    if transport_type is None:
        return {"module": "aiofastnet", "loaded": "aiofastnet" in sys.modules, "file": None,
                "compiled": False, "in_use": False}  # fmt: skip
    modname = transport_type.__module__
    part = _module(modname)
    return _combine([part], modname.split(".")[0] == "aiofastnet")


def probe(
    client: str, transport_type: type | None = None, details: dict[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """In the child, after its run: what each component of ``client`` was, by name.

    ``details``: what else the client said about itself (picows: its masking
    implementation), kept under each component whose name begins the key.
    """
    out: dict[str, dict[str, Any]] = {}
    for comp in COMPONENTS.get(client, ()):
        if comp == "blockws-speedups":
            out[comp] = _blockws_speedups()
        elif comp == "websockets-speedups":
            out[comp] = _websockets_speedups()
        elif comp == "wsaccel":
            out[comp] = _wsaccel()
        elif comp == "picows":
            out[comp] = _picows()
        elif comp == "aiofastnet":
            out[comp] = _aiofastnet(transport_type)
        elif comp == "aiohttp-speedups":
            out[comp] = _aiohttp_speedups()
    for key, value in (details or {}).items():
        comp = key.split()[0]
        if comp in out:
            out[comp][key] = value
    return out


def problems(client: str, build: dict[str, dict[str, Any]] | None) -> list[str]:
    """What is wrong with one run's ``build`` report for ``client``'s column; [] if nothing."""
    out = []
    build = build or {}
    for comp in REQUIRES.get(client, ()):
        b = build.get(comp)
        if b is None:
            out.append(f"{comp}: not reported")
        elif not b.get("loaded"):
            out.append(f"{comp}: not loaded ({b.get('module')})")
        elif not b.get("compiled"):
            out.append(f"{comp}: not a compiled build ({b.get('file')})")
        elif not b.get("in_use"):
            out.append(f"{comp}: loaded but not used by the client")
    for comp in FORBIDS.get(client, ()):
        b = build.get(comp)
        if b is None:
            out.append(f"{comp}: not reported")
        elif b.get("in_use"):
            out.append(f"{comp}: in use, but this column is measured without it")
    return out


def summary(client: str, build: dict[str, dict[str, Any]] | None) -> str:
    """One line for the report header: each component, compiled or not, in use or not."""
    if not COMPONENTS.get(client):
        return "nothing compiled to check"
    parts = []
    for comp, b in (build or {}).items():
        if not b.get("in_use"):
            state = "not used"
        elif b.get("compiled"):
            state = "compiled, in use"
        else:
            state = "in use, NOT compiled"
        where = b.get("file") or b.get("module")
        extra = "".join(f", {k.split(' ', 1)[1]} {v}" for k, v in b.items() if " " in k)
        parts.append(f"{comp} {state} ({where}{extra})")
    return "; ".join(parts) or "nothing reported"
