"""Counting host-device synchronisation points: the places where Python waits for the device.

On a GPU every `.item()`, `.tolist()`, `bool(tensor)`, `nonzero()`, boolean-mask indexing or `torch.equal`
stops the host until the device has finished all queued work, so an exit path with one such point per
layer and step runs at the speed of its syncs. On the CPU they cost nothing, which is why they are
counted here (in tests and in scripts/bench_inference.py) instead of timed: `SyncCounter` sees every
operator call that needs a value on the host, on any device.
"""
import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: operators whose output (or output size) is only known once the device has computed their input
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "_unique2", "unique_dim",
            "unique_consecutive", "is_nonzero"}
#: operators that sync when an index is a boolean mask (it is turned into positions first)
MASK_INDEX_OPS = {"index", "index_put", "index_put_"}
#: Tensor methods that read values on the host without an operator call on the CPU
HOST_METHODS = ("tolist", "cpu", "numpy")


def _has_mask(args) -> bool:
    for arg in args:
        if isinstance(arg, (list, tuple)) and _has_mask(arg):
            return True
        if isinstance(arg, torch.Tensor) and arg.dtype == torch.bool:
            return True
    return False


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as syncs: ...`` counts the synchronisation points of the block (``syncs.count``,
    by operator in ``syncs.ops``). ``counter.watch(module)`` counts only inside the module's forward calls
    (and methods named in ``methods``; ``counter.calls`` counts those calls), e.g. the decoder during a
    beam search (fairseq calls ``decoder.forward`` directly, so hooks would not see it)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.ops = Counter()
        self.calls = Counter()  # calls of the watched methods
        self._patched = {}

    def _add(self, name: str):
        self.count += 1
        self.ops[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        overload = func._overloadname
        if (name in SYNC_OPS or (name in MASK_INDEX_OPS and _has_mask(args))
                or (name == "repeat_interleave" and "Tensor" in overload and "int" not in overload)):
            self._add(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for method in HOST_METHODS:
            original = getattr(torch.Tensor, method)
            self._patched[method] = (method in torch.Tensor.__dict__, original)

            def counted(tensor, *args, _original=original, _name=method, **kwargs):
                self._add(_name)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, method, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, (own, original) in self._patched.items():
            if own:
                setattr(torch.Tensor, method, original)
            else:
                delattr(torch.Tensor, method)
        self._patched.clear()
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def watch(self, module, methods=()):
        """Count inside `module`'s forward calls and inside its methods named in `methods`."""
        originals = {name: getattr(module, name) for name in ("forward", *methods)}

        def counted(name, original):
            def call(*args, **kwargs):
                self.calls[name] += 1
                with self:
                    return original(*args, **kwargs)
            return call

        for name, original in originals.items():
            setattr(module, name, counted(name, original))
        try:
            yield self
        finally:
            for name in originals:
                delattr(module, name)
