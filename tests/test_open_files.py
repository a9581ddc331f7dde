"""chatd raises its soft limit of open files to the hard one at start: a
connection is a descriptor, and a shell's default soft limit (often 1,024)
would refuse connections long before the machine runs out (a real process,
started with a low soft limit)."""

from __future__ import annotations

import resource
from pathlib import Path

import trio

from tests.helpers.servers import chatd_process, config_text, free_port, wait_healthy


def limits_of(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files line")


async def test_the_soft_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 256
    assert hard == resource.RLIM_INFINITY or hard > low
    port = free_port()
    config = tmp_path / "chatd.toml"
    config.write_text(config_text(port, tmp_path / "chatd.db"))
    log = tmp_path / "chatd.log"
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # inherited by the child
    try:
        async with chatd_process(config, log) as proc:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            await wait_healthy(proc, port, log)
            raised, its_hard = limits_of(proc.pid)
            want = hard if hard != resource.RLIM_INFINITY else 1_048_576
            assert (raised, its_hard) == (min(want, 1_048_576), hard)
            text = await trio.Path(log).read_text()
            assert f"open files: soft limit raised from {low} to {raised}" in text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
