"""BV-Blend advantage estimation as fused PyTorch ops (torch.ops.bv_blend.*).

Depends on torch only; the trainer and the TRL integration live in the `bv_blend` package.
"""

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

from . import _C  # noqa: F401  (loads the compiled library, which registers torch.ops.bv_blend)
from . import _registrations  # noqa: F401
from . import reference
from .functional import blend_advantages
from .module import BlendStep, BVBlend, check_settings
from .reference import DEFAULT_SCALE, SCALE_MODES, BlendOutput

__all__ = ["BVBlend", "BlendOutput", "BlendStep", "SCALE_MODES", "blend_advantages",
           "check_settings", "reference"]
