"""Triton kernels of vllm-recontrol, installed as ``vllm_recontrol.kernels``."""
