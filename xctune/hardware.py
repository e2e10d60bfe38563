"""Hardware descriptions: GPUs, links between devices, and clusters of GPUs.

Units used throughout (kept explicit because vendors mix them freely):

* Memory capacity is in **bytes**. ``GiB = 1024**3``. Vendors market device
  memory as "24 GB" but the card exposes ~24 GiB (nvidia-smi on an RTX 4090
  reports 24564 MiB), so presets use GiB-based byte counts for marketed "GB"
  capacities. In a ``--gpus`` spec, ``GB`` means 1e9 bytes, ``GiB``/``G`` mean
  1024**3 bytes.
* Compute throughput is stored as dense (no structured sparsity) peak
  **TFLOP/s** per dtype in ``GPUSpec.tflops``; ``GPUSpec.peak_flops`` returns
  FLOP/s. ``fp32`` is plain FP32 CUDA-core throughput (PyTorch does not use
  TF32 for matmul by default); ``fp16``/``bf16`` are tensor-core throughput
  with FP32 accumulate, which is what PyTorch's matmuls use. On GeForce cards
  that is half of the headline FP16-accumulate figure.
* Bandwidth is stored in **GB/s = 1e9 bytes/s** (vendors' unit) and exposed
  in bytes/s through the ``mem_bw`` / ``bandwidth`` properties. Link bandwidth
  is per direction.
* Link latency is stored in **microseconds** per transfer.

Every preset carries a ``source`` naming the datasheet or specification its
numbers come from, so a reader can check them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Context, Decimal, InvalidOperation

from xctune.errors import BadInput

__all__ = [
    "GiB",
    "GPUSpec",
    "LinkSpec",
    "Cluster",
    "GPU_PRESETS",
    "LINK_PRESETS",
    "NETWORK_PRESETS",
    "DEFAULT_GPU_LINK",
    "MAX_GPUS",
    "parse_gpus",
    "parse_nodes",
    "NodeSpec",
    "make_cluster",
]

GiB = 1024**3
MiB = 1024**2

#: Upper bound on the number of GPUs in one ``--gpus`` spec. It keeps the
#: search space of the tuner bounded and stops "10000000x24GiB" from building
#: a huge tuple.
MAX_GPUS = 64

#: Largest memory accepted for one generic GPU (1 PiB). Far beyond any real
#: device; it only rejects typos whose byte counts would overflow float maths.
_MAX_GPU_BYTES = 1024**5

DTYPES = ("fp32", "fp16", "bf16")

# Spellings that callers (and torch) commonly use for the three dtypes.
_DTYPE_ALIASES = {
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "torch.float32": "fp32",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "torch.float16": "fp16",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "torch.bfloat16": "bf16",
}


def _canonical_dtype(dtype: object) -> str | None:
    if not isinstance(dtype, str):
        return None
    return _DTYPE_ALIASES.get(dtype.strip().lower())


class _FrozenMapping(Mapping):
    """Read-only, hashable, picklable dict wrapper.

    ``types.MappingProxyType`` would be read-only too, but it cannot be
    pickled, and clusters may be sent to worker processes.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, float]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> float:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return repr(self._data)

    def __reduce__(self):
        return (_FrozenMapping, (self._data,))


