"""On-device counters of what the rounding sites do to the values passing through them.

Each rounding site (a GEMM operand, a GEMM result, a gradient at either) adds, per call, to one small int64
tensor on the values' device:

    [nonzero entering, underflow (nonzero -> 0), subnormal results, overflow (finite -> inf/NaN)]

with in-place adds (no host sync), and a host-side count of the elements entering (known without a sync).
:meth:`RoundingCounters.read` gathers every site with one device-to-host copy. Transformer Engine's debug
tooling reports the same quantities (underflow %, overflow %) per tensor.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from ..formats import FloatFormat

__all__ = ["RoundingCounters", "SiteCounts"]

Key = tuple[str, str]  # (site, format name)


@dataclasses.dataclass(frozen=True)
class SiteCounts:
    """Counts at one rounding site and format (plain Python ints; obtained from :meth:`RoundingCounters.read`).

    Attributes:
        elements: values that entered the site.
        nonzero: nonzero values that entered (NaN included).
        underflow: nonzero values rounded to zero.
        subnormal: results that are nonzero and below the format's smallest normal number.
        overflow: finite values rounded to inf or NaN.
    """

    elements: int = 0
    nonzero: int = 0
    underflow: int = 0
    subnormal: int = 0
    overflow: int = 0

    @property
    def underflow_fraction_of_nonzero(self) -> float:
        """``underflow / nonzero`` (0.0 when nothing nonzero entered): of the **nonzero** values entering the
        site (a value that was already zero cannot underflow). Not the same denominator as
        :attr:`lossscale.diagnose.FormatDiagnosis.underflow_fraction`, which is over all elements."""
        return self.underflow / self.nonzero if self.nonzero else 0.0

    @property
    def underflow_fraction(self) -> float:
        """Deprecated alias of :attr:`underflow_fraction_of_nonzero` (the library's ``underflow_fraction``
        elsewhere is over all elements; this one never was)."""
        warnings.warn(
            "SiteCounts.underflow_fraction is deprecated: use underflow_fraction_of_nonzero (same value, "
            "underflow / nonzero)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.underflow_fraction_of_nonzero

    @property
    def subnormal_fraction(self) -> float:
        """``subnormal / elements`` (0.0 when nothing entered)."""
        return self.subnormal / self.elements if self.elements else 0.0

    @property
    def overflow_fraction(self) -> float:
        """``overflow / elements`` (0.0 when nothing entered)."""
        return self.overflow / self.elements if self.elements else 0.0

    def __add__(self, other: SiteCounts) -> SiteCounts:
        return SiteCounts(
            *(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(SiteCounts))
        )


class RoundingCounters:
    """Accumulates, per (site, format), what rounding did: underflow, subnormal results, overflow.

    Pass one to :func:`lossscale.autocast` (``counters=``); it keeps counting across contexts and steps until
    :meth:`reset`. Storage is created lazily on the device of the first tensor counted.

    Example:
        >>> import torch, lossscale
        >>> c = lossscale.RoundingCounters()
        >>> with lossscale.autocast("fp16-mixed", counters=c):
        ...     y = torch.nn.functional.linear(torch.full((2, 4), 1e-5), torch.full((3, 4), 1e-5))
        >>> c.read()[("linear.output", "fp16")].underflow
        6
        >>> c.gemms["linear"]
        1
    """

    def __init__(self) -> None:
        # One int64 tensor of 4 counts per (site, format, device): [nonzero, underflow, subnormal, overflow].
        self._counts: dict[tuple[str, str, torch.device], torch.Tensor] = {}
        self._elements: dict[Key, int] = {}
        self.gemms: dict[str, int] = {}
        """Emulated GEMM/convolution executions per op kind (host-side; no sync). One ``F.linear`` is 1, one
        scaled_dot_product_attention 2 (QK^T and PV), one LSTM layer over T steps 1 + T. Composite ops count
        their aten pieces (``"einsum.bmm"``), forward and backward."""
        self.unemulated: dict[str, int] = {}
        """GEMM-class ops that ran with FP32 operands inside an emulated region (not emulated), per op."""

    def record(self, site: str, fmt: FloatFormat, x: torch.Tensor, q: torch.Tensor) -> None:
        """Count the rounding of ``x`` to ``q`` (in ``fmt``) at ``site``. Does not synchronise."""
        key = (site, fmt.name)
        self._elements[key] = self._elements.get(key, 0) + x.numel()
        dkey = (site, fmt.name, x.device)
        buf = self._counts.get(dkey)
        if buf is None:
            buf = torch.zeros(4, dtype=torch.int64, device=x.device)
            self._counts[dkey] = buf
        with torch.no_grad():
            # Rounding never turns zero into nonzero, nor a non-finite value into a finite one (saturation is
            # off at the sites), so differences of whole-tensor counts give the transitions; this needs fewer
            # passes than element-wise masks. count_nonzero(t - t) counts non-finite values (inf - inf = NaN).
            nonzero_in = torch.count_nonzero(x)
            nonzero_out = torch.count_nonzero(q)
            small_out = torch.count_nonzero(q.abs() < fmt.min_normal)  # zeros and subnormals; NaN is False
            nonfinite_in = torch.count_nonzero(x - x)
            nonfinite_out = torch.count_nonzero(q - q)
            zeros_out = q.numel() - nonzero_out
            counts = torch.stack(
                [nonzero_in, nonzero_in - nonzero_out, small_out - zeros_out, nonfinite_out - nonfinite_in]
            )
            buf.add_(counts)

    def count_unemulated(self, op: str, n: int = 1) -> None:
        """Add ``n`` executions of a GEMM-class op that ran with FP32 operands inside an emulated region
        (see ``lossscale.autocast(strict=...)``). Host-side; does not synchronise."""
        self.unemulated[op] = self.unemulated.get(op, 0) + n

    def count_gemm(self, op: str, n: int = 1) -> None:
        """Add ``n`` emulated GEMM executions of kind ``op``. Host-side; does not synchronise."""
        self.gemms[op] = self.gemms.get(op, 0) + n

    def state(self) -> dict[tuple[str, str, torch.device], torch.Tensor]:
        """The raw on-device count tensors ``[nonzero, underflow, subnormal, overflow]``. Does not sync."""
        return dict(self._counts)

    def read(self) -> dict[Key, SiteCounts]:
        """All counts as Python ints, keyed by ``(site, format name)``. Synchronises once (one copy per
        device holding counts, normally one)."""
        by_device: dict[torch.device, list[tuple[str, str]]] = {}
        for site, fmt, device in self._counts:
            by_device.setdefault(device, []).append((site, fmt))
        out: dict[Key, SiteCounts] = {key: SiteCounts(elements=n) for key, n in self._elements.items()}
        for device, keys in by_device.items():
            host = torch.stack([self._counts[(s, f, device)] for s, f in keys]).cpu().tolist()
            for key, (nonzero, underflow, subnormal, overflow) in zip(keys, host, strict=True):
                out[key] = out[key] + SiteCounts(0, nonzero, underflow, subnormal, overflow)
        return dict(sorted(out.items()))

    def totals(self, *, grad: bool | None = None) -> dict[str, SiteCounts]:
        """Counts summed over sites, per format. ``grad=True`` keeps only backward sites (``*.grad``),
        ``False`` only forward ones, ``None`` both. Synchronises once."""
        out: dict[str, SiteCounts] = {}
        for (site, fmt), counts in self.read().items():
            if grad is not None and site.endswith(".grad") != grad:
                continue
            out[fmt] = out.get(fmt, SiteCounts()) + counts
        return out

    def summary(self) -> str:
        """A plain-text table of every site. Synchronises once."""
        rows = [f"{'site':<44} {'format':<9} {'elements':>12} {'underflow':>11} {'subnormal':>11} {'overflow':>10}"]
        for (site, fmt), c in self.read().items():
            rows.append(
                f"{site:<44} {fmt:<9} {c.elements:>12} {c.underflow_fraction_of_nonzero:>10.3%} "
                f"{c.subnormal_fraction:>10.3%} {c.overflow_fraction:>10.3%}"
            )
        return "\n".join(rows)

    def reset(self) -> None:
        """Forget all counts. Does not synchronise."""
        self._counts.clear()
        self._elements.clear()
        self.gemms.clear()
        self.unemulated.clear()

    def __repr__(self) -> str:
        tail = f", unemulated={self.unemulated}" if self.unemulated else ""
        return f"RoundingCounters({len(self._elements)} sites, gemms={self.gemms}{tail})"
