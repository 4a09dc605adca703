"""DUSt3R network with the official public surface.

>>> from pqk.models.dust3r import build_model, load_checkpoint
>>> model = load_checkpoint("DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth")
>>> res1, res2 = model(view1, view2)   # res1['pts3d'], res2['pts3d_in_other_view'], ['conf']
"""

from pqk.models.dust3r.checkpoint import build_model, load_checkpoint, read_checkpoint, save_model
from pqk.models.dust3r.config import Dust3rConfig, config_from_kwargs, parse_constructor_string
from pqk.models.dust3r.model import AsymmetricCroCo3DStereo, count_parameters

__all__ = [
    "AsymmetricCroCo3DStereo",
    "Dust3rConfig",
    "build_model",
    "config_from_kwargs",
    "count_parameters",
    "load_checkpoint",
    "parse_constructor_string",
    "read_checkpoint",
    "save_model",
]
