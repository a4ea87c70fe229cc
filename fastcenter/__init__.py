"""fastcenter: fused Triton kernels for small GPT training, and an honest study of vector centering.

    from fastcenter import ops          # rms_norm, center_rms_norm, rope, swiglu, linear_cross_entropy, ...
    from fastcenter.nn import RMSNorm, VectorCentering
    from fastcenter.model import GPT, GPTConfig
"""

__version__ = "0.1.0"


def _kernels_of_a_clone() -> None:
    """Make `fastcenter.kernels` importable from a clone that was never pip-installed.

    The Triton kernels live in the repository's top-level `kernels/` folder; pyproject.toml's package-dir maps it
    to `fastcenter.kernels` when the project is installed (a real subfolder in a wheel, a finder in an editable
    install). A plain clone has neither, and `python train.py --fused` run there (as nanoGPT's users work, and as
    the GPU lease runs the tree, with no install step) would find no kernels. So when this package sits in a
    repository with a `kernels/` folder beside it and has no `kernels` subfolder of its own, that folder is
    registered here under the name `fastcenter.kernels` -- never as a top-level module named "kernels", which
    is another project's name. Only the package is created; its modules import on first use.
    """
    import importlib.util
    import os
    import sys

    name = __name__ + ".kernels"
    here = os.path.dirname(os.path.abspath(__file__))
    if name in sys.modules or os.path.isdir(os.path.join(here, "kernels")):
        return
    folder = os.path.join(os.path.dirname(here), "kernels")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module  # what the import system does for a submodule: fastcenter.kernels as an attribute


_kernels_of_a_clone()
