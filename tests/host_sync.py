"""A CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``, so that the contract of the
update a CUDA graph captures (no host synchronisation, no data-dependent shape) is tested on
machines without a GPU too: a dispatch mode that fails on every op that makes the host wait for a
CUDA device to size or read its result.

It sees what goes through the dispatcher: ``.item()``, ``bool()``, ``nonzero``, boolean-mask
indexing and the like. It cannot see host reads that bypass it on the CPU (``.tolist()`` and
``.numpy()`` of a CPU tensor), nor a host-to-device copy; test_cuda.py's sync debug mode does.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# op -> why it waits for the device on CUDA
SYNCING = {
    aten._local_scalar_dense.default: "reads a tensor's value on the host (.item(), bool(), int(), float())",
    aten.nonzero.default: "sizes its output by the data (nonzero)",
    aten.masked_select.default: "sizes its output by the data (masked_select)",
    aten._unique2.default: "sizes its output by the data (unique)",
    aten.unique_consecutive.default: "sizes its output by the data (unique_consecutive)",
    aten.unique_dim.default: "sizes its output by the data (unique)",
    aten.bincount.default: "sizes its output by the data's maximum (bincount)",
    aten.repeat_interleave.Tensor: "sizes its output by the data (repeat_interleave)",
    aten.equal.default: "returns a host bool (torch.equal)",
    aten.is_nonzero.default: "returns a host bool (a tensor in an if)",
}


def _boolean_index(indices) -> bool:
    return any(i is not None and i.dtype == torch.bool for i in indices)


class HostSyncError(RuntimeError):
    pass


class NoHostSync(TorchDispatchMode):
    """``with NoHostSync(): update(batch)`` raises HostSyncError at the first syncing op."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = SYNCING.get(func)
        if why is None and func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            if _boolean_index(args[1]):
                why = "indexes with a boolean mask, which sizes its result by the data"
        if why is not None:
            raise HostSyncError(f"{func} {why}")
        return func(*args, **kwargs)
