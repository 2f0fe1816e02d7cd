"""Learning from the field (docs/feedback.md): corrections users send with their consent (the feedback
store), training from them (``train --feedback``), the promotion gate (``canestra promote``) and the
``current`` pointer a service follows."""

__all__ = ["pointer", "promote", "store", "training"]
