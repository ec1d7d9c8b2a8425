"""The Kronecker core for any Transformers model: :class:`KroneckerConfig`, :func:`kroneckerize`,
the module table (:mod:`.dispatch`) and loading through ``from_pretrained`` (:mod:`.hf_quantizer`)."""

from .config import KroneckerConfig
from .dispatch import KRONECKER_DISPATCH, KroneckerDispatch, ScaledKroneckerEmbedding, TiedKroneckerHead
from .hf_quantizer import KroneckerHfQuantizer
from .kroneckerize import kroneckerize, resolve_modules

__all__ = ["KRONECKER_DISPATCH", "KroneckerConfig", "KroneckerDispatch", "KroneckerHfQuantizer",
           "ScaledKroneckerEmbedding", "TiedKroneckerHead", "kroneckerize", "resolve_modules"]
