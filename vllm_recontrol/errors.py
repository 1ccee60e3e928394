"""Exception types, so callers can tell configuration mistakes from bugs."""


class RecontrolError(ValueError):
    """Base class: bad input to vllm-recontrol (a file, a key, a request value)."""


class ValueHeadError(RecontrolError):
    """A value-head artifact is missing, corrupt or does not fit the model."""


class ConfigError(RecontrolError):
    """An engine-wide setting under ``additional_config["recontrol"]`` is invalid."""


class RequestParamsError(RecontrolError):
    """A per-request setting in ``SamplingParams.extra_args`` is invalid."""


class VersionError(RuntimeError):
    """The installed vLLM is outside the range this release was tested against."""
