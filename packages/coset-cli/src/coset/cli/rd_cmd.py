"""``coset rd``: rate-distortion of HNLQ (Z2, D4, E8) against the best uniform scalar quantizer on N(0,1) data."""

from __future__ import annotations

from coset.quant import QuantizationConfig
from coset.quant.rd import gaussian_data, hnlq_rd, scalar_rd

__all__ = ["rd_table", "RD_CODES"]

#: (rate in bits/dim, q, M) of the HNLQ codes in the table; each is run for Z2, D4 and E8.
RD_CODES = ((2, 4, 1), (4, 4, 2), (6, 8, 2))


def rd_table(n: int = 1 << 16, seed: int = 0, lattices=("Z2", "D4", "E8"), center: bool = False) -> list[dict]:
    """One row per scheme: ``scheme, family, rate, effective_rate, beta, mse, snr_db, overload_rate``.

    HNLQ uses alpha = 1/3 and the rate-aware beta (minimising ``mse * 2^(2 H(T)/d)``, paper §5.1); its
    ``effective_rate`` adds the empirical entropy of T per dimension. The scalar rows are the MSE-optimal
    uniform quantizer with ``2^rate`` levels on the same samples.
    """
    x = gaussian_data(n, seed)
    rows = []
    for rate, q, M in RD_CODES:
        s = scalar_rd(rate, x=x)["uniform"]
        rows.append(
            {
                "scheme": f"scalar {rate}-bit",
                "family": "uniform scalar",
                "rate": float(rate),
                "effective_rate": float(rate),
                "beta": s["step"],
                "mse": s["mse"],
                "snr_db": s["snr_db"],
                "overload_rate": 0.0,
            }
        )
        for name in lattices:
            cfg = QuantizationConfig(lattice_type=name, q=q, M=M, alpha=1 / 3, max_scaling_iterations=30, center=center)
            r = hnlq_rd(config=cfg, x=x, alpha=None)
            rows.append(
                {
                    "scheme": f"{name} q={q} M={M}",
                    "family": f"HNLQ {name}",
                    "rate": float(rate),
                    "effective_rate": r["rate_effective"],
                    "beta": r["beta"],
                    "mse": r["mse"],
                    "snr_db": r["snr_db"],
                    "overload_rate": r["overload_rate"],
                }
            )
    return rows
