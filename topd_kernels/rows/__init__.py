"""Row backends: the per-row work over the vocabulary (`contract.py`), and which code runs it (`registry.py`)."""
