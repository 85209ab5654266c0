"""``confsmoe.torch``: the PyTorch bridge (MoELayer, MoEFunction, moe_function).

Imported on demand (``import confsmoe.torch`` or ``confsmoe.torch``), never by ``import confsmoe``.
See torch_bridge.py for how parameters, gradients and autograd are bridged.
"""
from .torch_bridge import MoEFunction, MoELayer, moe_function  # noqa: F401

__all__ = ["MoELayer", "MoEFunction", "moe_function"]
