"""Online estimators: they value each training batch with the live model (LAI and LLI in
``lai.py``, exact Ghost in ``ghost.py`` with its probe form in ``ghost_probe.py``, the paper
code's flattened Ghost in ``ghost_flat.py``, SPL's loss score in ``spl.py``) and their
helpers (``offload.py``: the LAI cache in host memory; ``precondition.py``: Adam)."""
