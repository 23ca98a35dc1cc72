"""dsalign.kernels.

Installed as ``dsalign.kernels``. When a checkout's root is on ``sys.path`` (``python -m pytest`` or ``python -c``
run from it, pytest's rootdir insertion), Python also finds this folder as a top-level package named ``kernels``,
which would shadow the ``kernels`` distribution that transformers imports (``transformers.integrations.hub_kernels``,
a dependency since transformers 5.25): every DeepseekV3 import then fails. Imported under that name, this module
hands the name over to the installed distribution (or, without one, stays an empty placeholder).
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _path = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
    # Without the distribution this module stays an empty placeholder (no ``__version__``), which transformers'
    # ``is_kernels_available()`` reports as unusable; raising here would break its import instead.
