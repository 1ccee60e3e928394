"""vllm-recontrol: RE-Control (test-time alignment by representation editing) inside vLLM.

Importing this package does not import vLLM; the plugin entry point is
``vllm_recontrol.plugin:register``.
"""

from .errors import (ConfigError, RecontrolError, RequestParamsError, ValueHeadError,
                     VersionError)
from .value_head import ValueHead

__version__ = "0.1.0"

__all__ = ["ValueHead", "RecontrolError", "ConfigError", "RequestParamsError",
           "ValueHeadError", "VersionError", "__version__"]
