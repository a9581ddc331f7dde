"""The coverage-guided fuzz target ``fuzz/fuzz_frames.py`` (bytes -> wsproto
with chatd's extensions -> text -> ``decode_frame``), in CI form.

* Its seed corpus (valid frames, fragments with a ping between them, deflated
  messages, compression bombs, an endless fragmented message, deep nesting,
  bad UTF-8) runs through the target in-process: a bomb that inflates past
  the limit, or a decoder error that escapes, fails here.
* Under atheris, the target runs in a subprocess for a bounded number of
  inputs (``-runs``), from that corpus: seconds. ``CHATD_LONG=1`` runs it for
  a million. Long runs by hand: see the target's docstring.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers.servers import REPO

TARGET = REPO / "fuzz" / "fuzz_frames.py"
RUNS = 1_000_000 if os.environ.get("CHATD_LONG") == "1" else 10_000


def load_target() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_frames", TARGET)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_corpus_passes_the_target() -> None:
    target = load_target()
    corpus = target.seeds()
    assert {"raw-bomb", "frames-bomb", "raw-endless", "raw-deflated"} <= set(corpus)
    for name, data in corpus.items():
        try:
            target.TestOneInput(data)
        except Exception as exc:
            raise AssertionError(f"seed {name}: {exc!r}") from exc


def test_target_reaches_the_decoder_and_the_limits() -> None:
    """The seeds exercise what they claim: a valid frame is decoded, the
    bombs and the endless message are refused at the limit (1009)."""
    target = load_target()
    corpus = target.seeds()

    def close_code(data: bytes) -> int | None:
        wire = data[1:] if data[0] & 1 else target.structured(data[1:])
        ws = target.server_connection()
        ws.receive_data(wire)
        for event in ws.events():
            if isinstance(event, target.CloseConnection):
                return int(event.code)
        return None

    assert close_code(corpus["raw-ping"]) is None
    assert close_code(corpus["frames-ping"]) is None
    for name in ("raw-bomb", "frames-bomb", "raw-endless"):
        assert close_code(corpus[name]) == 1009, name
    assert close_code(corpus["raw-bad-utf8"]) == 1007


def test_plain_python_smoke_run() -> None:
    """Random mutations of the seeds without atheris (the target's --smoke)."""
    assert load_target().smoke(2000, seed=6) == 2000 + len(load_target().seeds())


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (requirements-test.txt pins it)",
)
def test_atheris_bounded_run(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("PYTHONWARNINGS", None)
    subprocess.run(
        [sys.executable, str(TARGET), "--seeds", str(corpus)], check=True, env=env, timeout=60
    )
    done = subprocess.run(
        [sys.executable, str(TARGET), f"-runs={RUNS}", "-seed=1", "-timeout=10", str(corpus)],
        capture_output=True,
        env=env,
        timeout=3600,
        cwd=tmp_path,  # crash-* files, if any, land here
    )
    log = done.stderr.decode(errors="replace")
    assert done.returncode == 0, log[-4000:]
    assert f"Done {RUNS} runs" in log, log[-4000:]
