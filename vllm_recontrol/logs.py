"""Loggers under vLLM's ``vllm`` logger, so engine logs show RE-Control lines with vLLM's format."""

import logging


def get_logger(module_name: str) -> logging.Logger:
    """``vllm.recontrol.<module>``; outside vLLM it behaves like any library logger."""
    return logging.getLogger("vllm.recontrol." + module_name.rsplit(".", 1)[-1])
