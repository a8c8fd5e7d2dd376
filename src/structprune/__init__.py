"""StructPrune: structured global pruning of LLMs with one decoder layer on the GPU.

    from structprune import load_model, prune, perplexity
    model, tok = load_model("smollm2-135m")
    result = prune(model, tokenizer=tok, method="wanda-sp", sparsity=0.3, nsamples=8, seqlen=512)
    print(result.report["sparsity_achieved"], perplexity(model, tok, "wikitext2", limit=8).ppl)
"""

from .api import PruneResult, prune, prune_checkpoint
from .config import PruneConfig
from .errors import CalibrationError, StructPruneError, UnsupportedArchitectureError

from .version import __version__


def load_model(*args, **kwargs):
    """Load ``(model, tokenizer)`` from a folder, .gguf file, hub name or ``smollm2-135m``."""
    from .models.loading import load_model as _load

    return _load(*args, **kwargs)


def load_pruned(*args, **kwargs):
    """Load a folder written by ``structprune prune --output`` (verified; see :mod:`structprune.export.loader`)."""
    from .export.loader import load_pruned as _load

    return _load(*args, **kwargs)


def perplexity(*args, **kwargs):
    """Perplexity under the project's protocol (see :mod:`structprune.eval.perplexity`)."""
    from .eval.perplexity import perplexity as _ppl

    return _ppl(*args, **kwargs)


__all__ = ["PruneConfig", "PruneResult", "prune", "prune_checkpoint", "load_model", "load_pruned", "perplexity", "StructPruneError",
           "CalibrationError", "UnsupportedArchitectureError", "__version__"]
