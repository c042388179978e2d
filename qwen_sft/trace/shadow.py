"""Real values for the small integer tensors of a fake-tensor trace (routing indices, expert counts, offsets).

    fm = FakeTensorMode(allow_non_fake_inputs=True)
    with fm, ShadowMode(fm) as shadow:
        idx = fm.from_tensor(torch.tensor([3, 1, 3]))
        counts = torch.bincount(idx, minlength=4)   # data-dependent: computed on the real values
        assert counts.tolist() == [0, 1, 0, 2]

The expert engine's Python runs on routing decisions (``bincount``, ``nonzero``, ``.tolist()``), which a
fake tensor cannot answer. This mode keeps, beside each fake integer/bool tensor, the real tensor it would
hold, for as long as the fake one lives. An op whose tensor inputs all have values also runs on the values;
an op a fake tensor cannot run (its output shape or a Python scalar depends on data) runs on the values alone.
Float tensors never get a value: activations and weights stay fake and cost nothing.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

MAX_VALUE_NUMEL = 1 << 24  # routing indices of 256K tokens x top-8 fit; anything bigger is not bookkeeping
_SMALL_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}


def _small_int(t: torch.Tensor) -> bool:
    return t.dtype in _SMALL_DTYPES and t.numel() <= MAX_VALUE_NUMEL


def _mutates(func) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


class ShadowMode(TorchDispatchMode):
    """Enter inside ``fake_mode``; see the module docstring."""

    def __init__(self, fake_mode: FakeTensorMode) -> None:
        super().__init__()
        self.fake_mode = fake_mode
        self._values = WeakIdKeyDictionary()

    def set(self, fake: torch.Tensor, value: torch.Tensor) -> None:
        """Give ``fake`` a value (the router hook uses this for its top-k indices)."""
        if tuple(fake.shape) != tuple(value.shape) or fake.dtype != value.dtype:
            raise ValueError(f"value {tuple(value.shape)} {value.dtype} does not fit {tuple(fake.shape)} {fake.dtype}")
        self._values[fake] = value

    def value(self, t: torch.Tensor) -> torch.Tensor | None:
        """The real value of ``t``: itself when it is real, the stored one for a fake tensor, else None."""
        if not isinstance(t, FakeTensor):
            return t
        return self._values.get(t)

    def knows(self, t: torch.Tensor) -> bool:
        return self.value(t) is not None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, spec = tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        known = all(self.knows(t) for t in tensors)
        if not known:
            out = func(*args, **kwargs)
            if _mutates(func):  # an unknown input was written into a tensor that had a value
                for a, x in zip(func._schema.arguments, args):
                    if a.alias_info is not None and a.alias_info.is_write and isinstance(x, torch.Tensor):
                        self._values.pop(x, None)
            return out
        real_args, real_kwargs = tree_unflatten([self.value(x) if isinstance(x, torch.Tensor) else x for x in flat],
                                                spec)
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            with unset_fake_temporarily():
                real = func(*real_args, **real_kwargs)
            return tree_map(self._lift, real)
        outs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        if any(_small_int(x) for x in outs):
            with unset_fake_temporarily():
                real = func(*real_args, **real_kwargs)
            for fake, value in zip(tree_flatten(out)[0], tree_flatten(real)[0]):
                if isinstance(fake, FakeTensor) and isinstance(value, torch.Tensor) and _small_int(fake):
                    self._values[fake] = value
        return out

    def _lift(self, x):
        if not isinstance(x, torch.Tensor):
            return x  # .item() / .tolist(): a Python number
        fake = self.fake_mode.from_tensor(x)
        self._values[fake] = x
        return fake
