"""The JSON Schemas of ``neuron-broker status --json`` and ``neuron-ls --json`` (broker/schemas) say what the records
say: the same fields, all required, no others; and both documents share their field names. Real documents from a
real broker are validated in tests/integration/test_operator_tools.py."""
from __future__ import annotations

import dataclasses
import typing

import jsonschema
import pytest

from broker import ls, schemas
from neuron_client.wire import status
from tests.helpers import sample_status_doc


def records(root) -> dict[str, type]:
    """Every record type reachable from ``root``, by name."""
    out: dict[str, type] = {}

    def walk(hint):
        if dataclasses.is_dataclass(hint):
            if hint.__name__ not in out:
                out[hint.__name__] = hint
                for h in typing.get_type_hints(hint).values():
                    walk(h)
        for h in typing.get_args(hint):
            walk(h)

    walk(root)
    return out


@pytest.mark.parametrize("name, root", [("status", status.StatusDoc), ("ls", ls.Listing)])
def test_the_schema_file_matches_the_records(name, root):
    schema = schemas.load(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    defs = dict(schema["$defs"], **{root.__name__: schema})
    for cls_name, cls in records(root).items():
        assert cls_name in defs, f"{name}.schema.json has no definition of {cls_name}"
        part = defs[cls_name]
        fields = [f.name for f in dataclasses.fields(cls)]
        assert list(part["properties"]) == fields, cls_name
        assert part["required"] == fields and part["additionalProperties"] is False, cls_name
    assert schema["properties"]["schema"] == {"const": root.__dataclass_fields__["schema"].default}


def test_a_sample_document_validates_and_a_wrong_one_does_not():
    doc = sample_status_doc()
    jsonschema.validate(status.to_json(doc), schemas.load("status"))
    jsonschema.validate(status.to_json(ls.listing(doc)), schemas.load("ls"))
    old = status.to_json(doc)
    old["cores"][0]["core"] = old["cores"][0].pop("index")  # schema 1's name
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(old, schemas.load("status"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(status.to_json(doc), schema=1), schemas.load("status"))


def test_status_and_ls_share_their_field_names():
    """A field of the same meaning has one name in both documents: ls's owner and worker are status's records."""
    by_ls = typing.get_type_hints(ls.LsCore)
    assert by_ls["owner"] == typing.Optional[status.OwnerStatus] and by_ls["worker"] is status.WorkerStatus
    core_fields = {f.name for f in dataclasses.fields(status.CoreStatus)}
    assert {f.name for f in dataclasses.fields(ls.LsCore)} - {"models"} <= core_fields
    assert {f.name for f in dataclasses.fields(ls.LsBroker)} <= {f.name for f in dataclasses.fields(status.BrokerStatus)}
    assert {f.name for f in dataclasses.fields(ls.LsProcess)} <= {f.name for f in dataclasses.fields(status.LeaseStatus)}
    doc = status.to_json(sample_status_doc())
    listing = status.to_json(ls.listing(sample_status_doc()))
    for key in ("schema", "timestamp"):
        assert key in doc and key in listing
    assert doc["schema"] == listing["schema"] == 2


def test_a_document_of_a_broker_before_batcher_reports_still_decodes():
    """``leases[].batchers`` was added within schema 2: a document without it decodes, with no batchers."""
    doc = status.to_json(sample_status_doc())
    assert doc["leases"][0]["batchers"][0]["model"] == "m.pt"
    del doc["leases"][0]["batchers"]
    assert status.from_json(doc).leases[0].batchers == []
