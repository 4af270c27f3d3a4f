"""A lean install: the worker imports without any cloud SDK, and a backend whose SDK is missing says
which extra to install.

Each case runs a fresh interpreter whose ``sitecustomize`` (on PYTHONPATH) puts a finder first on
``sys.meta_path`` that refuses the modules named in ``BLOCKED_MODULES``, as if they were not
installed; the positive control runs the same script without the blocked modules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from providers.registry import BACKEND_EXTRAS

REPO = Path(__file__).resolve().parents[3]

HOOK = '''
import os
import sys

_BLOCKED = frozenset(n for n in os.environ.get("BLOCKED_MODULES", "").split(",") if n)


class _NotInstalled:
    """Refuse the blocked top-level modules (and their submodules) as an absent package is refused."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
'''

# Selects each backend as the worker does (its ProviderRegistry) and reports what happened.
SCRIPT = """
import json
import os
import sys

import worker  # noqa: F401  # the worker module imports without the blocked SDKs
from providers.registry import ProviderRegistry
from sandbox.errors import SandboxError
from sandbox.settings import Settings

registry = ProviderRegistry(Settings(data_dir=os.environ["DATA_DIR"]))
outcomes = {}
for backend in sys.argv[1:]:
    try:
        provider = registry.get(backend)
    except SandboxError as err:
        outcomes[backend] = {"error": type(err).__name__, "message": err.message}
    else:
        outcomes[backend] = {"built": type(provider).__name__, "backend_id": provider.backend_id}
imported = sorted({m.partition(".")[0] for m in sys.modules} & set(os.environ["SDK_MODULES"].split(",")))
print(json.dumps({"outcomes": outcomes, "sdk_modules_imported_by_worker": imported}))
"""

SDK_MODULES = sorted({module for extra in BACKEND_EXTRAS.values() for module in extra.modules})
STUB_ENV = {
    "SANDBOX_E2B_API_KEY": "e2b_0123456789abcdef",
    "SANDBOX_DAYTONA_API_KEY": "dtn_0123456789abcdef",
    "SANDBOX_RUNLOOP_API_KEY": "ak_0123456789abcdef",
    "SANDBOX_BLAXEL_API_KEY": "bl_0123456789abcdef",
    "SANDBOX_BLAXEL_WORKSPACE": "sandbox-test",
    "SANDBOX_VERCEL_TOKEN": "vc_0123456789abcdef",
    "SANDBOX_VERCEL_PROJECT_ID": "prj_0123456789",
    "SANDBOX_CLOUDFLARE_WORKER_URL": "https://sandbox.example.workers.dev",
}


def _select(tmp_path: Path, backends: list[str], blocked: list[str]) -> dict[str, object]:
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SANDBOX_", "E2B_", "DAYTONA_", "RUNLOOP_", "BL_"))}
    env.update(STUB_ENV)
    env.update(
        PYTHONPATH=os.pathsep.join([str(hook_dir), str(REPO)]),
        BLOCKED_MODULES=",".join(blocked),
        SDK_MODULES=",".join(SDK_MODULES),
        DATA_DIR=str(tmp_path / "data"),
    )
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *backends],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_without_the_e2b_sdk_the_worker_imports_and_selecting_e2b_names_the_extra(tmp_path: Path) -> None:
    result = _select(tmp_path, ["e2b", "local"], blocked=["e2b"])
    e2b = result["outcomes"]["e2b"]  # type: ignore[index]
    assert e2b["error"] == "SandboxConfigError"
    assert "the e2b backend needs its SDK: pip install 'sandbox-runtime[e2b]'" in e2b["message"]
    # Another backend of the same worker is unaffected.
    assert result["outcomes"]["local"]["backend_id"] == "unix_local"  # type: ignore[index]


def test_with_the_e2b_sdk_the_same_selection_builds_the_provider(tmp_path: Path) -> None:
    result = _select(tmp_path, ["e2b"], blocked=[])
    assert result["outcomes"] == {"e2b": {"built": "E2BProvider", "backend_id": "e2b"}}


def test_the_worker_imports_no_cloud_sdk(tmp_path: Path) -> None:
    result = _select(tmp_path, [], blocked=[])
    assert result["sdk_modules_imported_by_worker"] == []


def test_with_no_cloud_sdk_at_all_each_backend_names_its_own_extra(tmp_path: Path) -> None:
    backends = sorted(BACKEND_EXTRAS)
    result = _select(tmp_path, backends, blocked=SDK_MODULES)
    outcomes: dict[str, dict[str, str]] = result["outcomes"]  # type: ignore[assignment]
    for backend in backends:
        assert outcomes[backend]["error"] == "SandboxConfigError", backend
        assert f"pip install 'sandbox-runtime[{BACKEND_EXTRAS[backend].extra}]'" in outcomes[backend]["message"]