def _positive_finite(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


@dataclass(frozen=True)
class GPUSpec:
    """One GPU model: memory, dense peak throughput per dtype, memory bandwidth."""

    name: str
    memory_bytes: int
    tflops: Mapping[str, float]
    mem_bw_gbs: float
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.memory_bytes, int) or isinstance(self.memory_bytes, bool) \
                or self.memory_bytes <= 0:
            raise BadInput(f"GPU {self.name!r}: memory_bytes must be a positive integer, "
                           f"got {self.memory_bytes!r}")
        tflops = dict(self.tflops)
        if not tflops:
            raise BadInput(f"GPU {self.name!r}: tflops must list at least one dtype")
        for dtype, value in tflops.items():
            if dtype not in DTYPES:
                raise BadInput(f"GPU {self.name!r}: unknown dtype {dtype!r} in tflops; "
                               f"known: {', '.join(DTYPES)}")
            if not _positive_finite(value):
                raise BadInput(f"GPU {self.name!r}: tflops[{dtype!r}] must be a positive "
                               f"number, got {value!r}")
        if not _positive_finite(self.mem_bw_gbs):
            raise BadInput(f"GPU {self.name!r}: mem_bw_gbs must be a positive number, "
                           f"got {self.mem_bw_gbs!r}")
        # Frozen dataclass: a shared preset must not be mutable through its dict.
        object.__setattr__(self, "tflops", _FrozenMapping(tflops))

    def supports(self, dtype: str) -> bool:
        """True if the GPU has a listed throughput for ``dtype`` ("fp32", "fp16", "bf16")."""
        canon = _canonical_dtype(dtype)
        return canon is not None and canon in self.tflops

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype``; BadInput if the GPU does not support it."""
        canon = _canonical_dtype(dtype)
        if canon is None or canon not in self.tflops:
            raise BadInput(f"GPU {self.name!r} does not support dtype {dtype!r}; "
                           f"supported: {', '.join(sorted(self.tflops))}")
        return self.tflops[canon] * 1e12

    @property
    def mem_bw(self) -> float:
        """Memory bandwidth in bytes/s."""
        return self.mem_bw_gbs * 1e9


@dataclass(frozen=True)
class LinkSpec:
    """A data path between two devices: per-direction bandwidth plus fixed latency."""

    name: str
    bandwidth_gbs: float
    latency_us: float
    source: str

    def __post_init__(self) -> None:
        if not _positive_finite(self.bandwidth_gbs):
            raise BadInput(f"link {self.name!r}: bandwidth_gbs must be a positive number, "
                           f"got {self.bandwidth_gbs!r}")
        if not (_positive_finite(self.latency_us) or self.latency_us == 0):
            raise BadInput(f"link {self.name!r}: latency_us must be a non-negative number, "
                           f"got {self.latency_us!r}")

    @property
    def bandwidth(self) -> float:
        """Per-direction bandwidth in bytes/s."""
        return self.bandwidth_gbs * 1e9

    def transfer_seconds(self, nbytes: int, achieved: float = 1.0) -> float:
        """Time to move ``nbytes`` over this link: latency + nbytes / (bandwidth * achieved).

        ``achieved`` is the fraction of the datasheet rate a copy reaches on this path (the cost
        model passes its calibrated or assumed factor; 1.0 is the theoretical rate).
        Moving nothing costs nothing (no transfer is issued), hence 0.0 for 0 bytes.
        """
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
        if not 0 < achieved <= 1:
            raise ValueError(f"achieved fraction must be in (0, 1], got {achieved!r}")
        if nbytes == 0:
            return 0.0
        return self.latency_us * 1e-6 + nbytes / (self.bandwidth * achieved)


# --------------------------------------------------------------------------
# GPU presets
# --------------------------------------------------------------------------

_GA102_WP = ("NVIDIA Ampere GA102 GPU Architecture whitepaper, "
             "https://www.nvidia.com/content/PDF/nvidia-ampere-ga-102-gpu-architecture-whitepaper-v2.pdf")
_ADA_WP = ("NVIDIA Ada GPU Architecture whitepaper, "
           "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf")
_A100_DS = ("NVIDIA A100 Tensor Core GPU datasheet, "
            "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
            "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf")


def _gpu(name: str, gib: int, fp32: float, fp16: float, bf16: float | None,
         bw_gbs: float, source: str) -> GPUSpec:
    tflops = {"fp32": fp32, "fp16": fp16}
    if bf16 is not None:
        tflops["bf16"] = bf16
    # Marketed "N GB" capacity is N GiB of addressable memory (see module docstring).
    return GPUSpec(name=name, memory_bytes=gib * GiB, tflops=tflops,
                   mem_bw_gbs=bw_gbs, source=source)


GPU_PRESETS: dict[str, GPUSpec] = {
    g.name: g
    for g in (
        # GA106. fp16/bf16 = tensor FP16/BF16 with FP32 accumulate, dense
        # (GeForce Ampere runs FP32-accumulate at half the FP16-accumulate rate,
        # as tabulated for GA102 in the whitepaper).
        _gpu("rtx3060", 12, 12.7, 25.6, 25.6, 360,
             "NVIDIA GeForce RTX 3060 specifications, "
             "https://www.nvidia.com/en-us/geforce/graphics-cards/30-series/rtx-3060-3060ti/ "
             "(tensor rates per " + _GA102_WP + ")"),
        _gpu("rtx3090", 24, 35.6, 71, 71, 936, _GA102_WP),
        _gpu("rtx4090", 24, 82.6, 165.2, 165.2, 1008, _ADA_WP),
        _gpu("a10", 24, 31.2, 125, 125, 600,
             "NVIDIA A10 Tensor Core GPU datasheet, "
             "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/a10-datasheet.pdf"),
        _gpu("l40s", 48, 91.6, 362.05, 362.05, 864,
             "NVIDIA L40S GPU datasheet, "
             "https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413"),
        # Volta predates bf16: no "bf16" key, so supports("bf16") is False.
        _gpu("v100-32g", 32, 15.7, 125, None, 900,
             "NVIDIA Tesla V100 GPU datasheet (SXM2), "
             "https://images.nvidia.com/content/technologies/volta/pdf/"
             "volta-v100-datasheet-update-us-1165301-r5.pdf"),
        _gpu("a100-40g", 40, 19.5, 312, 312, 1555, _A100_DS),
        _gpu("a100-80g", 80, 19.5, 312, 312, 2039, _A100_DS + " (SXM)"),
        _gpu("h100-80g", 80, 67, 989.4, 989.4, 3350,
             "NVIDIA H100 Tensor Core GPU datasheet (SXM5), "
             "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"),
    )
}

# A bare memory size ("24GiB") gets the compute/bandwidth of this class.
_GENERIC_REFERENCE = GPU_PRESETS["rtx3090"]
_GENERIC_SOURCE = ("generic GPU: memory as given; throughput and bandwidth of an "
                   "RTX 3090 (assumption)")


# --------------------------------------------------------------------------
# Link presets
# --------------------------------------------------------------------------

_PCIE_LATENCY_US = 10.0    # cudaMemcpy launch + DMA setup, order of magnitude
_NVLINK_LATENCY_US = 3.0   # peer copy over NVLink, order of magnitude
_DISK_LATENCY_US = 100.0   # NVMe/SATA read request + page-cache miss

LINK_PRESETS: dict[str, LinkSpec] = {
    lk.name: lk
    for lk in (
        # x16 per direction: lanes * GT/s * 128b/130b encoding / 8 bits.
        LinkSpec("pcie3", 15.75, _PCIE_LATENCY_US,
                 "PCI Express Base Specification 3.0 (PCI-SIG), x16 8 GT/s 128b/130b, "
                 "https://pcisig.com/specifications"),
        LinkSpec("pcie4", 31.5, _PCIE_LATENCY_US,
                 "PCI Express Base Specification 4.0 (PCI-SIG), x16 16 GT/s 128b/130b, "
                 "https://pcisig.com/specifications"),
        LinkSpec("pcie5", 63.0, _PCIE_LATENCY_US,
                 "PCI Express Base Specification 5.0 (PCI-SIG), x16 32 GT/s 128b/130b, "
                 "https://pcisig.com/specifications"),
        # Vendors quote NVLink as total bidirectional bandwidth; we store half.
        LinkSpec("nvlink2", 150.0, _NVLINK_LATENCY_US,
                 "NVIDIA Tesla V100 GPU datasheet: NVLink 300 GB/s bidirectional, "
                 "https://images.nvidia.com/content/technologies/volta/pdf/"
                 "volta-v100-datasheet-update-us-1165301-r5.pdf"),
        LinkSpec("nvlink3", 300.0, _NVLINK_LATENCY_US,
                 "NVIDIA A100 Tensor Core GPU datasheet: NVLink 600 GB/s bidirectional, "
                 "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
                 "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"),
        LinkSpec("nvlink4", 450.0, _NVLINK_LATENCY_US,
                 "NVIDIA H100 Tensor Core GPU datasheet: NVLink 900 GB/s bidirectional, "
                 "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"),
        # Disk read paths: sequential read of a typical drive on that interface.
        LinkSpec("nvme-pcie3", 3.5, _DISK_LATENCY_US,
                 "typical PCIe 3.0 x4 NVMe SSD sequential read, e.g. Samsung 970 EVO Plus "
                 "data sheet (3,500 MB/s), https://semiconductor.samsung.com/consumer-storage/"
                 "internal-ssd/970evoplus/"),
        LinkSpec("nvme-pcie4", 7.0, _DISK_LATENCY_US,
                 "typical PCIe 4.0 x4 NVMe SSD sequential read, e.g. Samsung 980 PRO "
                 "data sheet (7,000 MB/s), https://semiconductor.samsung.com/consumer-storage/"
                 "internal-ssd/980pro/"),
        LinkSpec("sata-ssd", 0.55, _DISK_LATENCY_US,
                 "SATA Revision 3.0 6 Gb/s (SATA-IO, https://sata-io.org); ~550 MB/s "
                 "sequential read of typical SATA SSDs, e.g. Samsung 870 EVO data sheet"),
    )
}

DEFAULT_GPU_LINK = "pcie4"

# Networks between nodes. Bandwidth: the signalling rate of the standard (per direction, a
# 4x InfiniBand port). Latency: order of magnitude of one small message between two GPUs of
# different nodes — an assumption, like the link latencies above: kernel TCP/IP through NCCL's
# socket transport on Ethernet, RDMA verbs on InfiniBand.
_ETH_LATENCY_US = 25.0
_IB_LATENCY_US = 2.0
_IEEE_8023 = "IEEE 802.3 Ethernet standard (802.3ba: 100 Gb/s; 802.3bs: 200 and 400 Gb/s), https://standards.ieee.org/ieee/802.3/"
_IBTA = "InfiniBand Trade Association roadmap (4x port data rates), https://www.infinibandta.org/infiniband-roadmap/"

NETWORK_PRESETS: dict[str, LinkSpec] = {
    lk.name: lk
    for lk in (
        LinkSpec("eth-100g", 12.5, _ETH_LATENCY_US, _IEEE_8023 + " (100 Gb/s)"),
        LinkSpec("eth-200g", 25.0, _ETH_LATENCY_US, _IEEE_8023 + " (200 Gb/s)"),
        LinkSpec("eth-400g", 50.0, _ETH_LATENCY_US, _IEEE_8023 + " (400 Gb/s)"),
        LinkSpec("ib-edr", 12.5, _IB_LATENCY_US, _IBTA + " (EDR, 100 Gb/s)"),
        LinkSpec("ib-hdr", 25.0, _IB_LATENCY_US, _IBTA + " (HDR, 200 Gb/s)"),
        LinkSpec("ib-ndr", 50.0, _IB_LATENCY_US, _IBTA + " (NDR, 400 Gb/s)"),
    )
}

# describe() prints the lane width for PCIe presets (all presets are x16).
_LINK_LABELS = {"pcie3": "pcie3 x16", "pcie4": "pcie4 x16", "pcie5": "pcie5 x16"}


# --------------------------------------------------------------------------
# Cluster
# --------------------------------------------------------------------------

def _check_headroom(headroom: object) -> float:
    if (not isinstance(headroom, (int, float)) or isinstance(headroom, bool)
            or not 0.0 <= headroom <= 0.9):   # also rejects NaN
        raise BadInput(f"headroom must be a number in [0, 0.9], got {headroom!r}")
    return float(headroom)


@dataclass(frozen=True)
class Cluster:
    """GPUs plus the links a device map's tensors travel over.

    GPUs are numbered across the whole cluster (``cuda:0..N-1`` in a plan), node after node.
    ``node_of[i]`` is the node of GPU ``i``; GPUs of one node talk over that node's link
    (``node_links``), GPUs of different nodes over ``network``. A single-node cluster leaves
    ``node_of`` empty: every GPU pair uses ``gpu_link``.
    """

    gpus: tuple[GPUSpec, ...]
    gpu_link: LinkSpec
    host_link: LinkSpec
    disk_link: LinkSpec
    headroom: float = 0.10
    node_of: tuple[int, ...] = ()
    node_links: tuple[LinkSpec, ...] = ()
    network: LinkSpec | None = None

    def __post_init__(self) -> None:
        gpus = tuple(self.gpus)
        if not gpus or not all(isinstance(g, GPUSpec) for g in gpus):
            raise BadInput("a cluster needs at least one GPU, given as GPUSpec objects")
        object.__setattr__(self, "gpus", gpus)
        object.__setattr__(self, "headroom", _check_headroom(self.headroom))
        node_of = tuple(self.node_of) or (0,) * len(gpus)
        if len(node_of) != len(gpus) or list(node_of) != sorted(node_of) or set(node_of) != set(range(max(node_of) + 1)):
            raise BadInput("node_of must give each GPU its node, numbered 0.. in GPU order")
        links = tuple(self.node_links) or (self.gpu_link,) * (max(node_of) + 1)
        if len(links) != max(node_of) + 1:
            raise BadInput("node_links must give each node its link")
        if max(node_of) > 0 and self.network is None:
            raise BadInput("a cluster of several nodes needs the network between them")
        object.__setattr__(self, "node_of", node_of)
        object.__setattr__(self, "node_links", links)

    def __len__(self) -> int:
        return len(self.gpus)

    @property
    def n_nodes(self) -> int:
        return self.node_of[-1] + 1

    def node_gpus(self, node: int) -> tuple[int, ...]:
        """The GPU indices of one node."""
        return tuple(i for i, n in enumerate(self.node_of) if n == node)

    def crosses_nodes(self, src, dst) -> bool:
        """True where a move between two devices goes over the network."""
        a, b = self._endpoint(src), self._endpoint(dst)
        return isinstance(a, int) and isinstance(b, int) and self.node_of[a] != self.node_of[b]

    def usable_bytes(self, index: int) -> int:
        """Bytes a device map may place on GPU ``index`` after keeping ``headroom`` free."""
        return int(self.gpus[index].memory_bytes * (1.0 - self.headroom))

    def describe(self) -> str:
        """Compact one-liner, e.g. ``2x rtx4090 (24.0 GiB), pcie4 x16``.

        Consecutive identical GPUs are grouped; mixed clusters are joined by " + ". Several
        nodes: ``[4x rtx4090 (24.0 GiB), pcie4 x16] x2 over eth-100g``.
        """
        if self.n_nodes > 1:
            nodes = [self._describe_gpus(self.node_gpus(k), self.node_links[k]) for k in range(self.n_nodes)]
            groups: list[list] = []
            for d in nodes:
                if groups and groups[-1][0] == d:
                    groups[-1][1] += 1
                else:
                    groups.append([d, 1])
            text = " + ".join(f"[{d}]" + (f" x{n}" if n > 1 else "") for d, n in groups)
            return f"{text} over {self.network.name}"
        return self._describe_gpus(range(len(self.gpus)), self.gpu_link)

    def _describe_gpus(self, indices, link: LinkSpec) -> str:
        groups: list[list] = []
        for gpu in (self.gpus[i] for i in indices):
            if groups and groups[-1][0] == gpu:
                groups[-1][1] += 1
            else:
                groups.append([gpu, 1])
        def size(b: int) -> str:
            return f"{b / GiB:.1f} GiB" if b >= GiB else f"{b / MiB:.0f} MiB"

        parts = [f"{n}x {g.name} ({size(g.memory_bytes)})" if g.name != size(g.memory_bytes).replace(" ", "")
                 else f"{n}x {g.name}" for g, n in groups]
        return f"{' + '.join(parts)}, {_LINK_LABELS.get(link.name, link.name)}"

    def _endpoint(self, device: str | int) -> str | int:
        """Normalise a device-map value to a GPU index, "cpu" or "disk"."""
        if isinstance(device, bool):
            raise ValueError(f"not a device: {device!r}")
        if isinstance(device, int):
            index = device
        elif isinstance(device, str):
            d = device.strip().lower()
            if d in ("cpu", "disk"):
                return d
            # accelerate device maps may also spell GPUs "cuda:N".
            m = re.fullmatch(r"cuda:([0-9]+)", d)
            if not m:
                raise ValueError(f"unknown device {device!r}; expected a GPU index, "
                                 f"'cuda:N', 'cpu' or 'disk'")
            index = int(m.group(1))
        else:
            raise ValueError(f"not a device: {device!r}")
        if not 0 <= index < len(self.gpus):
            raise ValueError(f"GPU index {index} out of range for {len(self.gpus)} GPU(s)")
        return index

    def link_between(self, src: str | int, dst: str | int) -> LinkSpec:
        """The link a transfer from ``src`` to ``dst`` crosses.

        GPU<->GPU uses the node's link (``gpu_link`` on one node), or ``network`` between
        nodes; anything involving "disk" uses ``disk_link``
        (the disk is the bottleneck even when the data lands in host RAM);
        GPU<->"cpu" uses ``host_link``. Same device on both ends is a ValueError:
        there is no transfer to cost.
        """
        a, b = self._endpoint(src), self._endpoint(dst)
        if a == b:
            raise ValueError(f"no link between {src!r} and itself")
        if "disk" in (a, b):
            return self.disk_link
        if "cpu" in (a, b):
            return self.host_link
        if self.node_of[a] != self.node_of[b]:
            return self.network
        return self.node_links[self.node_of[a]]


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------

# Leading count before "x": captured loosely (sign, decimals) so that "0.5x"
# or "-1x" get a precise error instead of "unknown GPU".
_COUNT_RE = re.compile(r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*x\s*(.*)",
                       re.ASCII | re.DOTALL | re.IGNORECASE)

# Memory size: number + unit. Sign captured only to report it.
_SIZE_RE = re.compile(r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*([a-z]*)", re.ASCII)

# unit (lower case) -> (bytes per unit, canonical spelling). A bare "G" is
# read as GiB because that is what people mean when they say "a 24G card".
_UNITS = {
    "tib": (1024**4, "TiB"), "t": (1024**4, "TiB"), "tb": (10**12, "TB"),
    "gib": (GiB, "GiB"), "g": (GiB, "GiB"), "gb": (10**9, "GB"),
    "mib": (MiB, "MiB"), "m": (MiB, "MiB"), "mb": (10**6, "MB"),
}


def _known_gpus_hint() -> str:
    return f"known: {', '.join(sorted(GPU_PRESETS))} or a memory size like 24GiB"


def _generic_gpu(token: str, number: str, unit: str) -> GPUSpec:
    if unit not in _UNITS:
        if unit == "":
            raise BadInput(f"GPU memory {token!r} in --gpus needs a unit (GiB, GB, MiB, MB, "
                           f"TiB, TB)")
        raise BadInput(f"unknown memory unit in {token!r} in --gpus; "
                       f"use GiB, GB, G, MiB, MB, M, TiB, TB or T")
    per_unit, canon_unit = _UNITS[unit]
    try:
        amount = Decimal(number)  # exact: "23.5GiB" must be exactly 23.5 * 2**30
    except InvalidOperation:  # pragma: no cover - the regex only admits valid numbers
        raise BadInput(f"bad memory size {token!r} in --gpus") from None
    # Compare before multiplying: Decimal arithmetic on a thousand-digit typo
    # would raise decimal.Overflow rather than a clean BadInput.
    if amount > _MAX_GPU_BYTES or amount * per_unit > _MAX_GPU_BYTES:
        raise BadInput(f"GPU memory {token!r} in --gpus is implausibly large (max 1 PiB)")
    nbytes = int(amount * per_unit)
    if nbytes <= 0:
        raise BadInput(f"GPU memory must be positive, got {token!r} in --gpus")
    # "24.0gib" -> "24GiB": one spelling per size, so equal specs compare equal.
    # (The context only keeps normalize() from rounding long inputs.)
    text = format(amount.normalize(Context(prec=max(28, len(number)))), "f")
    ref = _GENERIC_REFERENCE
    return GPUSpec(name=f"{text}{canon_unit}", memory_bytes=nbytes, tflops=dict(ref.tflops),
                   mem_bw_gbs=ref.mem_bw_gbs, source=_GENERIC_SOURCE)


def _parse_kind(token: str, extra: Mapping[str, GPUSpec]) -> GPUSpec:
    """A preset name or a bare memory size; ``token`` is stripped, original case."""
    key = token.lower()
    if key in extra:
        return extra[key]
    if key in GPU_PRESETS:
        return GPU_PRESETS[key]
    m = _SIZE_RE.fullmatch(key)
    if m:
        return _generic_gpu(token, m.group(1), m.group(2))
    raise BadInput(f"unknown GPU {token!r} in --gpus; {_known_gpus_hint()}")


def _parse_item(item: str, extra: Mapping[str, GPUSpec]) -> tuple[int, GPUSpec]:
    """``[N x]KIND`` -> (N, spec)."""
    # An exact preset name wins, so a preset whose name contains "x" is never split.
    # (The count regex also needs a digit before the "x", so "rtx4090" never matches it.)
    m = None if item.lower() in GPU_PRESETS or item.lower() in extra else _COUNT_RE.fullmatch(item)
    if m is None:
        return 1, _parse_kind(item, extra)
    count_text = m.group(1)
    if not count_text.isdigit():
        raise BadInput(f"GPU count must be a whole number >= 1, got {count_text!r} "
                       f"in {item!r} in --gpus")
    # int() refuses strings over 4300 digits; anything this long is too many anyway.
    count = int(count_text) if len(count_text) <= 9 else MAX_GPUS + 1
    if count < 1:
        raise BadInput(f"GPU count must be >= 1, got {count_text!r} in {item!r} in --gpus")
    kind = m.group(2).strip()
    if not kind:
        raise BadInput(f"missing GPU kind after count in {item!r} in --gpus")
    if count > MAX_GPUS:  # check before building anything of that size
        raise BadInput(f"too many GPUs in --gpus: count {count_text!r} in {item!r} "
                       f"(max {MAX_GPUS} in total)")
    return count, _parse_kind(kind, extra)


def parse_gpus(spec: str, extra: Mapping[str, GPUSpec] | None = None) -> tuple[GPUSpec, ...]:
    """Parse a ``--gpus`` spec like ``"rtx4090, 2x rtx3060"`` or ``"2x24GiB"``.

    Items are comma-separated ``[N x]KIND``; KIND is a preset name from
    ``GPU_PRESETS`` or a memory size (``24GiB``, ``24GB`` = 24e9 bytes,
    ``24G`` = 24 GiB, ``512MiB``) for a generic GPU. Case and whitespace are
    ignored. ``extra`` adds named devices (a calibrated ``host``). Returns the
    GPUs in the order written. Raises BadInput.
    """
    if not isinstance(spec, str):
        raise BadInput(f"--gpus must be a string, got {type(spec).__name__}")
    if not spec.strip():
        raise BadInput("empty --gpus spec; expected e.g. '2x rtx4090' or '24GiB,12GiB'")
    gpus: list[GPUSpec] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise BadInput(f"empty item in --gpus {spec.strip()!r} (stray comma?)")
        count, gpu = _parse_item(item, extra or {})
        if len(gpus) + count > MAX_GPUS:
            raise BadInput(f"too many GPUs in --gpus: {len(gpus) + count} "
                           f"after {item!r} (max {MAX_GPUS} in total)")
        gpus.extend([gpu] * count)
    return tuple(gpus)


def _link(name: object, what: str, presets: Mapping[str, LinkSpec] = LINK_PRESETS) -> LinkSpec:
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in presets:
        raise BadInput(f"unknown {what} {name!r}; known: {', '.join(sorted(presets))}")
    return presets[key]


# One node group of a multi-node spec: "[N x]" then "[GPU items (@ intra-node link)]".
_NODE_RE = re.compile(r"\s*(?:([0-9]+)\s*x\s*)?\[([^\[\]]*)\]\s*", re.ASCII | re.IGNORECASE)


@dataclass(frozen=True)
class NodeSpec:
    """One node of a ``--gpus`` spec: its GPUs and the link between them (None: the --link default)."""

    gpus: tuple[GPUSpec, ...]
    link: str | None = None


def parse_nodes(spec: str, extra: Mapping[str, GPUSpec] | None = None) -> tuple[tuple[NodeSpec, ...], str | None]:
    """Parse a ``--gpus`` spec into nodes and the network between them.

    One node (today's syntax): ``"rtx4090, 2x rtx3060"``. Several nodes: node groups
    ``[N x][GPU items[@link]]`` joined by ``+``, then ``@NETWORK``:
    ``"2x[4xa10]@ib-hdr"``, ``"[rtx4090,2xrtx3060]+[4xa10@nvlink3]@eth-100g"``. Returns the
    nodes and the network preset name (None for one node). Raises BadInput.
    """
    if not isinstance(spec, str):
        raise BadInput(f"--gpus must be a string, got {type(spec).__name__}")
    text = spec.strip()
    if "[" not in text and "]" not in text:
        if "@" in text or "+" in text:
            raise BadInput(f"--gpus {text!r}: '@' and '+' describe nodes; write each node in brackets, "
                           f"e.g. '2x[4xa10]@ib-hdr'")
        return (NodeSpec(parse_gpus(text, extra)),), None
    if text.count("[") != text.count("]"):
        raise BadInput(f"--gpus {text!r}: unbalanced brackets; write each node as [GPUS], e.g. '2x[4xa10]@ib-hdr'")
    body, network = text, None
    if not text.endswith("]"):
        at = text.rfind("@")
        if at < 0 or "]" in text[at:]:
            raise BadInput(f"--gpus {text!r}: expected '@NETWORK' after the last node, e.g. '2x[4xa10]@eth-100g'")
        body, network = text[:at], text[at + 1:].strip()
        _link(network, "network", NETWORK_PRESETS)
    nodes: list[NodeSpec] = []
    for group in body.split("+"):
        m = _NODE_RE.fullmatch(group)
        if m is None:
            raise BadInput(f"--gpus {text!r}: bad node group {group.strip()!r}; write [N x][GPUS] or [GPUS@LINK], "
                           f"e.g. 2x[4xa10] or [4xa100-40g@nvlink3]")
        count = int(m.group(1)) if m.group(1) and len(m.group(1)) <= 4 else (1 if not m.group(1) else MAX_GPUS + 1)
        if count < 1:
            raise BadInput(f"--gpus {text!r}: node count must be >= 1 in {group.strip()!r}")
        inner, link = m.group(2), None
        if "@" in inner:
            inner, link = (x.strip() for x in inner.split("@", 1))
            _link(link, "intra-node link")
        gpus = parse_gpus(inner, extra)
        if count > MAX_GPUS or sum(len(n.gpus) for n in nodes) + count * len(gpus) > MAX_GPUS:
            raise BadInput(f"too many GPUs in --gpus {text!r} (max {MAX_GPUS} in total)")
        nodes.extend([NodeSpec(gpus, link)] * count)
    if len(nodes) > 1 and network is None:
        raise BadInput(f"--gpus {text!r} has {len(nodes)} nodes: name the network between them, e.g. "
                       f"'{body.strip()}@eth-100g' (known: {', '.join(sorted(NETWORK_PRESETS))})")
    return tuple(nodes), network


def make_cluster(gpus: str, link: str = DEFAULT_GPU_LINK, headroom: float = 0.10,
                 host_link: str = "pcie4", disk: str = "nvme-pcie4",
                 extra: Mapping[str, GPUSpec] | None = None) -> Cluster:
    """Build a Cluster from a ``--gpus`` spec (one node or several) and link preset names.

    ``link`` is the GPU-to-GPU link inside a node unless the node names its own. Raises BadInput.
    """
    nodes, network = parse_nodes(gpus, extra)
    default = _link(link, "GPU link")
    node_links = tuple(_link(n.link, "intra-node link") if n.link else default for n in nodes)
    return Cluster(
        gpus=tuple(g for n in nodes for g in n.gpus),
        gpu_link=node_links[0],
        host_link=_link(host_link, "host link"),
        disk_link=_link(disk, "disk link"),
        headroom=_check_headroom(headroom),
        node_of=tuple(k for k, n in enumerate(nodes) for _ in n.gpus),
        node_links=node_links,
        network=_link(network, "network", NETWORK_PRESETS) if network else None,
    )
