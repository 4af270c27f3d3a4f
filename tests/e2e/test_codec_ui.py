"""The Temporal Web UI shows an encrypted exec to an operator only through the codec server.

A dev server with its Web UI (``--db-filename``, as ``sandboxctl up`` runs it) and, in the first
case, ``--ui-codec-endpoint`` pointing at ``python -m daemons.codec_server`` (same keys as the
worker). A lease exec carries a marker in its command and one in its output. Headless Chromium
opens the lease's history page: through the codec server both markers are shown decoded; without
a codec endpoint (the negative control, same page once its events have rendered) neither is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from sandbox.settings import Settings
from tests.conftest import FAST_TIMERS, REPO, free_port, running_runtime, wait_for_port
from tests.dev_server import DevServer, dev_server
from worker import connect
from workflows.models.lease import lease_workflow_id

RENDERED = "Workflow Execution Update Accepted"  # an event row of the exec update: the history has rendered


async def history_page_text(
    browser: Any, server: DevServer, tmp_path: Path, marker: str, *, decoded: bool
) -> tuple[str, str]:
    """Run a lease exec on ``server``, open its history page, and return the page's text and the output.

    The page is read once its events have rendered and, when ``decoded`` is expected, once the
    codec server's answers have replaced the payloads (the UI decodes after it renders).
    """
    settings = Settings(
        data_dir=tmp_path / "data", temporal_address=server.address, task_queue=f"ui-{uuid.uuid4()}", **FAST_TIMERS
    )
    client = await connect(settings)
    async with running_runtime(client, settings) as runtime:
        leases = runtime.leases()
        ws, g = f"ws-{uuid.uuid4().hex[:8]}", "g1"
        await leases.acquire(ws, g, kind="turn", holder_id="t1", backend="local")
        out = await leases.exec(ws, g, ["sh", "-c", f"printf '%s-%s\\n' {marker} out # {marker}-cmd"])
        await leases.release(ws, g, "t1", kind="turn")
    description = await client.get_workflow_handle(lease_workflow_id(ws, g)).describe()
    workflow = urllib.parse.quote(description.id, safe="")
    page = await browser.new_page()
    try:
        await page.goto(f"{server.ui_url}/namespaces/default/workflows/{workflow}/{description.run_id}/history")
        await page.get_by_text(RENDERED).first.wait_for(timeout=60_000)
        if decoded:
            wanted = f"{marker}-out"
            await page.wait_for_function("m => document.body.innerText.includes(m)", arg=wanted, timeout=60_000)
        return await page.inner_text("body"), out.stdout
    finally:
        await page.close()


async def test_history_page_decodes_through_the_codec_server(browser: Any, tmp_path: Path) -> None:
    marker = f"m{uuid.uuid4().hex[:10]}"  # short: the UI's event rows show the first ~60 characters of a payload
    codec_port = free_port()
    with dev_server(tmp_path, ui=True, codec_endpoint=f"http://127.0.0.1:{codec_port}") as server:
        codec = subprocess.Popen(
            [sys.executable, "-m", "daemons.codec_server", "--port", str(codec_port), "--ui-origin", server.ui_url],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},  # the session's SANDBOX_PAYLOAD_KEYS: the worker's keys
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "codec.log").open("wb"),
        )
        try:
            wait_for_port(codec_port, proc=codec)
            text, stdout = await history_page_text(browser, server, tmp_path, marker, decoded=True)
        finally:
            codec.terminate()
            codec.wait(timeout=10)
    assert stdout == f"{marker}-out\n"
    assert f"{marker}-out" in text  # the exec's output, decoded
    # Its activity summary, decoded, names the program only: the rest of an argv can hold a secret.
    assert "exec sh" in text
    assert f"{marker}-cmd" not in text


async def test_without_a_codec_endpoint_the_page_shows_no_marker(browser: Any, tmp_path: Path) -> None:
    marker = f"m{uuid.uuid4().hex[:10]}"  # short: the UI's event rows show the first ~60 characters of a payload
    with dev_server(tmp_path, ui=True) as server:
        text, stdout = await history_page_text(browser, server, tmp_path, marker, decoded=False)
    assert stdout == f"{marker}-out\n"
    assert RENDERED in text
    assert marker not in text
    assert "exec sh" not in text  # the summary is ciphertext too
