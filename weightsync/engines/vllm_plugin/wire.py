"""The JSON that travels in vLLM's ``/init_weight_transfer_engine`` and ``/update_weights``.

Pure Python on purpose: the trainer-side adapter builds these, the backend inside vLLM parses
them, and neither side needs the other's heavy imports. vLLM hands the dicts to
``init_info_cls(**d)`` / ``update_info_cls(**d)``, so the field names are the wire format.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TRANSPORTS = ("broadcast", "shm")
DTYPES = (
    "bfloat16",
    "float16",
    "float32",
    "float64",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
)


@dataclass
class InitInfo:
    """How the engine joins the transport; sent once per trainer connection."""

    transport: str
    timeout_s: float = 300.0
    record_digests: bool = False
    """Keep a sha256 of every tensor handed to the model, for check_weights."""
    # broadcast: a gloo group built like SGLang's init_custom_process_group.
    master_address: str = ""
    master_port: int = 0
    world_size: int = 0
    rank: int = 0
    group_name: str = ""
    # shm: a persistent ring of POSIX shared-memory slots, named or given as paths.
    slot_names: list[str] = field(default_factory=list)
    slot_bytes: int = 0

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport={self.transport!r}: allowed {TRANSPORTS}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s!r}: must be > 0")
        if self.transport == "broadcast":
            if not (self.master_address and self.master_port > 0 and self.group_name):
                raise ValueError("broadcast needs master_address, master_port and group_name")
            if not 0 < self.rank < self.world_size:
                raise ValueError(
                    f"rank={self.rank} world_size={self.world_size}: the "
                    "trainer is rank 0, engines take 1..world_size-1"
                )
        elif not self.slot_names or self.slot_bytes <= 0:
            raise ValueError("shm needs slot_names and slot_bytes > 0")


@dataclass
class UpdateInfo:
    """One bucket: one flat buffer per dtype, tensors laid out at element offsets.

    ``groups`` items: ``{"dtype", "numel", "byte_offset", "entries": [[name, shape,
    offset, numel], ...]}``; ``byte_offset`` places the group inside a shm slot and is
    ignored by broadcast, which sends each group as its own tensor, in order.
    """

    groups: list[dict]
    bucket: int = 0
    slot: int = -1

    def __post_init__(self) -> None:
        for g in self.groups:
            if g.get("dtype") not in DTYPES:
                raise ValueError(f"bucket {self.bucket}: dtype {g.get('dtype')!r} not in {DTYPES}")
            for name, shape, offset, numel in g["entries"]:
                n = 1
                for s in shape:
                    n *= int(s)
                if n != numel or offset < 0 or offset + numel > g["numel"]:
                    raise ValueError(
                        f"bucket {self.bucket}: entry {name!r} shape={shape} "
                        f"offset={offset} numel={numel} does not fit its group"
                    )
