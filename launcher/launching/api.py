"""``launcher.launch(fn, nproc=...)``: the Python API, for a loop without a job file."""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from ..env import detect
from ..errors import LaunchError
from ..spec import MAIN_ALIAS, RankSpec


def launch(
    fn: Callable[..., Any],
    nproc: int = 2,
    backend: str = "auto",
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    timeout_s: float = 120.0,
    startup_timeout_s: float = 300.0,
    seed: int | None = None,
    log_dir: str | os.PathLike[str] | None = None,
) -> dict[int, Any]:
    """Run ``fn(*args, **kwargs)`` in ``nproc`` ranks with the process group ready.

    ``fn`` must be defined at module level (in a module or in the script being run), and a script that calls
    ``launch`` must do so under ``if __name__ == "__main__":``. Returns ``{rank: return value}``; raises
    :class:`launcher.RankFailure` with the failing rank's traceback.

    Under torchrun or in an srun step the calling process already is one rank: ``fn`` runs in place (``nproc``
    is ignored; the world size is the launcher's) and only this rank's result is returned, so the same script
    works with ``python script.py`` and ``torchrun --nproc-per-node N script.py``.
    """
    settings: dict[str, Any] = {"backend": backend, "timeout_s": timeout_s,
                                "startup_timeout_s": startup_timeout_s, "seed": seed}
    caller = inspect.currentframe()
    assert caller is not None and caller.f_back is not None  # CPython keeps frames
    _refuse_unguarded_main(caller.f_back)
    environment = detect()
    if not environment.spawns_here():
        from ..rank.program import execute  # this process is the rank: nothing crosses a process boundary

        spec = RankSpec(args=tuple(args), kwargs=dict(kwargs or {}), **settings)
        return {environment.rank(): execute(spec, fn=fn)}
    from .local import spawn

    spec = RankSpec.for_function(fn, args, kwargs, **settings)
    if log_dir is None:
        with tempfile.TemporaryDirectory(prefix="launcher-") as tmp:
            return spawn(spec, nproc, Path(tmp))
    return spawn(spec, nproc, Path(log_dir))


def _refuse_unguarded_main(caller: FrameType) -> None:
    """A script calling ``launch`` at module level starts ranks that import it again: each rank would then
    call ``launch`` too. Refused with the fix instead of a page of bootstrap errors."""
    at_top = caller.f_code.co_name == "<module>"
    if at_top and caller.f_globals.get("__name__") in (MAIN_ALIAS, "__mp_main__"):
        raise LaunchError(
            f"launcher.launch() runs at the top level of {caller.f_code.co_filename}, which every rank "
            "imports\n"
            'HINT: call it under `if __name__ == "__main__":` so that importing the script starts nothing'
        )
