"""coset.cuda: native HNLQ kernels."""

__all__: list[str] = []
