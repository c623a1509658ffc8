"""The documentation: the site builds with no warning, and the README stays short and linked.

``mkdocs build --strict`` turns every warning into a failure: a link to a missing page or
anchor, a page left out of the nav, a file a snippet names that is not there, a module the API
reference cannot load. The site is built into a temporary folder, never into ``site/``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import missing_prerequisite

from cxrsr.config import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
README_MAX_LINES = 220
BUILD_TIMEOUT = 300  # seconds; a build takes a few

# [text](target), ![alt](target) and reference definitions "[name]: target".
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, …

TWO_COMMANDS = (
    "```bash\n"
    "./run.sh     # set everything up, start Orthanc, classify data/, write SRs, upload, verify\n"
    "./test.sh    # set everything up and run the tests (ruff, mypy, pytest against a real"
    " Orthanc)\n"
    "```\n"
)


def require_docs_tools() -> None:
    """MkDocs, Material and mkdocstrings in this interpreter (requirements-dev.txt)."""
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing_prerequisite(
                f"{module} not installed (requirements-dev.txt; test.sh installs it)"
            )


def mkdocs_build(project: Path, site_dir: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` of ``project`` into ``site_dir``, as a developer runs it."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # Material's banner, not a build warning
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )


def warnings_of(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if "WARNING" in line]


def test_the_site_builds_in_strict_mode_without_a_warning(tmp_path: Path) -> None:
    require_docs_tools()
    site = tmp_path / "site"
    result = mkdocs_build(PROJECT_ROOT, site)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert warnings_of(result) == [], output
    # The API reference was generated, not left as ":::" lines: every page documents objects.
    api_pages = sorted((PROJECT_ROOT / "docs" / "api").glob("*.md"))
    assert api_pages
    for page in api_pages:
        if page.name == "index.md":
            continue
        html = (site / "api" / page.stem / "index.html").read_text(encoding="utf-8")
        assert "doc-heading" in html, f"{page.name}: no object documented"
        assert ":::" not in html, f"{page.name}: an identifier was not rendered"
    # Snippets were included: the deployment page shows the systemd unit itself.
    deployment = (site / "deployment" / "index.html").read_text(encoding="utf-8")
    assert "RestartPreventExitStatus" in deployment


def test_a_broken_link_or_anchor_fails_the_build(tmp_path: Path) -> None:
    """The strict build is what catches them: a copy of the site with one of each must fail."""
    require_docs_tools()
    project = tmp_path / "project"
    project.mkdir()
    for name in ("mkdocs.yml", "CHANGELOG.md", "docker-compose.yml"):
        shutil.copy2(PROJECT_ROOT / name, project / name)
    for folder in ("docs", "deploy"):
        shutil.copytree(PROJECT_ROOT / folder, project / folder)
    for page in (project / "docs" / "api").glob("*.md"):  # no API reference: a faster build
        page.write_text(f"# {page.stem}\n", encoding="utf-8")
    index = project / "docs" / "index.md"
    index.write_text(
        index.read_text(encoding="utf-8")
        + "\n[gone](no-such-page.md) and [no anchor](pipeline.md#no-such-heading)\n",
        encoding="utf-8",
    )
    result = mkdocs_build(project, tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    warnings = warnings_of(result)
    assert any("no-such-page.md" in line for line in warnings), output
    assert any("no-such-heading" in line for line in warnings), output


def test_the_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move detail to docs/"
    )


def relative_links(markdown: str) -> list[str]:
    """Every link target in ``markdown`` that names a file of the repository, anchors dropped."""
    targets = INLINE_LINK.findall(markdown) + REFERENCE_LINK.findall(markdown)
    files = []
    for target in targets:
        if EXTERNAL.match(target) or target.startswith("#"):
            continue
        files.append(target.split("#", 1)[0].split("?", 1)[0])
    return files


def test_relative_links_are_found_in_markdown() -> None:
    markdown = (
        'See [the docs](docs/index.md#top), ![pic](docs/a.png "title"), [web](https://x.org/a),\n'
        "[here](#exit-codes) and <https://y.org>.\n\n[ref]: CHANGELOG.md\n"
    )
    assert relative_links(markdown) == ["docs/index.md", "docs/a.png", "CHANGELOG.md"]


def test_every_relative_link_in_the_readme_names_an_existing_file() -> None:
    links = relative_links(README.read_text(encoding="utf-8"))
    assert links, "the README links no documentation page"
    missing = [link for link in links if not (PROJECT_ROOT / link).exists()]
    assert missing == [], f"README.md links files that do not exist: {missing}"


def test_the_readme_keeps_the_two_commands() -> None:
    """The README's two commands are a contract: one runs the job, one runs the tests (CI)."""
    assert TWO_COMMANDS in README.read_text(encoding="utf-8")
    for script in ("run.sh", "test.sh"):
        assert os.access(PROJECT_ROOT / script, os.X_OK), script


def load_rest_roles() -> ModuleType:
    if importlib.util.find_spec("griffe") is None:
        missing_prerequisite("griffe not installed (mkdocstrings[python], requirements-dev.txt)")
    path = PROJECT_ROOT / "docs" / "griffe_rest_roles.py"
    spec = importlib.util.spec_from_file_location("griffe_rest_roles", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("rest", "markdown"),
    [
        (":func:`write_report`", "`write_report`"),
        (":mod:`cxrsr.report.page` builds", "`cxrsr.report.page` builds"),
        (":class:`~cxrsr.report.page.Report`", "`Report`"),
        (":py:meth:`Foo.bar`", "`Foo.bar`"),
        ("Command line::\n\n    python -m x", "Command line:\n\n    python -m x"),
        ("Shape::\n", "Shape:\n"),
        ("``code`` stays", "``code`` stays"),
    ],
)
def test_rest_roles_become_markdown(rest: str, markdown: str) -> None:
    assert load_rest_roles().markdown_from_rest(rest) == markdown
