"""Loading a Kronecker model class refuses a checkpoint whose factors its config does not describe.

transformers only warns about missing and unexpected keys and initialises the missing ones at
random: a ``config.json`` whose ``kronecker_factors`` was edited (or dropped) would load another
model silently. Factors in the checkpoint that the config does not list, or a dense weight where
the config lists factors, are errors; factors simply absent (a partial checkpoint) are
initialised by ``_init_weights`` as transformers does for any missing key. Standard library only,
so that it travels with saved model code.
"""

__all__ = ["StrictKroneckerLoadingMixin"]

_FACTORS = ("A", "B")


def _factor_keys(keys) -> list:
    return sorted(k for k in keys or () if k.rsplit(".", 1)[-1] in _FACTORS)


class StrictKroneckerLoadingMixin:
    """``from_pretrained`` that raises when the checkpoint's Kronecker factors and the config disagree."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        unexpected = _factor_keys(info.get("unexpected_keys"))
        dense = set(info.get("unexpected_keys") or ())
        # a listed Kronecker module whose checkpoint entry is a dense matrix (not merely absent)
        missing = [k for k in _factor_keys(info.get("missing_keys")) if k.rsplit(".", 1)[0] + ".weight" in dense]
        if unexpected or missing:
            what = (f"factors the config does not list ({', '.join(unexpected[:4])}{'…' if len(unexpected) > 4 else ''})"
                    if unexpected else f"no factors for modules the config lists ({', '.join(missing[:4])}"
                                       f"{'…' if len(missing) > 4 else ''})")
            raise ValueError(f"the checkpoint has {what}: config.json's kronecker_factors and the weights disagree; "
                             "restore the config saved with the weights")
        return (model, info) if want_info else model
