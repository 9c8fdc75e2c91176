"""Grammar backends; each module is imported only when selected (optional dependencies)."""
