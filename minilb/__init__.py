"""minilb: a load balancer for SGLang prefill/decode disaggregated serving."""

__version__ = "0.1.0"
