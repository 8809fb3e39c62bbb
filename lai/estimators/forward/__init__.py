"""The forward-mode machinery behind exact Ghost: releasing unreachable tangents
(``tangents.py``), lean tangent rules (``forward_fastpaths.py``) and JVPs for custom
autograd functions (``custom_function_jvp.py``)."""
