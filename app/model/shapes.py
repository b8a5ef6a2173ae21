"""The one padding rule: the collator (padded plans, training) and training's feature cache count with it."""


def padded(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple`."""
    return -(-length // multiple) * multiple
