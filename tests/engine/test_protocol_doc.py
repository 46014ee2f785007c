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
