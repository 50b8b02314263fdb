"""OpenAI's published OpenAPI document as JSON Schema validators (for the conformance tests).

The document is vendored in tests/data/openai/ (MIT, see SOURCE.md there;
`EPSERVE_OPENAI_OPENAPI` names another copy). It is OpenAPI 3.1, whose schemas are JSON
Schema 2020-12, except that it still writes OpenAPI 3.0's `nullable: true` in about a hundred
places: those are read here as "or null" (`{"anyOf": [schema, {"type": "null"}]}`), or a
stream chunk with `finish_reason: null` would fail for the wrong reason.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import referencing
from referencing.jsonschema import DRAFT202012

REPO = Path(__file__).resolve().parents[1]
DOCUMENT = REPO / "tests" / "data" / "openai" / "openapi.json"
BASE_URI = "urn:openai-openapi"


def document_path() -> Path:
    path = Path(os.environ.get("EPSERVE_OPENAI_OPENAPI") or DOCUMENT)
    if not path.is_file():
        raise FileNotFoundError(f"OpenAI's OpenAPI document is not at {path} (set "
                                f"EPSERVE_OPENAI_OPENAPI to its path)")
    return path


def nullable_as_null(node: Any) -> Any:
    """A copy of `node` with every `nullable: true` schema turned into "this schema or null"."""
    if isinstance(node, list):
        return [nullable_as_null(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: nullable_as_null(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def _registry() -> referencing.Registry:
    doc = nullable_as_null(json.loads(document_path().read_text(encoding="utf-8")))
    resource = referencing.Resource(contents=doc, specification=DRAFT202012)
    return referencing.Registry().with_resource(BASE_URI, resource)


def validator(schema_name: str, relax: Any = None) -> jsonschema.Draft202012Validator:
    """A validator of `#/components/schemas/<schema_name>`; `relax(schema)` may edit a copy of
    that schema first (each use says which rule of the document it departs from, and why)."""
    registry = _registry()
    doc = registry.contents(BASE_URI)
    if schema_name not in doc["components"]["schemas"]:
        raise KeyError(f"no component schema {schema_name!r} in {document_path()}")
    schema: dict[str, Any] = {"$ref": f"{BASE_URI}#/components/schemas/{schema_name}"}
    if relax is not None:
        schema = copy.deepcopy(doc["components"]["schemas"][schema_name])
        relax(schema)
        schema = {"$id": f"{BASE_URI}/relaxed/{schema_name}", **_absolute_refs(schema)}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _absolute_refs(node: Any) -> Any:
    if isinstance(node, list):
        return [_absolute_refs(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {key: (BASE_URI + value if key == "$ref" and value.startswith("#") else
                  _absolute_refs(value)) for key, value in node.items()}


def errors(schema_name: str, instance: Any, relax: Any = None) -> list[str]:
    """Every way `instance` departs from the schema, one line each (empty: it conforms)."""
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator(schema_name, relax).iter_errors(instance)]
