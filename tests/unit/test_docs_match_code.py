"""README.md and docs/*.md against the code: every environment variable they name is read somewhere, every
worker setting is described, and docs/API.md's error table lists exactly the codes the worker and nginx send."""
from __future__ import annotations

import re
from pathlib import Path

from pydantic import AliasChoices

import api.errors
from api.settings import Settings
from scripts.render_nginx import ERRORS as NGINX_ERRORS

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VAR = re.compile(r"\b((?:FLUX|NGINX|FP4|BF16|FP8)_[A-Z0-9_]*[A-Z0-9])\b")
# FLUX_PRECISION is the entry point's (main_fp4.py ...), never read from the environment
NOT_SETTINGS = {"FLUX_PRECISION"}


def _settings_variables() -> set[str]:
    names = {"FP4_API_PORT", "BF16_API_PORT", "FP8_API_PORT"}  # load_settings' per-precision ports
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {c for c in alias.choices if isinstance(c, str)}
        else:
            names.add(f"FLUX_{field.upper()}")
    return names - NOT_SETTINGS


def _read_elsewhere() -> set[str]:
    """Variables the scripts, deploy files, benchmarks and test harness read (a reference, not a mention)."""
    found: set[str] = set()
    shell = [*ROOT.glob("*.sh"), *(ROOT / "scripts").glob("*.sh"), *(ROOT / "deploy").rglob("*.sh"),
             *(ROOT / "bench").rglob("*.sh"), ROOT / "Dockerfile"]
    for path in shell:
        found |= set(re.findall(r"\$\{?((?:FLUX|NGINX|FP4|BF16|FP8)_[A-Z0-9_]+)", path.read_text()))
    python = [*(ROOT / "scripts").glob("*.py"), *(ROOT / "bench").rglob("*.py"), *(ROOT / "tests").rglob("*.py"),
              *(ROOT / "deploy").rglob("*.py")]
    for path in python:
        found |= set(re.findall(r"""(?:environ(?:\.get)?[\[(]|getenv\()\s*["']([A-Z0-9_]+)["']""", path.read_text()))
    found |= set(re.findall(r'os\.getenv\("([A-Z0-9_]+)"\)', (ROOT / "load_test.lua").read_text()))
    for path in [ROOT / "docker-compose.multi-gpu.yml", *(ROOT / "deploy").rglob("*.yaml"),
                 *(ROOT / "deploy").rglob("*.yml")]:
        found |= set(re.findall(r"\$\{((?:FLUX|NGINX)_[A-Z0-9_]+)", path.read_text()))
    return found


def _documented() -> dict[str, set[str]]:
    where: dict[str, set[str]] = {}
    for doc in DOCS:
        for name in VAR.findall(doc.read_text()):
            where.setdefault(name, set()).add(doc.name)
    return where


def test_every_documented_variable_is_read_by_the_code():
    known = _settings_variables() | _read_elsewhere()
    unknown = {name: sorted(docs) for name, docs in _documented().items() if name not in known}
    assert not unknown, f"named in the docs, read nowhere: {unknown}"


def test_every_worker_setting_is_documented():
    documented = set(_documented())
    missing = sorted(name for name in _settings_variables() if name not in documented
                     and not any(alias in documented for alias in _aliases_of(name)))
    assert not missing, f"worker settings described in no doc: {missing}"


def _aliases_of(name: str) -> set[str]:
    for info in Settings.model_fields.values():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices) and name in alias.choices:
            return {c for c in alias.choices if isinstance(c, str)}
    return set()


def _produced_codes() -> set[str]:
    codes = set()

    def walk(cls):
        codes.add(cls.code)
        for sub in cls.__subclasses__():
            walk(sub)

    walk(api.errors.ApiError)
    codes |= {code for _, code, *_ in NGINX_ERRORS}
    template = (ROOT / "deploy" / "nginx" / "flux.conf.j2").read_text()
    codes |= set(re.findall(r'"code":"([a-z_]+)"', template))
    app = (ROOT / "api" / "app.py").read_text()
    codes |= set(re.findall(r'err\.code = [^\n]*?"([a-z_]+)"[^\n]*?"([a-z_]+)"', app)[0])
    return codes


def _documented_codes() -> set[str]:
    table = (ROOT / "docs" / "API.md").read_text()
    return set(re.findall(r"^\| (?:\d{3}|other) \| `([a-z_]+)` \|", table, re.M))


def test_the_error_table_lists_every_code_sent_and_no_other():
    produced, documented = _produced_codes(), _documented_codes()
    assert {"queue_full", "bad_gateway", "method_not_allowed", "worker_not_found"} <= produced
    assert produced - documented == set(), f"sent but not in docs/API.md's error table: {produced - documented}"
    assert documented - produced == set(), f"in docs/API.md's error table, sent by nothing: {documented - produced}"


def test_every_named_error_is_raised_somewhere():
    """A documented worker code is produced, not only declared: each ApiError subclass is used outside errors.py."""
    sources = "\n".join(p.read_text() for p in [*(ROOT / "api").glob("*.py"), *(ROOT / "models").glob("*.py")]
                        if p.name != "errors.py")
    unused = [cls.__name__ for cls in api.errors.ApiError.__subclasses__()
              if not re.search(rf"\b{cls.__name__}\b", sources)]
    assert not unused, f"declared in api/errors.py, raised nowhere: {unused}"
