"""A stand-in for ``torch.distributed.GradBucket``, so that tests can call a communication hook directly."""


class FakeBucket:
    """The part of ``dist.GradBucket`` a hook reads: the flat buffer, its index, whether it is the last."""

    def __init__(self, buf, idx=0):
        self._b, self._i = buf, idx

    def buffer(self):
        return self._b

    def index(self):
        return self._i

    def is_last(self):
        return True
