"""A short script using the Python client exits cleanly, every time (no native-client abort at exit).

The Temporal SDK's native client freed while the interpreter finalizes aborted about one short
script in four ("Fatal Python error: PyGILState_Release"); ``client.connection`` collects it first.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

pytestmark = pytest.mark.timeout(300)

RUNS = 20

SCRIPT = """
import asyncio, sys
from client import LeaseNotFound, connect_leases, open_leases, resolve_settings

KEPT = []

async def main() -> None:
    async with open_leases() as leases:  # the documented way
        KEPT.append(leases)  # even kept in a global past the block
        try:
            await leases.describe(sys.argv[1], "g1")
        except LeaseNotFound:
            pass
    plain = await connect_leases(resolve_settings())  # and a client simply dropped at the end
    try:
        await plain.describe(sys.argv[1], "g2")
    except LeaseNotFound:
        pass
    print("done")

asyncio.run(main())
"""


async def test_a_short_client_script_exits_0_every_time(temporal_env: WorkflowEnvironment, tmp_path: Path) -> None:
    script = tmp_path / "short.py"
    script.write_text(SCRIPT)
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith("SANDBOX_")}
    env |= {
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "SANDBOX_TEMPORAL_ADDRESS": temporal_env.client.service_client.config.target_host,
        "SANDBOX_DATA_DIR": str(tmp_path / "data"),
        "SANDBOX_PAYLOAD_ENCRYPTION": "false",
    }

    async def once(i: int) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            f"exit-{i}",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(), err.decode()

    for pair in range(0, RUNS, 2):  # two at a time: the crash is a race, load makes it likelier
        for code, out, err in await asyncio.gather(once(pair), once(pair + 1)):
            assert "Fatal Python error" not in err, err
            assert code == 0 and out == "done\n", (code, out, err)
