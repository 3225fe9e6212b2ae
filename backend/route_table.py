"""Measured route tables: which kernel is fastest per layer shape and M, on one adapter.

`python -m executorch_wgpu tune` writes one (JSON); `WebGPUPartitioner(route_table=path)`
reads it, and preprocess bakes the matching entry into each layer's blob
(RouteSource "route-table", the table's name, adapter and date in Route.table).
A shape the table does not list falls back to the default rule.

A table that names its adapter's kind ("adapter_class", as tune writes it) gives
the routes of adapters of that kind only, beside the default rule's for the rest
(Q4Linear.adapter_routes); a table without one gives every adapter's routes.

File format (version 1):
    {"format": "executorch_wgpu-route-table", "version": 1,
     "name": str, "adapter": str, "date": str, "command": str,
     "adapter_class": "discrete-gpu" | "integrated-gpu" | "cpu",         # optional
     "entries": [{"K": int, "N": int, "group_size": int,
                  "decode": kernel,                                  # M == 1
                  "prefill": [{"m_max": int, "kernel": kernel}, ...], # M > 1, by increasing m_max
                  "measured_us": {"<M>": {kernel: µs, ...}, ...}}]}  # the evidence, not read back
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, NoReturn, Optional, Tuple

from executorch_wgpu.backend.serialization.blob import ADAPTER_CLASSES, Route
from executorch_wgpu.shaders.registry import DECODE_KERNELS, PREFILL_KERNELS

FORMAT = "executorch_wgpu-route-table"
VERSION = 1

# Upper bound of the last prefill bucket: any M (tune's tables and the default rule both end with it).
LAST_BUCKET_M_MAX = 2**62


class RouteTableError(ValueError):
    """A route table file that cannot be used; the message names the file and the problem."""


def describe_buckets(prefill: Tuple[Tuple[int, str], ...]) -> str:
    """'M<=8 regtiled, M>8 shmem': the last bucket serves every larger M too, so its bound is not shown."""
    parts = [f"M<={m} {kernel}" for m, kernel in prefill[:-1]]
    above = prefill[-2][0] if len(prefill) > 1 else 1
    parts.append(f"M>{above} {prefill[-1][1]}")
    return ", ".join(parts)


@dataclass(frozen=True)
class RouteTableEntry:
    K: int
    N: int
    group_size: int
    decode: str
    prefill: Tuple[Tuple[int, str], ...]       # ((m_max, kernel), ...)
    measured_us: Dict[str, Dict[str, float]] = field(default_factory=dict, compare=False)


@dataclass
class RouteTable:
    name: str
    adapter: str
    date: str
    command: str = ""
    entries: List[RouteTableEntry] = field(default_factory=list)
    adapter_class: Optional[str] = None   # the kind of adapter its routes are for; None: any

    def describe(self) -> str:
        return f"{self.name} ({self.adapter}, {self.date})"

    def entry_for(self, k: int, n: int, group_size: int) -> Optional[RouteTableEntry]:
        for e in self.entries:
            if (e.K, e.N, e.group_size) == (k, n, group_size):
                return e
        return None

    def route_for(self, k: int, n: int, group_size: int) -> Optional[Route]:
        """The measured route of a layer shape, or None when the table has no entry for it."""
        e = self.entry_for(k, n, group_size)
        if e is None:
            return None
        return Route(
            decode_kernel=e.decode,
            prefill_kernel=e.prefill[-1][1],
            source="route-table",
            skinny_max_m=0,
            shmem_min_mn=0,
            reason=(f"measured fastest on {self.adapter}: decode -> {e.decode}; "
                    f"prefill {describe_buckets(e.prefill)} (K={k}, N={n})"),
            table=self.describe(),
            prefill_buckets=tuple(e.prefill),
        )

    def without_evidence(self) -> "RouteTable":
        """The same routes without the measured timings (what lowering needs, and all it needs)."""
        entries = [replace(e, measured_us={}) for e in self.entries]
        return RouteTable(self.name, self.adapter, self.date, self.command, entries, self.adapter_class)

    # ---- file I/O ---------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "name": self.name, "adapter": self.adapter,
            "date": self.date, "command": self.command,
            **({"adapter_class": self.adapter_class} if self.adapter_class else {}),
            "entries": [
                {"K": e.K, "N": e.N, "group_size": e.group_size, "decode": e.decode,
                 "prefill": [{"m_max": m, "kernel": k} for m, k in e.prefill], "measured_us": e.measured_us}
                for e in self.entries
            ],
        }

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def from_json(cls, data: dict, source: str = "route table") -> "RouteTable":
        def fail(what: str) -> NoReturn:
            raise RouteTableError(f"{source}: {what}")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            fail(f"not a route table (its 'format' is not {FORMAT!r})")
        if data.get("version") != VERSION:
            fail(f"route table version {data.get('version')!r}; this executorch_wgpu reads version {VERSION}")
        entries = []
        try:
            for i, e in enumerate(data["entries"]):
                k, n, gs = int(e["K"]), int(e["N"]), int(e["group_size"])
                prefill = tuple((int(b["m_max"]), str(b["kernel"])) for b in e["prefill"])
                decode = str(e["decode"])
                if decode not in DECODE_KERNELS:
                    fail(f"entry {i}: decode kernel {decode!r} is not one of {DECODE_KERNELS}")
                if not prefill or any(kern not in PREFILL_KERNELS for _, kern in prefill):
                    fail(f"entry {i}: prefill buckets {prefill} must name kernels of {PREFILL_KERNELS}")
                bounds = [m for m, _ in prefill]
                if any(b <= a for a, b in zip(bounds, bounds[1:])) or bounds[0] < 2:
                    fail(f"entry {i}: prefill bucket bounds {bounds} must be >= 2 and strictly increasing")
                entries.append(RouteTableEntry(k, n, gs, decode, prefill, e.get("measured_us", {})))
            adapter_class = data.get("adapter_class")
            if adapter_class is not None and adapter_class not in ADAPTER_CLASSES:
                fail(f"adapter_class {adapter_class!r} is not one of {ADAPTER_CLASSES}")
            return cls(str(data["name"]), str(data["adapter"]), str(data["date"]), str(data.get("command", "")),
                       entries, adapter_class)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, RouteTableError):
                raise
            fail(f"malformed entry ({type(e).__name__}: {e})")

    @classmethod
    def load(cls, path) -> "RouteTable":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise RouteTableError(f"cannot read route table {path}: {e}") from e
        except json.JSONDecodeError as e:
            raise RouteTableError(f"route table {path} is not valid JSON: {e}") from e
        return cls.from_json(data, source=f"route table {path}")
