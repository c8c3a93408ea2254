"""omniscratch model: a text decoder, an in-house vision encoder and an in-house audio encoder, from seeded random weights.

No I/O, no deepspeed, no torch.distributed: parallelism is applied to the finished model from train/.
"""

from .components import COMPONENTS, component_of, component_params, component_summary
from .config import ModelConfig, load_model_config
from .init import INIT_SCHEME, init_tensor, init_weights
from .omni import OmniModel

__all__ = ["COMPONENTS", "INIT_SCHEME", "ModelConfig", "OmniModel", "component_of", "component_params",
           "component_summary", "init_tensor", "init_weights", "load_model_config"]
