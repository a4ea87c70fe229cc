"""The public ops as data, for the tests that run every op the same way (test_layouts.py, test_autograd.py).

Each `Op` lists its tensor arguments (shape and kind) and calls the op on a module: `fastcenter.ops` for the
implementation under test, `fastcenter.reference` (on float64 copies) for the truth. Shapes are small but
awkward: widths and vocabularies that are not powers of two, a cos/sin cache longer than the sequence, grouped
k heads, a ragged last chunk of the linear cross-entropy.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from conftest import DEVICE

BACKENDS = ("triton", "cpu", "reference")


@dataclass
class Arg:
    name: str
    shape: tuple
    kind: str = "float"  # "float": differentiable; "table": float32 constant (cos/sin); "target": class ids


@dataclass
class Op:
    name: str
    args: list[Arg]
    call: Callable  # (module, **tensors) -> tuple of outputs
    vocab: int = 0  # for targets

    @property
    def differentiable(self) -> list[str]:
        return [a.name for a in self.args if a.kind == "float"]


D, V = 40, 50  # a row width that is not a power of two; a vocabulary that is not either
LCE_OPTIONS = dict(chunk_size=3, label_smoothing=0.1, z_loss=1e-3, softcap=4.0)

ROPE_ARGS = [Arg("q", (2, 5, 3, 16)), Arg("k", (2, 5, 2, 16)), Arg("cos", (6, 8), "table"), Arg("sin", (6, 8), "table")]
LCE_ARGS = [
    Arg("input", (2, 4, 16)),
    Arg("linear_weight", (V, 16)),
    Arg("target", (2, 4), "target"),
    Arg("linear_bias", (V,)),
]


def _lce(**options):
    def call(m, input, linear_weight, target, linear_bias):
        return (m.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, **options),)

    return call


OPS = {
    op.name: op
    for op in [
        Op(
            "rms_norm",
            [Arg("input", (2, 3, D)), Arg("weight", (D,))],
            lambda m, input, weight: (m.rms_norm(input, (D,), weight, 1e-5),),
        ),
        Op(
            "center_rms_norm",
            [Arg("input", (2, 3, D)), Arg("weight", (D,)), Arg("center", (D,)), Arg("residual", (2, 3, D))],
            lambda m, input, weight, center, residual: m.center_rms_norm(
                input, weight, center=center, residual=residual, eps=1e-5
            ),
        ),
        Op(  # Gemma's RMSNorm: * (1 + weight)
            "rms_norm_offset",
            [Arg("input", (2, 3, D)), Arg("weight", (D,))],
            lambda m, input, weight: (m.rms_norm(input, (D,), weight, 1e-5, weight_offset=1.0),),
        ),
        Op(
            "center_rms_norm_offset",
            [Arg("input", (2, 3, D)), Arg("weight", (D,)), Arg("center", (D,)), Arg("residual", (2, 3, D))],
            lambda m, input, weight, center, residual: m.center_rms_norm(
                input, weight, center=center, residual=residual, eps=1e-5, weight_offset=1.0
            ),
        ),
        Op(
            "center_rms_norm_per_token_center",
            [Arg("input", (2, 3, D)), Arg("weight", (D,)), Arg("center", (2, 3, D))],
            lambda m, input, weight, center: m.center_rms_norm(input, weight, center=center, eps=1e-5),
        ),
        Op("rope", ROPE_ARGS, lambda m, q, k, cos, sin: m.rope(q, k, cos, sin)),
        Op("rope_interleaved", ROPE_ARGS, lambda m, q, k, cos, sin: m.rope(q, k, cos, sin, interleaved=True)),
        Op("swiglu", [Arg("gate", (3, 4, 24)), Arg("up", (3, 4, 24))], lambda m, gate, up: (m.swiglu(gate, up),)),
        Op("swiglu_packed", [Arg("packed", (3, 4, 48))], lambda m, packed: (m.swiglu(packed),)),
        Op(
            "geglu",
            [Arg("gate", (3, 4, 24)), Arg("up", (3, 4, 24))],
            lambda m, gate, up: (m.geglu(gate, up, approximate="tanh"),),
        ),
        Op("geglu_packed", [Arg("packed", (3, 4, 48))], lambda m, packed: (m.geglu(packed),)),
        Op(
            "cross_entropy",
            [Arg("input", (7, V)), Arg("target", (7,), "target")],
            lambda m, input, target: (m.cross_entropy(input, target, reduction="none", label_smoothing=0.1),),
            vocab=V,
        ),
        Op("linear_cross_entropy", LCE_ARGS, _lce(**LCE_OPTIONS), vocab=V),
        Op("linear_cross_entropy_none", LCE_ARGS, _lce(reduction="none", **LCE_OPTIONS), vocab=V),
    ]
}


def values(op: Op, arg: Arg, device) -> torch.Tensor:
    """Fresh random values for one argument (contiguous)."""
    if arg.kind == "target":
        target = torch.randint(0, op.vocab, arg.shape, device=device)
        target.view(-1)[1] = -100  # one ignored token
        return target
    if arg.kind == "table":
        return torch.rand(arg.shape, device=device) * 2 - 1
    if arg.name == "weight":
        return 1.0 + 0.3 * torch.randn(arg.shape, device=device)
    scale = 0.3 if arg.name == "linear_weight" else 1.0
    return scale * torch.randn(arg.shape, device=device)


def select_backend(name: str, monkeypatch) -> str:
    """Make `name` the backend the ops pick (the dispatch reads the environment at call time); return the device
    to put the tensors on ("cpu" needs CPU tensors and no interpreter, even on a GPU machine)."""
    if name == "reference":
        monkeypatch.setenv("FASTCENTER_BACKEND", "reference")
        return DEVICE
    monkeypatch.delenv("FASTCENTER_BACKEND", raising=False)
    if name == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        return "cpu"
    return DEVICE
