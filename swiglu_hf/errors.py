"""Typed errors. Each message says what was wrong and what to do about it."""


class SwigluError(Exception):
    """Base class of every error swiglu_hf raises on purpose."""


class InvalidInputError(SwigluError, ValueError):
    """Tensor arguments of the fused op have incompatible shapes or an odd packed width."""


class InvalidDtypeError(SwigluError, TypeError):
    """Tensor arguments are integer, unsupported, or of mixed dtypes/devices."""


class UnsupportedActivationError(SwigluError, ValueError):
    """The activation is not one the fused kernels implement."""


class UnknownBackendError(SwigluError, ValueError):
    """`backend=` is not one of "auto", "triton", "torch"."""


class BackendUnavailableError(SwigluError, RuntimeError):
    """The requested backend cannot run on this machine (e.g. Triton on CPU without the interpreter)."""


class NotPicklableError(SwigluError, TypeError):
    """A patched model was pickled whole (torch.save(model)); save its state_dict or revert first."""


class NoGatedMLPError(SwigluError, ValueError):
    """apply_swiglu_patch found no module it could patch."""


class SelfCheckError(SwigluError, ValueError):
    """The fused forward disagreed with the module's own forward on a random probe."""


class UnsupportedModuleError(SwigluError, ValueError):
    """A module has a gated-MLP structure but a layout or extra math the fused forward does not implement."""


class HigherOrderGradError(SwigluError, RuntimeError):
    """A backward with create_graph=True ran through a fused MLP node, whose backward is written out (not
    itself differentiable)."""


class PatchRefusedWarning(UserWarning):
    """apply_swiglu_patch(strict=False) left gated modules unpatched; the message lists each with its reason."""


class UnsupportedLossError(SwigluError, ValueError):
    """swiglu_hf.loss cannot compute this model's causal-LM loss chunk by chunk (logits made with steps it
    does not know, an auxiliary loss, no decoder or lm_head); the message says what to use instead."""
