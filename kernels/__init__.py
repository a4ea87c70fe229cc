"""Triton kernels of fastcenter, one file per op family; installed as `fastcenter.kernels`.

They import only torch and triton. `fastcenter.ops` wraps them as custom ops with autograd; call those.
"""

if __name__ != "fastcenter.kernels":
    # This folder was imported under its own name: the repository root is on sys.path (`python -m pytest` or a
    # script run there). "kernels" is another project's name -- Hugging Face's kernel hub, which transformers
    # probes for and imports -- so step aside: hand the import to the installed package of that name, or, with
    # none installed, leave what Python finds for a folder without __init__.py: an empty namespace package (no
    # __file__, no __version__, no submodules), which transformers reads as "not installed". Raising here instead
    # would break transformers' probe, which imports whatever importlib.util.find_spec("kernels") finds.
    # fastcenter itself only ever imports this folder as fastcenter.kernels.
    def _step_aside() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        others = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec(__name__, others)
        if spec is None:
            spec = importlib.machinery.ModuleSpec(__name__, None, is_package=True)
            spec.submodule_search_locations = []
        module = importlib.util.module_from_spec(spec)
        sys.modules[__name__] = module  # the import statement returns what sys.modules holds after this runs
        if spec.loader is not None:
            spec.loader.exec_module(module)

    _step_aside()
