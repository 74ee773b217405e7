"""Model adapters: generation backends (``backends``), tiny models built from config (``tiny``) and the
embedding encoders (``encoders``)."""
