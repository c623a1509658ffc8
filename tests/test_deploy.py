"""The deployment files: both compose stacks against the Compose Specification's JSON schema,
and the promises a schema cannot check (loopback ports, non-root, read-only weights, no
credentials in the image, one state volume per watcher)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cxrsr.config import PROJECT_ROOT

SINGLE = PROJECT_ROOT / "docker-compose.yml"
HOSPITAL = PROJECT_ROOT / "deploy" / "hospital" / "docker-compose.yml"
#: SOURCE:TARGET[:MODE], where SOURCE may hold ${VAR:-default} (a colon not before a slash).
MOUNT = re.compile(r"(.*?):(/[^:]*)(?::(\w+))?")
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"


def _load(path: Path) -> dict[str, Any]:
    from ruamel.yaml import YAML  # installed with check-jsonschema

    document = YAML(typ="safe").load(path.read_text())
    assert isinstance(document, dict)
    return document


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with the compose-spec schema it vendors (no network)."""
    if not CHECK_JSONSCHEMA.exists():
        from tests.conftest import missing_prerequisite

        missing_prerequisite("check-jsonschema is not installed (requirements-dev.txt)")
    return subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("path", [SINGLE, HOSPITAL], ids=["single", "hospital"])
def test_compose_files_follow_the_compose_specification(path: Path) -> None:
    checked = _validate(path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_schema_check_refuses_a_broken_compose_file(tmp_path: Path) -> None:
    """The validator really judges: a misspelt service key fails."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(SINGLE.read_text().replace("restart:", "restrat:"))
    checked = _validate(broken)
    assert checked.returncode != 0
    assert "restrat" in checked.stdout + checked.stderr


@pytest.mark.parametrize("path", [SINGLE, HOSPITAL], ids=["single", "hospital"])
def test_published_ports_listen_on_loopback_only(path: Path) -> None:
    for name, service in _load(path)["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_hospital_stack_shape() -> None:
    """PostgreSQL unpublished and waited for; watchers non-root, read-only, each its own state."""
    services = _load(HOSPITAL)["services"]
    assert "ports" not in services["postgres"]
    assert services["orthanc"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    watchers = {name: s for name, s in services.items() if name.startswith("watcher")}
    assert len(watchers) >= 2
    state_volumes = set()
    for name, service in watchers.items():
        uid = str(service["user"]).split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{name} runs as root"
        assert service["read_only"] is True
        assert service["restart"] == "unless-stopped"
        mounts = {}
        for volume in service["volumes"]:
            source, target, mode = MOUNT.fullmatch(volume).groups()  # type: ignore[union-attr]
            mounts[target] = (source, mode)
        assert mounts["/var/lib/cxrsr/weights"][1] == "ro", f"{name}: weights writable"
        state_volumes.add(mounts["/var/lib/cxrsr/state"][0])
        assert service["environment"]["CXRSR_DOTENV"] == "/dev/null"
    assert len(state_volumes) == len(watchers), "two watchers share one state folder"


def test_hospital_healthcheck_and_command_parse_as_watcher_options() -> None:
    sys.path.insert(0, str(PROJECT_ROOT))
    import watch_orthanc

    parser = watch_orthanc.build_parser()
    services = _load(HOSPITAL)["services"]
    test = services["watcher-1"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "/opt/cxrsr/watch_orthanc.py"]
    args = parser.parse_args(test[3:])
    assert args.check_health and str(args.state_dir) == "/var/lib/cxrsr/state"

    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    args = parser.parse_args(cmd)
    assert str(args.state_dir) == "/var/lib/cxrsr/state"
    assert str(args.cache_dir) == "/var/lib/cxrsr/weights"


def test_orthanc_postgresql_config_lets_several_orthancs_share_the_database() -> None:
    config = json.loads((HOSPITAL.parent / "orthanc-postgresql.json").read_text())["PostgreSQL"]
    assert config["EnableIndex"] is True
    assert config["Lock"] is False
    assert config["Password"] == "${POSTGRES_PASSWORD}", "a password written into the repository"


def test_image_runs_unprivileged_and_never_contains_credentials() -> None:
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    ignored = set((PROJECT_ROOT / ".dockerignore").read_text().split())
    assert {".env", "data", "output", ".venv"} <= ignored
    for line in dockerfile.splitlines():
        if line.startswith(("COPY", "ADD")):
            sources = shlex.split(line)[1:-1]
            assert all(not s.startswith((".env", "data", "output")) for s in sources), line
            assert "." not in sources, f"copies the whole checkout: {line}"
