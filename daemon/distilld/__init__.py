"""distilld: a declarative distillation daemon."""

__version__ = "0.1.0"
