"""Provider adapters: one module per provider family, all behind the seam in ``base``."""
