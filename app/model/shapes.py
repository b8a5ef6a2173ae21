"""The one padding rule. The batch policy's cost model (pure Python) and the collator (torch) both count with it, so
the batch the policy plans is the batch that runs."""


def padded(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple`."""
    return -(-length // multiple) * multiple
