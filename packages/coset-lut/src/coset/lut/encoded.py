"""``EncodedMatrix``: a matrix whose rows are HNLQ-encoded in d-blocks, ready for LUT products."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from coset.lattice.validate import check_int
from coset.quant import QuantizationConfig, encode, to_blocks

from .center import code_offset
from .checks import block_scales, check_codes, check_config
from .index import label_index
from .tables import representative_table

__all__ = ["EncodedMatrix"]


@dataclass(frozen=True, eq=False)
class EncodedMatrix:
    """Rows of an ``(n, k)`` matrix, each split into ``K = ceil(k/d)`` zero-padded d-blocks and encoded.

    Attributes
    ----------
    labels : (n, K, M, d) integer labels in [0, q)
    T : (n, K) integer scale steps
    config : QuantizationConfig (``with_dither`` must be False: LUT products assume z = 0)
    k : number of columns before padding (``K*d - d < k <= K*d``)
    """

    labels: torch.Tensor
    T: torch.Tensor
    config: QuantizationConfig
    k: int

    def __post_init__(self) -> None:
        check_config(self.config)
        check_codes(self.labels, self.T, self.config, "labels", "T")
        if self.labels.ndim != 4:
            raise ValueError(f"labels must have shape (n, K, M, d), got {tuple(self.labels.shape)}")
        if self.T is None:
            raise TypeError("T must be a torch.Tensor of shape (n, K)")
        K, d = self.labels.shape[1], self.config.dim
        check_int("k", self.k, (K - 1) * d + 1, K * d)  # K blocks of d columns, the last one padded

    @classmethod
    def from_dense(cls, W: torch.Tensor, config: QuantizationConfig, *, backend: str = "auto") -> "EncodedMatrix":
        """Encode the rows of ``W``.

        Parameters
        ----------
        W : (n, k) float tensor, finite; k need not be a multiple of d (the last block is zero-padded)
        config : QuantizationConfig with ``with_dither=False``
        backend : encoder backend, passed to :func:`coset.quant.encode`
        """
        check_config(config)
        if not isinstance(W, torch.Tensor):
            raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
        if W.ndim != 2:
            raise ValueError(f"W must be a 2-D (n, k) matrix, got shape {tuple(W.shape)}")
        if W.shape[1] == 0:
            raise ValueError("W must have at least one column")
        blocks, _ = to_blocks(W, config.dim)
        b, T = encode(blocks, config=config, backend=backend)
        return cls(labels=b, T=T, config=config, k=W.shape[1])

    # ------------------------------------------------------------------ shape
    @property
    def n(self) -> int:
        return self.labels.shape[0]

    @property
    def num_blocks(self) -> int:
        """K, the number of d-blocks per row."""
        return self.labels.shape[1]

    @property
    def pad(self) -> int:
        """Zeros appended to each row before encoding."""
        return self.num_blocks * self.config.dim - self.k

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def nbytes(self) -> int:
        """Storage of the code bit-packed: ``M d ceil(log2 q)`` bits per block plus one byte of T per block."""
        c = self.config
        bits = self.n * self.num_blocks * c.M * c.dim * c.bits_per_label
        return (bits + 7) // 8 + self.n * self.num_blocks

    # ------------------------------------------------------------------ kernel-ready views (cached)
    @cached_property
    def indices(self) -> torch.Tensor:
        """(n, K, M) int32 contiguous label indices ``idx(b_m)`` (the native kernels' ``ix``)."""
        return label_index(self.labels, self.config.q).to(torch.int32).contiguous()

    @cached_property
    def block_scales(self) -> torch.Tensor:
        """(n, K) float32 per-block scale ``beta 2^(alpha T)`` (the native kernels' ``sx``)."""
        return block_scales(self.T, self.T.shape, self.config, torch.float32, self.T.device).contiguous()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decoded matrix ``Ŵ`` (n, k), by table lookup of the representatives (equals coset.quant.decode).

        The representatives are integers or halves and ``sum_m q^m a_m`` is exact in float32 (|.| < 2^24);
        only the final scaling rounds. Works in ``dtype`` (float32 unless float64 is asked for), one
        ``(n, K, d)`` buffer (an ``embedding_bag`` over the representative table). Centred codes
        (``config.center``) subtract the offset ``c`` before scaling, in float64 (as decode does).

        Returns
        -------
        (n, k) tensor of ``dtype``
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        c = self.config
        wd = torch.float64 if (dtype == torch.float64 or c.center) else torch.float32
        a = representative_table(c.lattice, c.q, c.with_tie_dither).to(device=self.labels.device, dtype=wd)
        n, K, M = self.indices.shape
        if n * K == 0:
            return torch.zeros((n, self.k), dtype=dtype, device=self.labels.device)
        # One bag of M weighted lookups per block (exact sums), then the per-block scale: one rounding.
        lw = torch.tensor([float(c.q**m) for m in range(M)], dtype=wd, device=a.device).expand(n * K, M)
        pts = F.embedding_bag(self.indices.view(n * K, M), a, mode="sum", per_sample_weights=lw.contiguous())
        s = self.block_scales if wd == torch.float32 else block_scales(self.T, self.T.shape, c, wd, a.device)
        off = code_offset(c, a.device)
        pts = pts.view(n, K, c.dim)
        if off is not None:
            pts = pts - off
        pts = pts * s.unsqueeze(-1)
        return pts.reshape(n, -1)[:, : self.k].to(dtype)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"EncodedMatrix(shape={self.shape}, blocks={self.num_blocks}, lattice={c.lattice_type}, q={c.q}, "
            f"M={c.M}, nbytes={self.nbytes})"
        )
