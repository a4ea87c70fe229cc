"""Faults on demand for tests that run train.py as a user would (a subprocess): Python imports this module at
start-up when tests/inject is on PYTHONPATH, and it acts only when FASTCENTER_INJECT names a fault.

    FASTCENTER_INJECT=nan_from_forward:13   the 13th training-mode forward of the GPT, and every later one,
                                            returns a NaN loss
    FASTCENTER_INJECT=enospc_on_save:2      the 2nd torch.save writes a few bytes, then fails as a full disk
    FASTCENTER_INJECT=buffers_at_eval:0     every evaluation first saves this process's centering statistics to
                                            $FASTCENTER_INJECT_DIR/rank<R>-eval<N>.pt (what each DDP rank uses)
"""

import os

_fault = os.environ.get("FASTCENTER_INJECT", "")
if _fault:
    import errno

    import torch

    _kind, _, _count = _fault.partition(":")
    _n = int(_count)
    _calls = {"n": 0}

    if _kind == "nan_from_forward":
        from fastcenter.model import GPT

        _forward = GPT.forward

        def _nan_forward(self, idx, targets=None):
            loss = _forward(self, idx, targets)
            if self.training:
                _calls["n"] += 1
                if _calls["n"] >= _n:
                    loss = loss * float("nan")
            return loss

        GPT.forward = _nan_forward
    elif _kind == "enospc_on_save":
        _save = torch.save

        def _full_disk_save(obj, f, *args, **kwargs):
            _calls["n"] += 1
            if _calls["n"] >= _n:
                f.write(b"half a checkpoint")
                raise OSError(errno.ENOSPC, "No space left on device")
            return _save(obj, f, *args, **kwargs)

        torch.save = _full_disk_save
    elif _kind == "buffers_at_eval":
        from fastcenter.training import Trainer

        _evaluate = Trainer.evaluate

        def _recording_evaluate(self, *args, **kwargs):
            _calls["n"] += 1
            stats = {k: v.clone() for k, v in self.raw_model.state_dict().items() if k.endswith("running_mean")}
            name = f"rank{self.dist.rank}-eval{_calls['n']}.pt"
            torch.save(stats, os.path.join(os.environ["FASTCENTER_INJECT_DIR"], name))
            return _evaluate(self, *args, **kwargs)

        Trainer.evaluate = _recording_evaluate
    else:
        raise ValueError(f"FASTCENTER_INJECT: unknown fault {_fault!r}")
