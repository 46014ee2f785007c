"""engine/protocol.py against the engine's request type and docs/protocol.md (the one page that
explains the protocol): a field added on one side must be added on the other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine import protocol
from engine.pipeline import AskRequest
from engine.request_checks import validate_common

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")


def test_ask_request_takes_exactly_the_protocol_fields():
    assert set(AskRequest.__dataclass_fields__) == set(protocol.ASK_FIELDS)


def test_shared_model_settings_are_ask_and_batch_fields():
    common = set(validate_common({}, protocol.STRATEGIES))
    assert common <= set(protocol.ASK_FIELDS)
    assert common <= set(protocol.BATCH_FIELDS)
    assert "faithful_empty_slots" in common


@pytest.mark.parametrize("name, fields", [
    ("ASK_FIELDS", protocol.ASK_FIELDS),
    ("BATCH_FIELDS", protocol.BATCH_FIELDS),
    ("result event", protocol.EVENT_TYPES["result"]),
])
def test_doc_names_every_field(name, fields):
    missing = [k for k in fields if not re.search(rf'"{k}"|`{k}`', DOC)]
    assert not missing, f"docs/protocol.md does not mention {name} {missing}"


def engine_sources() -> str:
    """The engine's code, protocol.py (where every code is declared) left out."""
    root = Path(__file__).resolve().parents[2] / "engine"
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.py"))
                     if p.name != "protocol.py")


def test_codes_the_engine_never_sends_are_documented_as_reserved():
    """The docs listed model_loading / no_weights as what a not-ready engine answers, but serve
    loads the model before it listens: such codes must be marked reserved, not promised."""
    source = engine_sources()
    sent = {code for code in protocol.ERROR_CODES if re.search(rf'\b{code}\b', source)}
    assert set(protocol.ERROR_CODES) - sent == set(protocol.RESERVED_ERROR_CODES)
    row = next(line for line in DOC.splitlines() if line.startswith("| `model_loading`"))
    assert "reserved, not sent by this version" in row
    assert "'loading' is reserved" in protocol.HEALTH_FIELDS["status"]
    assert "`loading` is reserved" in DOC
