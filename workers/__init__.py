"""Worker processes: one per model instance. Never imports ``server``."""
