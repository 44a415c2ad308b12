"""JSON Schemas (draft 2020-12) of the operator commands' JSON documents: ``status.schema.json`` for
``neuron-broker status --json`` (:class:`neuron_client.wire.status.StatusDoc`), ``ls.schema.json`` for
``neuron-ls --json`` (:class:`broker.ls.Listing`). tests/unit/test_schemas.py keeps them in step with the records."""
from __future__ import annotations

import json
import os

DIR = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
    """The schema file of document ``name`` (``status`` or ``ls``)."""
    return os.path.join(DIR, f"{name}.schema.json")


def load(name: str) -> dict:
    with open(path(name)) as f:
        return json.load(f)
